"""Install StyleAligned on a diffusers pipeline and take it off again: one installer, one undo.

`apply(pipe, config)` asks the pipeline's backbone (`backbones/`) for its attention layers, and registers one
`diffusers.hooks.ModelHook` named "stylealigned" on each selected attention module (the module's own forward runs
with our processor swapped in for the call), on every GroupNorm if their statistics are shared, and on each
denoiser (a Wan 2.2 pipeline has two), which reads each call's layout and, inside `handle.chunked(...)`, runs the
references once and the targets in chunks. Whatever else a set intercepts goes through the same handle, which takes
it off with the rest: a hook on the ControlNet (`handle.hooked`) and pipeline methods replaced for a block
(`handle.replaced`: prompt tags, per-image strengths); the step-end callbacks a set needs are composed into the
call's one (`with_step_ends`). How the calls run (chunk sizes, layout, still references, the prompt table) is one
object, `handle.run`; nothing is stored on the pipeline (`applied` finds the handle in the denoiser's registry).
Processors, LoRA layers or adapters loaded meanwhile are left alone; `remove()` takes off only what it put on.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from .backbones import Backbone, backbone_for
from .config import StyleAlignedConfig
from .errors import UserError
from .norms import shared_group_norm
from .processors import BATCH, RECORD, REPLAY, SharedProcessor, SharedState, backend_kernel
from .prompts import PromptRows, untagged

HOOK = "stylealigned"


def select_layers(names: Sequence[str], shared_layers: float | str | tuple[str, ...]) -> list[str]:
    """The layers that share: an evenly spread fraction, a name substring, or explicit names."""
    if isinstance(shared_layers, str):
        picked = [name for name in names if shared_layers in name]
        if not picked:
            raise ValueError(f"shared_layers {shared_layers!r} matches no attention layer; the layers are "
                             f"{', '.join(names)}")
        return picked
    if isinstance(shared_layers, tuple):
        unknown = sorted(set(shared_layers) - set(names))
        if unknown:
            raise ValueError(f"shared_layers names unknown layers {unknown}; attention layers are {list(names)}")
        return [name for name in names if name in shared_layers]
    count = round(shared_layers * len(names))
    picks = {int((i + 0.5) * len(names) / count) for i in range(count)} if count else set()
    return [name for i, name in enumerate(names) if i in picks]


@dataclass
class RunState:
    """How the pipeline's calls run under one handle: set by what drives them (sets, panoramas), read by the hooks."""

    denoiser_chunk: int | None = None    # targets per denoiser call after the references' own pass (None: one call)
    controlnet_chunk: int | None = None  # images of each guidance group per ControlNet call (None: one call)
    groups: int | None = None            # guidance groups fixed by `layout` (a caller's own denoiser calls)
    still_reference: bool = False        # the references are still images leading clips: run apart, as one frame
    prompt_rows: PromptRows | None = None  # the running call's prompt table (`prompts.tagged_prompts`)


def layers_to_share(backbone: Backbone, config: StyleAlignedConfig) -> list[str]:
    """The attention layers `config` shares on this backbone: its family's default when shared_layers is None, the
    family's guided layers where the unconditional call stays unshared."""
    if config.is_disabled:
        return []
    default = backbone.default_shared_layers if config.share_unconditional else backbone.guided_shared_layers
    shared = default if config.shared_layers is None else config.shared_layers
    return select_layers(backbone.attention_layers(), shared)


class AttentionHook(ModelHook):
    """Runs the attention module's own forward, and any hook registered on it before ours, with a shared-attention
    processor in place of the module's processor for the duration of the call, on the attention backend the
    module's processor would run (`processors.backend_kernel`). torch.compile traces all of it (no graph break)."""

    def __init__(self, processor):
        super().__init__()
        self.processor = processor

    def new_forward(self, module, *args, **kwargs):
        if not self.processor.state.sharing:  # a step below `share_until` or an unshared call: the module as it is
            return self.fn_ref.original_forward(*args, **kwargs)
        own = module.processor
        if kwargs.get("ip_hidden_states") is not None and "ip_hidden_states" in inspect.signature(
                own.__call__).parameters:
            raise ValueError(f"{self.processor.name} runs an IP-Adapter, which StyleAligned cannot share yet; "
                             "leave the layer out of shared_layers")
        self.processor.kernel = backend_kernel(own)  # the attention backend the user chose, if any, for this call
        with swapped_processor(module, self.processor):
            return self.fn_ref.original_forward(*args, **kwargs)


