"""The `peftlab` command end to end, in subprocesses: demo learning, the run directory,
eval reproducing the saved metrics, predict, merge, and one-line errors for mistakes."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import peftlab
import pytest
import yaml
from conftest import run_peftlab
from peftlab.domains.protein.data import demo_proteins
from peftlab.pipelines.cli import main
from peftlab.shared.errors import UserError


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ppi_run(tmp_path_factory) -> Path:
    """One `peftlab run protein-ppi --demo`, shared by the tests that reuse a run."""
    run_dir = tmp_path_factory.mktemp("runs") / "ppi"
    result = run_peftlab("run", "protein-ppi", "--demo", "--out", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_demo_learns_and_writes_the_run_directory(ppi_run):
    metrics = json.loads((ppi_run / "metrics.json").read_text())
    # The demo must learn: chance AUROC is 0.5 and chance AUPR the positive rate (~0.35).
    assert metrics["test"]["auroc"] >= 0.75
    assert metrics["test"]["aupr"] >= 0.55
    for name in ("run.yaml", "card.md", "meta.json", "metrics.json", "predictions/test.jsonl",
                 "predictions/validation.jsonl", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/head.safetensors", "adapter/method.json", "checkpoints/last/state.json",
                 "checkpoints/best/trainable.safetensors"):
        assert (ppi_run / name).exists(), name
    meta = json.loads((ppi_run / "meta.json").read_text())
    assert meta["task"] == "protein-ppi" and meta["method"]["name"] == "lora"
    assert meta["backbone"]["weights_sha256"] and meta["labels"] == ["no_interaction", "interaction"]
    assert meta["examples"] == {"train": 800, "validation": 200, "test": 300}  # the demo card's sizes
    assert 0 < metrics["params"]["percent"] < 100 and metrics["params"]["trainable"] < metrics["params"]["total"]
    assert set(metrics["train"]) >= {"samples_per_s", "seconds", "peak_rss_mb"}
    best = max(metrics["history"], key=lambda h: h["validation"]["aupr"])
    assert metrics["train"]["best_epoch"] == best["epoch"]
    assert metrics["validation"]["aupr"] == pytest.approx(best["validation"]["aupr"])
    lines = (ppi_run / "predictions" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 300 and {"protein_a", "protein_b", "score", "prediction", "label"} <= set(json.loads(lines[0]))
    assert json.loads(lines[0])["positive_class"] == "interaction"  # the class `score` is the probability of


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_eval_reproduces_the_saved_test_metrics_exactly(ppi_run):
    result = run_peftlab("eval", ppi_run, "--split", "test")
    assert result.returncode == 0, result.stderr[-2000:]
    tested = len((ppi_run / "predictions" / "test.jsonl").read_text().splitlines())
    assert f"test: {tested} examples of {ppi_run / 'card.md'}" in result.stderr
    saved = json.loads((ppi_run / "metrics.json").read_text())["test"]
    assert last_json(result.stdout)["test"] == saved


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_eval_writes_the_predictions_training_wrote(ppi_run, tmp_path):
    out = tmp_path / "eval" / "test.jsonl"
    result = run_peftlab("eval", ppi_run, "--split", "test", "--predictions", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_text() == (ppi_run / "predictions" / "test.jsonl").read_text()


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_predict_on_fasta_and_pairs(ppi_run, tmp_path):
    sequences, _ = demo_proteins(8, 12, 0)
    fasta = tmp_path / "proteins.fasta"
    max_length = yaml.safe_load((ppi_run / "run.yaml").read_text()).get("task", {}).get("max_length", 1022)
    sequences["long"] = "M" + "KT" * max_length  # longer than the run reads: predicted on a window, with a note
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in sequences.items()))
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("fam0_p0\tfam1_p3\nfam2_p1\tfam3_p5\nfam0_p0\tfam4_p2\nfam6_p0\tfam2_p2\nlong\tfam0_p0\n"
                     "fam0_p0\tfam1_p3\n")  # a pair listed twice: two rows, and a note
    out = tmp_path / "predictions.jsonl"
    result = run_peftlab("predict", ppi_run, fasta, pairs, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"note: 1 pair has a sequence longer than {max_length} residues: its start window is scored" in result.stderr
    assert "note: 1 ids name more than one input (e.g. 'fam0_p0|fam1_p3'); their prediction rows follow the input order" \
        in result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["protein_a"], r["protein_b"]) for r in rows][:2] == [("fam0_p0", "fam1_p3"), ("fam2_p1", "fam3_p5")]
    assert len(rows) == 6 and rows[5] == rows[0]
    assert all(0 <= r["score"] <= 1 for r in rows)
    # planted partners (0-1, 2-3) should outscore non-partners
    assert min(rows[0]["score"], rows[1]["score"]) > max(rows[2]["score"], rows[3]["score"])
    missing = run_peftlab("predict", ppi_run, fasta, tmp_path / "nothere.tsv")
    assert missing.returncode == 2 and "nothere.tsv: no such file or folder" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_eval_on_a_card_naming_the_classes_in_another_order(ppi_run, tmp_path, capsys):
    sequences, _ = demo_proteins(8, 12, 0)
    (tmp_path / "proteins.fasta").write_text("".join(f">{k}\n{v}\n" for k, v in sequences.items()))
    pairs = [("fam0_p0", "fam1_p3", 0), ("fam2_p1", "fam3_p5", 1), ("fam0_p0", "fam4_p2", 0), ("fam0_p1", "fam1_p2", 1)]
    results = {}
    for name, labels, flip in (("same", "[no_interaction, interaction]", False),
                               ("swapped", "[interaction, no_interaction]", True)):
        (tmp_path / f"{name}.tsv").write_text("".join(f"{a}\t{b}\t{1 - y if flip else y}\n" for a, b, y in pairs))
        card = tmp_path / f"{name}.md"
        card.write_text(f"---\nname: {name}\ndomain: protein\ntask: protein-ppi\nformat: fasta+pairs_tsv\n"
                        f"files: {{sequences: proteins.fasta}}\nlabels: {labels}\n"
                        f"splits: {{test: {name}.tsv, validation: {name}.tsv}}\n---\n")
        assert main(["eval", str(ppi_run), "--data", str(card)]) == 0
        captured = capsys.readouterr()
        results[name] = json.loads(captured.out.strip().splitlines()[-1])
    assert "names the classes in another order; its labels are matched to the run's by name" in captured.err
    assert results["swapped"]["test"] == results["same"]["test"] and results["same"]["test"]["auroc"] is not None
    (tmp_path / "other.md").write_text((tmp_path / "same.md").read_text().replace("no_interaction", "none"))
    assert main(["eval", str(ppi_run), "--data", str(tmp_path / "other.md")]) == 2
    assert "evaluation needs the classes the run was trained on" in capsys.readouterr().err


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_predict_on_a_card_equals_predict_on_its_files(ppi_run, tmp_path):
    sequences, _ = demo_proteins(8, 12, 0)
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text("".join(f">{k}\n{v}\n" for k, v in sequences.items()))
    pairs = tmp_path / "pairs.tsv"  # labelled (a card's data is), columns in the card's own order
    pairs.write_text("0\tfam0_p0\tfam1_p3\n1\tfam2_p1\tfam3_p5\n0\tfam0_p0\tfam4_p2\n")
    (tmp_path / "more-pairs.tsv").write_text("1\tfam5_p0\tfam6_p3\n0\tfam7_p1\tfam1_p5\n1\tfam2_p0\tfam4_p4\n")
    card = tmp_path / "new-pairs.md"
    card.write_text("---\nname: new\ndomain: protein\ntask: protein-ppi\nformat: fasta+pairs_tsv\n"
                    "files: {sequences: proteins.fasta}\nfields: {label: 0, protein_a: 1, protein_b: 2}\n"
                    "labels: [no_interaction, interaction]\nsplits: {test: pairs.tsv, validation: more-pairs.tsv}\n---\n")
    result = run_peftlab("predict", ppi_run, card, "--split", "test")
    assert result.returncode == 0, result.stderr[-2000:]
    by_card = [json.loads(line) for line in result.stdout.splitlines()]
    assert {row.pop("split") for row in by_card} == {"test"}
    unlabelled = tmp_path / "unlabelled.tsv"
    unlabelled.write_text("".join("\t".join(line.split("\t")[1:]) for line in pairs.read_text().splitlines(True)))
    by_files = run_peftlab("predict", ppi_run, fasta, unlabelled)  # read with the run card's columns: a, b
    assert by_files.returncode == 0, by_files.stderr[-2000:]
    assert by_card == [json.loads(line) for line in by_files.stdout.splitlines()]
    both = run_peftlab("predict", ppi_run, card)  # no --split: every split, each line naming its own
    assert [json.loads(line)["split"] for line in both.stdout.splitlines()] == ["test"] * 3 + ["validation"] * 3
    for arguments, message in [((card, "--split", "train"), "split 'train' is not in .*new-pairs.md; it has test, validation"),
                               ((card, fasta), "a data card is predicted on its own"),
                               ((fasta, unlabelled, "--split", "test"), "--split test picks a split of a data card")]:
        refused = run_peftlab("predict", ppi_run, *arguments)
        assert refused.returncode == 2 and re.search(message, refused.stderr), refused.stderr[-2000:]


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_merge_gives_a_run_that_evaluates_like_the_original(ppi_run, tmp_path, capsys, monkeypatch):
    merged = tmp_path / "merged"
    result = run_peftlab("merge", ppi_run, "--out", merged)
    assert result.returncode == 0, result.stderr[-2000:]
    method = json.loads((merged / "meta.json").read_text())["method"]
    assert method["name"] == "full" and method["merged_from"]["run_dir"] == str(ppi_run.resolve())
    # its parameter counts are the merged model's (no LoRA matrices); the adapter's stay with merged_from
    adapter_params, merged_params = (json.loads((run / "meta.json").read_text())["params"] for run in (ppi_run, merged))
    assert method["merged_from"]["params"] == adapter_params
    assert merged_params["total"] == adapter_params["total"] - adapter_params["method"]
    resumed = run_peftlab("run", "--resume", merged)  # not an unfinished run: nothing to resume, nothing overwritten
    assert resumed.returncode == 2 and f"{merged} is a merged model (`peftlab merge` of {ppi_run.resolve()})" in resumed.stderr
    assert not (merged / "metrics.json").exists() and not (merged / "checkpoints").exists()
    # its run.yaml is the config that trained the adapter; repeating it says what it repeats
    assert (merged / "run.yaml").read_text() == (ppi_run / "run.yaml").read_text()
    from peftlab.pipelines import runner

    config = runner.build_config(None, config_file=str(merged / "run.yaml"))
    assert config.method_name == "lora"
    assert f"note: {merged} is a merged model; its run.yaml repeats the training of {ppi_run.resolve()} (lora " \
        in capsys.readouterr().err
    served = peftlab.load([f"m={merged}"])  # serve's /adapters names what a merged run came from
    assert served.summary()[0]["merged_from"] == {"run": ppi_run.name, "method": "lora"}  # a name: no server paths
    evaluated = run_peftlab("eval", merged)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    saved = json.loads((ppi_run / "metrics.json").read_text())["test"]
    # bf16 autocast rounds merged and separate weights differently: close, not equal
    assert last_json(evaluated.stdout)["test"]["auroc"] == pytest.approx(saved["auroc"], abs=0.01)
    # merging it again would only copy it under a second merged_from: refused before its backbone loads
    from peftlab.pipelines import predictor

    monkeypatch.setattr(predictor, "load", lambda *args, **kwargs: pytest.fail("the backbone loaded before the refusal"))
    assert main(["merge", str(merged), "--out", str(tmp_path / "twice")]) == 2
    assert f"error: {merged}: a merged run has no adapter to merge: its weights are the whole backbone; use it as it " \
           f"is (eval, predict, serve), or --export it in its library's format" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()
    # so are a non-empty --out, and --export of a task without an export format
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["merge", str(ppi_run), "--out", str(tmp_path / "taken")]) == 2
    assert f"error: {tmp_path / 'taken'} exists and is not empty; choose another --out" in capsys.readouterr().err
    reasoning = tmp_path / "reasoning-run"
    reasoning.mkdir()
    (reasoning / "meta.json").write_text(json.dumps({"task": "reasoning-arithmetic", "method": {"name": "lora"}}))
    assert main(["merge", str(reasoning), "--export", str(tmp_path / "exported")]) == 2
    assert "error: task 'reasoning-arithmetic' has no export format; `peftlab merge --out` writes a merged run" \
        in capsys.readouterr().err
    # a full fine-tuning run of such a task is sent neither to --export nor back to merge --out: the advice went in a circle
    (reasoning / "meta.json").write_text(json.dumps({"task": "reasoning-arithmetic", "method": {"name": "full"}}))
    assert main(["merge", str(reasoning), "--out", str(tmp_path / "merged-full")]) == 2
    assert f"error: {reasoning}: a full fine-tuning run has no adapter to merge: its weights are the whole backbone; " \
           f"use it as it is (eval, predict, serve)\n" in capsys.readouterr().err
    assert main(["merge", str(reasoning), "--export", str(tmp_path / "exported")]) == 2
    assert "error: task 'reasoning-arithmetic' has no export format; use the run as it is (eval, predict, serve)" \
        in capsys.readouterr().err


def test_list_and_help():
    result = run_peftlab("list")
    assert result.returncode == 0
    for expected in ("protein-ppi", "lora", "ssf", "esm2_t33_650M_UR50D", "data_cards/protein-ppi-demo.md"):
        assert expected in result.stdout
    # --demo's method where it is not the recipe's (a tiny random-init model has nothing for LoReFT to steer)
    assert "method=loreft (--demo: full on tiny-wide)" in result.stdout
    for command in (["run"], ["eval"], ["predict"], ["merge"], ["card", "validate"], ["card", "new"], ["list"]):
        assert run_peftlab(*command, "--help").returncode == 0


ERRORS = [
    (["run", "protein-pip", "--demo"], "unknown pipeline 'protein-pip'"),
    (["run", "protein-ppi", "--demo", "--method", "lorra"], "unknown PEFT method 'lorra'"),
    (["run", "protein-ppi", "--demo", "--backbone", "esm3_huge"], "unknown ESM-2 backbone 'esm3_huge'"),
    (["run", "protein-ppi", "--demo", "train.lrr=1"], "unknown config key 'train.lrr'; valid train keys"),
    (["run", "protein-ppi", "--demo", "train.lr=-1"], "train.lr: Input should be greater than 0"),
    (["run", "protein-ppi", "--demo", "method.rank=4"], "has no option 'rank'"),
    (["run", "protein-ppi", "--demo", "task.crop_train=sideways"], "crop_train must be random, start or center"),
    (["run", "protein-ppi", "--demo", "--data", "missing-card.md"], "data card missing-card.md does not exist"),
    (["run", "protein-ppi", "--demo", "--data", "data_cards/protein-classify-demo.md"], "the card is for task 'protein-classify'"),
    # another task's card names fields or split keys this task does not read: the task mismatch is what to say
    (["run", "medical-classify", "--demo", "--data", "data_cards/peptides-amp.md"], "the card is for task 'protein-classify'"),
    (["run", "medical-classify", "--demo", "--data", "data_cards/emodb-subset.md"], "the card is for task 'speech-emotion'"),
    (["run", "protein-ppi", "--demo", "train.lr"], "is not key=value"),
    (["eval", "not-a-run"], "not-a-run: no such run directory"),
    (["card", "validate", "nowhere.md"], "does not exist"),
    (["run", "protein-ppi", "--backbone", "esm2_t6_8M_UR50D", "--demo"], "is not available offline"),
    # a resumed run follows its run.yaml: other settings were silently ignored
    (["run", "--resume", "some-run", "train.epochs=8"], "--resume some-run: continues the run as its run.yaml says "
                                                        "and takes no other settings (got train.epochs=8)"),
    (["run", "protein-ppi", "--resume", "some-run", "--method", "dora", "--demo"],
     "(got protein-ppi --demo --method); drop them, or start a new run with them"),
]


@pytest.mark.parametrize("argv, message", ERRORS)
def test_user_mistakes_give_one_line_and_exit_code_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.json"))


def test_bad_fasta_in_a_subprocess_names_file_and_line(tmp_path):
    (tmp_path / "s.fasta").write_text(">a\nMKT\n>b\nMK9T\n")
    (tmp_path / "p.tsv").write_text("a\tb\t1\n")
    card = tmp_path / "card.md"
    card.write_text("---\nname: bad\ndomain: protein\ntask: protein-ppi\nformat: fasta+pairs_tsv\n"
                    "files: {sequences: s.fasta, pairs: p.tsv}\n---\nbad\n")
    result = run_peftlab("run", "protein-ppi", "--demo", "--data", card, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 's.fasta'}:4:")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_python_api_mirrors_the_cli(tmp_path):
    import peftlab

    run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / "run", overrides={"train.epochs": 2})
    predictor = peftlab.load(run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert predictor.evaluate("test") == saved["test"]
    assert saved["test"]["accuracy"] > 0.5  # 4 classes: chance is 0.25
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">q1\nMKTAYIAKQRQISFVKSHF\n>q2\nGGGGGGGGGGG\n")
    rows = predictor.predict([fasta])
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert sum(rows[0]["scores"].values()) == pytest.approx(1.0, abs=1e-4)
    by_hand = predictor.predict([{"id": "q1", "seq": "MKTAYIAKQRQISFVKSHF"}])  # example dicts as the reader makes them
    assert by_hand[0]["scores"] == pytest.approx(rows[0]["scores"], abs=1e-6)  # alone, not batched with q2
    with pytest.raises(UserError, match="an example dict lacks the field 'seq' that protein-classify reads"):
        predictor.predict([{"sequence": "MKV"}])  # a misnamed field: one line, not a KeyError
    # a value the model cannot read is not a missing field (the tokenizer's KeyError read as "lacks the field '1'")
    with pytest.raises(UserError, match=r"^an example dict holds a value protein-classify cannot read \(KeyError: '1'\)"):
        predictor.predict([{"seq": "MKT123"}])
    with pytest.raises(UserError, match=r"^an example dict holds a value protein-classify cannot read \(TypeError: "):
        predictor.predict([{"seq": 5}])
    assert json.dumps(predictor.predict([{"id": tmp_path / "x", "seq": "MKV"}]))  # a Path comes back as text
    # what is neither a path, a dict nor a list of them is refused by name, not iterated
    for wrong, named in [(5, "not int"), (None, "not NoneType"), (b"q.fasta", "not bytes")]:
        with pytest.raises(UserError, match=f"^predict takes a path .*, {named}$"):
            predictor.predict(wrong)
    for wrong in (None, 5):
        with pytest.raises(UserError, match=f"^a run directory is a path \\(str or Path\\), not {type(wrong).__name__}$"):
            peftlab.load(wrong)
    with pytest.raises(UserError, match=r"^overrides='train.epochs=1': give a dict"):
        peftlab.run("protein-classify", demo=True, overrides="train.epochs=1")
    with pytest.raises(UserError, match=r"^resume='.*run' continues the run as its run.yaml says and takes no other "
                                        r"arguments \(got pipeline, method\)"):
        peftlab.run("protein-classify", method="bitfit", resume=run_dir)
    repeated = run_peftlab("run", "--config", run_dir / "run.yaml", "--out", tmp_path / "again", "train.epochs=1")
    assert repeated.returncode == 0, repeated.stderr[-2000:]


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_repeating_a_run_from_its_run_yaml_notes_a_card_that_changed_since(ppi_run, tmp_path, capsys):
    """`run --config RUN/run.yaml` reads the card as it is now: where that is not the card
    the run read (RUN/card.md), the repeat is another experiment, and a note says so."""
    from peftlab.pipelines import config as cfg
    from peftlab.pipelines import runner

    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "run.yaml").write_text((ppi_run / "run.yaml").read_text())
    (copy / "card.md").write_text((ppi_run / "card.md").read_text())
    config = runner.build_config(config_file=str(copy / "run.yaml"))
    assert "has changed since" not in capsys.readouterr().err
    (copy / "card.md").write_text((ppi_run / "card.md").read_text().replace("seed: 0", "seed: 1"))
    assert runner.build_config(config_file=str(copy / "run.yaml")) == config
    card = cfg.resolve_card_path(config.data.card)
    assert f"note: {card} has changed since {copy} trained on it; this run reads it as it is now " \
           f"(the card that run read is {copy / 'card.md'})" in capsys.readouterr().err
    runner.build_config(config_file=str(copy / "run.yaml"), data=str(tmp_path / "another.md"))
    assert "has changed since" not in capsys.readouterr().err  # another card named: not a repeat of that run


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_adapter_on_other_backbone_weights_is_refused_unless_forced(ppi_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ppi_run, copy, symlinks=True)
    meta = json.loads((copy / "meta.json").read_text())
    meta["backbone"]["weights_sha256"] = "0" * 64  # as if trained on other weights
    (copy / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", str(copy)]) == 2
    assert "pass --force to use it anyway" in capsys.readouterr().err
    assert main(["eval", str(copy), "--force"]) == 0


@pytest.mark.xdist_group("ppi-demo-run")  # one worker trains the shared run once
def test_eval_and_predict_refuse_a_bad_request_before_the_backbone_loads(ppi_run, tmp_path, capsys, monkeypatch):
    """A wrong split or a missing file costs no backbone load (seconds to minutes for a
    large model) and still ends in one line with exit code 2."""
    from peftlab.shared.tasks import get_task

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(type(get_task("protein-ppi")), "build_model", no_backbone)
    assert main(["eval", str(ppi_run), "--split", "dev"]) == 2
    assert re.search(r"split 'dev' is not in \S+; it has train, validation, test", capsys.readouterr().err)
    assert main(["predict", str(ppi_run), str(tmp_path / "absent.fasta"), str(tmp_path / "absent.tsv")]) == 2
    assert "absent.fasta: no such file or folder" in capsys.readouterr().err
    card = ppi_run / "card.md"
    assert main(["predict", str(ppi_run), str(card), "--split", "dev"]) == 2
    assert "split 'dev' is not in" in capsys.readouterr().err


def test_naming_the_recipes_own_method_keeps_its_options_and_another_method_drops_them():
    from peftlab.pipelines import runner

    own = runner.build_config("protein-classify", method="lora")
    other = runner.build_config("protein-classify", method="dora")
    recipe = runner.build_config("protein-classify")
    assert own.method == recipe.method  # alpha 32, dropout 0.1 from the recipe
    assert other.method == {"name": "dora"}
    # with --demo too, where the demo trains another method (full): LoReFT keeps the recipe's rank and positions
    demo_loreft = runner.build_config("reasoning-commonsense", demo=True, method="loreft")
    assert demo_loreft.method == runner.build_config("reasoning-commonsense").method
    assert demo_loreft.method["rank"] == 8 and demo_loreft.backbone.name == "tiny"


def test_tqdm_disable_hides_the_training_and_evaluation_bars(tmp_path):
    """The bars passed `disable=False` where shown, which overrides tqdm's TQDM_DISABLE."""
    budget = ["train.epochs=1", "train.max_steps=2", "data.limit.train=16", "data.limit.validation=8",
              "data.limit.test=8"]
    shown = run_peftlab("run", "protein-classify", "--demo", "--out", tmp_path / "shown", *budget)
    hidden = run_peftlab("run", "protein-classify", "--demo", "--out", tmp_path / "hidden", *budget,
                         env={"TQDM_DISABLE": "1"})
    assert shown.returncode == hidden.returncode == 0, hidden.stderr[-2000:]
    assert "step/s" in shown.stderr and "evaluate test" in shown.stderr
    assert "step/s" not in hidden.stderr and "evaluate" not in hidden.stderr and "%|" not in hidden.stderr
    assert "epoch 1: train loss" in hidden.stderr  # what the run says still shows


