"""Data cards: parsing, validation errors that name the field and the fix, env expansion."""

from __future__ import annotations

import json
import re
from pathlib import Path

import peftlab
import pytest
from conftest import REPO, run_peftlab
from peftlab.pipelines import runner
from peftlab.pipelines.cli import main
from peftlab.shared.cards import read_card
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import Dataset, get_task, list_tasks

GOOD = """---
name: tiny-ppi
domain: protein
task: protein-ppi
format: fasta+pairs_tsv
files: {sequences: seqs.fasta, pairs: pairs.tsv}
labels: [no_interaction, interaction]
splits: {ratios: {train: 0.5, validation: 0.25, test: 0.25}, seed: 0}
license: CC0-1.0
source: written by the tests
---
Four proteins, eight pairs.
"""


def write_ppi_files(folder: Path) -> None:
    (folder / "seqs.fasta").write_text(">p1\nMKTAYIAKQR\n>p2\nMLLAVLYCLA\nVFALSSRA\n>p3\nGGGWWWKKKL\n>p4\nACDEFGHIKL\n")
    rows = ["p1\tp2\t1", "p1\tp3\t0", "p2\tp3\t1", "p2\tp4\t0", "p3\tp4\t1", "p1\tp4\t0", "p4\tp4\t1", "p3\tp3\t0"]
    (folder / "pairs.tsv").write_text("\n".join(rows) + "\n")


def write_card(folder: Path, text: str = GOOD) -> Path:
    write_ppi_files(folder)
    path = folder / "card.md"
    path.write_text(text)
    return path


def test_card_parses_and_resolves_paths_relative_to_the_card(tmp_path):
    card = read_card(write_card(tmp_path))
    assert card.name == "tiny-ppi" and card.labels == ["no_interaction", "interaction"]
    assert card.file("sequences") == tmp_path / "seqs.fasta"
    assert card.body == "Four proteins, eight pairs."
    dataset = get_task("protein-ppi").read(card, get_task("protein-ppi").options())
    assert sum(len(v) for v in dataset.splits.values()) == 8
    assert dataset.splits["train"][0]["a_seq"] in {"MKTAYIAKQR", "MLLAVLYCLAVFALSSRA", "GGGWWWKKKL", "ACDEFGHIKL"}


def test_a_card_saved_with_a_byte_order_mark_and_crlf_reads_as_the_plain_card(tmp_path):
    """Windows Notepad saves UTF-8 with a byte-order mark (and CRLF line ends)."""
    plain = read_card(write_card(tmp_path))
    path = tmp_path / "notepad.md"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode())
    assert read_card(path).model_dump(exclude={"card_path", "text"}) == plain.model_dump(exclude={"card_path", "text"})


def test_classes_named_by_whole_numbers_are_their_names(tmp_path):
    card = read_card(write_card(tmp_path, GOOD.replace("labels: [no_interaction, interaction]", "labels: [0, 1]")))
    assert card.labels == ["0", "1"]


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("task: protein-ppi\n", ""), r"required field 'task' is missing; add `task:`"),
    (lambda t: t.replace("labels: [no_interaction, interaction]", "labels: no_interaction"), r"field 'labels'"),
    (lambda t: t.replace("license: CC0-1.0", "lisence: CC0-1.0"), r"unknown field 'lisence'; valid fields"),
    (lambda t: t.replace("files: {sequences: seqs.fasta", "files: {sequences: '${PEFTLAB_TEST_UNSET}/s.fasta'"), r"PEFTLAB_TEST_UNSET is not set"),
    (lambda t: t.replace("seqs.fasta, pairs", "missing.fasta, pairs"), r"files.sequences = .*missing.fasta does not exist"),
    (lambda t: t.replace("interaction]", "interaction"), r"line \d+: the YAML header does not parse"),
    (lambda t: t.replace("splits: {ratios: {train: 0.5, validation: 0.25, test: 0.25}", "splits: {ratios: [0.5, 0.5]"), r"splits.ratios must be a mapping"),
    (lambda t: t.replace("---\nname", "name", 1), r":1: a data card starts with a '---' line"),
    (lambda t: t.replace("task: protein-ppi", "task: protein-classify"), r"format 'fasta\+pairs_tsv' is not one protein-classify reads"),
    (lambda t: t.replace("train: 0.5", "train: 0.9"), r"splits.ratios must be non-negative and sum to 1"),
    (lambda t: t.replace("labels: [no_interaction, interaction]", "labels: [no, true]"),  # as the card writes it
     r"got true: quote it \(labels: \['true', \.\.\.\]\)"),
    (lambda t: t.replace("labels: [no_interaction, interaction]", "labels: 0"),
     r"field 'labels': labels is the list of class names in order \(labels: \[negative, positive\]\), got 0$"),
    (lambda t: t.replace("labels: [no_interaction, interaction]", "labels: [no, 1.5]"),
     r"card\.md: field 'labels': labels name the classes in order as text, got 1\.5: quote it \(labels: \['1\.5', "
     r"\.\.\.\]\) or leave `labels` out$"),
])
def test_card_errors_name_the_field_and_the_fix(tmp_path, edit, message, monkeypatch):
    monkeypatch.delenv("PEFTLAB_TEST_UNSET", raising=False)
    path = write_card(tmp_path, edit(GOOD))
    with pytest.raises(UserError, match=message):
        card = read_card(path)
        task = get_task(card.task)
        task.read(runner.load_card(str(path), task), task.options())