@contextlib.contextmanager
def swapped_processor(module: nn.Module, processor) -> Iterator[None]:
    """`processor` as the module's processor within the block, whatever either is (a child nn.Module included,
    which torch refuses to assign a plain object over); after it, the very object that was there, in its place."""
    modules = module._modules
    if "processor" not in modules and not isinstance(processor, nn.Module):
        own, module.processor = module.processor, processor  # the common case: plain attributes
        try:
            yield
        finally:
            module.processor = own
        return
    order, child = list(modules), modules.pop("processor", None)
    own = vars(module).get("processor", _NONE)
    object.__setattr__(module, "processor", processor)  # bypasses nn.Module's child registration
    try:
        yield
    finally:
        object.__delattr__(module, "processor")
        if own is not _NONE:
            object.__setattr__(module, "processor", own)
        if child is not None:
            restored = {**modules, "processor": child}
            modules.clear()
            modules.update((name, restored[name]) for name in order)


_NONE = object()


class GroupNormHook(ModelHook):
    """GroupNorm with statistics joint over each image and its reference.

    It replaces the module's computation, so an accelerate offload hook on the module (sequential CPU offload)
    is run around it here: its weights are loaded for the call and dropped after, as the module's own forward does.
    """

    def __init__(self, name: str, state: SharedState):
        super().__init__()
        self.name, self.state = name, state

    def new_forward(self, module, x):
        if not self.state.sharing:
            return self.fn_ref.original_forward(x)
        offload = getattr(module, "_hf_hook", None)
        if offload is None:
            return shared_group_norm(module, self.name, self.state, x)
        (x,), _ = offload.pre_forward(module, x)
        return offload.post_forward(module, shared_group_norm(module, self.name, self.state, x))


class CallName(StateManager):
    """The name a pipeline gives its denoiser call with `cache_context` ("cond", "uncond"; None outside one): diffusers
    hands each call's context to the state managers of every stateful hook on the denoiser."""

    def __init__(self):
        super().__init__(BaseState)
        self.name = None

    def set_context(self, context) -> None:
        super().set_context(context)
        self.name = None if context is None else context.name


class DenoiserHook(ModelHook):
    """Reads each call's layout into the shared state; with a batch size, runs references then targets in chunks."""

    _is_stateful = True  # so that diffusers tells `call_name` what each call is

    def __init__(self, handle: StyleAlignedHandle):
        super().__init__()
        self.handle, self.call_name = handle, CallName()

    def reset_state(self, module):
        """Nothing is kept from one pipeline call to the next."""
        return module

    def new_forward(self, module, *args, **kwargs):
        try:
            return self.layout_forward(module, *args, **kwargs)
        finally:  # per-call facts live for the call only: each call starts from the same (empty) state
            self.handle.state.call.clear()
            self.handle.state.sharing = True

    def layout_forward(self, module, *args, **kwargs):
        run, state, backbone = self.handle.run, self.handle.state, self.handle.backbone
        forward = self.fn_ref.original_forward
        state.groups = backbone.guidance_groups() if run.groups is None else run.groups
        still, chunk = run.still_reference, run.denoiser_chunk
        if still:  # for the backbone's begin_call; absent otherwise (per-call facts start empty)
            state.call["still_reference"] = True
        inputs = by_name(module, args, kwargs)
        backbone.begin_call(state, self.handle.config, inputs)
        config = self.handle.config
        state.sharing = ((config.share_until <= 0 or shares_at(backbone, inputs, config.share_until))
                         and (config.share_unconditional or self.call_name.name != "uncond"))
        sample = inputs[backbone.sample_name]
        if isinstance(sample, list):  # one tensor per batch row (Z-Image)
            batch, device = len(sample), sample[0].device
        else:
            batch, device = sample.shape[0], sample.device
        references = state.references
        if not still and (chunk is None or state.split(batch) - references <= chunk):
            return forward(*args, **untagged(run.prompt_rows, kwargs))
        rows = torch.arange(batch, device=device).view(state.groups, -1)
        pieces = [rows[:, :references]] + list(rows[:, references:].split(chunk or batch, dim=1))
        outputs = []
        try:
            for mode, piece in zip([RECORD] + [REPLAY] * (len(pieces) - 1), pieces):
                state.mode, state.last = mode, piece is pieces[-1]
                index = piece.reshape(-1)
                _, part = chunk_inputs((), inputs, index, batch, backbone.unbatched_inputs, backbone.row_lists)
                if still and mode == RECORD:
                    _, part = first_frame((), part, backbone)
                outputs.append((index, _first(forward(**untagged(run.prompt_rows, part)))))
        finally:
            state.mode, state.last = BATCH, False
            state.cache.clear()
        return backbone.wrap_output(merged(outputs, batch), kwargs.get("return_dict", True))


