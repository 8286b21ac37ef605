"""Point-BERT (Yu et al. 2022), written here, with its official checkpoint layout.

A point cloud becomes a sequence of patch tokens:

1. farthest point sampling (FPS) picks `num_group` patch centres;
2. each centre's `group_size` nearest points (kNN) form a patch, expressed relative to
   its centre;
3. a mini-PointNet (shared per-point MLP, max-pool, concat, MLP, max-pool) embeds each
   patch, and `reduce_dim` maps it to the transformer width;
4. a learned MLP on the patch centres gives positional embeddings; a CLS token with its
   own positional embedding is prepended;
5. `depth` pre-norm transformer blocks (positions are added to the input of every
   block, as in Point-BERT), then a final LayerNorm.

Module and parameter names follow `PointTransformer` in Point-BERT's models/Point_BERT.py
(`encoder.first_conv`, `reduce_dim`, `cls_token`, `cls_pos`, `pos_embed`,
`blocks.blocks.N.attn.qkv`, `norm`, ...), so the official `base_model` state dict
loads key for key. Point-BERT publishes its weights on GitHub / Google Drive only, so a
real backbone is a local `.pth` path (or the file in the torch hub cache); `tiny` and
`small` are random-init presets for tests, demos and training from scratch.

FPS and kNN are plain vectorised torch (no CUDA extensions): FPS loops over the
`num_group` centres and is vectorised over the batch and the points.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.utils.checkpoint
from peftlab.shared import io
from peftlab.shared.backbone_cache import load_once
from peftlab.shared.errors import UserError
from peftlab.shared.feature_cache import Stage
from torch import nn
from torch.nn import functional as F

# ----------------------------------------------------------------------------- grouping


def farthest_point_sample(points: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N, 3) -> (B, count) indices; starts from point 0, like pointnet2's CUDA kernel.

    Each step adds the point farthest from the ones chosen so far (distance to the
    nearest chosen point), so the centres spread evenly over the surface.
    """
    batch, num_points, _ = points.shape
    if count > num_points:
        raise ValueError(f"cannot pick {count} centres from {num_points} points")
    chosen = torch.zeros(batch, count, dtype=torch.long, device=points.device)
    nearest = torch.full((batch, num_points), float("inf"), device=points.device, dtype=points.dtype)
    rows = torch.arange(batch, device=points.device)
    farthest = torch.zeros(batch, dtype=torch.long, device=points.device)
    for step in range(count):
        chosen[:, step] = farthest
        latest = points[rows, farthest].unsqueeze(1)  # (B, 1, 3)
        nearest = torch.minimum(nearest, (points - latest).pow(2).sum(-1))
        farthest = nearest.argmax(-1)
    return chosen


def knn(queries: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """(B, M, 3) queries, (B, N, 3) points -> (B, M, k) indices of the k nearest points,
    nearest first."""
    distances = torch.cdist(queries, points)
    return distances.topk(k, dim=-1, largest=False, sorted=True).indices


def gather(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """values (B, N, C), indices (B, ...) -> (B, ..., C)."""
    batch = values.shape[0]
    flat = indices.reshape(batch, -1)
    picked = torch.gather(values, 1, flat.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
    return picked.reshape(*indices.shape, values.shape[-1])


class Group(nn.Module):
    """Points -> (patches centred on their centres, centres). No parameters."""

    def __init__(self, num_group: int, group_size: int):
        super().__init__()
        self.num_group = num_group
        self.group_size = group_size

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centers = gather(points, farthest_point_sample(points, self.num_group))  # (B, G, 3)
        patches = gather(points, knn(centers, points, self.group_size))          # (B, G, k, 3)
        return patches - centers.unsqueeze(2), centers


# ----------------------------------------------------------------------------- the network


class PatchEncoder(nn.Module):
    """Point-BERT's mini-PointNet ("Encoder" in its dVAE.py): one vector per patch."""

    def __init__(self, encoder_dims: int, hidden: tuple[int, int] = (128, 256)):
        super().__init__()
        first, second = hidden
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, first, 1), nn.BatchNorm1d(first), nn.ReLU(inplace=True), nn.Conv1d(first, second, 1))
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * second, 2 * second, 1), nn.BatchNorm1d(2 * second), nn.ReLU(inplace=True),
            nn.Conv1d(2 * second, encoder_dims, 1))
        self.encoder_dims = encoder_dims

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch, groups, size, _ = patches.shape
        x = self.first_conv(patches.reshape(batch * groups, size, 3).transpose(2, 1))  # (BG, C1, k)
        pooled = x.max(dim=2, keepdim=True).values
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, size), x], dim=1))
        return x.max(dim=2).values.reshape(batch, groups, self.encoder_dims)