def test_a_mistake_met_mid_training_is_a_line_of_its_own_after_the_bar(tmp_path, capsys, monkeypatch):
    """A mistake found at a training step (an undecodable video, say) ends the progress bar's
    line before the error, which stays one line that starts with `error: `."""
    from peftlab.domains.protein import tasks as protein_tasks

    def unreadable(self, batch):
        raise UserError("x.mp4: cannot be decoded as a video")

    monkeypatch.setattr(protein_tasks.ClassifyModel, "forward", unreadable)
    assert main(["run", "protein-classify", "--demo", "--out", str(tmp_path / "run"), "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.endswith("\nerror: x.mp4: cannot be decoded as a video\n"), err[-300:]
    assert "train:" in err  # the bar was there, on its own line


def test_a_card_without_validation_runs_with_the_recipes_evaluated_splits(tmp_path, capsys):
    """`validation_fraction: 0` or ratios without validation is documented to train on all
    of train and keep the last epoch; the recipes evaluate [validation, test], so the run
    evaluates the split it has, and says so, rather than refusing the card."""
    rows = ["sequence,label"] + [f"{'MKTAYIAKQR'[: 5 + i % 5]}{'GW'[i % 2] * 6},{i % 2}" for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    card = tmp_path / "card.md"
    card.write_text("---\nname: noval\ndomain: protein\ntask: protein-classify\nformat: csv\nfiles: {data: d.csv}\n"
                    "splits: {ratios: {train: 0.8, test: 0.2}}\n---\n")
    assert main(["run", "protein-classify", "--backbone", "tiny", "--data", str(card), "--out", str(tmp_path / "run"),
                 "train.max_steps=2"]) == 0
    err = capsys.readouterr().err
    assert "note: the data has no validation split; eval.splits is ['test']" in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "test" in metrics and "validation" not in metrics
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["eval"]["splits"] == ["test"]
    # a split the data lacks that is not validation is still refused
    assert main(["run", "protein-classify", "--backbone", "tiny", "--data", str(card), "--out", str(tmp_path / "other"),
                 "eval.splits=[validation]"]) == 2


def test_resume_of_a_run_another_process_is_training_is_refused(tmp_path, capsys):
    """Training holds a lock on run.yaml; `--resume` of the same run from a second process
    stops with one line instead of two processes writing one directory."""
    import fcntl

    run_dir = tmp_path / "run"
    assert main(["run", "protein-classify", "--demo", "--out", str(run_dir), "train.max_steps=1", "train.epochs=1"]) == 0
    (run_dir / "metrics.json").unlink()  # as if the first process were still training
    with open(run_dir / "run.yaml", "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        resumed = run_peftlab("run", "--resume", run_dir)
    assert resumed.returncode == 2, resumed.stderr[-2000:]
    assert resumed.stderr.strip().splitlines() == [
        f"error: {run_dir}: another peftlab process is training this run; let it finish, or stop it and then resume"]
    assert not (run_dir / "metrics.json").exists()
    capsys.readouterr()
    assert main(["run", "--resume", str(run_dir)]) == 0 and (run_dir / "metrics.json").is_file()  # the lock is gone


def test_a_run_killed_before_its_start_was_written_resumes_to_a_reusable_run(tmp_path, capsys):
    """Killed after run.yaml but before card.md and meta.json: `--resume` trained it to the
    end, yet without meta.json eval / predict / merge refused it and sent the user back to
    --resume, which said the run was finished."""
    finished = tmp_path / "finished"
    assert main(["run", "protein-classify", "--demo", "--out", str(finished), "train.max_steps=2", "train.epochs=1"]) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(finished / "run.yaml", killed / "run.yaml")
    assert main(["run", "--resume", str(killed)]) == 0
    written, original = (json.loads((run / "meta.json").read_text()) for run in (killed, finished))
    assert written.pop("created") >= original.pop("created") and written == original
    assert (killed / "card.md").read_text() == (finished / "card.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(killed), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == json.loads((finished / "metrics.json").read_text())["test"]
