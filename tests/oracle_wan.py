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
from dataclasses import dataclass, field

import torch

from tests.oracle import family_config

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


def attend_target(q, k, v, ref, config, own, shared):
    """One target clip's q, k, v (heads, tokens, dim) against its reference's `ref` = (q, k, v) (heads, its tokens,
    dim), all after the q/k norms and before RoPE. `own` and `shared` are the RoPE angles of the target's tokens and
    of the reference keys as the target sees them."""
    q = adain(q, ref[0]) if config.adain_queries else q
    k = adain(k, ref[1]) if config.adain_keys else k
    v = adain(v, ref[2]) if config.adain_values else v
    q, k = rope(q, own), rope(k, own)
    if not config.share_attention:
        return attention(q, k, v)
    keys = torch.cat([k, config.shared_score_scale * rope(ref[1], shared)], dim=-2)
    return attention(q, keys, torch.cat([v, ref[2]], dim=-2), shift_from=q.shape[-2], shift=config.shared_score_shift)


def attend_clips(q, k, v, config, own, shared):
    """One guidance group: q, k, v (clips, heads, tokens, dim); clip 0 is the reference, attending to itself as in
    the stock model."""
    reference = (q[0], k[0], v[0])
    out = [attention(rope(q[0], own), rope(k[0], own), v[0])]
    out += [attend_target(q[i], k[i], v[i], reference, config, own, shared) for i in range(1, q.shape[0])]
    return torch.stack(out)


@dataclass
class Context:
    """The latent grid of the current transformer call, in patches: (frames, rows, columns); with a still
    reference, whether the call runs it ("record") or the targets ("targets"), and its recorded q, k, v by layer."""

    grid: tuple = ()
    still: str | None = None
    recorded: dict = field(default_factory=dict)


class WanOracleProcessor:
    """Oracle processor for a block's `attn1` (WanAttention, called with rotary_emb and nothing else)."""

    def __init__(self, config, context, name=""):
        self.config, self.context, self.name = config, context, name

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
        if self.context.still == "record":  # the still reference alone, as a one-frame clip
            self.context.recorded[self.name] = (q[0], k[0], v[0])
            out = attention(rope(q, own), rope(k, own), v)
        elif self.context.still == "targets":  # its keys at frame 0 of the targets' (row, column) grid
            ref_shared = rope_angles(1, rows, columns, q.shape[-1], column_offset=offset)
            reference = self.context.recorded[self.name]
            out = torch.stack([attend_target(q[i], k[i], v[i], reference, self.config, own, ref_shared)
                               for i in range(q.shape[0])])
        else:
            out = attend_clips(q, k, v, self.config, own, shared)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))


def module_of(pipe, name):
    """The attention module `name`: "transformer.blocks.N.attn1" / "transformer_2...." on two experts, else
    "blocks.N.attn1" in `pipe.transformer`."""
    for expert in ("transformer", "transformer_2"):
        if name.startswith(expert + "."):
            return getattr(pipe, expert).get_submodule(name[len(expert) + 1:])
    return pipe.transformer.get_submodule(name)


def install(pipe, config, layer_names, still=False):
    """Put oracle processors on the named `attn1` modules; returns `undo()`. `still`: clip 0 of every call is a
    still image, its frames all alike: each call runs it alone on its first frame (its output put on every frame),
    then the targets against it."""
    config = family_config(pipe, config)
    context = Context()
    modules = {name: module_of(pipe, name) for name in layer_names}
    originals = {name: module.processor for name, module in modules.items()}
    processors = {name: WanOracleProcessor(config, context, name) for name in modules}
    for name, module in modules.items():
        module.set_processor(processors[name])
    experts = [expert for expert in (pipe.transformer, getattr(pipe, "transformer_2", None)) if expert is not None]
    previous = {"timestep": None, "calls": 0}  # the last call's timestep, and the calls in a row at it

    def pre_hook(module, args, kwargs):
        """The call's grid; under `share_unconditional=False` the second call at a timestep (the negative prompt's,
        which the pipeline runs after the prompt's) runs the modules' own processors."""
        context.grid = grid_of(module, kwargs["hidden_states"])
        timestep = float(kwargs["timestep"].max())
        previous["calls"] = previous["calls"] + 1 if timestep == previous["timestep"] else 1
        previous["timestep"] = timestep
        sharing = config.share_unconditional or previous["calls"] == 1
        for name, attention in modules.items():
            attention.set_processor(processors[name] if sharing else originals[name])

    handles = [expert.register_forward_pre_hook(pre_hook, with_kwargs=True) for expert in experts]
    if still:
        for expert in experts:
            expert.forward = still_forward(expert, context)

    def undo():
        for handle in handles:
            handle.remove()
        for expert in experts:
            vars(expert).pop("forward", None)
        for name, module in modules.items():
            module.set_processor(originals[name])

    return undo


def grid_of(transformer, hidden_states):
    """(frames, rows, columns) in patches of a latent (batch, channels, frames, height, width)."""
    _, _, frames, height, width = hidden_states.shape
    patch = transformer.config.patch_size
    return frames // patch[0], height // patch[1], width // patch[2]


def still_forward(transformer, context):
    """A transformer forward that runs clip 0 alone on its first frame, then the other clips."""
    forward = type(transformer).forward.__get__(transformer)

    def run(hidden_states, timestep, encoder_hidden_states, return_dict=True, **kwargs):
        context.still, first = "record", hidden_states[:1, :, :1]
        context.grid = grid_of(transformer, first)
        reference = forward(hidden_states=first, timestep=timestep[:1],
                            encoder_hidden_states=encoder_hidden_states[:1], return_dict=False, **kwargs)[0]
        context.still, context.grid = "targets", grid_of(transformer, hidden_states)
        targets = forward(hidden_states=hidden_states[1:], timestep=timestep[1:],
                          encoder_hidden_states=encoder_hidden_states[1:], return_dict=False, **kwargs)[0]
        context.still = None
        return (torch.cat([reference.expand(-1, -1, targets.shape[2], -1, -1), targets]),)

    return run
