"""Slow, explicit oracle of StyleAligned on FLUX.2 transformers, per image (`oracle_dit.attend_group`'s rules).

FLUX.2's double-stream attention joins [text, image] with per-head RMS norms; its single-stream attention computes
q, k, v and an MLP input with one fused linear layer and projects [attention, SwiGLU(MLP)] with another. Only the
set's image tokens (position ids with t = 0) are normalised and shared; conditioning images (t > 0) are not. No
code is shared with the package.
"""

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux2 import Flux2ParallelSelfAttention

from tests.oracle import family_config
from tests.oracle_dit import Context, attend_group, installed


class Flux2OracleProcessor:
    """Oracle processor for `Flux2Attention` (double-stream) and `Flux2ParallelSelfAttention` (single-stream)."""

    def __init__(self, config, context):
        self.config, self.context = config, context

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if isinstance(attn, Flux2ParallelSelfAttention):
            return self.single(attn, hidden_states, *args, **kwargs)
        return self.double(attn, hidden_states, *args, **kwargs)

    def heads(self, attn, x, norm=None):
        x = x.unflatten(-1, (-1, attn.head_dim))
        return (x if norm is None else norm(x)).transpose(1, 2)

    def attend(self, q, k, v, rotary):
        text, image = self.context.text_tokens, self.context.image_tokens
        out = attend_group(q, k, v, slice(text, text + image), self.config, rotary, self.context.reference_rotary)
        return out.transpose(1, 2).flatten(2)

    def double(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        assert attention_mask is None
        q = torch.cat([self.heads(attn, attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
                       self.heads(attn, attn.to_q(hidden_states), attn.norm_q)], dim=2)
        k = torch.cat([self.heads(attn, attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
                       self.heads(attn, attn.to_k(hidden_states), attn.norm_k)], dim=2)
        v = torch.cat([self.heads(attn, attn.add_v_proj(encoder_hidden_states)),
                       self.heads(attn, attn.to_v(hidden_states))], dim=2)
        out = self.attend(q, k, v, image_rotary_emb)
        text = encoder_hidden_states.shape[1]
        return attn.to_out[1](attn.to_out[0](out[:, text:])), attn.to_add_out(out[:, :text])

    def single(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        assert attention_mask is None
        inner = attn.inner_dim
        weight, bias = attn.to_qkv_mlp_proj.weight, attn.to_qkv_mlp_proj.bias
        q, k, v, mlp = (F.linear(hidden_states, weight[a:b], None if bias is None else bias[a:b])
                        for a, b in ((0, inner), (inner, 2 * inner), (2 * inner, 3 * inner), (3 * inner, None)))
        out = self.attend(self.heads(attn, q, attn.norm_q), self.heads(attn, k, attn.norm_k), self.heads(attn, v),
                          image_rotary_emb)
        gate, linear = mlp.chunk(2, dim=-1)
        return attn.to_out(torch.cat([out, F.silu(gate) * linear], dim=-1))


def install(pipe, config, layer_names):
    """Put oracle processors on the named attention modules of `pipe.transformer`; returns `undo()`."""
    config = family_config(pipe, config, gates=True)
    transformer, context = pipe.transformer, Context()

    def read_call(call):
        txt_ids, img_ids = (ids[0] if ids.ndim == 3 else ids for ids in (call["txt_ids"], call["img_ids"]))
        generated = img_ids[img_ids[:, 0] == 0]
        context.text_tokens, context.image_tokens = txt_ids.shape[0], generated.shape[0]
        context.reference_rotary = None  # "same": the call's own image rows
        if config.reference_positions == "shifted":
            shifted = generated.clone()
            shifted[:, 2] += int(generated[:, 2].max()) + 1
            context.reference_rotary = transformer.pos_embed(shifted)

    processors = {name: Flux2OracleProcessor(config, context) for name in layer_names}
    return installed(transformer, processors, read_call, config, lambda call: float(call["timestep"].max()))  # sigma
