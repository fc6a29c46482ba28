"""Slow, explicit, loop-per-clip oracle of StyleAligned on Wan's self-attention (`attn1`), from issue 24's rules.

Per shared `attn1` and transformer call (one guidance group: Wan runs its negative prompt in a call of its own),
clip 0 is the reference and attends to its own tokens exactly as the stock model does. q and k are RMS-normalised
over all heads together (the module's norm_q / norm_k on the flattened heads), then split into heads. A target's
queries and keys (values with `adain_values`) are AdaIN-normalised to the reference's, per head and channel over
all of a clip's tokens; then RoPE over (frame, row, column). With sharing on, every target query also attends to
the reference's tokens: its keys before RoPE and without AdaIN, rotated at the same (frame, row, column) positions,
the column moved by the latent width (in patches) under "shifted", times `shared_score_scale`, logits toward them
+ `shared_score_shift`; and its values. RoPE angles are computed here from the positions (theta 10000, Wan's split
of the head channels into frame, row and column parts), not taken from the model. No code is shared with the
package.
"""

import math
from dataclasses import dataclass

import torch

EPS = 1e-5
THETA = 10000.0


def adain(x, ref):
    """(x - mean(x)) / std(x) * std(ref) + mean(ref), statistics over tokens (dim -2), unbiased variance + EPS."""
    mean, std = x.mean(-2, keepdim=True), (x.var(-2, keepdim=True) + EPS).sqrt()
    ref_mean, ref_std = ref.mean(-2, keepdim=True), (ref.var(-2, keepdim=True) + EPS).sqrt()
    return (x - mean) / std * ref_std + ref_mean


def rope_angles(frames, rows, columns, head_dim, column_offset=0):
    """(tokens, head_dim / 2) rotation angles, tokens in (frame, row, column) order: Wan gives the row and the
    column 2 * (head_dim // 6) channels each and the frame the rest, each part its own frequencies."""
    row_dim = 2 * (head_dim // 6)
    parts = [head_dim - 2 * row_dim, row_dim, row_dim]
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(columns) + column_offset,
                             indexing="ij")
    angles = []
    for position, dim in zip((f, r, c), parts):
        freqs = 1.0 / THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(position.reshape(-1, 1).double() * freqs)
    return torch.cat(angles, dim=-1)


def rope(x, angles):
    """Rotate channel pairs (2i, 2i + 1) of x (heads, tokens, dim) by `angles` (tokens, dim / 2)."""
    pairs = x.double().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def attention(q, k, v, shift_from=None, shift=0.0):
    """softmax(q k^T / sqrt(d) + shift on keys from `shift_from` on) v, logits built explicitly."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if shift_from is not None:
        logits[..., shift_from:] += shift
    return logits.softmax(-1) @ v


def attend_clips(q, k, v, config, own, shared):
    """One guidance group: q, k, v (clips, heads, tokens, dim) after the q/k norms, before RoPE; clip 0 is the
    reference. `own` and `shared` are the RoPE angles of a clip's tokens and of the shared reference keys."""
    out = [attention(rope(q[0], own), rope(k[0], own), v[0])]
    for i in range(1, q.shape[0]):
        qi = adain(q[i], q[0]) if config.adain_queries else q[i]
        ki = adain(k[i], k[0]) if config.adain_keys else k[i]
        vi = adain(v[i], v[0]) if config.adain_values else v[i]
        qi, ki = rope(qi, own), rope(ki, own)
        if not config.share_attention:
            out.append(attention(qi, ki, vi))
            continue
        keys = torch.cat([ki, config.shared_score_scale * rope(k[0], shared)], dim=-2)
        values = torch.cat([vi, v[0]], dim=-2)
        out.append(attention(qi, keys, values, shift_from=q.shape[-2], shift=config.shared_score_shift))
    return torch.stack(out)


@dataclass
class Context:
    """The latent grid of the current transformer call, in patches: (frames, rows, columns)."""

    grid: tuple = ()


class WanOracleProcessor:
    """Oracle processor for a block's `attn1` (WanAttention, called with rotary_emb and nothing else)."""

    def __init__(self, config, context):
        self.config, self.context = config, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        assert encoder_hidden_states is None and attention_mask is None, "the oracle shares attn1 only"

        def heads(t):  # (batch, tokens, heads * dim) -> (batch, heads, tokens, dim)
            return t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)

        q = heads(attn.norm_q(attn.to_q(hidden_states)))
        k = heads(attn.norm_k(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        frames, rows, columns = self.context.grid
        assert frames * rows * columns == q.shape[-2], "the grid must cover every token"
        own = rope_angles(frames, rows, columns, q.shape[-1])
        offset = columns if self.config.reference_positions == "shifted" else 0
        shared = rope_angles(frames, rows, columns, q.shape[-1], column_offset=offset)
        out = attend_clips(q, k, v, self.config, own, shared)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


def module_of(pipe, name):
    """The attention module `name`: "transformer.blocks.N.attn1" / "transformer_2...." on two experts, else
    "blocks.N.attn1" in `pipe.transformer`."""
    for expert in ("transformer", "transformer_2"):
        if name.startswith(expert + "."):
            return getattr(pipe, expert).get_submodule(name[len(expert) + 1:])
    return pipe.transformer.get_submodule(name)


def install(pipe, config, layer_names):
    """Put oracle processors on the named `attn1` modules; returns `undo()`."""
    context = Context()
    modules = {name: module_of(pipe, name) for name in layer_names}
    originals = {name: module.processor for name, module in modules.items()}
    for module in modules.values():
        module.set_processor(WanOracleProcessor(config, context))
    experts = [expert for expert in (pipe.transformer, getattr(pipe, "transformer_2", None)) if expert is not None]

    def pre_hook(module, args, kwargs):
        _, _, frames, height, width = (args[0] if args else kwargs["hidden_states"]).shape
        patch = module.config.patch_size
        context.grid = (frames // patch[0], height // patch[1], width // patch[2])

    handles = [expert.register_forward_pre_hook(pre_hook, with_kwargs=True) for expert in experts]

    def undo():
        for handle in handles:
            handle.remove()
        for name, module in modules.items():
            module.set_processor(originals[name])

    return undo
