"""Image backbones through timm: ViT, ResNet, or any other timm architecture.

A backbone name is one of:

- a timm name, e.g. `resnet50`, `vit_base_patch16_224`, `vit_base_patch16_224.mae`
  (a `.tag` picks the pretrained weights). Resolution order: the local Hugging Face
  cache (where timm downloads to), then the torch hub cache (timm's older URL
  downloads), then a download. Offline (`PEFTLAB_OFFLINE=1` or `HF_HUB_OFFLINE=1`)
  with neither cache holding it, the error names where it looked and how to pass a
  local file.
- `ARCH:PATH`, a local weights file for timm architecture ARCH (`.safetensors`,
  `.pth`, `.pt`, `.bin`; a plain state dict, or one under `state_dict` / `model`), in
  timm's key names or torchvision's (torchvision's ResNets share timm's names). A file
  whose names differ but whose tensors match ARCH's one for one, in order and shape,
  is loaded by position, and the run's meta.json says so.
- a local folder as timm saves for the Hugging Face hub (`config.json` naming the
  architecture, with `model.safetensors` or `pytorch_model.bin`).
- `tiny_vit`, `tiny_resnet` (`tiny` = `tiny_vit`): small seeded random-init models of
  each family, for tests and the demo.
- `random-init:ARCH`: ARCH with seeded random weights, asked for by name, for
  "how much does pretraining help" baselines. Nothing else is ever random-init.

Image size, interpolation, mean and std come from the backbone's own pretrained
config (timm's `resolve_data_config`), so a model sees inputs normalised the way it
was trained.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from urllib.parse import urlparse

import torch
from peftlab.shared import hub, io
from peftlab.shared.backbone_cache import load_once
from peftlab.shared.errors import UserError
from peftlab.shared.feature_cache import Stage
from peftlab.shared.lazy import lazy_import
from torch import nn

timm = lazy_import("timm")

TINY_SEED = 1234
"""Fixed so a tiny backbone is the same weights every time it is built (runs reload it)."""
TINY_IMAGE_SIZE = 32
TINY_DATA_CONFIG = {
    "input_size": (3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
RANDOM_INIT_PREFIX = "random-init:"
RECOMMENDED = ["resnet50", "vit_base_patch16_224", "vit_base_patch16_224.mae"]
"""The backbones of Dutt et al.: supervised ResNet-50, supervised and MAE ViT-Base."""


def _tiny_vit(image_size: int) -> nn.Module:
    # 2 blocks of width 64 over 4x4 patches: 64 tokens + CLS at 32 px.
    return timm.models.VisionTransformer(img_size=image_size, patch_size=4, embed_dim=64, depth=2, num_heads=4,
                                         mlp_ratio=2.0, num_classes=0)


def _tiny_resnet(image_size: int) -> nn.Module:
    # One BasicBlock per stage, narrow channels. zero_init_last=False so every block's
    # residual branch contributes from the start (timm zeroes the last BN otherwise).
    return timm.models.ResNet(timm.models.BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 48, 64),
                              stem_width=16, num_classes=0, zero_init_last=False)


TINY_PRESETS = {"tiny_vit": _tiny_vit, "tiny_resnet": _tiny_resnet}
TINY_ALIASES = {"tiny": "tiny_vit"}


def backbone_names() -> list[str]:
    return ["tiny", *TINY_PRESETS, *RECOMMENDED, "ARCH:/path/to/weights.pth", f"{RANDOM_INIT_PREFIX}ARCH"]


@load_once
def load_backbone(name: str, image_size: int | None = None) -> tuple[nn.Module, dict, dict]:
    """-> (model without classifier, info for meta.json, timm data config)."""
    preset = TINY_ALIASES.get(name, name)
    if preset in TINY_PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = TINY_PRESETS[preset](image_size or TINY_IMAGE_SIZE)
        model.pretrained_cfg = dict(TINY_DATA_CONFIG)
        return _finish(model, name, "random-init tiny preset", preset, image_size)
    if name.startswith(RANDOM_INIT_PREFIX):
        arch = _check_architecture(name[len(RANDOM_INIT_PREFIX):], name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = _create(arch, image_size, pretrained=False)
        return _finish(model, name, "random-init (asked for by name)", arch, image_size)

    path = Path(os.path.expanduser(name))
    if path.is_dir():
        return _load_hub_folder(path, name, image_size)
    if path.is_file():
        raise UserError(f"{path}: say which timm architecture these weights are for, "
                        f"e.g. --backbone resnet50:{path} (see `timm.list_models()`)")
    arch, sep, file = name.partition(":")
    if sep and file:
        weights = Path(os.path.expanduser(file))
        if not weights.is_file():
            raise UserError(f"backbone {name!r}: weights file {weights} does not exist; pass ARCH:/path/to/weights.pth")
        arch = _check_architecture(arch, name)
        return _load_weights_file(arch, weights, name, image_size)
    return _load_named(_check_architecture(name, name), name, image_size)


def _check_architecture(arch: str, name: str) -> str:
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:8]}*")[:5]
        hint = f" (close timm names: {', '.join(close)})" if close else ""
        raise UserError(f"backbone {name!r}: {arch!r} is not a timm architecture, a local path, or one of "
                        f"{', '.join(['tiny', *TINY_PRESETS])}{hint}")
    return arch


def _create(arch: str, image_size: int | None, **kwargs) -> nn.Module:
    """timm.create_model; `img_size` goes to the models that take it."""
    kwargs.setdefault("num_classes", 0)
    if image_size:
        try:
            return timm.create_model(arch, img_size=image_size, **kwargs)
        except TypeError as error:
            # Conv nets take any input size and have no img_size argument.
            if "img_size" not in str(error):
                raise
    return timm.create_model(arch, **kwargs)


def _reference(arch: str) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """ARCH's state-dict shapes with its pretrained classifier (on the meta device: no
    memory, no init), and the classifier's key prefixes."""
    with torch.device("meta"):
        state = timm.create_model(arch, pretrained=False).state_dict()
    cfg = timm.models.get_pretrained_cfg(arch)
    classifier = cfg.classifier if cfg is not None else None
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    return state, tuple(f"{n}." for n in names if n)


