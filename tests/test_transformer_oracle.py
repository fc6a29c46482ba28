"""Every transformer family end to end against its loop-per-image oracle (tests/families.py): every knob, chunked
calls, fp32 next to fp64, the reference as generated alone, exact removal, and the img2img variants."""

import itertools

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import stylealigned as sa
from stylealigned.apply import hooked_layers
from tests.families import FAMILIES, families, knob_id
from tests.tolerance import assert_rounding_close, denoising_depth

FLAGS = ("share_attention", "adain_queries", "adain_keys", "adain_values")
KNOB_GRID = [dict(zip(FLAGS, flags)) for flags in itertools.product([False, True], repeat=4)]
EXTRA = [dict(shared_score_scale=1.7, shared_score_shift=0.69), dict(shared_score_shift=-0.5, adain_values=True),
         dict(reference_positions="same"), dict(shared_layers=1.0), dict(shared_layers=0.5, shared_score_scale=0.8),
         dict(text_sees_reference=False, shared_score_shift=0.3),
         dict(share_until=0.99)]  # the first step (pure noise, level 1) shared, the second plain
CHUNK_KNOBS = [{}, EXTRA[0], dict(adain_values=True, shared_layers=1.0), EXTRA[-1]]


def cases(knobs_of) -> list:
    return [pytest.param(family, knobs, id=f"{family.name}-{knob_id(knobs)}") for family in FAMILIES
            for knobs in knobs_of(family)]


def leftovers(transformer) -> list[str]:
    """Modules that still carry a hook registry or an instance-level forward."""
    return [name or "<transformer>" for name, module in transformer.named_modules()
            if hasattr(module, "_diffusers_hook") or "forward" in vars(module)]


def per_image_change(a, b):
    return (a - b).abs().flatten(1).amax(dim=1)


class RecordBatches(ModelHook):
    """A foreign hook registered before `apply` (inside ours): each transformer call's (or chunk's) batch."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def pre_forward(self, module, *args, **kwargs):
        latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))  # Z-Image: a list, `x`
        self.batches.append(len(latents))
        return args, kwargs


def record_batches(pipe) -> list:
    recorder = RecordBatches()
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(recorder, "recorder")
    return recorder.batches


@pytest.mark.parametrize("family, knobs", cases(lambda family: KNOB_GRID + EXTRA + [
    dict(shared_layers=family.named_layer), *family.extra_knobs]))
def test_every_knob_equals_the_oracle(request, family, knobs):
    """Two denoising steps: SD3 and Z-Image with guidance batched (two groups), FLUX.2 with CFG in a second call,
    Qwen-Image unguided with prompts of different token lengths (targets keep their text-padding masks and see every
    reference image token), Z-Image's targets at other positions than their reference."""
    pipe = family.pipe(request, family.dtype)
    fast, expected = family.fast_and_oracle(pipe, sa.StyleAlignedConfig(**knobs), **family.grid)
    torch.testing.assert_close(fast, expected, **family.tolerance)


@pytest.mark.parametrize("family, knobs", cases(lambda family: CHUNK_KNOBS + list(family.chunk_knobs)))
def test_chunked_equals_the_oracle(request, family, knobs):
    """Guided, five images in chunks of two: the reference recorded once per call, the targets replayed two at a
    time (per-row inputs sliced by row)."""
    pipe = family.pipe(request, family.dtype)
    config, prompts = sa.StyleAlignedConfig(**knobs), (*family.prompts, "a tree", "a bird on the car")[:5]
    batches = record_batches(pipe)
    with sa.apply(pipe, config) as handle, handle.chunked(2):
        chunked = family.latents(pipe, prompts, **family.guided)
    # [reference], [t1, t2], [t3, t4] per transformer call
    assert batches == [family.groups * 1, family.groups * 2, family.groups * 2] * family.calls_per_step * 2
    expected = family.oracle_latents(pipe, config, prompts, **family.guided)
    torch.testing.assert_close(chunked, expected, **family.tolerance)


@pytest.mark.parametrize("family", families(*(family.name for family in FAMILIES if family.dtype == torch.float64)))
def test_fp32_follows_the_oracle(request, family):
    """The families tested in fp64 above, in fp32: within rounding (tests/tolerance.py, a depth of three steps) and
    the fp32 contract's 1e-4 (Qwen-Image and Z-Image run fp32 throughout)."""
    pipe = family.pipe(request)
    config = sa.StyleAlignedConfig.transfer(adain_values=True, shared_layers=1.0)
    fast, expected = family.fast_and_oracle(pipe, config, **family.guided)
    assert_rounding_close(fast, expected, denoising_depth(pipe, 3))
    torch.testing.assert_close(fast, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", families())
def test_reference_alone_chunks_and_exact_removal(request, family):
    """Guided: the reference (image 0) comes out as its prompt generated alone, a set in chunks of one as in one
    batch, the targets change; removed (twice: idempotent), the model is bit for bit the stock one, with its own
    processors and no hook left."""
    pipe = family.pipe(request, family.dtype)
    stock = family.latents(pipe, **family.guided)
    processors = [module.processor for module in pipe.transformer.modules() if hasattr(module, "processor")]
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True, shared_score_shift=0.5)) as handle:
        assert hooked_layers(pipe.transformer) == handle.layers != []
        shared = family.latents(pipe, **family.guided)
        with handle.chunked(1):
            chunked = family.latents(pipe, **family.guided)
    handle.remove()  # again: nothing more to undo
    # (checked before the next call: FLUX's and SD3's pipelines open a cache context, a registry of diffusers' own)
    assert leftovers(pipe.transformer) == [] and not hasattr(pipe, "_stylealigned_handle")
    assert torch.equal(family.latents(pipe, **family.guided), stock)
    alone = family.latents(pipe, family.prompts[:1], **family.guided)
    torch.testing.assert_close(shared[:1], alone, **family.alone)
    torch.testing.assert_close(chunked, shared, **family.alone)
    assert (per_image_change(shared, stock)[1:] > 1e-3).all()
    assert [module.processor for module in pipe.transformer.modules() if hasattr(module, "processor")] == processors


@pytest.mark.parametrize("family", families(*(family.name for family in FAMILIES if family.img2img)))
def test_the_img2img_variant(request, family):
    """The img2img pipeline built from the same components calls the transformer as text-to-image does: the
    reference as generated alone (fp64 within rounding, fp32 within 1e-5), every target changed."""
    import diffusers

    text_to_image = family.pipe(request, family.dtype)
    pipe = getattr(diffusers, family.img2img)(**text_to_image.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, family.height, family.width, dtype=family.dtype)
    prompts = family.prompts[:3]

    def run(prompts):
        return pipe(list(prompts), image=image.expand(len(prompts), -1, -1, -1), strength=0.7, num_inference_steps=4,
                    height=family.height, width=family.width, output_type="latent", **family.prompt_kwargs,
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images

    stock = run(prompts)
    with sa.apply(pipe):
        shared = run(prompts)
    alone = run(prompts[:1])
    if family.dtype == torch.float64:
        assert_rounding_close(shared[:1], alone, denoising_depth(pipe, steps=4))
    else:
        torch.testing.assert_close(shared[:1], alone, atol=1e-5, rtol=1e-5)
    assert (per_image_change(shared, stock)[1:] > 1e-3).all()
