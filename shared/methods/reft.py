"""Representation fine-tuning: LoReFT and DiReFT (Wu et al. 2024, "ReFT").

Instead of changing weights, ReFT edits the hidden states that chosen decoder layers
output, at chosen positions of the prompt: the first `first_positions` and the last
`last_positions` tokens (the paper's commonsense recipe: 7 and 7 in every layer).

- LoReFT: h <- h + R^T (W h + b - R h). R (rank x width) keeps orthonormal rows through
  torch's orthogonal parametrisation (the Cayley map of a free matrix), so the
  edit replaces h's component in an r-dimensional subspace by the learned W h + b.
  Parameters per intervention: R (r*d) + W (r*d) + b (r) = 2rd + r.
- DiReFT: h <- h + R^T (W h + b) with R unconstrained: no orthogonality, no
  subtraction, cheaper. R starts at zero here (a peftlab choice, as LoRA's B = 0), so
  DiReFT starts equal to the base model. The paper's text drops R's orthogonality and
  fixes no init; pyreft's DireftIntervention keeps an orthogonal, orthogonally
  initialised R.

What holds at LoReFT's init: R's orthonormal rows point in random directions (as
pyreft's orthogonal init; with the Cayley map they start orthogonal to hidden dimensions
0..r-1) and W, b take nn.Linear's default init, so the edit is not zero. It is the identity exactly when
W = R and b = 0 (then W h + b - R h = 0); `LoReFTIntervention.make_identity()` sets that,
and the tests check both facts.

Where interventions apply. A pre-forward hook on the model reads `attention_mask` (left
or right padding both work: the prompt starts at each row's first attended token) and
marks the positions; each chosen block's forward hook adds its edit there. A training
batch holds prompt + answer, so the caller says where each prompt ends with
`prompt_lengths(model, lengths)`; without it the whole attended input is the prompt.
During generation only the prefill pass (no cached keys yet) is edited: the prompt's
states are computed once and cached, and generated tokens are not prompt positions.
On a prompt shorter than the two windows, each window is cut to half the prompt, as
pyreft does (`get_intervention_locations`): no position is edited twice, and the middle
position of an odd-length prompt is not edited.

Options `tie_positions` (one intervention serves the first and the last positions, as
the paper's tied runs) and `tie_layers` (one intervention shared by all chosen layers)
choose the parameter sharing. Interventions are position-specific, so they cannot be
merged into the weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from peftlab.shared.errors import UserError
from peftlab.shared.methods.registry import Applied, register_method
from peftlab.shared.methods.targeting import find_blocks, resolve_layers
from torch import nn
from torch.nn.utils import parametrizations


class LoReFTIntervention(nn.Module):
    """Returns the edit R^T (W h + b - R h) for hidden states h (..., width)."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.rotate = nn.Linear(width, rank, bias=False)
        # Cayley map without trivialisation: the weight is a pure function of one stored
        # r x d matrix, so saving that matrix saves the intervention. (Torch's default for
        # non-square weights, Householder, loses orthonormality under Adam: tested.)
        parametrizations.orthogonal(self.rotate, orthogonal_map="cayley", use_trivialization=False)
        if width >= 2 * rank:
            self._start_on_random_directions(width, rank)
        self.learned_source = nn.Linear(width, rank)

    @torch.no_grad()
    def _start_on_random_directions(self, width: int, rank: int) -> None:
        # The Cayley map of the small matrix nn.Linear's init stores is close to the
        # identity, so R would start on hidden dimensions 0..r-1 (72 % of its energy there).
        # Storing [0; 2U], U a random orthonormal (d-r) x r matrix, turns e_1..e_r by 90
        # degrees onto U's columns: R starts as [0 | U^T], random directions, as pyreft's
        # orthogonally initialised R does.
        directions = torch.empty(width - rank, rank)
        nn.init.orthogonal_(directions)
        stored = torch.zeros(width, rank)
        stored[rank:] = 2 * directions
        self.rotate.parametrizations.weight.original.copy_(stored.T)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever autocast says: W h + b and R h are close (equal at identity
        # init), and their difference in bf16 is mostly rounding error. The edit is
        # rank x width work, nothing next to the layer it edits.
        with torch.autocast(hidden.device.type, enabled=False):
            source = hidden.float()
            rotation = self.rotate.weight.float()
            source_weight, source_bias = self.learned_source.weight.float(), self.learned_source.bias.float()
            edit = (nn.functional.linear(source, source_weight, source_bias) - source @ rotation.T) @ rotation
        return edit.to(hidden.dtype)

    @torch.no_grad()
    def make_identity(self) -> None:
        """W = R, b = 0: the edit vanishes for every input."""
        self.learned_source.weight.copy_(self.rotate.weight)
        self.learned_source.bias.zero_()


class DiReFTIntervention(nn.Module):
    """Returns the edit R^T (W h + b); R unconstrained and zero at init."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.learned_source = nn.Linear(width, rank)
        self.project = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.project.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(self.learned_source(hidden))


class Interventions(nn.Module):
    """All interventions of one model, and where in the current batch they apply."""

    def __init__(self, first: int, last: int):
        super().__init__()
        self.first, self.last = first, last
        self.edits = nn.ModuleDict()
        self.prompt_lengths: torch.Tensor | None = None
        self.first_mask: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def locate(self, module, args, kwargs) -> None:
        """Pre-forward hook on the model: mark the first/last prompt positions of each row."""
        self.first_mask = self.last_mask = None
        past = kwargs.get("past_key_values")
        if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
            return  # a decoding step: the prompt was edited in the prefill pass
        mask = kwargs.get("attention_mask")
        if mask is None:
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if tokens is None:
                tokens = kwargs["inputs_embeds"]
            mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        mask = mask.bool()
        columns = torch.arange(mask.shape[1], device=mask.device)
        start = mask.float().argmax(dim=1, keepdim=True)  # first attended column per row
        length = mask.sum(dim=1, keepdim=True)
        if self.prompt_lengths is not None:
            length = torch.minimum(length, self.prompt_lengths.to(mask.device).view(-1, 1))
        offset = columns.view(1, -1) - start  # position within the prompt
        inside = (offset >= 0) & (offset < length)
        # pyreft's rule for short prompts: each window takes at most half the prompt
        first, last = (torch.clamp(length // 2, max=count) for count in (self.first, self.last))
        self.last_mask = inside & (offset >= length - last)
        self.first_mask = inside & (offset < first)

    def edit(self, hidden: torch.Tensor, first: nn.Module, last: nn.Module) -> torch.Tensor:
        if self.first_mask is None or hidden.shape[:2] != self.first_mask.shape:
            return hidden
        if first is last:
            where = (self.first_mask | self.last_mask).unsqueeze(-1)
            return hidden + torch.where(where, first(hidden), torch.zeros((), dtype=hidden.dtype, device=hidden.device))
        zero = torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        hidden_in = hidden
        hidden = hidden + torch.where(self.first_mask.unsqueeze(-1), first(hidden_in), zero)
        return hidden + torch.where(self.last_mask.unsqueeze(-1), last(hidden_in), zero)


@contextmanager
def prompt_lengths(model: nn.Module, lengths: torch.Tensor | None):
    """Within the block, position-based methods take each row's prompt to be `lengths` tokens."""
    # A direct attribute lookup, not a module walk: this runs on every forward pass.
    # `model` is the adapted network itself or an AdaptedModel holding it in `.model`.
    holders = (model, getattr(model, "model", None))
    interventions = next((h.reft_interventions for h in holders if hasattr(h, "reft_interventions")), None)
    if interventions is None or lengths is None:
        yield
        return
    interventions.prompt_lengths = lengths
    try:
        yield
    finally:
        interventions.prompt_lengths = None


@dataclass
class ReftOptions:
    rank: int = field(default=4, metadata={"help": "rank r of each intervention (the paper: 4 or 8)"})
    layers: str | list[int] | int | None = field(
        default="all", metadata={"help": "decoder layers whose outputs are edited: 'all', 'last_N', 'first_N' or indices"})
    first_positions: int = field(default=1, metadata={"help": "edit the first f prompt tokens (the paper's commonsense recipe: 7)"})
    last_positions: int = field(default=3, metadata={"help": "edit the last l prompt tokens (the paper: 7)"})
    tie_positions: bool = field(default=True, metadata={"help": "one intervention per layer serves both first and last positions"})
    tie_layers: bool = field(default=False, metadata={"help": "one intervention (pair) shared by all chosen layers"})
    blocks: str | None = field(default=None, metadata={"help": "module path of the decoder's layer list (default: the longest ModuleList)"})

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.first_positions < 0 or self.last_positions < 0:
            raise ValueError("first_positions and last_positions must be >= 0")
        if self.first_positions + self.last_positions == 0:
            raise ValueError("first_positions + last_positions is 0: no position would be edited")


def hidden_width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for attribute in ("hidden_size", "d_model", "n_embd"):
        if config is not None and isinstance(getattr(config, attribute, None), int):
            return getattr(config, attribute)
    raise UserError(f"reft: cannot tell the hidden width of a {type(model).__name__} (no config.hidden_size)")


def intervention_count(options: ReftOptions, layers: int) -> int:
    """How many interventions the options create on `layers` chosen layers."""
    return (1 if options.tie_layers else layers) * (1 if options.tie_positions else 2)


def _apply(model: nn.Module, options: ReftOptions, intervention: type) -> Applied:
    _, blocks = find_blocks(model, options.blocks)
    chosen = resolve_layers(options.layers, len(blocks))
    chosen = list(range(len(blocks))) if chosen is None else chosen
    width = hidden_width(model)
    if options.rank > width:
        raise UserError(f"reft: rank {options.rank} exceeds the hidden width {width}")
    interventions = Interventions(options.first_positions, options.last_positions)

    def make(key: str) -> nn.Module:
        if key not in interventions.edits:
            interventions.edits[key] = intervention(width, options.rank)
        return interventions.edits[key]

    handles = [model.register_forward_pre_hook(interventions.locate, with_kwargs=True)]
    for index in chosen:
        layer_key = "shared" if options.tie_layers else f"layer{index}"
        first = make(layer_key if options.tie_positions else f"{layer_key}_first")
        last = first if options.tie_positions else make(f"{layer_key}_last")
        handles.append(blocks[index].register_forward_hook(_block_hook(interventions, first, last)))
    model.reft_interventions = interventions
    names = [f"reft_interventions.{n}" for n, _ in interventions.named_parameters()]
    return Applied(model, names, state=handles)


def _block_hook(interventions: Interventions, first: nn.Module, last: nn.Module):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (interventions.edit(output[0], first, last), *output[1:])
        return interventions.edit(output, first, last)

    return hook


def _is_transformers_decoder(model: nn.Module) -> bool:
    # Imported here: the registry loads before any causal-LM code is needed.
    from peftlab.shared.causal_lm import is_causal_lm

    return is_causal_lm(model)


register_method(
    "loreft",
    ReftOptions,
    lambda model, options: _apply(model, options, LoReFTIntervention),
    description="LoReFT (Wu et al. 2024): h + R^T(Wh + b - Rh) on chosen prompt positions, R with orthonormal rows",
    mergeable=False,
    identity_at_init=False,
    applies_to=_is_transformers_decoder,
)

register_method(
    "direft",
    ReftOptions,
    lambda model, options: _apply(model, options, DiReFTIntervention),
    description="DiReFT (Wu et al. 2024): h + R^T(Wh + b) on chosen prompt positions, no orthogonality; R zero-init",
    mergeable=False,
    identity_at_init=True,
    applies_to=_is_transformers_decoder,
)
