"""ESM-2 backbones (fair-esm), by official name, local file or folder, or `tiny`.

Resolution order for a name: an existing local path (an official fair-esm `.pt` file,
or a Hugging Face `EsmModel` folder with `config.json`), then the torch hub cache
(`<torch hub dir>/checkpoints/<name>.pt`, where fair-esm stores downloads), then a
download through fair-esm. Offline with none of these, the error says where it looked
and how to pass a local path. Only `tiny` is random-init.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pickle
from pathlib import Path

import esm
import torch
from esm.model.esm2 import ESM2
from esm.rotary_embedding import apply_rotary_pos_emb
from peftlab.shared import hub, io, narrow_attention, rotary
from peftlab.shared.backbone_cache import load_once
from peftlab.shared.errors import UserError
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

# name -> (layers, width, heads), as released by Meta AI (Lin et al. 2023)
FAIR_ESM_HOST = "dl.fbaipublicfiles.com"
"""Where fair-esm downloads its checkpoints from."""

ESM2_ARCHITECTURES = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
TINY = (2, 64, 4)
TINY_SEED = 1234
"""Fixed so a `tiny` backbone is the same weights every time it is built (runs reload it)."""

AMINO_ACIDS = set("ACDEFGHIKLMNPQRSTVWYXBZUO")
"""Letters ESM-2's alphabet has a token for: the 20 standard residues, X (unknown),
B/Z (ambiguous), U (selenocysteine), O (pyrrolysine)."""


class ESMEncoder(nn.Module):
    """ESM-2's encoder: token embedding, transformer layers, final layer norm.

    The same modules (and state-dict keys) as fair-esm's `ESM2`, without the LM and
    contact heads, returning the last hidden states (batch, tokens, width).
    """

    def __init__(self, num_layers: int, embed_dim: int, attention_heads: int, token_dropout: bool = True,
                 attention: str = "sdpa"):
        super().__init__()
        if attention not in ("sdpa", "eager"):
            raise UserError(f"attention must be sdpa or eager, got {attention!r}")
        self.attention = attention
        self.alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
        full = ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=attention_heads,
                    alphabet=self.alphabet, token_dropout=token_dropout)
        self.embed_tokens = full.embed_tokens
        self.layers = full.layers
        for layer in self.layers:
            layer.__class__ = FusedAttentionLayer  # same modules and keys, one more way to run
        self.emb_layer_norm_after = full.emb_layer_norm_after
        self.token_dropout = token_dropout
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.attention_heads = attention_heads
        self.activation_checkpointing = False
        """Recompute each layer's activations in the backward pass instead of keeping them."""
        if (attention == "sdpa" and embed_dim // attention_heads in narrow_attention.HEAD_WIDTHS
                and not torch.cuda.is_available()):
            # built (first use on a machine) now rather than inside the first step; with a
            # GPU, only if a forward pass runs on the CPU
            narrow_attention.load()

    @property
    def padding_idx(self) -> int:
        return self.alphabet.padding_idx

    def tokenize(self, sequences: list[str]) -> torch.Tensor:
        """<cls> residues <eos>, right-padded to the longest sequence in the batch."""
        to_index = self.alphabet.tok_to_idx
        width = max(len(s) for s in sequences) + 2
        tokens = torch.full((len(sequences), width), self.alphabet.padding_idx, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids = [self.alphabet.cls_idx] + [to_index[c] for c in sequence] + [self.alphabet.eos_idx]
            tokens[row, : len(ids)] = torch.tensor(ids)
        return tokens

    def stages(self) -> list[nn.Module]:
        """The encoder in order: embedding, each layer, final norm (`forward`'s
        `start`/`stop` index this list; feature caching counts frozen stages in it)."""
        return [self.embed_tokens, *self.layers, self.emb_layer_norm_after]

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
        """Hidden states after stages [start, stop) of `stages()`; all of them by default.
        From `start` > 0, `hidden` is the output of stage start - 1 for these tokens.
        Padding positions carry no meaning (zeros where the layers ran packed): read
        the positions of real tokens only."""
        stop = len(self.layers) + 2 if stop is None else stop
        padding_mask = tokens.eq(self.alphabet.padding_idx)
        attention_mask = padding_mask if padding_mask.any() else None
        x = self._embed(tokens, padding_mask) if start == 0 else hidden
        layers = self.layers[max(start - 1, 0):max(stop - 1, 0)]
        if self.attention == "sdpa":
            recompute = self.activation_checkpointing and torch.is_grad_enabled()
            lengths = None  # per-sequence attention on CPUs: see CPUFlashAttention
            if attention_mask is not None and x.device.type == "cpu":
                lengths = per_sequence_lengths(attention_mask, self.attention_heads)
            packed = lengths is not None and self._packs(layers)
            if packed:
                real = ~attention_mask
                x = x[real]  # (tokens, width): the sequences one after another, no padding
            for layer in layers:
                if recompute:
                    x = checkpoint(layer, x, self_attn_padding_mask=attention_mask, fused=True, lengths=lengths,
                                   use_reentrant=False)
                else:
                    x = layer(x, self_attn_padding_mask=attention_mask, fused=True, lengths=lengths)
            if packed:
                padded = x.new_zeros((*real.shape, x.shape[-1]))
                padded[real] = x
                x = padded
        elif len(layers):
            x = x.transpose(0, 1)  # fair-esm's own layers are sequence-first
            for layer in layers:
                x, _ = layer(x, self_attn_padding_mask=attention_mask, need_head_weights=False)
            x = x.transpose(0, 1)
        if start <= len(self.layers) + 1 < stop:
            x = self.emb_layer_norm_after(x)
        return x

    def _packs(self, layers) -> bool:
        """Whether a batch whose attention runs per sequence also runs its layers on
        packed tokens (the projections and feed-forward then skip the padding too): in
        training only. Inference keeps the padded layout, where a row is an input: peft's
        mixed-adapter batches (`peftlab serve`) pick each row's adapter by it. Attention
        dropout also needs the padded layout (torch's SDPA with a mask)."""
        if not len(layers) or not torch.is_grad_enabled():
            return False
        return not (self.training and any(layer.self_attn.dropout for layer in layers))

    def _embed(self, tokens: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        if self.token_dropout:
            # ESM-2 was trained with masked tokens zeroed and the rest rescaled by the
            # expected mask ratio; at fine-tuning there are no masks, so x *= 0.88 / 1.
            masked = tokens == self.alphabet.mask_idx
            x = x.masked_fill(masked.unsqueeze(-1), 0.0)
            mask_ratio_train = 0.15 * 0.8
            lengths = (~padding_mask).sum(-1)
            observed = masked.sum(-1).to(x.dtype) / lengths
            x = x * (1 - mask_ratio_train) / (1 - observed)[:, None, None]
        return x * (1 - padding_mask.unsqueeze(-1).type_as(x))


class FusedAttentionLayer(esm.modules.TransformerLayer):
    """fair-esm's TransformerLayer that also runs batch-first with fused attention
    (`fused=True`), through the module call, so that hooks on the layer see that path
    too (FSDP gathers a layer's parameters in its forward pre-hook)."""

    def forward(self, x, self_attn_mask=None, self_attn_padding_mask=None, need_head_weights=False, fused=False,
                lengths=None):
        if fused:
            return _layer_sdpa(self, x, self_attn_padding_mask, lengths)
        return super().forward(x, self_attn_mask=self_attn_mask, self_attn_padding_mask=self_attn_padding_mask,
                               need_head_weights=need_head_weights)


def _layer_sdpa(layer, x: torch.Tensor, padding_mask: torch.Tensor | None,
                lengths: tuple[int, ...] | None) -> torch.Tensor:
    """fair-esm's TransformerLayer with fused attention (torch SDPA), batch-first, on a
    padded batch (batch, tokens, width) or on packed tokens (tokens, width: the
    sequences of the right-padded `padding_mask` one after another). `lengths`, the
    sequences' lengths where attention runs per sequence (`per_sequence_lengths`), is
    required for packed tokens.

    The same modules (q/k/v/out projections, rotary embedding, norms, fc1/fc2) are
    called, so PEFT methods that wrap or hook them apply unchanged; only the attention
    product, which fair-esm computes eagerly with a materialised (B·H, T, T) softmax,
    becomes one fused kernel. Numerically checked against the eager layer in the tests.
    """
    attention = layer.self_attn
    packed = x.dim() == 2
    width = x.shape[-1]
    heads = attention.num_heads
    h = layer.self_attn_layer_norm(x)

    def split(t: torch.Tensor) -> torch.Tensor:  # -> (batch, heads, tokens, head width); packed: batch 1
        return t.view(-1, x.shape[-2], heads, width // heads).transpose(1, 2)

    q, k, v = split(attention.q_proj(h)), split(attention.k_proj(h)), split(attention.v_proj(h))
    projected = v.dtype
    dropout = attention.dropout if attention.training else 0.0
    cos, sin = _rotary_tables(attention.rot_emb, q, lengths if packed else None)
    if dropout == 0.0 and rotary.supports(q, cos):  # the values CPUFlashAttention rounds to bf16, in one pass
        q, k = rotary.rotate(q, cos, sin), rotary.rotate(k, cos, sin)
    else:  # fair-esm rotates in fp32 (its cos/sin tables are fp32)
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
    mask = None if padding_mask is None or packed else ~padding_mask[:, None, None, :]
    if q.device.type == "cpu" and dropout == 0.0:
        spans = None if lengths is None else (_packed_spans if packed else _padded_spans)(lengths)
        h = CPUFlashAttention.apply(q.to(projected), k.to(projected), v, spans, None if spans else mask)
    elif q.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):  # see CPUFlashAttention: fp32 is faster here
            h = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout)
    else:
        h = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, dropout_p=dropout)
    x = x + attention.out_proj(h.transpose(1, 2).reshape(x.shape))
    h = layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))
    return x + h


