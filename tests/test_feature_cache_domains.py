"""Frozen-feature caching (shared/feature_cache.py) in medical imaging, speech emotion and
point clouds: which stages count as frozen per method, staged forwards equal to the whole
forward, training with the cache ending where training without it ends, and inputs that
vary between epochs (augmentation, random crops, padding) turning it off."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from conftest import demo_card_for
from peftlab.domains.medical_imaging.backbones import backbone_stages, staged_forward
from peftlab.domains.medical_imaging.backbones import load_backbone as load_image_backbone
from peftlab.domains.point_cloud.backbones import load_backbone as load_point_backbone
from peftlab.domains.speech_emotion.backbones import load_backbone as load_speech_backbone
from peftlab.domains.speech_emotion.modules import SpeechPrompt
from peftlab.pipelines.cli import main
from peftlab.shared import io, methods
from peftlab.shared.cards import read_card
from peftlab.shared.feature_cache import in_training
from peftlab.shared.tasks import get_task
from torch import nn

PROBE = ["--method", "freeze_layers", "method.trainable_blocks=0", "method.train_after_blocks=false"]
SMALL = ["data.limit.train=48", "data.limit.validation=16", "data.limit.test=32", "train.epochs=3",
         "train.batch_size=16", "train.early_stopping_patience=null", "train.precision=fp32", "eval.splits=[test]"]


@functools.cache
def _demo(task_name: str):
    task = get_task(task_name)
    card = read_card(demo_card_for(task_name))
    dataset = task.read(card, task.options())
    return dataset.labels, dataset.splits["train"][:48]


def _model(task_name: str, backbone: str, method: str, method_options: dict | None = None, **task_options):
    """A task model with a method applied as `peftlab run` applies it (the task's defaults first)."""
    task = get_task(task_name)
    labels, _ = _demo(task_name)
    options = task.options(**task_options)
    if task_name == "speech-emotion":
        options.class_counts = [1] * len(labels)
    model = task.build_model(backbone, labels, options)
    model.backbone = methods.apply(model.backbone, method, **{**task.default_method_options(method, model), **(method_options or {})})
    return model


def _stages(model):
    base = model.backbone.base_model
    listed = backbone_stages(base) if hasattr(model, "data_config") else base.stages
    return in_training(model, listed if callable(listed) else lambda: listed)[:2]


def _no_dropout(model: nn.Module) -> nn.Module:
    """The tiny speech presets keep transformers' default dropout (0.1), which rightly
    ends the frozen prefix at the first layer; without it the layers can count too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


PROBE_OPTIONS = {"trainable_blocks": 0, "train_after_blocks": False}


@pytest.mark.parametrize(("backbone", "method", "options", "frozen"), [
    ("tiny_vit", "full", {}, 0),
    ("tiny_vit", "lora", {"layers": "last_1"}, 2),             # embedding + block 0
    ("tiny_vit", "freeze_layers", {"trainable_blocks": 1}, 2),
    ("tiny_vit", "freeze_layers", PROBE_OPTIONS, 4),           # all: the pooled features
    ("tiny_vit", "vpt", {}, 0),                                # its hook on norm_pre edits the embedding
    ("tiny_resnet", "freeze_layers", {"trainable_blocks": 1}, 4),  # stem + layer1..3 (one block each)
    ("tiny_resnet", "freeze_layers", PROBE_OPTIONS, 6),
    ("tiny_resnet", "tsa", {}, 1),                             # hooks on every residual block's 3x3 convs
])
def test_medical_frozen_stages(backbone, method, options, frozen):
    model = _model("medical-classify", backbone, method, options, batchnorm="frozen")
    assert _stages(model)[0] == frozen


def test_batchnorm_that_updates_ends_the_prefix_at_the_stem():
    model = _model("medical-classify", "tiny_resnet", "freeze_layers", PROBE_OPTIONS)  # batchnorm=update
    assert _stages(model) == (0, "BatchNorm using batch statistics")
    line = model.plan_feature_cache(_demo("medical-classify")[1], 2**30)
    assert "BatchNorm" in line and "task.batchnorm=frozen" in line and model.feature_cache is None


@pytest.mark.parametrize(("method", "options", "frozen"), [
    ("full", {}, 0),                                       # the CNN trains too
    ("lora", {}, 2),                                       # every layer: CNN and the encoder's entry
    ("lora", {"layers": "last_1"}, 3),                     # + layer 0
    ("freeze_layers", {"trainable_blocks": 1}, 3),
    ("freeze_layers", PROBE_OPTIONS, 5),                   # all: every layer's states
    ("speech_prompt", {}, 1),                              # prepended at the entry
])
def test_speech_frozen_stages(method, options, frozen):
    model = _model("speech-emotion", "tiny", method, options)
    _no_dropout(model)
    assert _stages(model)[0] == frozen


def test_speech_dropout_in_frozen_layers_ends_the_prefix():
    model = _model("speech-emotion", "tiny", "freeze_layers", PROBE_OPTIONS)
    assert _stages(model) == (1, "dropout")  # the CNN still counts: it has none


@pytest.mark.parametrize(("method", "options", "frozen"), [
    ("full", {}, 0),
    ("lora", {}, 2),                                       # every block; the embedding and empty prompt slot stay
    ("lora", {"layers": "last_1"}, 3),                     # + the (empty) prompt slot + block 0
    ("freeze_layers", {"trainable_blocks": 1}, 3),
    ("freeze_layers", PROBE_OPTIONS, 5),
    ("point_peft", {}, 1),                                 # prompt after the embedding, adapters in every block
    ("geometry_adapter", {}, 2),
])
def test_point_cloud_frozen_stages(method, options, frozen):
    assert _stages(_model("pointcloud-classify", "tiny", method, options))[0] == frozen


def test_point_cloud_batchnorm_statistics_that_update_end_the_prefix():
    model = _model("pointcloud-classify", "tiny", "freeze_layers", PROBE_OPTIONS, freeze_bn_stats=False, augment=False)
    assert _stages(model) == (0, "BatchNorm using batch statistics")
    assert "task.freeze_bn_stats=true" in model.plan_feature_cache(_demo("pointcloud-classify")[1], 2**30)


# ------------------------------------------------------------------------ staged forwards

def _each_split_equals_the_whole(run, total: int, whole):
    """run(hidden, start, stop): for every boundary, the rest after the prefix equals the whole."""
    for stage in range(1, total + 1):
        prefix = run(None, 0, stage)
        prefix = prefix[0] if isinstance(prefix, tuple) and stage == total and len(prefix) == 2 else prefix
        rest = run(prefix, stage, None)
        pairs = zip(rest, whole) if isinstance(whole, tuple) else [(rest, whole)]
        assert all(torch.equal(a, b) for a, b in pairs), stage


@pytest.mark.parametrize("backbone", ["tiny_vit", "tiny_resnet"])
def test_image_staged_forward_equals_timm_forward(backbone):
    network, _, _ = load_image_backbone(backbone)
    network.eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        whole = network(pixels)
        assert torch.equal(staged_forward(network, pixels), whole)
        _each_split_equals_the_whole(lambda h, start, stop: staged_forward(network, pixels if h is None else h, start, stop),
                                     len(backbone_stages(network)), whole)


def _transformers_reference(encoder, inputs, lengths):
    """What transformers' own wav2vec 2.0-family encoder gives: each layer's input and
    outputs, collected by hooks, the last replaced by the encoder's output."""
    network = encoder.network
    frames = encoder._embed_wav2vec2(inputs)
    valid = encoder.frame_lengths(lengths)
    mask = torch.arange(frames.shape[1])[None, :] < valid[:, None]
    collected = []
    layers = network.encoder.layers
    handles = [layers[0].register_forward_pre_hook(lambda m, a, k: collected.append(a[0] if a else k["hidden_states"]), with_kwargs=True)]
    handles += [layer.register_forward_hook(lambda m, a, r: collected.append(r[0] if isinstance(r, tuple) else r)) for layer in layers]
    try:
        result = network.encoder(frames, attention_mask=mask)
    finally:
        for handle in handles:
            handle.remove()
    collected[-1] = result.last_hidden_state
    return torch.stack(collected), mask


@pytest.mark.parametrize("backbone", ["tiny_wavlm", "tiny_wav2vec2", "tiny_hubert", "tiny_whisper"])
@pytest.mark.parametrize("prompted", [None, "input", "every_layer"])
def test_speech_staged_forward_equals_the_whole_forward(backbone, prompted):
    encoder, _ = load_speech_backbone(backbone)
    encoder.eval()
    if prompted:
        torch.manual_seed(0)
        encoder.speech_prompt = SpeechPrompt(3, encoder.width, 0.5, encoder.num_layers if prompted == "every_layer" else 0)
    rng = np.random.default_rng(0)
    batch = encoder.featurize([rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 9000, 12345)])
    with torch.no_grad():
        whole = encoder(batch.inputs, batch.lengths)
        if encoder.family != "whisper" and not prompted:  # padding and all: transformers' own numbers
            reference = _transformers_reference(encoder, batch.inputs, batch.lengths)
            assert torch.equal(whole[0], reference[0]) and torch.equal(whole[1], reference[1])
        _each_split_equals_the_whole(lambda h, start, stop: encoder(batch.inputs, batch.lengths, hidden=h, start=start, stop=stop),
                                     len(encoder.stages()), whole)


