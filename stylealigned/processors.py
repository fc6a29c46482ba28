"""The one shared-attention processor, for every family: a backbone's attention primitives around the method.

The processor asks the layer's `AttentionKind` (`backbones/layers.py`, supplied by the family's backbone) to
project, attends with the reference per the three modes below (the math lives in `attention.py`), and asks the
kind to finish the output exactly as diffusers' own processor for that module does. It knows nothing about
families or pipelines: `SharedState` tells it how the batch is laid out, and `apply.py` calls it from a hook on
each shared attention module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .attention import (ALL, Kernel, Reference, align_targets, kept, make_reference, reference_attention, rotated,
                        rotates_per_target, shared_attention, shared_tokens)
from .config import StyleAlignedConfig

BATCH, RECORD, REPLAY = "batch", "record", "replay"


@dataclass
class SharedState:
    """Batch layout shared by every hooked layer of one denoiser, set anew by the denoiser's hook on each call.

    mode BATCH: each of `groups` guidance groups starts with its `references` reference images.
    mode RECORD: the batch holds only the references; layers store what targets need in `cache`.
    mode REPLAY: the batch holds only targets; layers use the references stored by the last RECORD pass, and take
    them out of the cache in the call's `last` chunk, freeing each as soon as its last reader is done.
    `call`: this denoiser call's layout facts, as its backbone's `begin_call` reads them from the call's inputs
    and its attention kinds read them back (a single-stream block's text length, shared-key positions, ...).
    `weights`: one per reference, how much targets take from each (normalised; `StyleAlignedHandle.set_weights`).
    `sharing`: False for a denoiser call below the config's `share_until`, or an unconditional one that
    `share_unconditional=False` leaves unshared: every hooked module runs as it is.
    """

    groups: int = 1
    mode: str = BATCH
    cache: dict[str, Any] = field(default_factory=dict)
    last: bool = False
    call: dict[str, Any] = field(default_factory=dict)
    weights: tuple[float, ...] = (1.0,)
    sharing: bool = True

    @property
    def references(self) -> int:
        """Reference images at the start of each guidance group."""
        return len(self.weights)

    def cached(self, name: str):
        """What the RECORD pass kept for layer `name`; taken out of the cache in the last chunk."""
        return self.cache.pop(name) if self.last else self.cache[name]

    def split(self, batch: int) -> int:
        """Images per guidance group for a batch of this size."""
        if batch % self.groups:
            raise ValueError(f"batch of {batch} does not split into {self.groups} guidance groups")
        return batch // self.groups


def stored(ref: Reference, inputs: Tensor | None = None) -> Reference:
    """What the cache keeps of a layer's references for the chunks after them: the AdaIN statistics and, where targets
    attend to the references, the shared keys and values, or the `inputs` they are projected from where given, each
    on a storage of its own (a view would keep the whole joined text + image projection alive)."""
    if inputs is not None:
        return replace(ref, inputs=inputs.clone(memory_format=torch.contiguous_format))
    if ref.key is None:
        return ref
    return replace(ref, key=ref.key.clone(memory_format=torch.contiguous_format),
                   value=ref.value.clone(memory_format=torch.contiguous_format))


Projection = Callable[[Tensor], tuple[Tensor, Tensor]]  # inputs (..., tokens, C) -> keys, values (..., H, N, D)


class SharedAttention:
    """What every kind shares: the three modes over (G, M, H, N, D) queries, keys and values before RoPE."""

    def __init__(self, name: str, config: StyleAlignedConfig, state: SharedState):
        self.name, self.config, self.state = name, config, state
        self.kernel: Kernel | None = None  # the attention kernel of the module's call (`apply.AttentionHook`)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, image: slice = ALL, rotate=None, rotate_shared=None,
               mask: Tensor | None = None, inputs: Tensor | None = None, project: Projection | None = None) -> Tensor:
        """`inputs` (batch, tokens, C), where given: what a RECORD pass keeps of the references (at their image
        tokens) instead of their keys and values, which REPLAY chunks `project` again."""
        mode = self.state.mode
        if mode == BATCH:  # q, k, v are this layer's own projections: the targets' are overwritten, not copied
            return shared_attention(q, k, v, self.config, image, rotate, rotate_shared, mask, overwrite=True,
                                    weights=self.state.weights, kernel=self.kernel)
        if mode == RECORD:
            caches_inputs = self.config.share_attention and inputs is not None
            once = None if rotates_per_target(rotate_shared) else rotate_shared  # per-target: in each chunk
            ref = make_reference(q, k, v, self.config, image, once, self.state.weights,
                                 keys=self.config.share_attention and not caches_inputs)
            references = self.grouped(inputs)[:, kept(self.state.weights)][..., image, :] if caches_inputs else None
            self.state.cache[self.name] = stored(ref, references)
            return reference_attention(q, k, v, rotate, mask, self.kernel)
        ref = self.state.cached(self.name)
        if ref.inputs is not None:
            key, value = shared_tokens(*project(ref.inputs), rotate_shared)
            ref = replace(ref, key=key, value=value, inputs=None)
        elif ref.key is not None and rotates_per_target(rotate_shared):  # at this chunk's targets' own positions
            ref = replace(ref, key=rotated(ref.key, rotate_shared))
        return align_targets(q, k, v, ref, self.config, image, rotate, mask, overwrite=True, kernel=self.kernel)

    def grouped(self, x: Tensor) -> Tensor:
        """(batch, ...) -> (groups, per group, ...)."""
        return x.unflatten(0, (self.state.groups, self.state.split(x.shape[0])))

    @staticmethod
    def ungrouped(x: Tensor) -> Tensor:
        """(groups, per group, heads, tokens, dim) -> (batch, tokens, heads * dim)."""
        return x.transpose(2, 3).flatten(0, 1).flatten(2)


class SharedProcessor(SharedAttention):
    """One shared attention layer of any family, composed from its backbone's primitives (`backbones.layers`):
    the kind projects the module's call into tokens, the method attends, the kind finishes the output exactly as
    the module's own processor does.

    The keyword arguments are named because diffusers' attention modules pass a processor only the keywords its
    signature names; positional ones are named by the kind's `positional`, as the module passes them.
    """

    def __init__(self, name: str, config: StyleAlignedConfig, state: SharedState, kind):
        super().__init__(name, config, state)
        self.kind = kind

    def __call__(self, attn, hidden_states: Tensor, *args, encoder_hidden_states=None, attention_mask=None,
                 encoder_hidden_states_mask=None, image_rotary_emb=None, rotary_emb=None, freqs_cis=None,
                 temb=None, **kwargs):
        given = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                     encoder_hidden_states_mask=encoder_hidden_states_mask, image_rotary_emb=image_rotary_emb,
                     rotary_emb=rotary_emb, freqs_cis=freqs_cis, temb=temb)
        kwargs.update((key, value) for key, value in given.items() if value is not None)
        kwargs.update(zip(self.kind.positional, args))
        tokens = self.kind.project(attn, self.state, hidden_states, **kwargs)
        q, k, v = (self.grouped(x) for x in (tokens.q, tokens.k, tokens.v))
        mask = None if tokens.mask is None else self.grouped(tokens.mask)
        out = self.attend(q, k, v, tokens.image, tokens.rotate, tokens.rotate_shared, mask, tokens.inputs,
                          lambda x: self.kind.keys_values(attn, x))
        return self.kind.finish(attn, self.ungrouped(out).to(tokens.q.dtype), tokens)


MASKED_BACKENDS = ("native", "_native_math", "_native_efficient")  # diffusers backends that take an additive mask


class DispatchedAttention:
    """diffusers' attention dispatcher (`dispatch_attention_fn`) with one backend, as an attention `Kernel`.

    `backend` None runs the active one (diffusers' `attention_backend` block). The dispatcher takes and returns
    (batch, tokens, heads, dim): these are views of our (batch, heads, tokens, dim), nothing is copied.
    """

    def __init__(self, backend):
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        self.backend = backend
        name = _AttentionBackendRegistry._active_backend if backend is None else backend
        self.takes_masks = str(getattr(name, "value", name)) in MASKED_BACKENDS

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask,
                                    scale=scale, backend=self.backend)
        return out.transpose(1, 2)


def backend_kernel(processor) -> DispatchedAttention | None:
    """The attention kernel a module's own `processor` runs, for ours to run too: the dispatcher with the user's
    backend where the processor goes through it (the transformers' processors) and a backend was chosen (`set_attention_backend`
    on the model, or a non-native active backend), else None: torch's SDPA, what the processor calls then (and
    what UNet and SD3 processors always call)."""
    if not hasattr(processor, "_attention_backend"):
        return None
    if processor._attention_backend is None:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

        if _AttentionBackendRegistry._active_backend == AttentionBackendName.NATIVE:
            return None
    return DispatchedAttention(processor._attention_backend)

