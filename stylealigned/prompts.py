"""One copy of a wave's prompt embeddings: the pipeline carries one-token tags, the denoiser gets the real rows.

With classifier-free guidance a pipeline call keeps its prompts' embeddings three times over for the whole call:
the negative ones, the positive ones, and both joined for the denoiser (a wave of 33 SD1.5 prompts: 22 MiB in fp32;
SD3's 333 joint text tokens: 258 MiB in bf16). Inside `tagged_prompts(handle)` the pipeline's `encode_prompt` keeps
each distinct row of every token sequence it returns once, in a `PromptRows` table (one row for a wave's shared
negative prompt), and returns a tag per row in its place: one token of `TAG_WIDTH` channels, the row's index in
the table (`handle.run.prompt_rows`). The pipeline repeats, joins and slices the tags as it would the embeddings;
the hooks in front of the denoiser and the ControlNet look each call's (or chunk's) tags up (`untagged`), so the
models see the same numbers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

TAG_WIDTH = 2  # channels of a tag: the table index in base BASE; no text encoder is this narrow
BASE = 256     # every integer up to 256 is exact in bf16 and fp16, so a tag survives the pipeline's dtype casts


def is_tags(value) -> bool:
    """A shape test only (no values read): (batch, 1, TAG_WIDTH) tensors are tags."""
    return isinstance(value, Tensor) and value.ndim == 3 and value.shape[1:] == (1, TAG_WIDTH)


class PromptRows:
    """The distinct token-sequence rows `encode_prompt` returned during one pipeline call, and their tags."""

    def __init__(self):
        self.table: Tensor | None = None  # (rows, tokens, channels)
        self.sums: list[float] = []       # each row's sum, to compare only rows that may be equal

    def tag(self, embeds: Tensor) -> Tensor:
        """(batch, tokens, channels) embeddings -> their (batch, 1, TAG_WIDTH) tags; a sequence of another
        shape than the table's comes back as it is (the hooks then pass it through)."""
        if self.table is not None and (embeds.shape[1:], embeds.dtype, embeds.device) != (
                self.table.shape[1:], self.table.dtype, self.table.device):
            return embeds
        new: list[Tensor] = []
        totals = embeds.sum(dim=(1, 2), dtype=torch.float64).tolist()
        ids = [self._index(row, total, new) for row, total in zip(embeds, totals)]
        if new:
            self.table = torch.stack(new) if self.table is None else torch.cat([self.table, torch.stack(new)])
        ids = torch.tensor(ids, device=embeds.device)
        return torch.stack([ids // BASE, ids % BASE], dim=-1)[:, None].to(embeds.dtype)

    def _index(self, row: Tensor, total: float, new: list[Tensor]) -> int:
        """The table index of `row`, added to `new` (after the table) if no kept row equals it."""
        kept = 0 if self.table is None else len(self.table)
        for i, seen in enumerate(self.sums):
            if seen == total and torch.equal(self.table[i] if i < kept else new[i - kept], row):
                return i
        self.sums.append(total)
        new.append(row)
        if len(self.sums) > BASE * BASE:
            raise ValueError(f"more than {BASE * BASE} distinct prompt rows in one pipeline call")
        return len(self.sums) - 1

    def lookup(self, tags: Tensor) -> Tensor:
        """The embeddings (batch, tokens, channels) the tags stand for."""
        ids = tags[:, 0, 0].long() * BASE + tags[:, 0, 1].long()
        return self.table.index_select(0, ids.to(self.table.device))


class TaggingEncoder:
    """`pipe.encode_prompt` inside `tagged_prompts`: the pipeline's own, with every token sequence tagged."""

    def __init__(self, encode):
        self.encode, self.rows = encode, PromptRows()

    def __call__(self, *args, **kwargs):
        outputs = self.encode(*args, **kwargs)
        return tuple(self.rows.tag(out) if isinstance(out, Tensor) and out.ndim == 3 else out for out in outputs)


@contextlib.contextmanager
def tagged_prompts(handle) -> Iterator[PromptRows]:
    """Within this block the calls of the pipeline a `StyleAlignedHandle` is applied to keep each distinct
    prompt-embedding row once (module docstring): its `encode_prompt` replaced through the handle."""
    encoder = TaggingEncoder(handle.pipe.encode_prompt)
    handle.run.prompt_rows = encoder.rows
    try:
        with handle.replaced("encode_prompt", encoder):
            yield encoder.rows
    finally:
        handle.run.prompt_rows = None


def untagged(rows: PromptRows | None, kwargs: dict) -> dict:
    """A model call's keyword inputs with tags replaced by the embeddings in `rows` they stand for (None: no tags)."""
    if rows is None or not any(is_tags(value) for value in kwargs.values()):
        return kwargs
    return {key: rows.lookup(value) if is_tags(value) else value for key, value in kwargs.items()}