@torch.compiler.disable
def shares_at(backbone: Backbone, inputs: dict, until: float) -> bool:
    """Whether a denoiser call with these inputs is at or above the noise level `until` (`share_until`): read from
    the timestep tensor in Python, so under torch.compile the graph breaks here (only where share_until is set)."""
    return backbone.noise_level(inputs) >= until


def take_rows(value, index: torch.Tensor, batch: int):
    """Select rows `index` of every tensor with `batch` rows inside nested args/kwargs."""
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[index]
    if isinstance(value, dict):
        return {key: take_rows(item, index, batch) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(item, index, batch) for item in value)
    return value


def chunk_inputs(args: tuple, kwargs: dict, index: torch.Tensor, batch: int, unbatched: tuple[str, ...] = (),
                 row_lists: tuple[str, ...] = ()):
    """(args, kwargs) of a module call for rows `index` of its `batch`; keyword inputs named in `unbatched` (no
    batch dimension) pass whole, those in `row_lists` (lists of one entry per row) keep their rows' entries."""
    def part(key, value):
        if key in unbatched:
            return value
        if key in row_lists:  # the index read on the host only here: no device sync for tensor inputs
            return [value[i] for i in index.tolist()]
        return take_rows(value, index, batch)

    return take_rows(args, index, batch), {key: part(key, value) for key, value in kwargs.items()}


def by_name(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """A module call's inputs by name: positional ones named by the parameters of the module's forward."""
    if not args:
        return kwargs
    names = list(inspect.signature(type(module).forward).parameters)[1:]  # after self
    return dict(zip(names, args)) | kwargs


def merged(outputs: list[tuple[torch.Tensor, torch.Tensor | list]], batch: int) -> torch.Tensor | list:
    """The chunks' outputs (rows `index`, output) put back in batch order: a tensor, or a list of one tensor per
    row where the module returns such a list. A tensor takes the targets' (the last chunk's) shape: a still
    reference's one frame goes on every frame of its rows."""
    last = outputs[-1][1]
    if isinstance(last, list):
        rows = [None] * batch
        for index, out in outputs:
            for i, row in zip(index.tolist(), out):
                rows[i] = row
        return rows
    whole = last.new_empty(batch, *last.shape[1:])
    for index, out in outputs:
        whole[index] = out
    return whole


def first_frame(args: tuple, kwargs: dict, backbone: Backbone) -> tuple[tuple, dict]:
    """A denoiser call's (args, kwargs) with its sample cut to the first frame: still references, run as one-frame
    clips."""
    if args:
        return (args[0].narrow(backbone.frame_axis, 0, 1), *args[1:]), kwargs
    sample = kwargs[backbone.sample_name]
    return args, {**kwargs, backbone.sample_name: sample.narrow(backbone.frame_axis, 0, 1)}


def _first(output):
    return output[0] if isinstance(output, tuple) else output.sample


def hooked_layers(denoiser: nn.Module) -> list[str]:
    """Names of the denoiser's modules whose attention StyleAligned runs now."""
    return [name for name, module in denoiser.named_modules()
            if isinstance(getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).get(HOOK), AttentionHook)]


def applied(pipe) -> StyleAlignedHandle | None:
    """The handle applied to `pipe` now, if any: found through the hook on its denoiser (nothing is on the pipeline)."""
    registry = getattr(backbone_for(pipe).denoiser, "_diffusers_hook", None)
    hook = None if registry is None else registry.hooks.get(HOOK)
    return hook.handle if isinstance(hook, DenoiserHook) else None


