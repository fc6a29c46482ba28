"""Install StyleAligned on a diffusers pipeline and take it off again.

`apply(pipe, config)` swaps the processors of the selected self-attention layers (and, if asked, the forward of
every GroupNorm) of `pipe.unet`, and returns a handle that restores them exactly. The handle can also run the
UNet in chunks against one reference (`handle.chunked(batch_size)`), which `sets.py` uses for large sets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .config import StyleAlignedConfig
from .norms import shared_group_norm_forward
from .processors import BATCH, RECORD, REPLAY, SharedState, StyleAlignedAttnProcessor, is_self_attention

SUPPORTED = ("StableDiffusionPipeline, StableDiffusionXLPipeline, their img2img variants, "
             "or any pipeline whose .unet is a diffusers UNet2DConditionModel")


def self_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's self-attention modules, in network order."""
    return [name for name, module in unet.named_modules() if is_self_attention(module)]


def select_layers(names: Sequence[str], shared_layers: float | str | tuple[str, ...]) -> list[str]:
    """The layers that share: an evenly spread fraction, a name substring, or explicit names."""
    if isinstance(shared_layers, str):
        return [name for name in names if shared_layers in name]
    if isinstance(shared_layers, tuple):
        unknown = sorted(set(shared_layers) - set(names))
        if unknown:
            raise ValueError(f"shared_layers names unknown layers {unknown}; self-attention layers are {list(names)}")
        return [name for name in names if name in shared_layers]
    count = round(shared_layers * len(names))
    picks = {int((i + 0.5) * len(names) / count) for i in range(count)} if count else set()
    return [name for i, name in enumerate(names) if i in picks]


class StyleAlignedHandle:
    """What `apply` installed on one pipeline; `remove()` (or leaving the `with` block) restores it bit for bit."""

    def __init__(self, pipe, config: StyleAlignedConfig, layers: list[str]):
        self.pipe, self.config, self.layers = pipe, config, layers
        self.state = SharedState()
        unet = pipe.unet
        self._original_processors = unet.attn_processors
        self._processors = dict(self._original_processors)
        for name in layers:
            self._processors[f"{name}.processor"] = StyleAlignedAttnProcessor(name, config, self.state)
        self._norms = [(name, module) for name, module in unet.named_modules()
                       if config.share_group_norm and isinstance(module, nn.GroupNorm)]
        self._install()
        self.active = True

    def _install(self) -> None:
        unet = self.pipe.unet
        unet.set_attn_processor(dict(self._processors))
        for name, norm in self._norms:
            norm.forward = shared_group_norm_forward(norm, name, self.state)
        self._hook = unet.register_forward_pre_hook(self._detect_groups)

    def _uninstall(self) -> None:
        self.pipe.unet.set_attn_processor(dict(self._original_processors))
        for _, norm in self._norms:
            del norm.forward
        self._hook.remove()
        self.state.cache.clear()

    def _detect_groups(self, unet, args) -> None:
        """Read whether the pipeline batches [uncond, cond] halves (classifier-free guidance) for this call."""
        try:
            guided = bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:  # called outside a pipeline call, or a pipeline without the property
            guided = False
        self.state.groups = 2 if guided else 1

    def remove(self) -> None:
        """Restore the original processors and norms; the pipeline then behaves exactly as before."""
        if not self.active:
            return
        self._uninstall()
        self.active = False
        if getattr(self.pipe, "_stylealigned_handle", None) is self:
            del self.pipe._stylealigned_handle

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Within this block the UNet is the plain model (e.g. to invert an image); StyleAligned returns after."""
        if not self.active:
            yield
            return
        self._uninstall()
        try:
            yield
        finally:
            self._install()

    def __enter__(self) -> StyleAlignedHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def chunked(self, batch_size: int | None) -> Iterator[None]:
        """Within this block the UNet runs each reference once per call, then the targets `batch_size` at a time."""
        unet = self.pipe.unet
        if batch_size is None:
            yield
            return
        if self.config.full_attention_share:
            raise ValueError("full_attention_share shares among all images at once: it cannot run in chunks")
        previous = vars(unet).get("forward")  # e.g. an offloading hook's forward, kept inside ours
        unet.forward = _chunked_forward(unet.forward, self.state, batch_size)
        try:
            yield
        finally:
            if previous is None:
                del unet.forward
            else:
                unet.forward = previous
            self.state.cache.clear()


def _chunked_forward(forward, state: SharedState, batch_size: int):
    """A UNet forward that runs the references (RECORD) and then targets in chunks (REPLAY)."""

    def run(sample: torch.Tensor, *args, **kwargs):
        batch = sample.shape[0]
        per_group = state.split(batch)
        if per_group - 1 <= batch_size:
            return forward(sample, *args, **kwargs)
        rows = torch.arange(batch, device=sample.device).view(state.groups, per_group)
        pieces = [rows[:, :1]] + list(rows[:, 1:].split(batch_size, dim=1))
        outputs = []
        try:
            for mode, piece in zip([RECORD] + [REPLAY] * (len(pieces) - 1), pieces):
                state.mode = mode
                index = piece.reshape(-1)
                outputs.append((index, _first(forward(*_take((sample, *args), index, batch),
                                                       **_take(kwargs, index, batch)))))
        finally:
            state.mode = BATCH
            state.cache.clear()
        merged = outputs[0][1].new_empty(batch, *outputs[0][1].shape[1:])
        for index, out in outputs:
            merged[index] = out
        return (merged,) if kwargs.get("return_dict") is False else _as_output(merged)

    return run


def _take(value, index: torch.Tensor, batch: int):
    """Select rows `index` of every tensor with `batch` rows inside nested args/kwargs."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[index]
    if isinstance(value, dict):
        return {key: _take(item, index, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(item, index, batch) for item in value)
    return value


def _first(output):
    return output[0] if isinstance(output, tuple) else output.sample


def _as_output(sample: torch.Tensor):
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def apply(pipe, config: StyleAlignedConfig | None = None) -> StyleAlignedHandle:
    """Make `pipe` generate style-aligned sets: image 0 of each guidance half is the reference.

    Applying again replaces the earlier installation instead of stacking on it.
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        raise TypeError(f"StyleAligned needs a pipeline with a UNet2DConditionModel .unet; supported: {SUPPORTED}; "
                        f"got {type(pipe).__name__}")
    config = config or StyleAlignedConfig()
    previous = getattr(pipe, "_stylealigned_handle", None)
    if previous is not None:
        previous.remove()
    layers = [] if config.is_disabled else select_layers(self_attention_layers(pipe.unet), config.shared_layers)
    handle = StyleAlignedHandle(pipe, config, layers)
    pipe._stylealigned_handle = handle
    return handle