def _load_strict(arch: str, state: dict[str, torch.Tensor], image_size: int | None) -> nn.Module:
    """timm builds ARCH from `state` (its own filter function adapts e.g. position
    embeddings to the image size), strictly: every backbone tensor must come from the
    file. timm only loads strictly when the class count matches the pretrained one, so
    the classifier (dropped anyway) is swapped for a placeholder of that shape, and
    removed after."""
    reference, classifier = _reference(arch)
    state = {k: v for k, v in state.items() if not (classifier and k.startswith(classifier))}
    state.update({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in reference.items()
                  if classifier and k.startswith(classifier)})
    cfg = timm.models.get_pretrained_cfg(arch)
    model = _create(arch, image_size, pretrained=True, pretrained_cfg_overlay={"state_dict": state},
                    num_classes=cfg.num_classes if cfg is not None else 1000)
    model.reset_classifier(0)
    return model


# ----------------------------------------------------------------------- named (cache / hub)

def _cached_weights(arch: str) -> tuple[Path | None, list[str]]:
    """Where timm would have put `arch`'s weights, and the places looked at."""
    cfg = timm.models.get_pretrained_cfg(arch)
    looked = []
    if cfg is None:
        return None, looked
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(hit, str):
                return Path(hit), looked
        looked.append(f"the Hugging Face cache {HF_HUB_CACHE} (repo {cfg.hf_hub_id})")
    if cfg.url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if cached.is_file():
            return cached, looked
        looked.append(str(cached))
    return None, looked