class Attention(nn.Module):
    """Multi-head self-attention with Point-BERT's names: `qkv` (no bias) and `proj`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            divisors = [n for n in range(1, dim + 1) if dim % n == 0 and n <= 16]
            raise UserError(f"Point-BERT width {dim} is not divisible by {num_heads} heads; set task.num_heads to the "
                            f"checkpoint's head count (one of {', '.join(map(str, divisors))}; a peftlab export's "
                            f"config.json says it)")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5, as Point-BERT
        return self.proj(x.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2, Point-BERT's names (timm's Mlp would add an Identity `norm`
    whose name collides with the real LayerNorms for name-suffix targeting)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (attn, then MLP), with Point-BERT's parameter names.

    `geometry_adapter` is an extension point for Point-PEFT's geometry-aware adapter
    (modules.py): when set, it refines the patch tokens between attention and MLP,
    using the patch centres. It is None in the plain backbone.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        if drop_path > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.geometry_adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        if self.geometry_adapter is not None:
            x = self.geometry_adapter(x, centers)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class TransformerEncoder(nn.Module):
    """The block list; positions join the input of every block (Point-BERT does this)."""

    def __init__(self, dim: int, depth: int, num_heads: int, drop_path_rate: float):
        super().__init__()
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(dim, num_heads, drop_path=rate) for rate in rates])
        self.activation_checkpointing = False
        """Recompute each block's activations in the backward pass instead of keeping them."""

    def forward(self, x: torch.Tensor, pos: torch.Tensor, centers: torch.Tensor, start: int = 0,
                stop: int | None = None) -> torch.Tensor:
        """Blocks [start, stop), all by default."""
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks[start:stop]:
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x + pos, centers, use_reentrant=False)
            else:
                x = block(x + pos, centers)
        return x


@dataclass(frozen=True)
class PointBertConfig:
    trans_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    encoder_dims: int = 256
    encoder_hidden: tuple[int, int] = (128, 256)
    num_group: int = 64
    group_size: int = 32
    drop_path_rate: float = 0.1
    pos_hidden: int = 128