def _rotary_tables(rot_emb, q: torch.Tensor, lengths: tuple[int, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """fair-esm's cos/sin rows for each token of q (batch, heads, tokens, width): by
    position in the padded rows, or, for packed sequences of `lengths`, by each token's
    position in its own sequence (so the values are those the padded layout gets)."""
    tokens = max(lengths) if lengths else q.shape[-2]
    cos, sin = rot_emb._update_cos_sin_tables(q.new_empty(tokens, 0), seq_dimension=0)
    if not lengths:
        return cos[:, :tokens], sin[:, :tokens]
    positions = torch.cat([torch.arange(n, device=q.device) for n in lengths])
    return cos[:, positions], sin[:, positions]


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class CPUFlashAttention(torch.autograd.Function):
    """Fused attention on CPU: computed in fp32, kept for backward in the inputs' dtype,
    each sequence attending only within itself.

    - Kernel: for head widths `narrow_attention` is built for (ESM-2 8M to 150M: 16-32),
      its kernel, which runs all sequences and heads in one call and 1.1-2.4x faster
      than torch's fused kernel (16-32-wide heads); otherwise, and for a `mask`, torch's
      fused kernel (`_flash`), one call per sequence.
    - fp32 compute: ESM-2's heads are narrow; on CPU torch's fused kernel runs them 2x
      faster in fp32 than in bf16 (forward + backward, 16-wide heads); the narrow
      kernel reads bf16, multiplies bf16 pairs exactly and sums and normalises in fp32.
    - kept in the inputs' dtype: fp32 copies of bf16 q, k, v and the output would double
      attention's share of training memory, so the bf16 tensors are kept and widened
      again in backward (exactly the values forward used; only the output is the
      bf16-rounded one, which the next projection consumes anyway under autocast).
    - per sequence (`spans`: (batch row, first token, end token) of each sequence in
      q, k, v of shape (batch, heads, tokens, head width)): a padded batch in one call
      costs B·T² where its sequences need the sum of their squared lengths (20 % less
      on length-bucketed ESM-2 batches), plus about 10 % for applying the mask; the
      kernels parallelise over heads, so one sequence still keeps the cores busy. Rows
      outside every span (padding) come out as zeros: they were masked as keys, so no
      real position sees them.
    - `mask` (a boolean keep-mask, batched in one call) serves masks that are not right
      padding.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: tuple[tuple[int, int, int], ...] | None,
                mask: torch.Tensor | None):
        if mask is None and narrow_attention.supports(q):
            spans = spans or _padded_spans((q.shape[2],) * q.shape[0])
            ctx.span_tensor = torch.tensor(spans, dtype=torch.long)
            out, logsumexp = narrow_attention.forward(q, k, v, ctx.span_tensor)
            ctx.save_for_backward(q, k, v, out, logsumexp)
            return out
        ctx.span_tensor = None
        ctx.spans = spans
        with torch.autocast("cpu", enabled=False):
            if spans is None:
                ctx.additive = None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, -torch.inf)
                out, logsumexp = _flash(q.float(), k.float(), v.float(), attn_mask=ctx.additive)
                out = out.to(q.dtype)
                ctx.save_for_backward(q, k, v, out, logsumexp)
                return out
            out = q.new_zeros(q.shape)
            logsumexps = []
            for rows in _span_index(spans):
                part, logsumexp = _flash(q[rows].float(), k[rows].float(), v[rows].float())
                out[rows] = part
                logsumexps.append(logsumexp)
        ctx.save_for_backward(q, k, v, out, *logsumexps)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, *logsumexps = ctx.saved_tensors
        if ctx.span_tensor is not None:
            return *narrow_attention.backward(grad_out, q, k, v, out, logsumexps[0], ctx.span_tensor), None, None
        if ctx.spans is None:
            grads = _flash_backward(grad_out.float(), q.float(), k.float(), v.float(), out.float(), logsumexps[0],
                                    0.0, False, attn_mask=ctx.additive)
            return *(grad.to(q.dtype) for grad in grads), None, None
        grads = [torch.zeros_like(t) for t in (q, k, v)]
        for rows, logsumexp in zip(_span_index(ctx.spans), logsumexps):
            parts = _flash_backward(grad_out[rows].float(), q[rows].float(), k[rows].float(), v[rows].float(),
                                    out[rows].float(), logsumexp, 0.0, False)
            for grad, part in zip(grads, parts):
                grad[rows] = part
        return *grads, None, None


def _padded_spans(lengths: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple((row, 0, length) for row, length in enumerate(lengths))


def _packed_spans(lengths: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple((0, end - length, end) for length, end in zip(lengths, itertools.accumulate(lengths)))


def _span_index(spans: tuple[tuple[int, int, int], ...]) -> list[tuple[slice, slice, slice]]:
    """Each span's index into a (batch, heads, tokens, head width) tensor."""
    return [(slice(row, row + 1), slice(None), slice(start, end)) for row, start, end in spans]


def right_padded_lengths(padding_mask: torch.Tensor) -> tuple[int, ...] | None:
    """Each row's length where `padding_mask` (batch, tokens; True = padding) pads on
    the right only; None for any other pattern."""
    lengths = (~padding_mask).sum(-1)
    positions = torch.arange(padding_mask.shape[-1], device=padding_mask.device)
    if not torch.equal(padding_mask, positions >= lengths[:, None]):
        return None
    return tuple(lengths.tolist())


def per_sequence_lengths(padding_mask: torch.Tensor, heads: int) -> tuple[int, ...] | None:
    """The lengths `CPUFlashAttention` runs one call per sequence with, or None to run
    the batch in one masked call: when the padding is not on the right, or when the
    shortest sequence alone is too little work for every thread (the kernels split a
    call into heads x 32-token query blocks; on a many-core machine short sequences
    would leave threads idle)."""
    lengths = right_padded_lengths(padding_mask)
    if lengths is None or heads * math.ceil(min(lengths) / 32) < torch.get_num_threads():
        return None
    return lengths


def backbone_names() -> list[str]:
    return ["tiny", *ESM2_ARCHITECTURES]


@load_once
def load_backbone(name: str) -> tuple[ESMEncoder, dict]:
    """-> (encoder, info) where info records name, source and a weights hash."""
    if name == "tiny":
        with torch.random.fork_rng():
            torch.manual_seed(TINY_SEED)
            encoder = ESMEncoder(*TINY)
        return encoder, _info(name, "random-init tiny preset", encoder)
    path = Path(os.path.expanduser(name))
    if path.exists():
        return _load_local(path, name)
    if name not in ESM2_ARCHITECTURES:
        if "/" in name or path.suffix in (".pt", ".pth"):  # meant as a file: say so, not "unknown name"
            raise UserError(f"ESM-2 backbone {name!r}: no such file or folder; give a fair-esm .pt checkpoint or a "
                            f"Hugging Face ESM folder, or a name: {', '.join(backbone_names())}")
        raise UserError(
            f"unknown ESM-2 backbone {name!r}: not a local path, and not one of {', '.join(backbone_names())}"
        )
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"
    if cached.is_file():
        return _load_official(cached, name)
    if reason := hub.offline(FAIR_ESM_HOST):
        raise UserError(
            f"ESM-2 backbone {name!r} is not available offline ({reason}): no local path {name!r} and no "
            f"cached file {cached}; download it where you have internet "
            f"(fair-esm: esm.pretrained.{name}()) or pass --backbone /path/to/{name}.pt"
        )
    try:
        esm.pretrained.load_model_and_alphabet_hub(name)  # downloads into the hub cache
    except Exception as error:  # network errors come in many types
        raise UserError(
            f"ESM-2 backbone {name!r} could not be downloaded ({type(error).__name__}: {error}); "
            f"looked for a local path and {cached}; pass --backbone /path/to/{name}.pt"
        ) from None
    return _load_official(cached, name)




def _load_local(path: Path, name: str) -> tuple[ESMEncoder, dict]:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path}: an ESM-2 folder needs config.json and model weights (as transformers saves EsmModel)")
        return _load_hf_folder(path, name)
    if path.suffix == ".pt":
        return _load_official(path, name)
    raise UserError(f"{path}: not an ESM-2 checkpoint; pass a fair-esm .pt file or a Hugging Face EsmModel folder")


def _load_official(path: Path, name: str) -> tuple[ESMEncoder, dict]:
    """An official fair-esm `.pt` file, read with weights_only=True.

    Official files keep their config as an argparse.Namespace, which we allow
    explicitly; any other pickled object is refused rather than executed.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path}: refused to load (it holds objects other than tensors and config: {str(error).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path}: not a readable torch checkpoint ({error}); is the file complete?") from None
    if not isinstance(data, dict) or "model" not in data or "cfg" not in data:
        raise UserError(f"{path}: not an ESM-2 checkpoint (expected keys 'model' and 'cfg', as fair-esm releases them)")
    cfg = data["cfg"]["model"]
    get = (lambda k: cfg[k]) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    encoder = ESMEncoder(get("encoder_layers"), get("encoder_embed_dim"), get("encoder_attention_heads"),
                         token_dropout=bool(get("token_dropout")))
    state = {}
    for key, value in data["model"].items():
        for prefix in ("encoder.sentence_encoder.", "encoder."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        state[key] = value
    _load_weights(encoder, state, path, ignore=("lm_head.", "contact_head."))
    return encoder, _info(name, str(path), encoder)


_HF_TO_FAIR = [
    ("embeddings.word_embeddings.", "embed_tokens."),
    ("encoder.emb_layer_norm_after.", "emb_layer_norm_after."),
    ("encoder.layer.", "layers."),
    (".attention.self.query.", ".self_attn.q_proj."),
    (".attention.self.key.", ".self_attn.k_proj."),
    (".attention.self.value.", ".self_attn.v_proj."),
    (".attention.self.rotary_embeddings.", ".self_attn.rot_emb."),
    (".attention.output.dense.", ".self_attn.out_proj."),
    (".attention.LayerNorm.", ".self_attn_layer_norm."),
    (".intermediate.dense.", ".fc1."),
    (".output.dense.", ".fc2."),
    (".LayerNorm.", ".final_layer_norm."),
]


def hf_to_fair_esm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `EsmModel` keys -> fair-esm `ESM2` keys (same tensors)."""
    mapped = {}
    for key, value in state.items():
        key = key.removeprefix("esm.")
        if key.startswith(("pooler.", "contact_head.", "lm_head.", "classifier.")) or key.endswith("position_ids"):
            continue
        for old, new in _HF_TO_FAIR:
            key = key.replace(old, new)
        # Some writers keep LayerNorm's legacy TensorFlow names.
        if key.endswith(".gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta"):
            key = key[: -len("beta")] + "bias"
        mapped[key] = value
    return mapped


def _load_hf_folder(path: Path, name: str) -> tuple[ESMEncoder, dict]:
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != "esm" or config.get("position_embedding_type", "rotary") != "rotary":
        raise UserError(f"{path}/config.json: not an ESM-2 model (model_type {config.get('model_type')!r}); ESM-2 has model_type 'esm' with rotary positions")
    vocab = path / "vocab.txt"
    if vocab.is_file():
        tokens = vocab.read_text().split()
        expected = esm.data.Alphabet.from_architecture("ESM-1b").all_toks
        if tokens != expected:
            raise UserError(f"{vocab}: vocabulary differs from ESM-2's 33 tokens; this is not an ESM-2 checkpoint")
    weights = path / "model.safetensors"
    if weights.is_file():
        state = io.load_tensors(weights)
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{path}: no model.safetensors or pytorch_model.bin next to config.json")
    encoder = ESMEncoder(config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
                         token_dropout=bool(config.get("token_dropout", True)))
    _load_weights(encoder, hf_to_fair_esm(state), path)
    return encoder, _info(name, str(path), encoder)


def _load_weights(encoder: ESMEncoder, state: dict, path: Path, ignore: tuple[str, ...] = ()) -> None:
    # Rotary inverse frequencies are computed from the width, not learned; transformers
    # 5 even saves one shared copy as `encoder.layer.*....inv_freq`.
    state = {k: v for k, v in state.items() if not k.startswith(ignore) and not k.endswith("inv_freq")}
    own = encoder.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("rot_emb.inv_freq"))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit ESM-2 (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, ESM-2 expects {tuple(own[key].shape)}")
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def _info(name: str, source: str, encoder: ESMEncoder) -> dict:
    return {
        "name": name,
        "source": source,
        "architecture": {"layers": encoder.num_layers, "width": encoder.embed_dim, "heads": encoder.attention_heads},
        "weights_sha256": io.tensors_fingerprint(encoder.state_dict()),
    }
