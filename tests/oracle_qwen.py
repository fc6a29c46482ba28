"""Slow, explicit, loop-per-image oracle of StyleAligned on Qwen-Image's double-stream attention.

Each call of Qwen-Image's transformer is one guidance group (true CFG runs the negative prompt in a call of its
own): image 0 is the reference and attends to its own tokens exactly as the stock model does. Tokens are [text,
image]; the q/k RMS norms act per head on each stream; RoPE is complex, from the model's frequency table, with
image rows and columns centred (row r of H sits at r - (H - H // 2)) and the text after the largest half side.
A target's image-token queries / keys / values are AdaIN-normalised to the reference's image tokens (after the
norms, before RoPE); with sharing on, every target query also attends to the reference's image tokens: its raw
keys rotated at the target's own image positions, the column moved by the latent width W under "shifted", times
the score scale, with the shift added to those logits, and its values. A target keeps its own text-padding mask;
the reference's tokens are never masked. No code is shared with the package; the group's attention is the DiT
oracle's (`oracle_dit.attend_group`), given the rotations built here from the frequency table.
"""

from dataclasses import dataclass

import torch

from tests.oracle import family_config
from tests.oracle_dit import attend_group, installed


def centred(count: int) -> list[int]:
    """Qwen-Image's centred positions of `count` rows (or columns)."""
    return [i - (count - count // 2) for i in range(count)]


def table_row(pos_embed, axis: int, position: int) -> torch.Tensor:
    """The model's complex frequency-table entry of one axis at an integer position (negative ones included)."""
    sizes = [dim // 2 for dim in pos_embed.axes_dim]
    start = sum(sizes[:axis])
    table = pos_embed.pos_freqs if position >= 0 else pos_embed.neg_freqs
    row = position if position >= 0 else len(pos_embed.neg_freqs) + position
    return table[row, start:start + sizes[axis]]


def image_freqs(pos_embed, height: int, width: int, column_shift: int = 0) -> torch.Tensor:
    """(height * width, dim / 2): frame 0, the centred row, the centred column + column_shift, token by token."""
    return torch.stack([torch.cat([table_row(pos_embed, 0, 0), table_row(pos_embed, 1, row),
                                   table_row(pos_embed, 2, column + column_shift)])
                        for row in centred(height) for column in centred(width)])


def text_freqs(pos_embed, height: int, width: int, text_tokens: int) -> torch.Tensor:
    """(text_tokens, dim / 2): text token j at position max(H // 2, W // 2) + j on every axis."""
    first = max(height // 2, width // 2)
    return torch.stack([torch.cat([table_row(pos_embed, axis, first + j) for axis in range(3)])
                        for j in range(text_tokens)])


def as_cos_sin(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex frequencies (tokens, dim / 2) as the real (cos, sin) pair (tokens, dim) of FLUX's RoPE, which
    rotates channel pairs (2i, 2i + 1): a complex product of adjacent channels by freqs[:, i], in real arithmetic."""
    return freqs.real.repeat_interleave(2, -1), freqs.imag.repeat_interleave(2, -1)


@dataclass
class Context:
    """The image grid (latent patches) of the transformer's current call, set by its pre-hook."""

    height: int = 0
    width: int = 0


class QwenOracleProcessor:
    """Oracle processor for Qwen-Image's double-stream `Attention` (image stream + text stream)."""

    def __init__(self, config, context, pos_embed):
        self.config, self.context, self.pos_embed = config, context, pos_embed

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        assert attention_mask is None and image_rotary_emb is not None

        def heads(t, norm=None):
            t = t.unflatten(-1, (attn.heads, -1))
            return (t if norm is None else norm(t)).transpose(1, 2)

        text_tokens = encoder_hidden_states.shape[1]
        q = torch.cat([heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q),
                       heads(attn.to_q(hidden_states), attn.norm_q)], dim=2)
        k = torch.cat([heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k),
                       heads(attn.to_k(hidden_states), attn.norm_k)], dim=2)
        v = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), heads(attn.to_v(hidden_states))], dim=2)
        height, width = self.context.height, self.context.width
        own = torch.cat([text_freqs(self.pos_embed, height, width, text_tokens),
                         image_freqs(self.pos_embed, height, width)])
        shift = width if self.config.reference_positions == "shifted" else 0
        masks = None if encoder_hidden_states_mask is None else [
            torch.cat([row.bool(), torch.ones(hidden_states.shape[1], dtype=torch.bool)])
            for row in encoder_hidden_states_mask]
        out = attend_group(q, k, v, slice(text_tokens, None), self.config, as_cos_sin(own),
                           as_cos_sin(image_freqs(self.pos_embed, height, width, shift)), masks)
        out = out.transpose(1, 2).flatten(2)
        text, image = out[:, :text_tokens], out[:, text_tokens:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def install(pipe, config, layer_names):
    """Put oracle processors on the named attention modules of `pipe.transformer`; returns `undo()`."""
    config = family_config(pipe, config, gates=True)
    transformer, context = pipe.transformer, Context()

    def read_call(call):
        (frames, context.height, context.width), = call["img_shapes"][0]
        assert frames == 1

    processors = {name: QwenOracleProcessor(config, context, transformer.pos_embed) for name in layer_names}
    return installed(transformer, processors, read_call, config, lambda call: float(call["timestep"].max()))  # sigma