class PointBERT(nn.Module):
    """Point cloud (B, N, 3) -> tokens (B, 1 + num_group, width): CLS first, then patches.

    `prompt` is an extension point for Point-PEFT's point-prior prompt (modules.py):
    when set, it inserts tokens after CLS before the blocks; they are removed again
    after the final norm, so the output always has 1 + num_group tokens.
    """

    def __init__(self, config: PointBertConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.trans_dim
        self.group_divider = Group(config.num_group, config.group_size)
        self.encoder = PatchEncoder(config.encoder_dims, config.encoder_hidden)
        self.reduce_dim = nn.Linear(config.encoder_dims, config.trans_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.trans_dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, config.trans_dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, config.pos_hidden), nn.GELU(), nn.Linear(config.pos_hidden, config.trans_dim))
        self.blocks = TransformerEncoder(config.trans_dim, config.depth, config.num_heads, config.drop_path_rate)
        self.norm = nn.LayerNorm(config.trans_dim)
        self.prompt: nn.Module | None = None
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        self.apply(_init_weights)

    def set_grouping(self, num_group: int | None = None, group_size: int | None = None) -> None:
        """Patches per cloud and points per patch are not weights: a checkpoint trained
        with 64 x 32 may run with other values (Point-BERT uses 128 x 32 on ScanObjectNN)."""
        self.config = replace(self.config, num_group=num_group or self.config.num_group,
                              group_size=group_size or self.config.group_size)
        self.group_divider = Group(self.config.num_group, self.config.group_size)

    def stages(self) -> list[nn.Module | Stage]:
        """The encoder in order: patch embedding (grouping, mini-PointNet, positions, CLS),
        the prompt slot (empty without a prompt), each block, the final norm (`forward`'s
        `start`/`stop` index this list; feature caching counts frozen stages in it)."""
        embed = Stage(modules=[self.group_divider, self.encoder, self.reduce_dim, self.pos_embed],
                      parameters=[self.cls_token, self.cls_pos])
        prompt = Stage(modules=[self.prompt] if self.prompt is not None else [])
        return [embed, prompt, *self.blocks.blocks, self.norm]

    def forward(self, points: torch.Tensor, hidden: tuple[torch.Tensor, ...] | torch.Tensor | None = None,
                start: int = 0, stop: int | None = None):
        """Tokens after stages [start, stop) of `stages()`; all of them by default. Between
        stages the state is (tokens, positions, patch centres); after the final norm, the
        tokens without prompts. From `start` > 0, `hidden` is stage start - 1's output."""
        last = len(self.blocks.blocks) + 2  # the final norm's index
        stop = last + 1 if stop is None else stop
        if start > last:
            return hidden
        if start == 0:
            patches, centers = self.group_divider(points)
            tokens = self.reduce_dim(self.encoder(patches))
            batch = tokens.shape[0]
            x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
            pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centers)], dim=1)
            feature = None
        else:
            x, pos, centers, *rest = hidden
            feature = rest[0] if rest else None  # the bank's query, for deep prompts' later blocks
        if start <= 1 < stop and self.prompt is not None:
            x, pos, feature = self.prompt(x, pos)
        first, end = max(start - 2, 0), max(min(stop, last) - 2, 0)
        if self.prompt is not None and self.prompt.deep:
            for index in range(first, end):
                x, pos = self._prompted_block_input(index, x, pos, centers, feature)
                x = self.blocks(x, pos, centers, start=index, stop=index + 1)
        else:
            x = self.blocks(x, pos, centers, start=first, stop=end)
        if stop <= last:
            return (x, pos, centers) if feature is None else (x, pos, centers, feature)
        x = self.norm(x)
        inserted = x.shape[1] - 1 - centers.shape[1]
        return torch.cat([x[:, :1], x[:, 1 + inserted:]], dim=1) if inserted else x


    def _prompted_block_input(self, index: int, x: torch.Tensor, pos: torch.Tensor, centers: torch.Tensor,
                              feature: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Deep prompts: block `index` gets its own prompts (the first block's came with the
        prompt stage); the first block after the prompted ones gets the tokens without them."""
        prompt = self.prompt
        if 0 < index < prompt.blocks:
            return prompt.refresh(index, x, feature), pos
        if index == prompt.blocks and x.shape[1] > 1 + centers.shape[1]:
            keep = lambda t: torch.cat([t[:, :1], t[:, 1 + prompt.length:]], dim=1)  # noqa: E731
            return keep(x), keep(pos)
        return x, pos


def _init_weights(module: nn.Module) -> None:
    # Point-BERT's initialisation: truncated normal Linear weights, zero biases.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- named backbones

PRESETS = {
    # Point-BERT's fine-tuning configuration (ModelNet40: 1024 points, 64 x 32 patches).
    "point_bert": PointBertConfig(),
    # Random-init presets: `tiny` for tests and the demo, `small` to train from scratch.
    "tiny": PointBertConfig(trans_dim=64, depth=2, num_heads=4, encoder_dims=64, encoder_hidden=(32, 64),
                            num_group=16, group_size=16, drop_path_rate=0.0, pos_hidden=32),
    "small": PointBertConfig(trans_dim=128, depth=4, num_heads=4, encoder_dims=128, encoder_hidden=(64, 128),
                             num_group=32, group_size=32, drop_path_rate=0.0, pos_hidden=64),
}
RANDOM_INIT = ("tiny", "small")
PRESET_SEED = 1234
"""Fixed so a random-init preset is the same weights every time it is built (runs reload it)."""

OFFICIAL_FILE = "Point-BERT.pth"
OFFICIAL_SOURCE = "https://github.com/lulutang0608/Point-BERT (README: pre-trained and fine-tuned models)"


def backbone_names() -> list[str]:
    return ["tiny", "small", "point_bert"]


@load_once
def load_backbone(name: str, num_heads: int | None = None) -> tuple[PointBERT, dict]:
    """-> (backbone, info). `name`: tiny, small, point_bert (the hub cache), or a .pth path."""
    if name in RANDOM_INIT:
        with torch.random.fork_rng():
            torch.manual_seed(PRESET_SEED)
            model = PointBERT(PRESETS[name])
        return model, _info(name, f"random-init {name} preset", model, {})
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return load_official_checkpoint(path, name, num_heads)
    if path.exists():
        raise UserError(f"{path}: a Point-BERT backbone is a checkpoint file (.pth), not a folder")
    if name != "point_bert":
        raise UserError(f"unknown Point-BERT backbone {name!r}: not a local file, and not one of {', '.join(backbone_names())}")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / OFFICIAL_FILE
    if cached.is_file():
        return load_official_checkpoint(cached, name, num_heads)
    raise UserError(
        f"Point-BERT backbone {name!r} is not available: no file {cached}; Point-BERT's weights are "
        f"published only at {OFFICIAL_SOURCE}; download {OFFICIAL_FILE} there and pass --backbone /path/to/{OFFICIAL_FILE}"
    )


# Prefixes a Point-BERT checkpoint may carry in front of `PointTransformer` keys:
# DataParallel's `module.`, the pre-training wrapper's query encoder `transformer_q.`,
# and `base_model.` in some re-saved files (Point-BERT's own loader strips the same).
_STRIPPED_PREFIXES = ("module.", "transformer_q.", "base_model.")
# Parts of pre-training or fine-tuning checkpoints that are not the encoder.
_NOT_ENCODER = ("transformer_k.", "dvae.", "cls_head_finetune.", "cls_head.", "lm_head.", "mask_token",
                "queue", "queue_ptr", "moco_loss", "loss_ce", "cls_head_finetune")


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The encoder state dict of an official Point-BERT file, prefixes stripped."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path}: refused to load (it holds objects other than tensors: {str(error).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise UserError(f"{path}: not a readable torch checkpoint ({error}); is the file complete?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a Point-BERT checkpoint (expected a dict with 'base_model')")
    state = data.get("base_model", data.get("model"))
    if not isinstance(state, dict):
        raise UserError(f"{path}: no 'base_model' state dict (keys: {sorted(data)[:6]}); Point-BERT saves the network under 'base_model'")
    stripped = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _STRIPPED_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        stripped[key] = value
    return stripped


def config_from_state(state: dict[str, torch.Tensor], path: Path, num_heads: int | None) -> PointBertConfig:
    """Widths and depth come from tensor shapes; heads are not in the weights (default 6)."""
    needed = ("cls_token", "reduce_dim.weight", "encoder.first_conv.0.weight", "encoder.first_conv.3.weight", "pos_embed.0.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{path}: not a Point-BERT encoder checkpoint (no {missing[0]!r} after stripping prefixes)")
    depth = 1 + max((int(k.split(".")[2]) for k in state if k.startswith("blocks.blocks.")), default=-1)
    if depth == 0:
        raise UserError(f"{path}: no transformer blocks (keys blocks.blocks.N.*) in the checkpoint")
    encoder_dims, trans_dim = state["reduce_dim.weight"].shape[1], state["reduce_dim.weight"].shape[0]
    return PointBertConfig(
        trans_dim=trans_dim, depth=depth, num_heads=num_heads or 6, encoder_dims=encoder_dims,
        encoder_hidden=(state["encoder.first_conv.0.weight"].shape[0], state["encoder.first_conv.3.weight"].shape[0]),
        pos_hidden=state["pos_embed.0.weight"].shape[0])


@dataclass
class LoadReport:
    loaded: list[str]
    missing: list[str]
    """Encoder keys the checkpoint lacks (they keep their initialisation)."""
    ignored: list[str]
    """Checkpoint keys that are not part of the encoder (pre-training heads, classifier)."""
    mismatched: list[str]

    def lines(self) -> list[str]:
        out = [f"loaded {len(self.loaded)} tensors"]
        for title, keys in (("missing", self.missing), ("ignored", self.ignored), ("shape mismatch", self.mismatched)):
            if keys:
                out.append(f"{title} ({len(keys)}): {', '.join(keys)}")
        return out


def load_official_checkpoint(path: Path, name: str, num_heads: int | None = None) -> tuple[PointBERT, dict]:
    state = checkpoint_state(path)
    config = config_from_state(state, path, num_heads)
    model = PointBERT(config)
    own = model.state_dict()
    report = LoadReport(loaded=[], missing=[], ignored=[], mismatched=[])
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.ignored.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value.float()
            report.loaded.append(key)
    report.missing = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
    if report.mismatched or report.missing:
        # Half-loaded encoders would silently train from partly random weights.
        raise UserError(f"{path}: checkpoint does not fit Point-BERT ({'; '.join(report.lines()[1:])[:400]})")
    model.load_state_dict(usable, strict=False)
    return model, _info(name, str(path), model, asdict(report))


def _info(name: str, source: str, model: PointBERT, report: dict) -> dict:
    c = model.config
    return {
        "name": name,
        "source": source,
        "architecture": {"width": c.trans_dim, "depth": c.depth, "heads": c.num_heads, "encoder_dims": c.encoder_dims,
                         "num_group": c.num_group, "group_size": c.group_size},
        "load_report": report,
        "weights_sha256": io.tensors_fingerprint(model.state_dict()),
    }
