"""Frozen-feature caching (shared/feature_cache.py) on the protein pipelines: which
stages count as frozen, the staged encoder forward, and training with the cache ending
where training without it ends."""

from __future__ import annotations

import json

import pytest
import torch
from peftlab.domains.protein.backbones import load_backbone
from peftlab.pipelines.cli import main
from peftlab.shared import io, methods
from peftlab.shared.feature_cache import FeatureCache, frozen_prefix_stages

SMALL = ["data.limit.train=64", "data.limit.validation=32", "data.limit.test=32", "train.epochs=3",
         "train.batch_size=16", "train.early_stopping_patience=null", "train.precision=fp32"]


def _encoder():
    encoder, _ = load_backbone("tiny")
    return encoder


@pytest.mark.parametrize(("method", "options", "frozen"), [
    ("full", {}, 0),
    ("lora", {"target_modules": ["k_proj", "v_proj"], "layers": "last_1"}, 2),  # embedding + layer 0
    ("lora", {"target_modules": ["k_proj", "v_proj"]}, 1),
    ("freeze_layers", {"trainable_blocks": 1}, 2),
    ("freeze_layers", {"trainable_blocks": 0}, 3),  # the final norm trains
    ("freeze_layers", {"trainable_blocks": 0, "train_after_blocks": False}, 4),  # a linear probe
])
def test_frozen_prefix_counts_untouched_stages(method, options, frozen):
    adapted = methods.apply(_encoder(), method, **options)
    assert frozen_prefix_stages(adapted.base_model.stages()) == frozen


def test_hooks_and_dropout_end_the_frozen_prefix():
    encoder = _encoder()
    for p in encoder.parameters():
        p.requires_grad_(False)
    assert frozen_prefix_stages(encoder.stages()) == 4
    handle = encoder.layers[1].register_forward_hook(lambda module, args, output: output)
    assert frozen_prefix_stages(encoder.stages()) == 2
    handle.remove()
    encoder.layers[0].self_attn.dropout = 0.1
    assert frozen_prefix_stages(encoder.stages()) == 1


def test_staged_forward_equals_the_whole_forward():
    encoder = _encoder().eval()
    tokens = encoder.tokenize(["MKTAYIAKQR", "MKV", "ACDEFGHIKLMNPQ"])
    with torch.no_grad():
        whole = encoder(tokens)
        for stage in range(len(encoder.stages()) + 1):
            prefix = encoder(tokens, stop=stage)
            assert torch.equal(encoder(tokens, hidden=prefix, start=stage), whole), stage


def test_cache_keeps_within_budget():
    cache = FeatureCache(stages=1, budget_bytes=2 * 4 * 10)
    cache.store(["a", "b", "c"], [torch.ones(10), torch.zeros(10), torch.ones(10)])
    assert len(cache) == 2 and cache.missing(["c"]) and not cache.missing(["a", "b"])
    assert torch.equal(cache.fetch(["b"])[0], torch.zeros(10))


def _train(tmp_path, name, capsys, *settings):
    out = tmp_path / name
    assert main(["run", "protein-classify", "--demo", "--out", str(out), *SMALL, *settings]) == 0
    log = capsys.readouterr().err
    head = io.load_tensors(out / "adapter" / "head.safetensors")
    return json.loads((out / "metrics.json").read_text()), head, log


@pytest.mark.parametrize("method", [
    ["--method", "freeze_layers", "method.trainable_blocks=0", "method.train_after_blocks=false"],
    ["method.layers=last_1", "method.dropout=0"],
])
def test_training_with_the_cache_ends_where_training_without_it_ends(tmp_path, capsys, method):
    cached, cached_head, log = _train(tmp_path, "cached", capsys, *method)
    assert "feature cache: on" in log
    plain, plain_head, log = _train(tmp_path, "plain", capsys, *method, "train.feature_cache_gb=0")
    assert "feature cache" not in log
    # Cached prefix outputs come from the batch an example first appeared in; recomputed
    # ones from its current batch, padded differently: equal up to float rounding.
    for key in plain_head:
        torch.testing.assert_close(cached_head[key], plain_head[key], atol=1e-5, rtol=1e-4)
    for split in ("validation", "test"):
        for metric, value in plain[split].items():
            assert cached[split][metric] == pytest.approx(value, abs=1e-3), (split, metric)
    assert [h["train_loss"] for h in cached["history"]] == pytest.approx([h["train_loss"] for h in plain["history"]], rel=1e-4)
    assert len(cached["train"]["epoch_seconds"]) == 3


def test_random_crops_turn_the_cache_off(tmp_path, capsys):
    _, _, log = _train(tmp_path, "crops", capsys, "--method", "freeze_layers", "task.max_length=20",
                       "train.epochs=1")
    assert "feature cache: off (sequences longer than task.max_length get a new random crop" in log
