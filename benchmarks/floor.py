"""The floor for StyleAligned's cost: the stock model plus only the work that sharing attention cannot avoid.

In the layers StyleAligned shares (`stylealigned.apply.layers_to_share`, the family's default), each target attends
to its own tokens plus its guidance group's reference's image-token keys and values; the reference attends to its own
tokens only, exactly as in the stock model. Nothing else: no AdaIN, no statistics, no second rotary embedding of the
reference keys (targets see them where the reference has them, i.e. reference_positions="same"), no per-call
layout bookkeeping beyond the guidance-group count and the family's `begin_call` (FLUX's text length for its
single-stream blocks and the rotary table of the image positions).

The floor's processor is family-free: the family's backbone supplies the attention primitives (projections, q/k
norms, RoPE, output projections exactly as diffusers' stock processor computes them), and only the attention itself
changes. Two layouts, matching StyleAligned's two:

    with floor(pipe):                  # one batch: image 0 of each guidance group is the reference
    with floor(pipe, batch_size=4):    # per denoiser call: the references once (their keys and values kept),
                                       # then the targets 4 at a time against them, as generate_set runs them

So the floor is what `sa.apply` (and `generate_set`) would cost if StyleAligned were free; `check` shows it computes
StyleAligned's own attention with AdaIN off and reference_positions="same" (exactly, on families without key masks
whose targets sit at their reference's positions: measured 0.0 on the UNet, FLUX.1, FLUX.2 and SD3; not Z-Image,
whose targets see the reference at their own positions and whose padding is masked).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from stylealigned.apply import by_name, chunk_inputs, layers_to_share, merged
from stylealigned.attention import attention, merged_attention, merges, rotated
from stylealigned.backbones import backbone_for
from stylealigned.config import StyleAlignedConfig
from stylealigned.processors import BATCH, RECORD, REPLAY, SharedProcessor, SharedState


class FloorAttention(SharedProcessor):
    """One shared layer's floor, on any family: the layer's own primitives (its backbone's attention kind projects
    and finishes exactly as the stock processor does) around attention in which targets also see their group's
    reference's image tokens, rotated where the reference has them. In chunks the references' keys and values are
    kept at RECORD (no re-projection) and read at REPLAY; where the kind caches its layer input instead (Wan, whose
    memory bound is the plain model plus that input), the floor keeps that input and projects it again per chunk.
    The model's own key masks are left out."""

    def attend(self, q, k, v, image, rotate=None, rotate_shared=None, mask=None, inputs=None, project=None):
        q, k = rotated(q, rotate), rotated(k, rotate)
        if self.state.mode == RECORD:
            kept = (k[:, 0, :, image], v[:, 0, :, image]) if inputs is None else self.grouped(inputs)[:, 0, image]
            self.state.cache[self.name] = kept
            return attention(q, k, v)
        if self.state.mode == REPLAY:
            kept = self.state.cache[self.name]
            if inputs is not None:
                ref_k, ref_v = project(kept)
                kept = rotated(ref_k, rotate_shared), ref_v
            return _targets(q, k, v, *kept)
        reference = attention(q[:, :1], k[:, :1], v[:, :1])
        if q.shape[1] == 1:
            return reference
        return torch.cat([reference, _targets(q[:, 1:], k[:, 1:], v[:, 1:], k[:, 0, :, image], v[:, 0, :, image])],
                         dim=1)


def _targets(q: Tensor, k: Tensor, v: Tensor, ref_k: Tensor, ref_v: Tensor) -> Tensor:
    """Targets (G, T, H, N, D) attend to their own keys and their group's reference keys (G, H, R, D), the fastest
    exact way known: on the CPU two flash calls merged by their log-sum-exps (`merged_attention`, cheaper there than
    concatenating the keys), else one call over the keys side by side."""
    if merges(q, k, v, ref_k, ref_v):
        return merged_attention(q, k, v, ref_k, ref_v)
    groups, targets = q.shape[:2]
    keys = torch.cat([k, ref_k[:, None].expand(groups, targets, *ref_k.shape[1:])], dim=-2)
    values = torch.cat([v, ref_v[:, None].expand(groups, targets, *ref_v.shape[1:])], dim=-2)
    return attention(q, keys, values)