class ModuleHook:
    """An interception of a module: our "stylealigned" hook in its diffusers hook registry."""

    def __init__(self, module: nn.Module, hook: ModelHook):
        self.module, self.hook = module, hook

    def install(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.module).register_hook(self.hook, HOOK)

    def uninstall(self) -> None:
        """Remove our hook; a registry left empty goes too, with the forward it bound, so the module is as before."""
        module = self.module
        registry = module._diffusers_hook
        registry.remove_hook(HOOK, recurse=False)
        if not registry.hooks:
            del module._diffusers_hook
            forward = vars(module).get("forward")
            if getattr(forward, "__func__", None) is type(module).forward and forward.__self__ is module:
                del module.forward


class MethodPatch:
    """An interception of a pipeline method: `method` in its place. Pipeline methods are not modules, and diffusers'
    hook registry hooks modules only, so this is the one other mechanism: an instance attribute over the class's
    method, and after it exactly what was there before (an instance attribute of the user's own included)."""

    def __init__(self, owner, name: str, method: Callable):
        self.owner, self.name, self.method, self.own = owner, name, method, _NONE

    def install(self) -> None:
        self.own = vars(self.owner).get(self.name, _NONE)
        setattr(self.owner, self.name, self.method)

    def uninstall(self) -> None:
        if self.own is _NONE:
            delattr(self.owner, self.name)
        else:
            setattr(self.owner, self.name, self.own)


def with_step_ends(kwargs: dict, callbacks: Sequence[Callable | None]) -> dict:
    """A pipeline call's arguments with the step-end `callbacks` (None: none) run, in turn and before the caller's
    own `callback_on_step_end`, as the call's one callback; each sees the tensors as the ones before left them.
    Ours change `latents`, which the call then passes along with any tensors the caller's asks for."""
    callbacks = [callback for callback in callbacks if callback is not None]
    if not callbacks:
        return kwargs
    theirs = kwargs.get("callback_on_step_end")
    names = getattr(theirs, "tensor_inputs", None) or kwargs.get("callback_on_step_end_tensor_inputs")
    callbacks += [] if theirs is None else [theirs]

    def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
        for callback in callbacks:
            tensors = {**tensors, **callback(pipe, step, timestep, tensors)}
        return tensors

    inputs = {} if names is None else {"callback_on_step_end_tensor_inputs": list(dict.fromkeys(["latents", *names]))}
    return kwargs | {"callback_on_step_end": step_end} | inputs


