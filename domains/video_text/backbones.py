"""CLIP backbones for video-text (open_clip), and the video model built on them.

A CLIP name is, in order:

- `tiny`: a random-init CLIP built here from an open_clip config (vision: 32 px, patch 8,
  width 64, 2 layers; text: width 64, 2 layers, 77 tokens as CLIP's), seeded, so every
  build is the same weights. For tests and the demo; nothing is downloaded (the BPE
  vocabulary ships with open_clip).
- `MODEL:TAG`: an open_clip architecture and one of its pretrained tags
  (`ViT-B-32:openai`, `ViT-B-16:laion2b_s34b_b88k`; `open_clip.list_pretrained()`).
  The weights file is looked up in the Hugging Face cache (or the legacy URL cache)
  first; offline (`PEFTLAB_OFFLINE=1` / `HF_HUB_OFFLINE=1`) with nothing cached, the
  error names where it looked. Online, open_clip downloads it.
- `MODEL:/path/to/checkpoint` (`.bin`, `.pt`, `.safetensors`): a local open_clip state
  dict for that architecture (open_clip reads `.pt`/`.bin` with weights_only=True).
- `hf-hub:org/repo` or `local-dir:/path`: open_clip's own schemes (config + weights).

After loading, each `nn.MultiheadAttention` in the towers is replaced by `CLIPAttention`,
the same computation with separate q/k/v/out `nn.Linear` layers (weights copied from the
packed in-projection; outputs equal within float tolerance, a test checks). Why:
`nn.MultiheadAttention` reads its projections as raw weights inside one fused call, so
peft's LoRA/LoKr/IA³ and hook-based adapters on `out_proj` would silently do nothing.
With real `Linear` layers every method targets `attn.q_proj` etc. as in any transformer.

`VideoCLIP` is the backbone PEFT methods apply to: CLIP's towers plus two named
adaptation points, `frame_pool` (frame embeddings -> one video embedding, mean pooling
as CLIP4Clip's "meanP") and `text_out` (the text embedding), where the temporal
adapter hooks in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peftlab.shared import hub, io
from peftlab.shared.backbone_cache import load_once
from peftlab.shared.errors import UserError
from torch import nn
from torch.nn import functional as F

TINY_SEED = 4321
"""Fixed so the tiny preset is the same weights on every build (runs reload it)."""

TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    # CLIP's context, so that `--backbone tiny`, the first offline check of a card, takes the
    # caption length a recipe sets for CLIP (32, CLIP4Clip's)
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}
TINY_PREPROCESS = {"size": 32, "mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
                   "interpolation": "bicubic", "resize_mode": "shortest"}

KNOWN_BACKBONES = ("ViT-B-32:openai", "ViT-B-16:openai", "ViT-B-32:laion2b_s34b_b79k", "ViT-L-14:openai")


def backbone_names() -> list[str]:
    return ["tiny", *KNOWN_BACKBONES]


# ----------------------------------------------------------------------------- attention


class CLIPAttention(nn.Module):
    """`nn.MultiheadAttention`'s computation (batch-first self- or cross-attention, additive
    or boolean mask) with q/k/v/out as separate `nn.Linear` layers that PEFT methods can wrap."""

    def __init__(self, width: int, heads: int, batch_first: bool):
        super().__init__()
        self.heads = heads
        self.batch_first = batch_first
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    @classmethod
    def from_multihead(cls, attention: nn.MultiheadAttention) -> CLIPAttention:
        if not attention._qkv_same_embed_dim or attention.in_proj_bias is None or attention.bias_k is not None:
            raise UserError("this CLIP's attention layout (separate k/v widths, no in-projection bias, or bias_k) "
                            "is not supported; use a standard open_clip ViT / text transformer")
        width = attention.embed_dim
        converted = cls(width, attention.num_heads, attention.batch_first)
        weight, bias = attention.in_proj_weight.detach(), attention.in_proj_bias.detach()
        with torch.no_grad():
            for index, projection in enumerate((converted.q_proj, converted.k_proj, converted.v_proj)):
                projection.weight.copy_(weight[index * width:(index + 1) * width])
                projection.bias.copy_(bias[index * width:(index + 1) * width])
            converted.out_proj.weight.copy_(attention.out_proj.weight)
            converted.out_proj.bias.copy_(attention.out_proj.bias)
        return converted.to(weight.dtype)

    def forward(self, query, key, value, need_weights: bool = False, attn_mask=None, key_padding_mask=None):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, width = query.shape

        def heads(x):
            return x.view(batch, x.shape[1], self.heads, width // self.heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
        if key_padding_mask is not None:
            padding = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
            padding = padding.masked_fill(key_padding_mask.bool(), float("-inf")).view(batch, 1, 1, -1)
            mask = padding if mask is None else mask + padding
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype) if mask is not None else None)
        out = self.out_proj(mixed.transpose(1, 2).reshape(batch, length, width))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def split_attention_projections(model: nn.Module) -> int:
    """Replace every `nn.MultiheadAttention` in `model` by an equal `CLIPAttention`."""
    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, CLIPAttention.from_multihead(child))
                replaced += 1
    return replaced


# ----------------------------------------------------------------------------- loading


@dataclass
class ClipBackbone:
    model: nn.Module
    """An open_clip CLIP (attention split into q/k/v/out Linears), float32, eval mode."""
    tokenizer: Any
    """open_clip tokenizer: list[str] -> LongTensor (N, context_length)."""
    preprocess: dict[str, Any]
    """size, mean, std, interpolation, resize_mode for the frames."""
    info: dict[str, Any]
    """name, source, weights_sha256: recorded in meta.json and in the feature-cache key."""


@load_once
def load_clip(name: str) -> ClipBackbone:
    import open_clip

    if name == "tiny":
        return _tiny_clip()
    model_name, pretrained = _parse(name)
    kwargs: dict[str, Any] = {}
    if model_name.startswith(("hf-hub:", "local-dir:")):
        source = model_name
        if model_name.startswith("hf-hub:") and (reason := hub.offline()):
            raise UserError(f"CLIP backbone {name!r}: open_clip's hf-hub scheme needs the network, and peftlab is "
                            f"offline ({reason}); download the repo where you have internet and pass local-dir:/path/to/it")
    else:
        if open_clip.get_model_config(model_name) is None:
            raise UserError(f"CLIP backbone {name!r}: {model_name!r} is not an open_clip architecture "
                            f"(e.g. ViT-B-32, ViT-B-16, ViT-L-14; open_clip.list_models() lists them)")
        pretrained, source, kwargs = _resolve_weights(name, model_name, pretrained)
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained, require_pretrained=True, **kwargs)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"CLIP backbone {name!r} could not be loaded from {source} "
                        f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from None
    preprocess = dict(open_clip.get_model_preprocess_cfg(model))
    return _finish(model, tokenizer, preprocess, name, source)


def _parse(name: str) -> tuple[str, str | None]:
    if name.startswith(("hf-hub:", "local-dir:")):
        return name, None
    model_name, sep, pretrained = name.partition(":")
    if not sep or not pretrained:
        raise UserError(f"CLIP backbone {name!r}: name the weights as MODEL:TAG (e.g. ViT-B-32:openai) or "
                        f"MODEL:/path/to/checkpoint, or use `tiny`")
    return model_name, pretrained


def _resolve_weights(name: str, model_name: str, pretrained: str) -> tuple[str, str, dict]:
    """-> (what open_clip gets as `pretrained`, where it comes from, create_model kwargs).
    A cached tag resolves to its local file so nothing touches the network."""
    import open_clip

    path = Path(os.path.expanduser(pretrained))
    if path.suffix in (".bin", ".pt", ".pth", ".safetensors") or pretrained.startswith(("/", "./", "~")):
        if not path.is_file():
            raise UserError(f"CLIP backbone {name!r}: checkpoint {path} does not exist; pass an existing file")
        return str(path), str(path), {}
    config = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not config:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise UserError(f"CLIP backbone {name!r}: {pretrained!r} is not a pretrained tag of {model_name} "
                        f"(tags: {', '.join(tags) or 'none'}) nor an existing checkpoint file")
    # The tag's own settings, which open_clip applies only when it resolves the tag itself.
    kwargs = {"force_quick_gelu": bool(config.get("quick_gelu", False)),
              "force_preprocess_cfg": {k: config[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in config}}
    cached, looked = _cached_file(config)
    if cached is not None:
        return str(cached), f"{cached} (cached {model_name}:{pretrained})", kwargs
    if reason := hub.offline():
        raise UserError(f"CLIP backbone {name!r} is not available offline ({reason}): no cached weights at {' or '.join(looked)}; "
                        f"download it where you have internet (open_clip.create_model({model_name!r}, "
                        f"pretrained={pretrained!r})) or pass MODEL:/path/to/checkpoint")
    return pretrained, f"open_clip download ({model_name}:{pretrained})", {}


def _cached_file(config: dict) -> tuple[Path | None, list[str]]:
    looked = []
    hub = config.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo, filename = os.path.split(hub)
        for candidate in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            found = try_to_load_from_cache(repo, candidate)
            looked.append(f"{HF_HUB_CACHE} ({repo}/{candidate})")
            if isinstance(found, str):
                return Path(found), looked
    url = config.get("url", "")
    if url:
        legacy = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        looked.append(str(legacy))
        if legacy.is_file():
            return legacy, looked
    return None, looked


def _tiny_clip() -> ClipBackbone:
    import open_clip
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = CLIP(**TINY_CONFIG)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=TINY_CONFIG["text_cfg"]["context_length"])
    return _finish(model, tokenizer, dict(TINY_PREPROCESS), "tiny", "random-init tiny CLIP preset (open_clip CLIP)")


def _finish(model: nn.Module, tokenizer, preprocess: dict, name: str, source: str) -> ClipBackbone:
    if not hasattr(model, "visual") or not hasattr(model, "encode_text"):
        raise UserError(f"CLIP backbone {name!r}: not a two-tower open_clip CLIP (no visual tower / encode_text)")
    model = model.float().eval()
    info = {"name": name, "source": source, "weights_sha256": io.tensors_fingerprint(model.state_dict())}
    split_attention_projections(model)
    size = preprocess.get("size", 224)
    preprocess["size"] = size[0] if isinstance(size, list | tuple) else int(size)
    if preprocess.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise UserError(f"CLIP backbone {name!r}: resize mode {preprocess['resize_mode']!r} is not supported "
                        f"(peftlab resizes frames by 'shortest' side + centre crop, or 'squash')")
    info["preprocess"] = {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()}
    return ClipBackbone(model, tokenizer, preprocess, info)


# ----------------------------------------------------------------------------- the video model


class FramePooling(nn.Module):
    """(batch, frames, dim) -> (batch, dim) by the mean over frames. A module so that
    methods (the temporal adapter) can hook the frame embeddings on their way in."""

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.mean(dim=1)


def encode_frames(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """(batch, frames, 3, H, W) normalised pixels -> (batch, frames, dim) CLIP image embeddings."""
    batch, frames = pixels.shape[:2]
    embeddings = visual(pixels.flatten(0, 1))
    if isinstance(embeddings, tuple):  # towers built with output_tokens
        embeddings = embeddings[0]
    return embeddings.view(batch, frames, -1)


class VideoCLIP(nn.Module):
    """CLIP over videos: frames -> image tower -> `frame_pool` -> video embedding;
    caption -> text tower -> `text_out` -> text embedding; both L2-normalised."""

    def __init__(self, clip: ClipBackbone, num_frames: int):
        super().__init__()
        self.clip = clip.model
        self.num_frames = num_frames
        self.embed_dim = int(self.clip.text_projection.shape[1]) if isinstance(
            getattr(self.clip, "text_projection", None), nn.Parameter) else _probe_width(self.clip)
        self.frame_pool = FramePooling()
        self.text_out = nn.Identity()

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        return encode_frames(self.clip.visual, pixels)

    def encode_video(self, frame_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.frame_pool(frame_features), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_out(self.clip.encode_text(tokens)), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        # CLIP caps the learned temperature at 100 (Radford et al. 2021)
        return self.clip.logit_scale.exp().clamp(max=100)

    def forward(self, text: torch.Tensor, pixels: torch.Tensor | None = None,
                frame_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (video embeddings, text embeddings, logit scale). Pass `pixels`, or the
        image tower's `frame_features` when they come from the cache."""
        if frame_features is None:
            frame_features = self.encode_frames(pixels)
        return self.encode_video(frame_features), self.encode_text(text), self.logit_scale()


def _probe_width(model: nn.Module) -> int:
    with torch.no_grad():
        return int(model.encode_text(torch.zeros(1, model.context_length, dtype=torch.long)).shape[-1])


def unwrap(backbone: nn.Module) -> nn.Module:
    """The module under any peftlab / peft wrapper (methods inject into it in place)."""
    from peftlab.shared.methods import AdaptedModel

    return backbone.base_model if isinstance(backbone, AdaptedModel) else backbone