def test_env_vars_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTLAB_TEST_DIR", str(tmp_path))
    path = write_card(tmp_path, GOOD.replace("seqs.fasta,", "'${PEFTLAB_TEST_DIR}/seqs.fasta',"))
    assert read_card(path).file("sequences") == tmp_path / "seqs.fasta"


def test_cli_card_validate_and_new(tmp_path, capsys):
    path = write_card(tmp_path)
    result = run_peftlab("card", "validate", path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["task"] == "protein-ppi" and sum(summary["splits"].values()) == 8

    assert summary["counted_as"] == dict.fromkeys(summary["splits"], "protein pairs")

    # a shipped card by the path `peftlab list cards` prints, from any working directory
    shipped = run_peftlab("card", "validate", "data_cards/protein-classify-demo.md", cwd=tmp_path)
    assert shipped.returncode == 0, shipped.stderr
    assert json.loads(shipped.stdout)["task"] == "protein-classify"

    # the same commands in-process (a subprocess above already covers the entry point)
    new = tmp_path / "new.md"
    assert main(["card", "new", "protein", "protein-classify", "--out", str(new)]) == 0
    card = read_card(new)
    assert card.task == "protein-classify" and card.format == "csv"
    assert new.read_text().endswith("biases.\n")  # a text file ends its last line
    assert "\nformat: csv\n# another format: set format to its name, add `loader: my_loader:read`" in new.read_text()
    assert main(["card", "new", "imaging", "protein-ppi"]) == 2
    assert "belongs to domain 'protein'" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["card", "new", "protein-classify"]) == 0  # the task alone names its domain
    assert capsys.readouterr().out == new.read_text()
    assert main(["card", "new", "protein-classify", "my.md"]) == 2  # the old habit of naming the file
    assert "card new takes TASK (or DOMAIN TASK), got protein-classify my.md; the card goes to --out FILE" in \
        capsys.readouterr().err
    assert main(["card", "new", "protein"]) == 2
    assert capsys.readouterr().err.strip() == ("error: protein is a domain; name one of its tasks: "
                                               "peftlab card new protein-classify | protein-ppi")


def test_every_shipped_card_parses():
    for path in sorted((REPO / "data_cards").glob("*.md")):
        card = read_card(path)
        task = get_task(card.task)
        assert card.domain == task.domain, path
        assert card.format in task.formats, path
        card.check_keys(task.card_keys)
        assert card.body, f"{path}: the card body should say what the data is"


@pytest.mark.parametrize("task_name", [task.name for task in list_tasks()])
def test_every_task_refuses_a_misspelt_split_key(tmp_path, task_name):
    # Read as absent, `splits: {ratio: ...}` would give the default split without a word.
    task = get_task(task_name)
    card = tmp_path / "card.md"
    card.write_text(f"---\nname: x\ndomain: {task.domain}\ntask: {task.name}\nformat: {task.formats[0]}\n"
                    "splits: {ratio: {train: 0.5, test: 0.5}, seed: 3}\n---\n")
    with pytest.raises(UserError, match=rf"card\.md: splits\.ratio is not understood by {task.name}; "
                                        r"did you mean splits\.ratios\? its split keys: ratios, seed, train, validation, test"):
        runner.load_card(str(card), task)
    for key in task.split_keys:  # each documented key passes the check
        # fold_by divides the records of the task's record format (a loader's, where the task reads none itself)
        fmt = task.formats[0] if key != "fold_by" else task.loader_format
        loader = "loader: my_loader:read\n" if fmt not in task.formats else ""
        card.write_text(f"---\nname: x\ndomain: {task.domain}\ntask: {task.name}\nformat: {fmt}\n{loader}"
                        f"splits: {{{key}: 1}}\n---\n")
        runner.load_card(str(card), task)