@pytest.mark.parametrize(("method", "options"), [
    (None, {}), ("point_peft", {}),
    ("point_peft", {"prompt_blocks": 1, "memory_size": 6}),  # deep prompts: block 1 sees none
    ("point_peft", {"prompt_blocks": 2, "memory_size": 6}),  # fresh prompts before each block
])
def test_point_bert_staged_forward_equals_the_whole_forward(method, options):
    encoder, _ = load_point_backbone("tiny")
    if method:
        encoder = methods.apply(encoder, method, local_groups=4, local_size=4, **options).base_model
        for block in encoder.blocks.blocks:  # zero-initialised gates would hide the adapters
            nn.init.normal_(block.geometry_adapter.gate, std=0.5)
        if options.get("memory_size"):  # a filled bank, so that every block's prompts consult it
            encoder.train()
            with torch.no_grad():
                encoder(torch.randn(6, 256, 3))
            assert int(encoder.prompt.memory_count) == 6
    encoder.eval()
    points = torch.randn(3, 256, 3)
    with torch.no_grad():
        whole = encoder(points)
        _each_split_equals_the_whole(lambda h, start, stop: encoder(points, hidden=h, start=start, stop=stop),
                                     len(encoder.stages()), whole)


# ------------------------------------------------------------------ training with the cache

