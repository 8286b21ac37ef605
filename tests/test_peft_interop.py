"""An adapter saved by a peft-backed method is an ordinary peft adapter."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import TinyNet
from peftlab.shared import methods

PEFT_METHODS = [m for m in methods.list_methods() if methods.get_method(m).peft_backed and methods.get_method(m).fits(TinyNet())]


@pytest.mark.parametrize("name", PEFT_METHODS)
def test_saved_adapter_loads_in_plain_peft_with_identical_outputs(name, tmp_path):
    torch.manual_seed(0)
    base = TinyNet().eval()
    adapted = methods.apply(copy.deepcopy(base), name)
    with torch.no_grad():
        for param in adapted.method_parameters().values():
            param.add_(0.05 * torch.randn_like(param))
    adapted.save(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ours, theirs = peft.get_peft_model_state_dict(adapted.model), peft.get_peft_model_state_dict(plain)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        # Same weights; peft's inference-mode path may order float ops differently.
        torch.testing.assert_close(plain(x), adapted.eval()(x), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(plain(x), base(x))