@contextlib.contextmanager
def floor(pipe, batch_size: int | None = None, config: StyleAlignedConfig | None = None) -> Iterator[SharedState]:
    """Within this block `pipe` runs the floor in the layers `config` shares (StyleAligned's default layers);
    with `batch_size`, each denoiser call runs the references once, then the targets `batch_size` at a time."""
    backbone = backbone_for(pipe)
    if len(backbone.denoisers()) > 1:
        raise ValueError("the floor runs on a pipeline with one denoiser (not Wan 2.2's two experts)")
    denoiser, state, config = backbone.denoiser, SharedState(), config or StyleAlignedConfig()
    modules = dict(denoiser.named_modules())
    originals = {name: modules[name].processor for name in layers_to_share(backbone, config)}
    forward, own_forward = denoiser.forward, vars(denoiser).get("forward")  # a hook registry may have bound one
    same = config.replace(reference_positions="same")

    def floor_forward(*args, **kwargs):
        state.groups = backbone.guidance_groups()
        inputs = by_name(denoiser, args, kwargs)
        backbone.begin_call(state, same, inputs)  # layout facts: a single-stream block's text length, ...
        sample = inputs[backbone.sample_name]
        batch = len(sample) if isinstance(sample, list) else sample.shape[0]
        if batch_size is None or batch // state.groups - 1 <= batch_size:
            return forward(*args, **kwargs)
        rows = torch.arange(batch).view(state.groups, -1)
        pieces = [rows[:, :1]] + list(rows[:, 1:].split(batch_size, dim=1))
        outputs = []
        try:
            for mode, piece in zip([RECORD] + [REPLAY] * (len(pieces) - 1), pieces):
                state.mode, index = mode, piece.reshape(-1)
                _, chunk = chunk_inputs((), inputs, index, batch, backbone.unbatched_inputs, backbone.row_lists)
                out = forward(**chunk)
                outputs.append((index, out[0] if isinstance(out, tuple) else out.sample))
        finally:
            state.mode = BATCH
            state.cache.clear()
        return backbone.wrap_output(merged(outputs, batch), kwargs.get("return_dict", True))

    for name in originals:
        modules[name].processor = FloorAttention(name, same, state, backbone.attention_kind(name))
    denoiser.forward = floor_forward
    try:
        yield state
    finally:
        if own_forward is None:
            del denoiser.forward
        else:
            denoiser.forward = own_forward
        for name, processor in originals.items():
            modules[name].processor = processor


@torch.no_grad()
def check(pipe, prompts: list[str], batch_size: int, **pipeline_kwargs) -> dict[str, float]:
    """Max |difference| of the latents after the pipeline's call between the floor and StyleAligned with AdaIN off
    and reference_positions="same" (the same computation), in one batch and in chunks of `batch_size`."""
    import stylealigned as sa

    backbone = backbone_for(pipe)
    backbone.read_settings(pipeline_kwargs)
    height, width = backbone.native_size()
    kwargs = dict(height=height, width=width) | pipeline_kwargs | dict(output_type="latent")
    noise = backbone.start_latents(backbone.initial_noise(range(len(prompts)), 0, kwargs["height"], kwargs["width"]),
                                   kwargs["height"], kwargs["width"])
    same = StyleAlignedConfig(adain_queries=False, adain_keys=False, reference_positions="same")
    differences = {}
    for chunks in (None, batch_size):
        with sa.apply(pipe, same) as handle, handle.chunked(chunks):
            ours = pipe(prompt=prompts, latents=noise, **kwargs)[0]  # images, or a video pipeline's frames
        with floor(pipe, chunks):
            mine = pipe(prompt=prompts, latents=noise, **kwargs)[0]
        differences["one batch" if chunks is None else f"chunks of {chunks}"] = (ours - mine).abs().max().item()
    return differences
