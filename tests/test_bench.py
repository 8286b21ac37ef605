"""`peftlab bench`: a small sweep on the protein-classify demo, its results, table and plot,
resuming, failing and skipped cells, up-front validation, and the aggregation helpers.

The sweep runs its cells in this process (`isolate=False`): the default, a fresh process
per cell, pays the package imports per cell, so one test runs a single cell that way.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from peftlab.pipelines import bench
from peftlab.pipelines.cli import main
from peftlab.shared.errors import UserError
from peftlab.shared.methods.registry import Applied, MethodSpec

PIPELINE = "protein-classify"
BUDGET = ["train.epochs=1", "train.max_steps=2", "data.limit.train=32", "data.limit.validation=16", "data.limit.test=16"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class NoOptions:
    pass


def _explode(module, inputs):
    raise RuntimeError("boom in the forward pass")


def _apply_exploding(model, options):
    model.register_forward_pre_hook(_explode)
    return Applied(model, [])


EXPLODING = MethodSpec("explode", NoOptions, _apply_exploding, "test method whose forward pass raises",
                       mergeable=False, identity_at_init=True)


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def exploding_method():
    """A method that passes every up-front check and fails inside training; registered
    only while this module runs, so other tests never see it."""
    from peftlab.shared.methods import registry

    registry.get_method("full")  # the built-ins first, so the patch only adds a name
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._METHODS, "explode", EXPLODING)
        yield


def run_sweep(out: Path) -> Path:
    return bench.bench(PIPELINE, "bitfit,explode,vpt", seeds=2, demo=True, out=out, overrides=BUDGET, isolate=False)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, exploding_method) -> Path:
    return run_sweep(tmp_path_factory.mktemp("bench") / "sweep")


def test_every_cell_is_recorded_finished_failed_or_skipped(sweep):
    rows = read_rows(sweep)
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [
        ("full", 0, "finished"), ("full", 1, "finished"), ("bitfit", 0, "finished"), ("bitfit", 1, "finished"),
        ("explode", 0, "failed"), ("explode", 1, "failed"), ("vpt", 0, "skipped"), ("vpt", 1, "skipped")]
    for row in rows[:4]:
        assert row["primary_metric"] == "accuracy" and row["split"] == "test"
        assert set(row["metrics"]) == {"accuracy", "macro_f1", "auroc"}
        assert all(0.0 <= value <= 1.0 for value in row["metrics"].values())
        saved = json.loads((sweep / row["run_dir"] / "metrics.json").read_text())
        assert row["metrics"] == saved["test"] and row["params"]["trainable"] == saved["params"]["trainable"]
        adapter = sweep / row["run_dir"] / "adapter"
        assert row["adapter_bytes"] == sum(p.stat().st_size for p in adapter.rglob("*") if p.is_file()) > 0
        assert row["train_seconds"] > 0 and row["samples_per_s"] > 0
        assert row["peak_rss_mb"] is None  # in one process it cannot be told apart per cell
    assert rows[0]["params"]["percent"] == 100.0 and 0 < rows[2]["params"]["percent"] < 100
    # train.seed = base seed (the recipe's 0) + k
    assert [yaml.safe_load((sweep / r["run_dir"] / "run.yaml").read_text())["train"]["seed"] for r in rows[:4]] == [0, 1, 0, 1]
    assert rows[4]["error"] == "RuntimeError: boom in the forward pass"
    assert "does not fit the ESMEncoder backbone" in rows[6]["error"]
    assert not (sweep / "runs" / "vpt-seed0").exists()


def test_table_holds_mean_and_std_recomputed_from_the_results(sweep):
    rows = [r for r in read_rows(sweep) if r["status"] == "finished"]
    table = (sweep / "table.md").read_text()
    table_rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert table_rows[0].startswith("| full (reference) | 2/2 |") and table_rows[1].startswith("| bitfit | 2/2 |")
    with open(sweep / "table.csv", newline="") as handle:
        by_method = {row["method"]: row for row in csv.DictReader(handle)}
    means = {}
    for method in ("full", "bitfit"):
        for metric in ("accuracy", "macro_f1", "auroc"):
            values = [r["metrics"][metric] for r in rows if r["method"] == method]
            mean, std = statistics.fmean(values), statistics.stdev(values)
            means[method, metric] = mean
            assert float(by_method[method][f"{metric}_mean"]) == mean
            assert float(by_method[method][f"{metric}_std"]) == std
            assert f"{mean:.4f} ± {std:.4f}" in table_rows[0 if method == "full" else 1]
    delta = means["bitfit", "accuracy"] - means["full", "accuracy"]
    assert float(by_method["bitfit"]["delta_accuracy_vs_full"]) == delta
    assert f"| {delta:+.4f} |" in table_rows[1]
    assert by_method["explode"]["status"] == "failed" and "boom" in by_method["explode"]["error"]
    assert by_method["vpt"]["status"] == "skipped"
    assert "- explode: 2 of 2 cells failed: RuntimeError: boom in the forward pass" in table
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header.index("accuracy") < header.index("macro_f1") < header.index("auroc") < header.index("peak RSS MB")


def test_pareto_plot_is_a_png(sweep):
    assert (sweep / "pareto.png").read_bytes()[:8] == PNG_MAGIC


def test_rerun_skips_finished_cells_resumes_killed_ones_and_retries_failures(sweep):
    before = {r["cell"]: r for r in read_rows(sweep)}
    finished = ["full-seed0", "bitfit-seed0"]
    mtimes = {cell: (sweep / "runs" / cell / "metrics.json").stat().st_mtime_ns for cell in finished}
    # full-seed1 killed after training but before its metrics; bitfit-seed1 killed before its run.yaml
    (sweep / "runs" / "full-seed1" / "metrics.json").unlink()
    bitfit_dir = sweep / "runs" / "bitfit-seed1"
    shutil.rmtree(bitfit_dir)
    bitfit_dir.mkdir()
    (bitfit_dir / "partial.tmp").write_text("left by a killed process")
    explode_log = (sweep / "logs" / "explode-seed0.log").stat().st_mtime_ns
    full_log = (sweep / "logs" / "full-seed1.log").read_text()

    run_sweep(sweep)

    after = {r["cell"]: r for r in read_rows(sweep)}
    assert {cell: (sweep / "runs" / cell / "metrics.json").stat().st_mtime_ns for cell in finished} == mtimes
    resumed_log = (sweep / "logs" / "full-seed1.log").read_text()
    assert resumed_log.startswith(full_log) and "resumed from step 2" in resumed_log.removeprefix(full_log)
    assert not (bitfit_dir / "partial.tmp").exists()
    for cell in ("full-seed1", "bitfit-seed1"):  # the same seed gives the same model, so the same metrics
        assert after[cell]["metrics"] == before[cell]["metrics"]
    assert after["explode-seed0"]["status"] == "failed"
    assert (sweep / "logs" / "explode-seed0.log").stat().st_mtime_ns > explode_log


def test_rerun_with_other_settings_is_refused(sweep, capsys):
    files = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    code = main(["bench", PIPELINE, "--demo", "--methods", "bitfit", "--out", str(sweep), "--in-process", *BUDGET[1:]])
    assert code == 2
    assert "other settings (overrides: train.epochs: 1 -> " in capsys.readouterr().err  # the key, as it acts
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == files


def test_rerun_with_overrides_that_act_alike_resumes(sweep, tmp_path, capsys):
    """The sweep's overrides in another order, and one more that gives a setting its default
    value, build the same configs: the sweep resumes, trains no finished cell again and
    retries only the failing ones."""
    sweep = Path(shutil.copytree(sweep, tmp_path / "sweep", ignore=shutil.ignore_patterns(bench.LOCK_FILE)))
    mtimes = {path: path.stat().st_mtime_ns for path in sweep.glob("runs/*/metrics.json")}
    recipe = bench.runner.build_config(PIPELINE, demo=True, overrides=BUDGET)
    code = main(["bench", PIPELINE, "--demo", "--methods", "bitfit,explode,vpt", "--seeds", "2", "--out", str(sweep),
                 "--in-process", *reversed(BUDGET), f"train.weight_decay={recipe.train.weight_decay}"])
    err = capsys.readouterr().err
    assert code == 1 and "other settings" not in err and "2 of 8 cells failed (explode-seed0, explode-seed1)" in err, err
    assert {path: path.stat().st_mtime_ns for path in sweep.glob("runs/*/metrics.json")} == mtimes


def test_rerun_after_the_recipe_changed_is_refused_naming_the_cell_and_setting(sweep, monkeypatch, capsys):
    """The same command, but the recipe (edited, or changed by a package update) now gives
    another weight decay and LoRA rank: finished cells were trained otherwise."""
    original = bench.cfg.read_recipe

    def edited(pipeline):
        recipe = original(pipeline)
        recipe["train"]["weight_decay"] = 0.05
        return recipe

    files = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    monkeypatch.setattr(bench.cfg, "read_recipe", edited)
    code = main(["bench", PIPELINE, "--demo", "--methods", "bitfit,explode,vpt", "--seeds", "2", "--out", str(sweep),
                 "--in-process", *BUDGET])
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(r"runs/full-seed0/run.yaml: cell full-seed0 was trained with other settings than the same "
                     r"command gives now \(train.weight_decay: 0.01 -> 0.05\)", err), err
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == files
    monkeypatch.setattr(bench.cfg, "read_recipe", original)
    bitfit = sweep / "runs" / "bitfit-seed1" / "run.yaml"
    same = bench.runner.build_config(PIPELINE, demo=True, method="bitfit", overrides=[*BUDGET, "train.seed=1"])
    assert bench._config_changes(same, bitfit) == []
    # the package (and its demo card) installed from another folder: the same data, resumable
    moved = (sweep.parent / "elsewhere" / "protein-classify-demo.md")
    moved.parent.mkdir(exist_ok=True)
    moved.write_text(Path(same.data.card if Path(same.data.card).is_absolute() else
                          bench.cfg.resolve_card_path(same.data.card)).read_text())
    assert bench._config_changes(same.model_copy(update={"data": same.data.model_copy(update={"card": str(moved)})}),
                                 bitfit) == []
    narrower = bench.runner.build_config(PIPELINE, demo=True, method="bitfit",
                                         overrides=[*BUDGET, "train.seed=1", "method.target_modules=[fc2]"])
    changes = bench._config_changes(narrower, bitfit)
    assert changes == ["method.target_modules: None -> ['fc2']"]

@pytest.mark.parametrize("arguments, message", [
    (["no-such-pipeline", "--methods", "lora"], "unknown pipeline 'no-such-pipeline'"),
    ([PIPELINE, "--demo", "--methods", "lora,nope"], "unknown PEFT method 'nope'"),
    ([PIPELINE, "--demo", "--methods", "lora,bitfit", "method.rank=4"],
     "method.rank=4: no method of the sweep (full, lora, bitfit) has option 'rank'"),
    ([PIPELINE, "--demo", "--methods", "lora", "--backbone", "no/such/esm.pt"],
     "ESM-2 backbone 'no/such/esm.pt': no such file or folder"),
    ([PIPELINE, "--demo", "--methods", "lora", "--columns", "accuracy,acuracy"],
     "--columns: 'acuracy' is not a metric of this sweep; its metrics: accuracy, macro_f1, auroc"),
    ([PIPELINE, "--demo", "--methods", "lora", "--columns", "accuracy,auroc_x"], "--columns: 'auroc_x' is not a metric"),
    ([PIPELINE, "--demo", "--methods", "lora", "train.nope=1"], "unknown config key 'train.nope'"),
    # found only on reading the data: once up front, not as a failure in every cell
    ([PIPELINE, "--demo", "--methods", "lora", "data.limit.dev=3"], "data.limit names split 'dev'"),
])
def test_mistakes_stop_before_any_training(tmp_path, capsys, arguments, message):
    out = tmp_path / "sweep"
    assert main(["bench", *arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]
    assert not out.exists()


def test_a_cell_in_its_own_process_reports_its_own_peak_memory(tmp_path):
    out = bench.bench(PIPELINE, ["bitfit"], demo=True, full=False, out=tmp_path / "sweep", overrides=BUDGET)
    [row] = read_rows(out)
    assert row["status"] == "finished", row
    recorded = json.loads((out / "runs" / "bitfit-seed0" / bench.PEAK_FILE).read_text())
    assert row["peak_rss_mb"] == recorded["peak_rss_mb"] > 100  # torch alone is more than 100 MB resident
    assert f"| {row['peak_rss_mb']:.0f} |" in (out / "table.md").read_text()
    # the random-init tiny backbone has the same weights digest in another process: resumable
    bench._check_out_dir(bench.plan(PIPELINE, ["bitfit"], seeds=1, demo=True, data=None, backbone=None, out=out,
                                    full=False, overrides=BUDGET))


def test_pareto_front_on_hand_made_points():
    points = [(1.0, 0.50), (2.0, 0.60), (3.0, 0.55), (0.5, 0.40), (2.0, 0.60), (0.5, 0.30), (100.0, 0.70)]
    # (3, .55) is beaten by (2, .60); (.5, .30) by (.5, .40); the two equal points both stay
    assert bench.pareto_front(points) == [0, 1, 3, 4, 6]
    # lower is better (e.g. a rank): fewer parameters and a lower value win
    assert bench.pareto_front([(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (10.0, 1.0)], higher_is_better=False) == [0, 1, 3]
    assert bench.pareto_front([]) == []


def row(method, seed, accuracy, status="finished", **extra):
    if status != "finished":
        return {"method": method, "seed": seed, "status": status, "error": f"{method} {status}"}
    return {"method": method, "seed": seed, "status": "finished", "metrics": {"accuracy": accuracy, **extra},
            "params": {"trainable": 10, "total": 100, "percent": 10.0}, "adapter_bytes": 2048,
            "train_seconds": 1.0 + seed, "samples_per_s": 10.0 * (seed + 1), "peak_rss_mb": 500.0 + seed,
            "peak_gpu_mb": None}


def test_summaries_of_hand_made_rows():
    rows = [row("lora", 0, 0.25, **{"acc/boolq": 0.5}), row("lora", 1, 0.5), row("lora", 2, 0.75),
            row("full", 0, 0.5), row("full", 1, None, status="failed"), row("vpt", 0, None, status="skipped")]
    lora, full, vpt = bench.summarise(rows)
    assert lora.metrics == {"accuracy": (0.5, 0.25), "acc/boolq": (0.5, None)}
    assert (lora.finished, lora.cells, lora.train_seconds, lora.samples_per_s, lora.peak_rss_mb) == (3, 3, 2.0, 20.0, 502.0)
    assert full.metrics == {"accuracy": (0.5, None)} and full.errors == ["full failed"] and full.finished == 1
    assert vpt.status == "skipped" and vpt.finished == 0 and vpt.errors == ["vpt skipped"]
    assert [s.method for s in bench.order_reference_first([lora, full, vpt])] == ["full", "lora", "vpt"]
    # every scalar metric the runs report becomes a column, the primary first
    assert bench.metric_columns([lora, full], "accuracy") == ["accuracy", "acc/boolq"]
    assert bench.metric_columns([lora, full], "accuracy", ["acc/boolq"]) == ["acc/boolq"]
    with pytest.raises(bench.UserError, match="no run reports 'f1'"):
        bench.metric_columns([lora], "accuracy", ["f1"])
    assert bench.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)


def test_the_recipes_own_method_keeps_the_recipes_options():
    sweep = bench.plan(PIPELINE, "lora,bitfit", seeds=2, demo=True, data=None, backbone=None, out=None, full=False,
                       overrides=["train.seed=7"])
    assert [(cell.name, cell.config.train.seed) for cell in sweep.cells] == [
        ("lora-seed7", 7), ("lora-seed8", 8), ("bitfit-seed7", 7), ("bitfit-seed8", 8)]
    recipe = yaml.safe_load((Path(bench.cfg.RECIPES) / f"{PIPELINE}.yaml").read_text())
    assert sweep.cells[0].config.method == recipe["method"] and sweep.cells[2].config.method == {"name": "bitfit"}
    assert not sweep.out.exists()


def test_method_options_go_to_the_methods_that_have_them(capsys):
    sweep = bench.plan(PIPELINE, "lora,bitfit", seeds=1, demo=True, data=None, backbone=None, out=None, full=True,
                       overrides=["method.r=4", "train.max_steps=2"])
    by_method = {cell.method: cell for cell in sweep.cells}
    assert by_method["lora"].config.method["r"] == 4 and "method.r=4" in by_method["lora"].overrides
    assert by_method["full"].config.method == {"name": "full"} and by_method["bitfit"].config.method == {"name": "bitfit"}
    assert all(cell.config.train.max_steps == 2 for cell in sweep.cells)
    assert "note: method.r=4 applies to lora; full, bitfit have no option 'r'" in capsys.readouterr().err


def test_resume_settings_compare_what_they_do_not_how_they_were_typed(tmp_path, monkeypatch):
    card = bench.cfg.PACKAGE_ROOT / "data_cards" / "protein-classify-demo.md"
    monkeypatch.chdir(card.parent)
    typed = {"pipeline": PIPELINE, "demo": True, "data": card.name, "backbone": None,
             "overrides": ["train.max_steps=2", "train.epochs=1"]}
    again = {**typed, "data": str(card), "overrides": ["train.epochs=1", "train.max_steps=2"]}
    assert bench._comparable(typed) == bench._comparable(again)
    assert bench._comparable(typed) != bench._comparable({**again, "overrides": ["train.epochs=2"]})


def test_a_second_sweep_into_a_running_sweeps_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "sweep"
    with bench._exclusive(out):
        assert main(["bench", PIPELINE, "--demo", "--methods", "bitfit", "--out", str(out), "--in-process", *BUDGET]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {out}: another peftlab bench (process {os.getpid()}) is running this sweep")
    assert not (out / bench.SETTINGS_FILE).exists()


def test_a_cell_process_ends_with_the_sweeps_process(tmp_path):
    """kill -9 of `peftlab bench` leaves no cell training on as an orphan beside a resumed sweep."""
    script = (
        "import subprocess, sys, time\n"
        "from peftlab.pipelines import bench\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], preexec_fn=bench._die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its parent (init, here) has yet to reap it


def test_a_sweep_with_failed_cells_exits_1_after_writing_its_reports(tmp_path, capsys, exploding_method):
    out = tmp_path / "sweep"
    code = main(["bench", PIPELINE, "--demo", "--methods", "explode", "--no-full", "--out", str(out), "--in-process",
                 *BUDGET])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: 1 of 1 cells failed (explode-seed0); their errors are in {out / 'table.md'} and {out / 'logs'}; "
        f"the same command retries them")
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC and "Δ" not in (out / "table.md").read_text()


def test_a_sweep_grown_by_a_method_keeps_the_earlier_rows(tmp_path):
    out = tmp_path / "sweep"
    bench.bench(PIPELINE, "lora", demo=True, full=False, out=out, overrides=BUDGET, isolate=False)
    bench.bench(PIPELINE, "ia3", demo=True, full=False, out=out, overrides=BUDGET, isolate=False)
    assert [(row["cell"], row["status"]) for row in read_rows(out)] == [("ia3-seed0", "finished"), ("lora-seed0", "finished")]
    table = (out / "table.md").read_text()
    for method in ("ia3", "lora"):  # two steps may leave a method at chance, which the table then says
        assert re.search(rf"\| {method}( \(at chance\))? \| 1/1 \|", table), table
    # the earlier run's method keeps the recipe options it was given in the table's note
    assert "(each method's other options are its defaults, with the task's choice of modules; every cell's resolved " \
           "options are in results.jsonl): lora: alpha=32, dropout=0.1, r=8; ia3: none." in table, table


def test_eval_on_a_bench_directory_points_to_its_runs(sweep, capsys):
    assert main(["eval", str(sweep)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {sweep} is a bench directory; each of its cells is a run: pass {sweep / 'runs'}/")
    assert "full-seed0" in error


def test_counts_print_without_decimals_and_scores_with_them():
    summaries = [bench.MethodSummary("lora", 2, 2, metrics={"median_rank": (5.0, 0.0), "accuracy": (1.0, 0.0)}),
                 bench.MethodSummary("ia3", 2, 2, metrics={"median_rank": (7.0, 2.0), "accuracy": (0.5, 0.1)})]
    assert bench._column_format(summaries, "median_rank") == ".0f"
    assert bench._column_format(summaries, "accuracy") == ".4f"
    assert bench._fmt_mean_std((5.0, 0.0), ".0f") == "5 ± 0"


def test_chance_is_the_best_score_of_a_constant_answer(tmp_path):
    from peftlab.shared.tasks import Dataset, get_task

    task = get_task("protein-classify")
    dataset = Dataset({"train": [{"label": label} for label in (0, 0, 0, 1, 2)],
                       "test": [{"label": label} for label in (0, 1, 2, 2)]}, ["a", "b", "c"])
    chance, basis = bench.chance_levels(task, dataset, "test", ["accuracy", "macro_f1", "auroc"])
    # the training frequencies answer a (right once in four), but always c is right twice;
    # F1 of c = 2·(1/2·1)/(1/2 + 1) = 2/3, of a and b 0; any constant ranks nothing (AUROC 0.5)
    assert chance == pytest.approx({"accuracy": 0.5, "macro_f1": 2 / 9, "auroc": 0.5})
    assert basis == bench.CONSTANT_ANSWER
    binary = Dataset({"train": [{"label": label} for label in (0, 1, 1)], "test": [{"label": label} for label in (0, 0, 1, 1)]},
                     ["no", "yes"])
    assert bench.chance_levels(task, binary, "test", ["accuracy", "aupr"])[0] == {"accuracy": 0.5, "aupr": 0.5}
    # F1 whichever side of 1/2 the training rate lies: always "yes" gets 2p/(1+p) on a test split 45 % positive,
    # so a degenerate always-yes adapter is at chance
    for training_rate in (48, 52):
        necessity = Dataset({"train": [{"label": int(i < training_rate)} for i in range(100)],
                             "test": [{"label": int(i < 45)} for i in range(100)]}, ["no", "yes"])
        chance, _ = bench.chance_levels(get_task("code-review-necessity"), necessity, "test", ["f1", "accuracy"])
        assert chance == pytest.approx({"f1": 2 * 0.45 / 1.45, "accuracy": 0.55})
    text = Dataset({"train": [{"label": "a sum"}], "test": [{"label": "a sum"}]}, [])
    assert bench.chance_levels(get_task("code-review-comment"), text, "test", ["bleu4"]) == ({}, "")

    sweep = bench.Sweep(PIPELINE, tmp_path, [], {}, ["lora", "ia3"], [0], {"backbone": None, "data": None, "demo": True,
                        "overrides": []}, "accuracy", True, ["accuracy"], chance={"accuracy": 0.25})
    learnt = bench.MethodSummary("lora", 1, 1, trainable=10, percent=1.0, adapter_bytes=1, metrics={"accuracy": (0.9, None)})
    stuck = bench.MethodSummary("ia3", 1, 1, trainable=2, percent=0.1, adapter_bytes=1, metrics={"accuracy": (0.25, None)})
    assert not bench.at_chance(learnt, sweep) and bench.at_chance(stuck, sweep)
    table = bench.table_markdown(sweep, [learnt, stuck], ["accuracy"], "test")
    assert "| ia3 (at chance) | 1/1 |" in table and "| lora | 1/1 |" in table
    assert "on the test split: accuracy 0.2500." in table
    csv_rows = list(csv.DictReader(bench.table_csv([learnt, stuck], ["accuracy"], "accuracy", {"ia3"}).splitlines()))
    assert [(row["method"], row["at_chance"]) for row in csv_rows] == [("lora", "False"), ("ia3", "True")]
    points = [(1.0, 0.9), (0.1, 0.25)]
    assert bench.pareto_front_above_chance(points, True, None) == [0, 1]
    assert bench.pareto_front_above_chance(points, True, 0.25) == [0]  # the stuck method is off the front
    bench.plot_pareto(tmp_path / "pareto.png", [learnt, stuck], "accuracy", True, "t", chance=0.25)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == PNG_MAGIC


def test_retrieval_chance_is_a_random_ranking_of_the_scored_splits_videos(tmp_path):
    from peftlab.shared.tasks import Dataset, get_task

    # 4 test videos: v0 with 2 captions, the others with 1 (5 queries); a constant answer
    # would tie every video and rank last, so chance is the random order's expectation
    test = [{"video": video, "caption": f"c{i}"} for i, video in enumerate(["v0", "v0", "v1", "v2", "v3"])]
    dataset = Dataset({"train": test[:1], "test": test}, [])
    chance, basis = bench.chance_levels(get_task("video-text-retrieval"), dataset, "test",
                                        ["t2v_r1", "t2v_r5", "v2t_r1", "mean_rank", "v2t_mean_rank"])
    # ranks uniform on 1..4 both ways: R@1 1/4, mean rank 5/2
    assert chance == pytest.approx({"t2v_r1": 0.25, "t2v_r5": 1.0, "v2t_r1": 0.25, "mean_rank": 2.5, "v2t_mean_rank": 2.5})
    assert "random ranking" in basis
    sweep = bench.Sweep("video-text-retrieval", tmp_path, [], {}, ["lora"], [0],
                        {"backbone": None, "data": None, "demo": True, "overrides": []}, "t2v_r1", True, ["t2v_r1"],
                        chance={"t2v_r1": 0.25}, chance_basis=basis)
    stuck = bench.MethodSummary("lora", 1, 1, trainable=2, percent=0.1, adapter_bytes=1, metrics={"t2v_r1": (0.25, None)})
    table = bench.table_markdown(sweep, [stuck], ["t2v_r1"], "test")
    assert "Chance, the scores of a uniformly random ranking (expected values) on the test split: t2v_r1 0.2500." in table
    assert "| lora (at chance) |" in table


def test_multi_label_chance_answers_each_findings_training_rate():
    from peftlab.shared.tasks import Dataset, get_task

    # findings x and y: x in 3 of 4 training images, y in 1; the test split has both outcomes of each
    train = [{"targets": targets, "label": ""} for targets in ([1, 0], [1, 0], [1, 1], [0, 0])]
    test = [{"targets": targets, "label": ""} for targets in ([1, 0], [0, 1], [1, 1], [0, 0])]
    chance, _ = bench.chance_levels(get_task("medical-classify"), Dataset({"train": train, "test": test}, ["x", "y"]),
                                    "test", ["auroc", "aupr", "accuracy", "macro_f1"])
    # a constant score ranks nothing: AUROC 0.5 per finding, AP each finding's test prevalence (1/2);
    # scores 0.75 and 0.25 answer "x, not y" for every image: x right on 2 of 4 images, y on 2 of 4
    # (accuracy is MedMNIST's, per finding), F1 of x 2/3, of y 0; "every finding" gets F1 2/3 for both
    assert chance == pytest.approx({"auroc": 0.5, "aupr": 0.5, "accuracy": 0.5, "macro_f1": 2 / 3})


def test_a_sweep_resumed_on_changed_data_is_refused_before_anything_runs(tmp_path):
    card = tmp_path / "card.md"
    original = (bench.cfg.PACKAGE_ROOT / "data_cards" / "protein-classify-demo.md").read_text()
    card.write_text(original)
    out = tmp_path / "sweep"
    first = bench.plan(PIPELINE, "bitfit", seeds=1, demo=False, data=str(card), backbone="tiny", out=out, full=False,
                       overrides=BUDGET)
    bench._claim_out_dir(first)
    again = bench.plan(PIPELINE, "bitfit", seeds=1, demo=False, data=str(card), backbone="tiny", out=out, full=False,
                       overrides=BUDGET)
    bench._check_out_dir(again)  # the same data: resumable
    card.write_text(original.replace("test: 200, seed: 0", "test: 200, seed: 7"))  # same card path, other examples
    changed = bench.plan(PIPELINE, "bitfit", seeds=1, demo=False, data=str(card), backbone="tiny", out=out, full=False,
                         overrides=BUDGET)
    with pytest.raises(UserError, match=r"sweep: the data has changed since this sweep's cells were trained"):
        bench._check_out_dir(changed)


def test_a_method_that_refuses_the_backbone_is_skipped_before_any_cell_runs(capsys):
    sweep = bench.plan("medical-classify", "adapter,ln_tuning,vera,bitfit", seeds=2, demo=True, data=None,
                       backbone="tiny_resnet", out=None, full=False, overrides=["train.max_steps=1"])
    assert {cell.method for cell in sweep.cells} == {"bitfit"}
    assert sweep.skipped["adapter"].startswith("adapter: peftlab's bottleneck adapters act on token features")
    assert sweep.skipped["ln_tuning"].startswith("ln_tuning: the model has no LayerNorm to tune (its norms: BatchNorm2d)")
    assert sweep.skipped["vera"].startswith("method 'vera': the model has no nn.ModuleList of blocks; name its list "
                                            "of blocks with method.blocks=PATH")


def test_the_table_says_which_options_each_method_was_given():
    sweep = bench.plan(PIPELINE, "lora,dora,bitfit", seeds=1, demo=True, data=None, backbone=None, out=None, full=True,
                       overrides=["train.max_steps=2"])
    assert bench.method_options_line(sweep) == "lora: alpha=32, dropout=0.1, r=8; full, dora, bitfit: none"
    assert bench.recipe_options_note(sweep) == ("lora keeps the recipe's options (alpha=32, dropout=0.1, r=8); the other "
                                                "methods start from their defaults: method.KEY=VALUE gives one to every "
                                                "method that has it")
    shared = bench.plan(PIPELINE, "lora,dora", seeds=1, demo=True, data=None, backbone=None, out=None, full=False,
                        overrides=["method.alpha=32", "method.dropout=0.1"])
    assert bench.method_options_line(shared) == "lora: alpha=32, dropout=0.1, r=8; dora: alpha=32, dropout=0.1"
    assert bench.recipe_options_note(shared) == ("lora keeps the recipe's options (r=8); the other methods start from "
                                                 "their defaults: method.KEY=VALUE gives one to every method that has it")


def _sequence_card(tmp_path: Path) -> Path:
    """A protein-classify CSV card split by ratios (its `splits.seed` decides the split)."""
    from peftlab.domains.protein.data import demo_sequences

    examples = demo_sequences({"train": 60}, 2, seed=0)["train"]
    rows = ["sequence,label"] + [f"{e['seq']},{e['label']}" for e in examples]
    (tmp_path / "sequences.csv").write_text("\n".join(rows) + "\n")
    card = tmp_path / "card.md"
    card.write_text("---\nname: seqs\ndomain: protein\ntask: protein-classify\nformat: csv\nfiles: {data: sequences.csv}\n"
                    "fields: {sequence: sequence, label: label}\nlabels: [a, b]\n"
                    "splits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 0}\n---\ntwo families\n")
    return card


def test_folds_run_each_fold_and_the_table_averages_over_them(tmp_path):
    """--folds seed=0,1,2: one cell per fold (the card's splits.seed) and seed; each
    cell tests on its own split, and the table's mean is over every fold's cell."""
    card = _sequence_card(tmp_path)
    out = bench.bench(PIPELINE, "bitfit", seeds=1, data=str(card), backbone="tiny", out=tmp_path / "sweep",
                      full=False, overrides=["train.epochs=4"], folds="seed=0,1,2", isolate=False)
    rows = read_rows(out)
    assert [(row["cell"], row["fold"], row["status"]) for row in rows] == [
        ("bitfit-splits.seed=0-seed0", "seed=0", "finished"), ("bitfit-splits.seed=1-seed0", "seed=1", "finished"),
        ("bitfit-splits.seed=2-seed0", "seed=2", "finished")]
    tests = []
    for row in rows:
        run = out / row["run_dir"]
        assert yaml.safe_load((run / "run.yaml").read_text())["data"]["splits"] == {"seed": int(row["fold"][-1])}
        tests.append({json.loads(line)["id"] for line in (run / "predictions" / "test.jsonl").read_text().splitlines()})
    assert len(tests[0]) == 12 and tests[0] != tests[1] != tests[2] != tests[0]
    table = (out / "table.md").read_text()
    accuracies = [row["metrics"]["accuracy"] for row in rows]
    assert re.search(r"\| bitfit( \(at chance\))? \| 3/3 \| ", table) and "| method | runs |" in table
    assert f"{statistics.fmean(accuracies):.4f} ± {statistics.stdev(accuracies):.4f}" in table
    assert "Folds: splits.seed = 0, 1, 2, one run per fold and seed" in table
    per_fold = " | ".join(f"{value:.4f}" for value in accuracies)
    assert "| method | seed=0 | seed=1 | seed=2 |" in table and f"| bitfit | {per_fold} |" in table
    assert "over the finished folds and seeds" in table


@pytest.mark.parametrize("folds, message", [
    ("seed", "--folds 'seed': give a card split key and its values"),
    ("sed=0,1", "--folds: 'sed' is not a split key protein-classify reads"),
    ("seed=0,1,0", "--folds: seed=0 is listed twice"),
    ("seed=x,1", "--folds seed=x: a split seed is a whole number"),
    ("test=[a,b],c", "--folds test=a+b: "),  # a fold the card cannot make, named before anything trains
    ("test=[a],a", "--folds: test=a is listed twice"),
])
def test_fold_mistakes_stop_before_any_training(tmp_path, capsys, folds, message):
    card = _sequence_card(tmp_path)
    out = tmp_path / "sweep"
    assert main(["bench", PIPELINE, "--methods", "bitfit", "--data", str(card), "--backbone", "tiny",
                 "--folds", folds, "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0], error
    assert not out.exists()


def test_folds_that_change_nothing_or_clash_with_an_override_are_refused(tmp_path, capsys):
    assert main(["bench", PIPELINE, "--demo", "--methods", "bitfit", "--folds", "seed=0,1"]) == 2
    assert "--folds seed=0 and seed=1 give the same splits" in capsys.readouterr().err  # demo data ignores splits.seed
    card = _sequence_card(tmp_path)
    assert main(["bench", PIPELINE, "--methods", "bitfit", "--data", str(card), "--backbone", "tiny",
                 "--folds", "seed=0,1", "data.splits.seed=3"]) == 2
    assert "data.splits.seed=3: --folds sets data.splits.seed per fold" in capsys.readouterr().err


def test_point_labels_clear_the_other_points_and_each_other():
    """Methods of similar size and score: a label is not printed over another point's
    marker or over another label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_xscale("log")
    axes.set_xlim(0.1, 100)
    axes.set_ylim(0, 1)
    # the second and third points sit where the first one's label would go; the fourth stands alone
    xs, ys, names = [1.0, 1.25, 1.25, 50.0], [0.5, 0.505, 0.52, 0.9], ["lora", "dora", "vera", "full"]
    axes.plot(xs, ys, "o")
    bench._label_points(axes, names, xs, ys)
    canvas.draw()
    from matplotlib.text import Text

    # the text's own box (an annotation's extent takes in its line too)
    labels = {text.get_text(): Text.get_window_extent(text, canvas.get_renderer()) for text in axes.texts}
    centres = dict(zip(names, axes.transData.transform(list(zip(xs, ys)))))
    radius = 4 * figure.dpi / 72
    for name, box in labels.items():
        for other, (x, y) in centres.items():
            if other != name:
                assert not box.overlaps(type(box).from_extents(x - radius, y - radius, x + radius, y + radius)), (name, other)
        assert not any(box.overlaps(labels[other]) for other in labels if other != name), name
    # a label moved past the next row has a line to its point; one beside it, or a row off, needs none
    lined = {text.get_text(): text.arrow_patch is not None for text in axes.texts}
    assert lined == {"lora": False, "dora": False, "vera": True, "full": False}, lined


def _write_esm_checkpoint(path: Path, shift: float = 0.0) -> None:
    """The tiny ESM encoder as a fair-esm .pt file; `shift` stands for re-trained weights."""
    import torch
    from peftlab.domains.protein import backbones
    from test_protein_data import _official_checkpoint

    encoder = backbones.load_backbone("tiny")[0]
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(shift)
    torch.save(_official_checkpoint(encoder), path)


def test_a_sweep_resumed_after_the_backbones_weights_changed_is_refused(tmp_path, capsys):
    """The same --backbone path, other weights (a re-trained checkpoint): a resume would
    pool cells trained on two backbones into one mean ± std."""
    weights, out = tmp_path / "esm.pt", tmp_path / "sweep"
    _write_esm_checkpoint(weights)
    command = ["bench", PIPELINE, "--demo", "--backbone", str(weights), "--methods", "bitfit", "--no-full",
               "--out", str(out), "--in-process", *BUDGET]
    assert main(command) == 0
    _write_esm_checkpoint(weights, shift=0.01)
    capsys.readouterr()
    assert main([*command, "--seeds", "2"]) == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # after the plan's notes
    assert "Traceback" not in err and error.startswith(f"error: {out}: the backbone's weights have changed since this "
                                                       f"sweep's cells were trained (bitfit-seed0 loaded weights "), err
    assert error.endswith("choose another --out, so that no table mixes the two")
    assert not (out / "runs" / "bitfit-seed1").exists()
    _write_esm_checkpoint(weights)  # the weights the cells were trained on: resumable again
    bench._check_out_dir(bench.plan(PIPELINE, "bitfit", seeds=2, demo=True, data=None, backbone=str(weights), out=out,
                                    full=False, overrides=BUDGET))


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_an_out_that_cannot_be_made_is_refused_in_one_line_before_the_plan(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "afile").write_text("not a folder")
    out = tmp_path / "afile" / "sub" if where == "under_a_file" else Path("/proc/peftlab_bench_test")
    reason = f"{tmp_path / 'afile'} is a file, not a folder" if where == "under_a_file" else "No such file or directory"

    def no_plan(*args, **kwargs):
        raise AssertionError("the plan (data read, models built) ran before --out was checked")

    monkeypatch.setattr(bench, "plan", no_plan)
    assert main(["bench", PIPELINE, "--demo", "--methods", "bitfit", "--out", str(out), "--in-process"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: --out {out}: cannot create the folder ({reason}); choose another --out"]
    assert not out.exists()


def test_a_method_option_that_matches_nothing_is_a_usage_error_not_a_skip(tmp_path, capsys):
    """A typo in method.target_modules makes lora refuse the backbone only because of the
    user's option: exit 2 with the method's message (as `peftlab run` does), not a sweep
    of `full` alone that exits 0."""
    out = tmp_path / "sweep"
    assert main(["bench", PIPELINE, "--demo", "--methods", "lora,dora", "--out", str(out),
                 "method.target_modules=[nonexistent]"]) == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # after the note on which methods take the option
    assert "Traceback" not in err and error.startswith("error: lora: no module matches target_modules=['nonexistent']"), err
    assert not out.exists()
    # a method the architecture refuses, with or without the option given, stays skipped
    sweep = bench.plan("medical-classify", "adapter,bitfit", seeds=1, demo=True, data=None, backbone="tiny_resnet",
                       out=None, full=False, overrides=["method.size=8", "train.max_steps=1"])
    assert {cell.method for cell in sweep.cells} == {"bitfit"}
    assert sweep.skipped["adapter"].startswith("adapter: peftlab's bottleneck adapters act on token features")


def test_an_earlier_runs_failed_cell_this_command_does_not_run_is_a_note_not_an_exit_1(tmp_path, capsys,
                                                                                       exploding_method):
    out = tmp_path / "sweep"
    command = ["bench", PIPELINE, "--demo", "--no-full", "--out", str(out), "--in-process", *BUDGET]
    assert main([*command, "--methods", "bitfit,explode"]) == 1
    capsys.readouterr()
    assert main([*command, "--methods", "bitfit"]) == 0  # explode dropped: this command retries nothing
    err = capsys.readouterr().err
    assert "error:" not in err and "retries them" not in err
    assert ("note: 1 cell of an earlier run failed, which this command does not run (explode-seed0): table.md lists "
            "them, but only this command's cells decide its exit status; to retry them, add explode back to --methods"
            in err), err
    assert "- explode: 1 of 1 cells failed" in (out / "table.md").read_text()
    assert main([*command, "--methods", "bitfit,explode"]) == 1  # named again: retried, and its failure counts
    assert "1 of 2 cells failed (explode-seed0)" in capsys.readouterr().err


def test_the_table_header_names_the_seeds_and_overrides_its_rows_average(tmp_path):
    """A resume with fewer seeds keeps the earlier seed's rows in the means, and overrides
    typed otherwise (another order, a default given) act alike: the header says what the
    rows were trained with, not what the last command typed."""
    out = tmp_path / "sweep"
    bench.bench(PIPELINE, "bitfit", seeds=2, demo=True, full=False, out=out, overrides=BUDGET, isolate=False)
    bench.bench(PIPELINE, "bitfit", seeds=1, demo=True, full=False, out=out,
                overrides=[*reversed(BUDGET), "train.seed=0"], isolate=False)
    table = (out / "table.md").read_text()
    assert f"Overrides: {' '.join(BUDGET)}. Seeds: 0, 1. Primary metric" in table, table
    assert re.search(r"\| bitfit( \(at chance\))? \| 2/2 \|", table), table
    # a method trained with fewer seeds than another is named with its own
    rows = [row("lora", 0, 0.5), row("lora", 1, 0.6), row("ia3", 0, 0.4), row("ia3", 1, None, status="failed")]
    assert bench.seeds_averaged(bench.plan(PIPELINE, "bitfit", seeds=1, demo=True, data=None, backbone=None, out=None,
                                           full=False, overrides=BUDGET), rows) == "0, 1 (ia3: 0)"


@pytest.mark.parametrize("methods, no_full, message", [
    ("full", True, "--methods names full and --no-full leaves it out; drop one of the two"),
    ("lora;bitfit", False, "--methods: 'lora;bitfit' is not one method; separate methods with commas, e.g. "
                           "--methods lora,bitfit"),
    ("lora bitfit", False, "--methods: 'lora bitfit' is not one method; separate methods with commas"),
])
def test_method_lists_that_contradict_or_lack_commas_are_refused(tmp_path, capsys, methods, no_full, message):
    out = tmp_path / "sweep"
    assert main(["bench", PIPELINE, "--demo", "--methods", methods, *(["--no-full"] if no_full else []),
                 "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: {message}"] or (len(error) == 1 and error[0].startswith(f"error: {message}")), error
    assert not out.exists()


def test_method_names_fold_case():
    sweep = bench.plan(PIPELINE, "LoRA, BitFit", seeds=1, demo=True, data=None, backbone=None, out=None, full=True,
                       overrides=BUDGET)
    assert sweep.methods == ["full", "lora", "bitfit"]
    assert bench.method_names(["DoRA", "full"]) == ["dora", "full"]


def test_a_sweep_stopped_midway_leaves_reports_that_match_its_results(tmp_path, monkeypatch):
    """Ctrl-C during the second cell: table.md, table.csv and pareto.png already hold the
    first cell, as results.jsonl does, rather than nothing (or an earlier run's table)."""
    original = bench.run_cell

    def interrupted_at_the_second_cell(sweep, cell, isolate):
        if cell.seed == 1:
            raise KeyboardInterrupt
        return original(sweep, cell, isolate)

    monkeypatch.setattr(bench, "run_cell", interrupted_at_the_second_cell)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        bench.bench(PIPELINE, "bitfit", seeds=2, demo=True, full=False, out=out, overrides=BUDGET, isolate=False)
    [finished] = read_rows(out)
    table = (out / "table.md").read_text()
    assert re.search(r"\| bitfit( \(at chance\))? \| 1/2 \|", table), table  # one of its two seeds so far
    assert f"{finished['metrics']['accuracy']:.4f}" in table
    assert "Not run yet (the sweep is running, or was stopped: the same command resumes it): bitfit-seed1." in table
    with open(out / "table.csv", newline="") as handle:
        [csv_row] = list(csv.DictReader(handle))
    assert (csv_row["seeds_finished"], csv_row["seeds"]) == ("1", "2")
    assert float(csv_row["accuracy_mean"]) == finished["metrics"]["accuracy"]
    assert (out / "pareto.png").read_bytes()[:8] == PNG_MAGIC


def test_a_spread_too_small_for_four_decimals_is_not_printed_as_none():
    assert bench._fmt_mean_std((0.9993, 3.1e-05)) == "0.9993 ± 3.1e-05"
    assert bench._fmt_mean_std((2.4e-05, None)) == "2.4e-05"
    assert bench._fmt_mean_std((0.5, 0.0)) == "0.5000 ± 0.0000"  # no spread at all stays 0
    assert bench._fmt_mean_std((5.0, 0.0), ".0f") == "5 ± 0"


def test_the_pareto_plot_names_the_methods_it_leaves_out_and_has_no_tick_past_100_percent(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: (saved.append(figure), save(figure, *args, **kwargs)))
    summaries = [bench.MethodSummary("full", 1, 1, trainable=100, percent=100.0, adapter_bytes=1,
                                     metrics={"accuracy": (0.9, None)}),
                 bench.MethodSummary("lora", 1, 1, trainable=40, percent=40.0, adapter_bytes=1,
                                     metrics={"accuracy": (0.8, None)}),
                 bench.MethodSummary("explode", 1, 0, errors=["boom"], status="failed"),
                 bench.MethodSummary("vpt", 1, 0, errors=["does not fit"], status="skipped")]
    bench.plot_pareto(tmp_path / "pareto.png", summaries, "accuracy", True, "t")
    [figure] = saved
    texts = [text.get_text() for text in figure.findobj(lambda artist: hasattr(artist, "get_text"))]
    assert "not shown: explode (failed), vpt (skipped)" in texts
    [axes] = figure.axes
    ticks = [label.get_text() for label in [*axes.xaxis.get_ticklabels(), *axes.xaxis.get_ticklabels(minor=True)]]
    assert "100" in ticks and not any(text and float(text) > 100 for text in ticks), ticks


def test_a_folder_that_is_not_a_sweep_is_refused_before_the_plan(tmp_path, capsys, monkeypatch):
    """It was refused, but only after the plan had read the data and built the models."""
    (tmp_path / "notes.txt").write_text("someone else's")

    def no_plan(*args, **kwargs):
        raise AssertionError("the plan (data read, models built) ran before --out was checked")

    monkeypatch.setattr(bench, "plan", no_plan)
    assert main(["bench", PIPELINE, "--demo", "--methods", "bitfit", "--out", str(tmp_path), "--in-process"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path} exists and is not a bench directory (no bench.json); choose another --out"]
