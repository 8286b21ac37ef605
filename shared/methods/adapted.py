"""`apply(model, name, **options)` and the adapted model it returns."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from peftlab.shared import io
from peftlab.shared.errors import UserError
from peftlab.shared.lazy import lazy_import
from peftlab.shared.methods.peft_methods import quiet_peft
from peftlab.shared.methods.registry import MethodSpec, build_options, get_method
from torch import nn

peft = lazy_import("peft")

METHOD_FILE = "method.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdaptedModel(nn.Module):
    """A model with one PEFT method applied; only the method's parameters train.

    `model` is what the method produced (a `peft.PeftModel` for peft-backed methods,
    else the base model with the method's modules attached). Calling the adapted model
    calls it.
    """

    def __init__(self, model: nn.Module, spec: MethodSpec, options, parameter_names, state, base_parameters: int,
                 buffer_names=()):
        super().__init__()
        self.model = model
        self.spec = spec
        self.options = options
        self._parameter_names = list(parameter_names)
        self._buffer_names = list(buffer_names)
        self._state = state
        self.base_parameters = base_parameters

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def method(self) -> str:
        return self.spec.name

    @property
    def base_model(self) -> nn.Module:
        """The underlying network (unwrapped from peft), for attribute access."""
        return self.model.get_base_model() if isinstance(self.model, peft.PeftModel) else self.model

    def method_parameters(self) -> dict[str, nn.Parameter]:
        params = dict(self.model.named_parameters())
        return {name: params[name] for name in self._parameter_names}

    def method_buffers(self) -> dict[str, torch.Tensor]:
        buffers = dict(self.model.named_buffers())
        return {name: buffers[name] for name in self._buffer_names}

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what `save` writes: the tensors that, with the base, rebuild the model."""
        if isinstance(self.model, peft.PeftModel):
            with quiet_peft():
                return peft.get_peft_model_state_dict(self.model)
        state = {name: p.detach() for name, p in self.method_parameters().items()}
        state.update({name: b.detach() for name, b in self.method_buffers().items()})
        return state

    def load_method_state_dict(self, tensors: dict[str, torch.Tensor], source: str = "adapter") -> None:
        if isinstance(self.model, peft.PeftModel):
            with quiet_peft():
                result = peft.set_peft_model_state_dict(self.model, tensors)
                expected = set(peft.get_peft_model_state_dict(self.model))
            # Prompt-learning methods load `prompt_embeddings` themselves yet report it
            # as unexpected; everything else peft reports as unexpected is a mismatch.
            prompt_learning = self.model.peft_config[self.model.active_adapter].is_prompt_learning
            unexpected = [k for k in getattr(result, "unexpected_keys", [])
                          if (k in expected or ".lora_" in k) and not (prompt_learning and k == "prompt_embeddings")]
            missing = sorted(expected - set(tensors))
            if missing or unexpected:
                raise UserError(f"{source}: adapter weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            return
        params = {**self.method_parameters(), **self.method_buffers()}
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise UserError(f"{source}: adapter weights do not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        with torch.no_grad():
            for name, param in params.items():
                if param.shape != tensors[name].shape:
                    raise UserError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model needs {tuple(param.shape)}")
                param.copy_(tensors[name])

    def parameter_counts(self) -> dict[str, float]:
        method = sum(p.numel() for p in self.method_parameters().values())
        return {
            "method": method,
            "base": self.base_parameters,
            "method_percent": 100.0 * method / max(self.base_parameters, 1),
        }

    def merge(self) -> nn.Module:
        """Fold the method into plain weights; the result computes the same outputs."""
        if not self.spec.mergeable:
            raise UserError(f"method {self.method!r} cannot be merged into the base weights (it adds modules)")
        return self.spec.merge(self.model, self.options, self._state)

    def save(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, peft.PeftModel):
            # peft's own writer: the folder loads with peft.PeftModel.from_pretrained.
            with quiet_peft():
                self.model.save_pretrained(str(directory))
        else:
            io.save_tensors(directory / WEIGHTS_FILE, self.method_state_dict())
        io.write_json(directory / METHOD_FILE, {"method": self.method, "options": dataclasses.asdict(self.options)})


def apply(model: nn.Module, name: str, **options) -> AdaptedModel:
    """Apply PEFT method `name` to `model`; only the method's parameters stay trainable."""
    spec = get_method(name)
    if not spec.fits(model):
        raise UserError(f"method {name!r} does not fit the {type(model).__name__} backbone ({spec.description})")
    parsed = build_options(spec, options)
    base_parameters = sum(p.numel() for p in model.parameters())
    for param in model.parameters():
        param.requires_grad_(False)
    try:
        applied = spec.apply(model, parsed)
    except UserError as error:  # every refusal names the method it is about
        if str(error).startswith((f"{name}:", f"method {name!r}")):
            raise
        raise UserError(f"method {name!r}: {error}") from None
    trainable = set(applied.parameter_names)
    for param_name, param in applied.model.named_parameters():
        param.requires_grad_(param_name in trainable)
    return AdaptedModel(applied.model, spec, parsed, applied.parameter_names, applied.state, base_parameters,
                        applied.buffer_names)


def load_adapter(model: nn.Module, directory) -> AdaptedModel:
    """Re-apply the method saved in `directory` to `model` and load its weights."""
    directory = Path(directory)
    method_file = directory / METHOD_FILE
    if not method_file.is_file():
        raise UserError(f"{directory}: not a peftlab adapter folder (no {METHOD_FILE})")
    saved = json.loads(method_file.read_text())
    adapted = apply(model, saved["method"], **saved["options"])
    adapted.load_method_state_dict(io.load_tensors(directory / WEIGHTS_FILE), source=str(directory))
    return adapted


def network_of(backbone: nn.Module) -> nn.Module:
    """The network itself: unwrapped from the method's `AdaptedModel` (and peft's
    wrapper), or from what stands in for one (serving's replayed backbone), by its
    `base_model`; `backbone` where nothing wraps it."""
    return backbone.base_model if hasattr(backbone, "base_model") else backbone
