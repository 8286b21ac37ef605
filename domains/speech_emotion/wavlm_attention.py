"""WavLM attention that calls its q/k/v/out projections as modules.

A module of its own because it subclasses a transformers class: `backbones` imports it
when it builds a WavLM, so registering the domain does not import transformers.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.models.wavlm.modeling_wavlm import WavLMAttention


class ModuleCallingWavLMAttention(WavLMAttention):
    """WavLM attention that calls its q/k/v/out projections as modules.

    transformers' WavLMAttention hands the projection *weights* to
    `F.multi_head_attention_forward`, so anything that wraps or hooks those modules
    (LoRA, IA3, SSF, adapters) would silently have no effect there. This computes the
    same attention (same scaling, gated relative-position bias and padding mask) by
    calling the modules; a test checks the outputs agree.
    """

    def torch_multi_head_self_attention(self, hidden_states, attention_mask, gated_position_bias):
        batch, length, _ = hidden_states.shape

        def heads(x):
            return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        query, key, value = heads(self.q_proj(hidden_states)), heads(self.k_proj(hidden_states)), heads(self.v_proj(hidden_states))
        bias = gated_position_bias.view(batch, self.num_heads, length, length).to(query.dtype)
        if attention_mask is not None:
            padding = attention_mask.ne(1)[:, None, None, :]
            bias = bias.masked_fill(padding, torch.finfo(bias.dtype).min)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                                  dropout_p=self.dropout if self.training else 0.0)
        attended = attended.transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.out_proj(attended), None
