"""A finished run reused later and from elsewhere: `eval` reads the run's own copy of
its card, a backbone named by a relative path is kept absolute, a domain's methods are
known to `merge` and `list`, and a diverging loss stops training with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peftlab
import pytest
import torch
import yaml
from conftest import run_peftlab
from peftlab.shared.errors import UserError

CARD = ("---\nname: peptides\ndomain: protein\ntask: protein-classify\nformat: csv\nfiles: {data: data.csv}\n"
        "labels: [inactive, active]\nsplits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 0}\n---\n")


def write_card(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = ["sequence,label"] + [f"{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 12))},{i % 2}" for i in range(60)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    (folder / "card.md").write_text(CARD)
    return folder / "card.md"


def test_eval_reads_the_runs_copy_of_its_card_after_the_original_is_edited_or_moved(tmp_path, capsys):
    card = write_card(tmp_path / "data")
    run_dir = peftlab.run("protein-classify", data=str(card), backbone="tiny", out=tmp_path / "run",
                          overrides={"train.epochs": 1})
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    trained_on = (run_dir / "predictions" / "test.jsonl").read_text()

    card.write_text(CARD.replace("seed: 0", "seed: 5"))  # another test split, were the edited card read
    capsys.readouterr()
    assert peftlab.load(run_dir).evaluate("test", predictions_file=tmp_path / "edited.jsonl") == saved
    assert (tmp_path / "edited.jsonl").read_text() == trained_on
    assert f"note: {card} has changed since training; reading the run's copy" in capsys.readouterr().err

    card.rename(card.with_name("renamed.md"))  # its data stays where training read it
    assert peftlab.load(run_dir).evaluate("test") == saved
    # another card is still read as given
    assert peftlab.load(run_dir).evaluate("test", card=str(card.with_name("renamed.md"))) != saved

    moved = tmp_path / "moved"
    card.parent.rename(moved)  # the data itself moved: the error says where it was looked for, and the way on
    for named in (None, str(run_dir / "card.md")):  # the run's copy, named or not, gets the same way on
        with pytest.raises(UserError, match=rf"data\.csv.*; or evaluate on the data where it is now: "
                                            rf"`peftlab eval {run_dir} --data CARD`"):
            peftlab.load(run_dir).evaluate("test", card=named)
    assert peftlab.load(run_dir).evaluate("test", card=str(moved / "renamed.md")) != saved  # seed 5 there


def test_a_backbone_given_by_a_relative_path_is_found_from_any_folder(tmp_path, monkeypatch):
    from peftlab.domains.protein import backbones
    from test_protein_data import _official_checkpoint

    work = tmp_path / "work"
    work.mkdir()
    torch.save(_official_checkpoint(backbones.load_backbone("tiny")[0]), work / "esm2_tiny.pt")
    card = write_card(tmp_path / "data")
    monkeypatch.chdir(work)
    run_dir = peftlab.run("protein-classify", data=str(card), backbone="esm2_tiny.pt", out=tmp_path / "run",
                          overrides={"train.epochs": 1})
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["backbone"]["name"] == str(work / "esm2_tiny.pt")
    monkeypatch.chdir(tmp_path)  # where esm2_tiny.pt is not
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert peftlab.load(run_dir).evaluate("test") == saved


def test_merge_and_list_know_the_methods_a_domain_registers(tmp_path):
    """A domain's methods register when its package is imported; `merge` checked the
    method before that and called ViT prompts an unknown method."""
    listed = run_peftlab("list", "methods")
    assert listed.returncode == 0
    names = {line.split()[0] for line in listed.stdout.splitlines() if line and not line.startswith(" ")}
    assert {"vpt", "point_peft", "speech_prompt", "llama_adapter", "lora"} <= names
    run_dir = tmp_path / "vpt-run"
    run_dir.mkdir()
    (run_dir / "meta.json").write_text(json.dumps({"method": {"name": "vpt", "options": {}}}))
    merged = run_peftlab("merge", run_dir, "--out", tmp_path / "merged")
    assert merged.returncode == 2
    assert merged.stderr.strip().startswith(f"error: {run_dir}: method 'vpt' cannot be merged into the backbone weights")
    assert not (tmp_path / "merged").exists()


def test_a_diverging_loss_stops_training_with_the_step_and_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"^the training loss became (nan|inf) at step \d+ \(epoch 1\): training "
                                        r"diverged; lower train\.lr \(now 1e\+06\)"):
        peftlab.run("protein-classify", demo=True, out=tmp_path / "run", overrides={"train.lr": 1e6, "train.epochs": 1})
    assert not (tmp_path / "run").exists()