def _load_named(arch: str, name: str, image_size: int | None):
    cached, looked = _cached_weights(arch)
    if cached is not None:
        model = _load_strict(arch, read_state_dict(cached), image_size)
        return _finish(model, name, str(cached), arch, image_size)
    where = "; ".join(["no local path " + repr(name), *looked])
    how = f"pass --backbone {arch}:/path/to/weights.pth (a timm or torchvision state dict)"
    if reason := hub.offline():
        raise UserError(f"backbone {name!r} is not available offline ({reason}): {where}; download it where you have "
                        f"internet (timm.create_model({arch!r}, pretrained=True)) or {how}")
    try:
        model = _create(arch, image_size, pretrained=True)
    except Exception as error:  # network and hub errors come in many types
        raise UserError(f"backbone {name!r} could not be downloaded ({type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}); looked in: {where}; {how}") from None
    return _finish(model, name, f"downloaded by timm ({arch})", arch, image_size)


# ------------------------------------------------------------------------------ local files

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file -> a flat state dict (tensors only, never arbitrary pickles)."""
    if path.suffix == ".safetensors":
        try:
            return io.load_tensors(path)
        except Exception as error:  # safetensors raises its own error types
            raise UserError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path}: refused to load (it holds objects other than tensors: "
                        f"{str(error).splitlines()[0]}); save a plain state dict") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path}: not a readable torch checkpoint ({error}); is the file complete?") from None
    # Training checkpoints wrap the weights (timm: state_dict / state_dict_ema; others: model).
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(torch.is_tensor(v) for v in data.values()):
        raise UserError(f"{path}: not a state dict of tensors (keys {list(data)[:4] if isinstance(data, dict) else type(data).__name__})")
    return {k.removeprefix("module."): v for k, v in data.items()}


_NOTED_BY_POSITION: set[tuple[Path, str]] = set()


def _load_weights_file(arch: str, path: Path, name: str, image_size: int | None):
    state = read_state_dict(path)
    try:
        model = _load_strict(arch, state, image_size)
        mapping = "by name"
    except RuntimeError as by_name_error:  # load_state_dict: missing / unexpected keys or shapes
        reordered = _match_by_position(arch, state)
        if reordered is None:
            first = str(by_name_error).splitlines()
            raise UserError(f"{path}: the weights do not fit timm architecture {arch!r} "
                            f"({' '.join(first[:2])[:300]}); check the architecture name") from None
        model = _load_strict(arch, reordered, image_size)
        mapping = "by position"
        if (path, arch) not in _NOTED_BY_POSITION:  # said once: training, evaluation and predict reload it
            _NOTED_BY_POSITION.add((path, arch))
            print(f"note: {path}: key names differ from timm's {arch}; all {len(reordered)} tensors match it "
                  f"in order and shape, so they were loaded by position", file=sys.stderr)
    model, info, config = _finish(model, name, str(path), arch, image_size)
    info["key_mapping"] = mapping
    return model, info, config


def _match_by_position(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """`state` renamed to timm's keys when the two agree tensor for tensor, in order.

    BatchNorm's `num_batches_tracked` counters are left out on both sides (some
    exporters drop them). The file may or may not carry the classifier.
    """
    reference, classifier = _reference(arch)
    own = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    candidates = [list(own), [k for k in own if not (classifier and k.startswith(classifier))]]
    for keys in candidates:
        if len(keys) == len(theirs) and all(own[k].shape == v.shape for k, (_, v) in zip(keys, theirs)):
            return {k: v for k, (_, v) in zip(keys, theirs)}
    return None


def _load_hub_folder(path: Path, name: str, image_size: int | None):
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: a backbone folder needs config.json naming the timm architecture "
                        f"(as timm's push_to_hub / save_for_hf writes it); for a weights file pass ARCH:/path/file.pth")
    try:
        config = json.loads(config_file.read_text())
        arch = config["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{config_file}: expected JSON with an 'architecture' field (timm's hub config)") from None
    weights = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).is_file()), None)
    if weights is None:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
    arch = _check_architecture(arch, name)
    model, info, data_config = _load_weights_file(arch, weights, name, image_size)
    # The folder's own preprocessing (mean, std, size) wins over the architecture default.
    saved = {k: v for k, v in (config.get("pretrained_cfg") or {}).items()
             if k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}
    data_config.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    if image_size:
        data_config["input_size"] = (3, image_size, image_size)
    info["data_config"] = data_config
    return model, info, data_config


# ------------------------------------------------------------------------------------ info

def _finish(model: nn.Module, name: str, source: str, arch: str, image_size: int | None):
    model.eval()
    data_config = dict(timm.data.resolve_data_config({}, model=model))
    if image_size:
        data_config["input_size"] = (3, image_size, image_size)
    info = {
        "name": name,
        "source": source,
        "architecture": arch,
        "family": family(model),
        "data_config": data_config,
        "weights_sha256": io.tensors_fingerprint(model.state_dict()),
    }
    return model, info, data_config


def is_vit(model: nn.Module) -> bool:
    """A timm-style vision transformer: patch tokens, prefix (CLS) tokens, a block list."""
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "norm_pre", "norm", "num_prefix_tokens"))


def is_resnet(model: nn.Module) -> bool:
    return isinstance(model, timm.models.ResNet) or all(hasattr(model, f"layer{i}") for i in range(1, 5))


def family(model: nn.Module) -> str:
    if is_vit(model):
        return "vit"
    if is_resnet(model):
        return "resnet"
    return "convnet" if any(isinstance(m, nn.Conv2d) for m in model.modules()) else "other"


def feature_width(model: nn.Module) -> int:
    """Width of the pooled features a classifier-less timm model returns."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