def _train(tmp_path, name, capsys, task_name, *settings):
    out = tmp_path / name
    assert main(["run", task_name, "--demo", "--out", str(out), *SMALL, *settings]) == 0
    log = capsys.readouterr().err
    return json.loads((out / "metrics.json").read_text()), io.load_tensors(out / "adapter" / "head.safetensors"), log


@pytest.mark.parametrize(("task_name", "settings"), [
    ("medical-classify", ["task.augment=false", *PROBE]),
    ("medical-classify", ["task.augment=false", "--method", "freeze_layers", "method.trainable_blocks=1"]),
    ("speech-emotion", PROBE),                                   # the CNN (dropout follows it)
    ("pointcloud-classify", ["task.augment=false"]),             # Point-PEFT: the patch embedding
    ("pointcloud-classify", ["task.augment=false", "--method", "lora", "method.layers=last_1", "method.dropout=0"]),
])
def test_training_with_the_cache_ends_where_training_without_it_ends(tmp_path, capsys, task_name, settings):
    cached, cached_head, log = _train(tmp_path, "cached", capsys, task_name, *settings)
    assert "feature cache: on" in log
    plain, plain_head, log = _train(tmp_path, "plain", capsys, task_name, *settings, "train.feature_cache_gb=0")
    assert "feature cache" not in log
    # Same batches, same order; cached prefix outputs may come from a batch padded
    # differently (speech): equal up to float rounding.
    for key in plain_head:
        torch.testing.assert_close(cached_head[key], plain_head[key], atol=1e-5, rtol=1e-4)
    for metric, value in plain["test"].items():
        if isinstance(value, float):
            assert cached["test"][metric] == pytest.approx(value, abs=1e-3), metric
    assert [h["train_loss"] for h in cached["history"]] == pytest.approx([h["train_loss"] for h in plain["history"]], rel=1e-4)


# ---------------------------------------------------------------- inputs that vary turn it off

def test_augmentation_and_random_crops_turn_the_cache_off():
    medical = _model("medical-classify", "tiny_vit", "freeze_layers", PROBE_OPTIONS)  # augment: the default
    assert "random crop and flip each epoch: task.augment=true" in medical.plan_feature_cache(_demo("medical-classify")[1], 2**30)
    points = _model("pointcloud-classify", "tiny", "freeze_layers", PROBE_OPTIONS)
    assert "random subset of points" in points.plan_feature_cache(_demo("pointcloud-classify")[1], 2**30)
    speech = _model("speech-emotion", "tiny", "freeze_layers", PROBE_OPTIONS, max_seconds=0.5)
    assert "new random window each epoch" in speech.plan_feature_cache(_demo("speech-emotion")[1], 2**30)
    assert medical.feature_cache is None and points.feature_cache is None and speech.feature_cache is None
    # the first seconds of each clip (PEFT-SER's crop) reach the frozen stages the same way every epoch
    first_seconds = _model("speech-emotion", "tiny", "freeze_layers", PROBE_OPTIONS, max_seconds=0.5, train_crop="start")
    assert "random window" not in first_seconds.plan_feature_cache(_demo("speech-emotion")[1], 2**30)


def test_padding_dependent_speech_features_turn_the_cache_off_unless_clips_are_one_length():
    model = _model("speech-emotion", "tiny_whisper", "freeze_layers", PROBE_OPTIONS)
    examples = _demo("speech-emotion")[1][:8]  # 0.8-1.2 s each
    assert "change with the padding its batch adds" in model.plan_feature_cache(examples, 2**30)
    shortest = min(e["samples"] for e in examples)
    trimmed = [dict(e, audio=e["audio"][:shortest], samples=shortest) for e in examples]
    assert model.plan_feature_cache(trimmed, 2**30).startswith("feature cache: on")