def test_a_card_without_validation_says_the_last_epoch_is_kept(tmp_path, capsys):
    card = write_card(tmp_path, GOOD.replace("validation: 0.25, test: 0.25", "test: 0.5"))
    config = runner.build_config("protein-ppi", data=str(card), backbone="tiny", overrides=["eval.splits=[test]"])
    task = get_task("protein-ppi")
    dataset = runner.read_dataset(config, task, task.options(), runner.load_card(str(card), task))
    assert "validation" not in dataset.splits
    assert capsys.readouterr().err == ""  # reading says nothing: notes wait until the request is known valid
    runner.prepare(config)
    assert "no validation split, so no checkpoint selection or early stopping" in capsys.readouterr().err
    runner.prepare(runner.build_config("protein-ppi", data=str(write_card(tmp_path)), backbone="tiny"))
    assert "no validation split" not in capsys.readouterr().err
    # a card of test data only (what `peftlab eval RUN --data CARD` takes) trains nothing: no such note
    test_only = write_card(tmp_path, GOOD.replace("train: 0.5, validation: 0.25, test: 0.25", "test: 1.0"))
    assert main(["card", "validate", str(test_only)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"test": 8} and summary["notes"] == []
    # a card that says nothing of where its data comes from, or on what terms, is told so
    no_terms = write_card(tmp_path, GOOD.replace("license: CC0-1.0", "license: ''"))
    assert main(["card", "validate", str(no_terms)]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(note.startswith("the card gives no license (`license:`): say where the data comes from") for note in notes)


def test_data_limit_is_said_with_what_it_kept(tmp_path):
    card = write_card(tmp_path)
    task = get_task("protein-ppi")
    whole = runner.read_dataset(runner.build_config("protein-ppi", data=str(card), backbone="tiny"), task,
                                task.options(), runner.load_card(str(card), task))
    assert not any("data.limit" in note for note in whole.notes)
    config = runner.build_config("protein-ppi", data=str(card), backbone="tiny",
                                 overrides=["data.limit.train=2", f"data.limit.test={len(whole.splits['test']) + 10}"])
    limited = runner.read_dataset(config, task, task.options(), runner.load_card(str(card), task))
    assert len(limited.splits["train"]) <= 2 < len(whole.splits["train"]) and len(limited.splits["test"]) == len(whole.splits["test"])
    assert [n for n in limited.notes if "data.limit" in n] == [
        f"data.limit keeps train {len(limited.splits['train'])} of {len(whole.splits['train'])} examples "
        "(a seeded sample, in class proportions where there are classes)"]


@pytest.mark.parametrize("task_name", [task.name for task in list_tasks()])
def test_every_task_refuses_a_fields_key_it_does_not_read(tmp_path, task_name):
    # Read as absent, `fields: {lable: ...}` made the reader look for the default column
    # and blame the data file.
    task = get_task(task_name)
    card = tmp_path / "card.md"
    header = f"---\nname: x\ndomain: {task.domain}\ntask: {task.name}\nformat: {task.formats[0]}\n"
    card.write_text(header + "fields: {lable: y}\n---\n")
    with pytest.raises(UserError, match=rf"card\.md: fields\.lable is not a field {task.name} reads; "
                                        rf"({'its fields: ' + ', '.join(task.field_keys) if task.field_keys else 'it reads no'})"):
        runner.load_card(str(card), task)
    for key in task.field_keys:
        card.write_text(header + f"fields: {{{key}: y}}\n---\n")
        runner.load_card(str(card), task)


def test_a_class_missing_from_train_is_said_before_training(tmp_path, capsys):
    (tmp_path / "train.csv").write_text("sequence,label\n" + "".join(f"MKV{'A' * i}L,pneumonia\n" for i in range(12)))
    (tmp_path / "test.csv").write_text("sequence,label\nMKVL,normal\nMKVAL,pneumonia\n")
    card = tmp_path / "card.md"
    card.write_text("---\nname: one-class\ndomain: protein\ntask: protein-classify\nformat: csv\nlabels: [normal, pneumonia]\n"
                    "splits: {train: train.csv, test: test.csv}\n---\n")
    runner.prepare(runner.build_config("protein-classify", data=str(card), backbone="tiny"))
    assert "note: no training examples of normal: the model cannot learn it" in capsys.readouterr().err
    both = card.read_text().replace("train.csv", "test.csv", 1)  # train on the two-class file
    card.write_text(both)
    runner.prepare(runner.build_config("protein-classify", data=str(card), backbone="tiny", overrides=["eval.splits=[test]"]))
    assert "no training examples" not in capsys.readouterr().err


@pytest.mark.parametrize("task_name", [task.name for task in list_tasks()])
def test_every_card_template_with_ratios_offers_per_split_files_that_load(tmp_path, task_name):
    """`card new` shows the per-split form beside the ratios; uncommented, it passes the
    card checks (the readers of each form are tested in test_validation_holdout.py)."""
    task = get_task(task_name)
    template = task.card_template()
    card = tmp_path / "card.md"
    card.write_text(template)
    runner.load_card(str(card), task)
    alternative = re.search(r"^# or one .* per split(?: \(format: (\w+)\))?, (?:without|keeping) files\.(\w+): "
                            r"(splits: \{[^}]*\})", template, re.MULTILINE)
    if alternative is None:
        assert not re.search(r"^splits: \{ratios:", template, re.MULTILINE), \
            "a template that splits by ratios should show the per-split files form too"
        return
    fmt, files_key, splits = alternative.groups()
    lines = [line for line in template.splitlines() if not line.startswith(("#", "splits:"))]
    lines.insert(lines.index("---", 1), splits)  # in the header, whether or not it had a splits line
    if "without" in alternative.group(0):
        lines = [line for line in lines if not line.strip().startswith(f"{files_key}:")]
    if fmt:
        lines = [f"format: {fmt}" if line.startswith("format:") else line for line in lines]
    card.write_text("\n".join(lines) + "\n")
    loaded = runner.load_card(str(card), task)
    assert {"train", "validation", "test"} <= set(loaded.splits)
    assert "ratios" not in loaded.splits


def test_a_recipe_reads_the_package_cards_whatever_the_working_folder_holds(tmp_path, monkeypatch):
    """A user's own data_cards/ folder, with a file of a shipped card's name, does not
    stand in for the recipe's card; `--data data_cards/...` names the user's own."""
    (tmp_path / "data_cards").mkdir()
    (tmp_path / "data_cards" / "protein-ppi-demo.md").write_text("not the shipped card\n")
    monkeypatch.chdir(tmp_path)
    packaged = Path(peftlab.__file__).parent / "data_cards" / "protein-ppi-demo.md"
    assert runner.build_config("protein-ppi", demo=True).data.card == str(packaged)
    mine = runner.build_config("protein-ppi", demo=True, data="data_cards/protein-ppi-demo.md").data.card
    assert runner.cfg.resolve_card_path(mine) == Path("data_cards/protein-ppi-demo.md")


def test_card_validate_says_what_it_counts_where_splits_count_different_things(capsys):
    """Captioning trains on (caption, video) pairs and evaluates once per video: the counts
    say so, and the held-out counts are the videos."""
    from peftlab.pipelines import runner
    from peftlab.shared.tasks import get_task

    assert main(["card", "validate", "data_cards/video-caption-demo.md"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counted_as"] == {"train": "captions, each with its video",
                                     "validation": "videos, each with all its captions",
                                     "test": "videos, each with all its captions"}
    task = get_task("video-caption")
    pairs, _ = task._read_pairs(runner.load_card("data_cards/video-caption-demo.md", task), task.options())
    assert summary["splits"] == {"train": len(pairs["train"]),
                                 **{split: len({e["video_id"] for e in pairs[split]}) for split in ("validation", "test")}}
    # a run logs the same counts, each unit named once after the splits it counts
    dataset = Dataset({split: [{}] * count for split, count in summary["splits"].items()}, [])
    assert runner.describe_split_sizes(task, dataset) == \
        "train 480 (captions, each with its video), validation 48, test 48 (videos, each with all its captions)"
    assert runner.describe_split_sizes(get_task("protein-ppi"), dataset) == \
        "train 480, validation 48, test 48 (protein pairs)"