# ------------------------------------------------------------------------ staged forward
# Frozen-feature caching (shared/feature_cache.py) runs a backbone stage by stage: a ViT
# as embedding (patches, CLS / register tokens, positions), each block, then the final
# norm with pooling; a ResNet as stem, each residual block, then pooling. Only timm's
# own two classes qualify: subclasses may change what their forward does between stages.

def backbone_stages(model: nn.Module) -> list[nn.Module | Stage] | None:
    """`model` in the order `staged_forward` runs it; None for other architectures."""
    if type(model) is timm.models.VisionTransformer:
        loose = [p for p in (model.cls_token, model.reg_token, model.pos_embed) if p is not None]
        embed = Stage(modules=[model.patch_embed, model.pos_drop, model.patch_drop, model.norm_pre], parameters=loose)
        pooling = [m for m in (model.norm, model.attn_pool, model.fc_norm, model.head_drop, model.head) if m is not None]
        return [embed, *model.blocks, Stage(modules=pooling)]
    if type(model) is timm.models.ResNet:
        stem = Stage(modules=[model.conv1, model.bn1, model.act1, model.maxpool])
        pooling = Stage(modules=[model.global_pool, model.fc], dropout=float(model.drop_rate or 0.0))
        return [stem, *_residual_blocks(model), pooling]
    return None


def _residual_blocks(model: timm.models.ResNet) -> list[nn.Module]:
    return [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]


def staged_forward(model: nn.Module, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """The output of stages [start, stop) of `backbone_stages(model)` (all of them by
    default: the same pooled features as `model(x)`). From `start` > 0, `x` is the
    output of stage start - 1."""
    vit = type(model) is timm.models.VisionTransformer
    blocks = list(model.blocks) if vit else _residual_blocks(model)
    last = len(blocks) + 1  # the pooling stage
    stop = last + 1 if stop is None else stop
    if start == 0 < stop:
        if vit:
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        else:
            x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    chosen = blocks[max(start, 1) - 1:max(min(stop, last) - 1, 0)]
    if chosen and model.grad_checkpointing and torch.is_grad_enabled():
        x = timm.models.checkpoint_seq(chosen, x)  # as timm's own forward does when it is switched on
    else:
        for block in chosen:
            x = block(x)
    if start <= last < stop:
        x = model.forward_head(model.norm(x) if vit else x)
    return x
