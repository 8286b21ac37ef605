"""Data given as train and test files without a validation file: every domain holds out
`splits.validation_fraction` of train for checkpoint selection (speech holds out whole
speakers, tested with speech), and test stays as given."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import numpy as np
import pytest
from peftlab.domains.video_text.data import write_video
from peftlab.pipelines import runner
from peftlab.shared.data import hold_out_validation
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import get_task


class Card:
    card_path = "card.md"

    def __init__(self, **splits):
        self.splits = splits


def test_class_labels_are_stratified_and_text_targets_are_not_one_stratum_each():
    classes = {"train": [{"id": i, "label": i % 4} for i in range(200)], "test": [{"id": -1, "label": 0}]}
    held, note = hold_out_validation(classes, Card(validation_fraction=0.2, seed=3), "rows")
    assert Counter(e["label"] for e in held["validation"]) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert held["test"] is classes["test"] and len(held["train"]) == 160
    assert note == "validation: 40 training rows held out (splits.validation_fraction=0.2, seed 3); test is untouched"
    # Generated targets are text, nearly all distinct: stratifying by them held out nothing
    texts = {"train": [{"id": i, "label": f"answer {i}"} for i in range(200)], "test": []}
    assert len(hold_out_validation(texts, Card(validation_fraction=0.2), "rows")[0]["validation"]) == 40


def test_groups_are_held_out_whole():
    train = [{"id": f"{v}:{c}", "video_id": f"video{v}"} for v in range(30) for c in range(v % 3 + 1)]
    held, _ = hold_out_validation({"train": train, "test": []}, Card(validation_fraction=0.2, seed=0), "captions",
                                  group_of=lambda e: e["video_id"])
    validation_videos = {e["video_id"] for e in held["validation"]}
    assert len(validation_videos) == 6 and not validation_videos & {e["video_id"] for e in held["train"]}
    assert len(held["train"]) + len(held["validation"]) == len(train)


def test_a_bad_fraction_and_a_zero_fraction():
    splits = {"train": [{"label": 0}] * 10, "test": []}
    with pytest.raises(UserError, match=r"card\.md: splits\.validation_fraction must be a number in \[0, 1\), got 1\.5"):
        hold_out_validation(splits, Card(validation_fraction=1.5), "rows")
    assert hold_out_validation(splits, Card(validation_fraction=0), "rows") == (splits, None)


def _write_card(folder, task, header):
    card = folder / "card.md"
    card.write_text(f"---\nname: t\ndomain: {get_task(task).domain}\ntask: {task}\n{header}\n---\n")
    return runner.load_card(str(card), get_task(task))


def _protein_classify(folder):
    for split, n in (("train", 40), ("test", 10)):
        (folder / f"{split}.csv").write_text("sequence,label\n" + "".join(f"MKV{'A' * (i % 7)}L,{'ab'[i % 2]}\n" for i in range(n)))
    return "format: csv\nlabels: [a, b]\nsplits: {train: train.csv, test: test.csv, validation_fraction: 0.25}", 40, 10


def _protein_ppi(folder):
    (folder / "p.fasta").write_text("".join(f">p{i}\nMKV{'A' * i}L\n" for i in range(12)))
    pairs = list(itertools.combinations(range(12), 2))  # 66 distinct pairs
    for split, chosen in (("train", pairs[:40]), ("test", pairs[40:50])):
        (folder / f"{split}.tsv").write_text("".join(f"p{a}\tp{b}\t{(a + b) % 2}\n" for a, b in chosen))
    return ("format: fasta+pairs_tsv\nfiles: {sequences: p.fasta}\nlabels: [negative, positive]\n"
            "splits: {train: train.tsv, test: test.tsv, validation_fraction: 0.25}"), 40, 10


def _code_review(folder):
    for split, n in (("train", 40), ("test", 10)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"patch": f"@@ -1 +1 @@\n+x = {i}", "msg": f"name {i}"}) + "\n"
                                                      for i in range(n)))
    return "format: jsonl\nsplits: {train: train.jsonl, test: test.jsonl, validation_fraction: 0.25}", 40, 10


def _reasoning(folder):
    for split, n in (("train", 40), ("test", 10)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                                                      for i in range(n)))
    return "format: jsonl\nsplits: {train: train.jsonl, test: test.jsonl, validation_fraction: 0.25}", 40, 10


def _video(folder):
    for v in range(20):
        write_video(folder / f"v{v}.mp4", np.full((2, 8, 8, 3), 10 * v, np.uint8))  # reading decodes every video
    for split, videos in (("train", range(16)), ("test", range(16, 20))):
        (folder / f"{split}.csv").write_text("video,caption\n" + "".join(f"v{v},a clip {v} take {c}\n" for v in videos for c in range(2)))
    return "format: csv\nsplits: {train: train.csv, test: test.csv, validation_fraction: 0.25}", 32, 8


CASES = {"protein-classify": _protein_classify, "protein-ppi": _protein_ppi, "code-review-comment": _code_review,
         "reasoning-arithmetic": _reasoning, "video-text-retrieval": _video}


@pytest.mark.parametrize("task_name", list(CASES))
def test_train_and_test_files_get_a_validation_split_from_train(task_name, tmp_path):
    header, train_size, test_size = CASES[task_name](tmp_path)
    task = get_task(task_name)
    dataset = task.read(_write_card(tmp_path, task_name, header), task.options())
    assert len(dataset.splits["test"]) == test_size
    assert len(dataset.splits["train"]) + len(dataset.splits["validation"]) == train_size
    assert len(dataset.splits["validation"]) == pytest.approx(train_size / 4, abs=1)
    assert any(note.startswith("validation: ") and "held out" in note for note in dataset.notes)
    ids = [{json.dumps(e, sort_keys=True, default=str) for e in dataset.splits[s]} for s in ("train", "validation")]
    assert not ids[0] & ids[1]
    no_holdout = task.read(_write_card(tmp_path, task_name, header.replace("validation_fraction: 0.25", "validation_fraction: 0")),
                           task.options())
    assert "validation" not in no_holdout.splits and len(no_holdout.splits["train"]) == train_size


def test_protein_pairs_given_per_split_are_kept_protein_disjoint_on_request(tmp_path):
    # Six families of four proteins, pairs within a family, so that a disjoint split exists; two train pairs
    # reach into the test family and must go
    (tmp_path / "p.fasta").write_text("".join(f">p{i}\nMKV{'A' * i}L\n" for i in range(24)))
    families = [list(itertools.combinations(range(4 * f, 4 * f + 4), 2)) for f in range(6)]
    train = [pair for family in families[:5] for pair in family] + [(0, 20), (4, 21)]
    for split, chosen in (("train", train), ("test", families[5])):
        (tmp_path / f"{split}.tsv").write_text("".join(f"p{a}\tp{b}\t{(a + b) % 2}\n" for a, b in chosen))
    grouped = ("format: fasta+pairs_tsv\nfiles: {sequences: p.fasta}\nlabels: [negative, positive]\n"
               "splits: {train: train.tsv, test: test.tsv, validation_fraction: 0.25, group_by_protein: true}")
    task = get_task("protein-ppi")
    dataset = task.read(_write_card(tmp_path, "protein-ppi", grouped), task.options())
    assert dataset.splits["validation"] and len(dataset.splits["test"]) == 6
    proteins = {split: {p for e in examples for p in (e["a"], e["b"])} for split, examples in dataset.splits.items()}
    assert dataset.splits["test"] and dataset.splits["train"]
    # Ignored before: train kept pairs with test proteins, silently
    assert not proteins["train"] & proteins["test"] and not proteins["validation"] & proteins["test"]
    assert not proteins["train"] & proteins["validation"]
    assert any(note.startswith("group_by_protein: no protein is in two splits") for note in dataset.notes)


@pytest.mark.parametrize("task_name", list(CASES))
def test_a_validation_fraction_that_would_be_ignored_is_refused(task_name, tmp_path):
    header, _, _ = CASES[task_name](tmp_path)
    task = get_task(task_name)
    train_file = re.search(r"splits: \{train: (\S+),", header).group(1)
    # beside a validation file: the fraction held nothing out
    with_validation = header.replace("test: ", f"validation: {train_file}, test: ", 1)
    with pytest.raises(UserError, match=r"card\.md: splits\.validation_fraction holds validation out of train, but "
                                        r"the data gives a validation split; remove validation_fraction$"):
        task.read(_write_card(tmp_path, task_name, with_validation), task.options())
    # one table the ratios divide: validation got its ratio, the fraction nothing
    unsplit = re.sub(r"splits: \{.*\}", "splits: {validation_fraction: 0.25}", header)
    unsplit = (unsplit.replace("files: {sequences: p.fasta}", f"files: {{sequences: p.fasta, pairs: {train_file}}}")
               if "files:" in unsplit else f"{unsplit}\nfiles: {{data: {train_file}}}")
    with pytest.raises(UserError, match=r"card\.md: splits\.validation_fraction holds validation out of train where the "
                                        r"data comes split \(.+\); here splits\.ratios divide the \w+: give validation "
                                        r"its ratio there"):
        task.read(_write_card(tmp_path, task_name, unsplit), task.options())