class StyleAlignedHandle:
    """What `apply` installed on one pipeline: its hooks and method patches, all in one list that `remove()` (or
    leaving the `with` block) takes off again; `run`, how the pipeline's calls run under it (`RunState`)."""

    def __init__(self, pipe, config: StyleAlignedConfig, backbone: Backbone, layers: list[str]):
        self.pipe, self.config, self.backbone, self.layers = pipe, config, backbone, layers
        self.state, self.run = SharedState(), RunState()
        denoisers = backbone.denoisers()
        modules = {prefix + name: module for prefix, denoiser in denoisers.items()
                   for name, module in denoiser.named_modules()}
        self._interceptions: list[ModuleHook | MethodPatch] = [ModuleHook(denoiser, DenoiserHook(self))
                                                                for denoiser in denoisers.values()]
        self._interceptions += [ModuleHook(modules[name], AttentionHook(SharedProcessor(
            name, config, self.state, backbone.attention_kind(name)))) for name in layers]
        if config.share_group_norm:
            self._interceptions += [ModuleHook(module, GroupNormHook(name, self.state))
                                    for name, module in modules.items() if isinstance(module, nn.GroupNorm)]
        self._install()
        self.active = True

    def _install(self) -> None:
        for interception in self._interceptions:
            interception.install()
        self._refresh_registries()

    def _uninstall(self) -> None:
        for interception in reversed(self._interceptions):
            interception.uninstall()
        self._refresh_registries()
        self.state.cache.clear()

    def hooked(self, module: nn.Module, hook: ModelHook) -> contextlib.AbstractContextManager:
        """Within this block `hook` is our hook on `module` too (a ControlNet's)."""
        return self._intercepting(ModuleHook(module, hook))

    def replaced(self, name: str, method: Callable) -> contextlib.AbstractContextManager:
        """Within this block the pipeline's method `name` is `method` (`MethodPatch`)."""
        return self._intercepting(MethodPatch(self.pipe, name, method))

    @contextlib.contextmanager
    def _intercepting(self, interception: ModuleHook | MethodPatch) -> Iterator[None]:
        """`interception` on for the block, taken off after it, or with the rest by `remove()` (one undo)."""
        interception.install()
        self._interceptions.append(interception)
        try:
            yield
        finally:
            if interception in self._interceptions:  # not taken off by `remove()` meanwhile
                self._interceptions.remove(interception)
                interception.uninstall()

    def _refresh_registries(self) -> None:
        """Tell a registry on each denoiser (caching features keep one) that the hooks below it changed."""
        for denoiser in self.backbone.denoisers().values():
            registry = getattr(denoiser, "_diffusers_hook", None)
            if registry is not None:
                registry.invalidate_child_registries_cache()

    def remove(self) -> None:
        """Take off every hook and patch this handle installed; the pipeline then behaves exactly as before."""
        if not self.active:
            return
        self._uninstall()
        self._interceptions.clear()
        self.active = False

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Within this block the pipeline is the plain one (e.g. to invert an image); StyleAligned returns after."""
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

    def set_weights(self, weights: Sequence[float]) -> None:
        """From now on each guidance group starts with len(weights) references; targets take from reference k in
        proportion to weights[k] (non-negative, normalised to sum 1; weight 0 leaves a reference out exactly)."""
        weights = normalised_weights(weights)
        check_references(self.config, len(weights))
        self.state.weights = weights

    @contextlib.contextmanager
    def layout(self, mode: str, groups: int) -> Iterator[None]:
        """Within this block each denoiser call runs in `mode` with `groups` guidance groups, for loops that call the
        denoiser themselves: RECORD with the references alone, then REPLAY with targets against them (panoramas)."""
        self.state.mode, self.run.groups = mode, groups
        try:
            yield
        finally:
            self.state.mode, self.run.groups = BATCH, None

    @contextlib.contextmanager
    def chunked(self, denoiser_chunk: int | None, controlnet_chunk: int | None = None) -> Iterator[None]:
        """Within this block each denoiser call runs the references once, then the targets `denoiser_chunk` at a
        time, and a ControlNet hooked for a set runs `controlnet_chunk` images of each guidance group at a time
        (None: all at once)."""
        if denoiser_chunk is not None and self.config.full_attention_share:
            raise ValueError("full_attention_share shares among all images at once: it cannot run in chunks")
        self.run.denoiser_chunk, self.run.controlnet_chunk = denoiser_chunk, controlnet_chunk
        try:
            yield
        finally:
            self.run.denoiser_chunk = self.run.controlnet_chunk = None
            self.state.cache.clear()


def normalised_weights(weights: Sequence[float]) -> tuple[float, ...]:
    """Reference weights scaled to sum 1; any that is negative or not finite, or all 0, is a UserError."""
    weights = tuple(float(w) for w in weights)
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"reference weights must be finite, >= 0 and not all 0, got {list(weights)}; "
                        "pass one such weight per reference")
    total = sum(weights)
    return tuple(w / total for w in weights)


def check_references(config: StyleAlignedConfig, count: int) -> None:
    """Several references need a config that can mix them: not shared GroupNorms nor the full-sharing ablation."""
    if count > 1 and (config.share_group_norm or config.full_attention_share):
        knob = "share_group_norm" if config.share_group_norm else "full_attention_share"
        raise UserError(f"{knob} works with one reference only; turn it off to mix {count} references")


def apply(pipe, config: StyleAlignedConfig | None = None) -> StyleAlignedHandle:
    """Make `pipe` generate style-aligned sets: image 0 of each guidance group is the reference (images 0..K-1
    after `handle.set_weights` with K weights).

    Applying again replaces the earlier installation instead of stacking on it. An unsupported pipeline, or a knob
    that means nothing on its model family, is a UserError.
    """
    backbone = backbone_for(pipe)
    config = backbone.resolve(config or StyleAlignedConfig())
    backbone.check_config(config)
    previous = applied(pipe)
    if previous is not None:
        previous.remove()
    return StyleAlignedHandle(pipe, config, backbone, layers_to_share(backbone, config))
