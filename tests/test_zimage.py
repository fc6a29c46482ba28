"""StyleAligned on the tiny Z-Image pipeline: every knob against the loop-per-image oracle end to end (with batched
guidance, and with `cfg_truncation` dropping it on late steps), the reference as generated alone, exact removal,
chunks, few-step (Turbo-like) sets, the layers, and refusals.

The prompts pad their captions to 64 (LONG) or 32 (SHORT, "a house") tokens, so targets sit at other image positions
than their reference; the 24 x 40 image is 6 x 10 patches (a row/column swap shows) plus 4 image padding tokens.
"""

import itertools

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import stylealigned as sa
from stylealigned import sets
from stylealigned.apply import hooked_layers, layers_to_share
from stylealigned.backbones import ZImageBackbone, backbone_for
from tests import oracle_zimage
from tests.test_backends import dispatch_spy, native_backend  # noqa: F401 (fixture)
from tests.zimage_pipelines import HEIGHT, LONG, PROMPT_KWARGS, SHORT, WIDTH

PROMPTS = [LONG, SHORT, "a house", LONG]
FLAGS = ("share_attention", "adain_queries", "adain_keys", "adain_values")
KNOB_GRID = [dict(zip(FLAGS, flags)) for flags in itertools.product([False, True], repeat=4)]
EXTRA = [dict(shared_score_scale=1.7, shared_score_shift=0.69), dict(shared_score_shift=-0.5, adain_values=True),
         dict(reference_positions="same"), dict(shared_layers=1.0), dict(shared_layers=0.5, shared_score_scale=0.8),
         dict(shared_layers="noise_refiner")]
# fp32 end to end (the pipeline steps its latents in fp32 and rotates in complex64): the bound
FP32 = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture
def pipe(zimage_pipe):
    return zimage_pipe


def latents(pipe, prompts=PROMPTS, steps=2, seed=0, **kwargs):
    """The pipeline's final latents, image i from the noise seeded seed + i; the prompts passed as a copy (the
    pipeline rewrites its prompt list)."""
    noise = backbone_for(pipe).initial_noise(range(len(prompts)), seed, HEIGHT, WIDTH)
    return pipe(list(prompts), num_inference_steps=steps, height=HEIGHT, width=WIDTH, latents=noise,
                output_type="latent", **PROMPT_KWARGS, **kwargs).images


def oracle_latents(pipe, config, prompts=PROMPTS, **kwargs):
    undo = oracle_zimage.install(pipe, config, layers_to_share(backbone_for(pipe), config), len(prompts))
    try:
        return latents(pipe, prompts, **kwargs)
    finally:
        undo()


def fast_and_oracle(pipe, config, prompts=PROMPTS, **kwargs):
    with sa.apply(pipe, config):
        fast = latents(pipe, prompts, **kwargs)
    return fast, oracle_latents(pipe, config, prompts, **kwargs)


def per_image_change(a, b):
    return (a - b).abs().flatten(1).amax(dim=1)


class RecordBatches(ModelHook):
    """A foreign hook registered before `apply` (inside ours): each transformer call's (or chunk's) batch."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def pre_forward(self, module, *args, **kwargs):
        self.batches.append(len(args[0] if args else kwargs["x"]))
        return args, kwargs


def record_batches(pipe) -> list:
    recorder = RecordBatches()
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(recorder, "recorder")
    return recorder.batches


# the oracle


def test_the_oracle_with_nothing_shared_is_the_stock_model(pipe):
    """Its own positions, RoPE, mask and explicit softmax reproduce the model (it asserts its positions are the
    model's); no-op knobs give the stock latents."""
    off = sa.StyleAlignedConfig(share_attention=False, adain_queries=False, adain_keys=False, shared_layers=1.0)
    torch.testing.assert_close(oracle_latents(pipe, off), latents(pipe), atol=1e-5, rtol=1e-5)


# every knob, end to end


@pytest.mark.parametrize("knobs", KNOB_GRID + EXTRA, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_every_knob_equals_oracle_end_to_end(pipe, knobs):
    """Two steps with classifier-free guidance batched [cond..., uncond...]: two groups."""
    fast, expected = fast_and_oracle(pipe, sa.StyleAlignedConfig(**knobs), guidance_scale=4.0)
    torch.testing.assert_close(fast, expected, **FP32)


@pytest.mark.parametrize("knobs", [{}, EXTRA[0], dict(shared_layers=1.0, adain_values=True,
                                                          reference_positions="same")])
def test_cfg_truncation_runs_unguided_steps_as_one_group(pipe, knobs):
    """cfg_truncation 0.1: the first of 3 steps guided (a batch of 2 x 3), the later ones not (3); the reference
    stays as generated alone, and targets follow the oracle, chunked too."""
    prompts, settings = [SHORT, LONG, "a house"], dict(steps=3, guidance_scale=4.0, cfg_truncation=0.1)
    config = sa.StyleAlignedConfig(**knobs)
    batches = record_batches(pipe)
    with sa.apply(pipe, config) as handle:
        fast = latents(pipe, prompts, **settings)
        assert batches == [6, 3, 3]
        with handle.chunked(1):
            chunked = latents(pipe, prompts, **settings)
    expected = oracle_latents(pipe, config, prompts, **settings)
    torch.testing.assert_close(fast, expected, **FP32)
    torch.testing.assert_close(chunked, expected, **FP32)
    torch.testing.assert_close(fast[:1], latents(pipe, prompts[:1], **settings), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_few_steps_without_and_with_guidance_equal_the_oracle(pipe, guidance):
    """Z-Image-Turbo's setting: 8 steps, guidance 0 (one group); guidance 1 still batches pos + 1 (pos - neg)."""
    config = sa.StyleAlignedConfig()
    fast, expected = fast_and_oracle(pipe, config, steps=8, guidance_scale=guidance)
    torch.testing.assert_close(fast, expected, **FP32)


@pytest.mark.parametrize("knobs", [{}, EXTRA[0], dict(adain_values=True, shared_layers=1.0)])
def test_chunked_equals_oracle(pipe, knobs):
    """References recorded once per step, targets replayed 2 at a time (per-row list inputs sliced by row)."""
    config, prompts = sa.StyleAlignedConfig(**knobs), PROMPTS + [SHORT]
    batches = record_batches(pipe)
    with sa.apply(pipe, config) as handle, handle.chunked(2):
        chunked = latents(pipe, prompts, guidance_scale=4.0)
    assert batches == [2 * 1, 2 * 2, 2 * 2] * 2  # [reference], [t1, t2], [t3, t4] per step, two groups each
    torch.testing.assert_close(chunked, oracle_latents(pipe, config, prompts, guidance_scale=4.0), **FP32)


def test_targets_at_other_positions_than_the_reference_see_it_at_their_own(pipe):
    """A short-caption reference and long-caption targets sit at different t: the oracle rotates the shared keys at
    each target's own t, and so must the fast path (also with the reference's caption the longer)."""
    for prompts in ([SHORT, LONG, LONG], [LONG, SHORT, "a house"]):
        fast, expected = fast_and_oracle(pipe, sa.StyleAlignedConfig(shared_layers=1.0), prompts,
                                         guidance_scale=4.0)
        torch.testing.assert_close(fast, expected, **FP32)


# the reference, removal, targets


@pytest.mark.parametrize("guidance", [0.0, 4.0])
def test_reference_equals_its_prompt_generated_alone(pipe, guidance):
    alone = latents(pipe, PROMPTS[:1], guidance_scale=guidance)
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True, shared_score_shift=0.5)):
        in_set = latents(pipe, guidance_scale=guidance)
    torch.testing.assert_close(in_set[:1], alone, atol=1e-5, rtol=1e-5)


def leftovers(transformer) -> list[str]:
    return [name or "<transformer>" for name, module in transformer.named_modules()
            if hasattr(module, "_diffusers_hook") or "forward" in vars(module)]


def test_removed_or_never_applied_is_bit_identical(pipe):
    stock = latents(pipe)
    processors = [module.processor for module in pipe.transformer.modules() if hasattr(module, "processor")]
    with sa.apply(pipe) as handle:
        assert hooked_layers(pipe.transformer) == handle.layers != []
        shared = latents(pipe)
    assert per_image_change(shared, stock)[0] < 1e-5 and (per_image_change(shared, stock)[1:] > 1e-3).all()
    assert leftovers(pipe.transformer) == [] and not hasattr(pipe, "_stylealigned_handle")
    assert torch.equal(latents(pipe), stock)
    handle = sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True))
    with handle.chunked(1):
        latents(pipe)
    handle.remove()
    assert leftovers(pipe.transformer) == [] and torch.equal(latents(pipe), stock)
    assert [module.processor for module in pipe.transformer.modules() if hasattr(module, "processor")] == processors


# layers and refusals


def test_attention_layers_and_the_default(pipe):
    """The image refiner and the joint layers share, never the caption refiner; by default the joint layers."""
    backbone = backbone_for(pipe)
    assert isinstance(backbone, ZImageBackbone)
    assert backbone.attention_layers() == ["noise_refiner.0.attention", "layers.0.attention", "layers.1.attention"]
    with sa.apply(pipe) as handle:
        assert handle.layers == hooked_layers(pipe.transformer) == ["layers.0.attention", "layers.1.attention"]


def test_several_references_are_refused_in_one_line(pipe):
    with sa.apply(pipe) as handle:
        handle.set_weights([1.0, 1.0])
        with pytest.raises(sa.UserError, match="one reference") as refused:
            latents(pipe, guidance_scale=0.0)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("knob", ["share_group_norm", "share_layer_norm", "full_attention_share"])
def test_knobs_without_meaning_are_refused(pipe, knob):
    with pytest.raises(sa.UserError, match=knob):
        sa.apply(pipe, sa.StyleAlignedConfig(**{knob: True}))


# generate_set


def set_latents(pipe, prompts, decoded, **kwargs) -> dict[int, torch.Tensor]:
    """generate_set's decoded latents by set position."""
    found = {}
    images = sets.generate_set(pipe, prompts, seed=7, height=HEIGHT, width=WIDTH, **PROMPT_KWARGS, **kwargs,
                               on_image=lambda i, image: found.setdefault(i, image.info["latent"]))
    assert len(images) == len(found) and all(image.size == (WIDTH, HEIGHT) for image in images)
    return found


@pytest.mark.parametrize("settings", [dict(num_inference_steps=2, guidance_scale=4.0),
                                      dict(num_inference_steps=8, guidance_scale=0.0)], ids=["guided", "turbo"])
def test_chunked_set_equals_one_batch_and_leaves_the_prompts(pipe, decoded, settings):
    prompts = PROMPTS + ["a tree"]
    given = list(prompts)
    whole = set_latents(pipe, given, decoded, **settings)
    chunked = set_latents(pipe, given, decoded, batch_size=2, **settings)
    waves = set_latents(pipe, given, decoded, batch_size=1, wave_size=2, **settings)
    assert given == prompts  # ZImagePipeline rewrites the prompt list it is given: never the caller's
    assert sorted(whole) == sorted(chunked) == sorted(waves) == list(range(len(prompts)))
    for i in range(len(prompts)):
        torch.testing.assert_close(chunked[i], whole[i], **FP32)
        torch.testing.assert_close(waves[i], whole[i], **FP32)
    with sa.apply(pipe):
        expected = latents(pipe, prompts, seed=7, steps=settings["num_inference_steps"],
                           guidance_scale=settings["guidance_scale"])
    torch.testing.assert_close(torch.stack([whole[i] for i in range(len(prompts))]), expected, **FP32)
    assert leftovers(pipe.transformer) == []


def test_the_img2img_variant(pipe):
    """ZImageImg2ImgPipeline calls the transformer as the text-to-image pipeline does: the reference as generated
    alone, targets changed."""
    from diffusers import ZImageImg2ImgPipeline

    img2img = ZImageImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, HEIGHT, WIDTH)

    def run(prompts):
        return img2img(list(prompts), image=image.expand(len(prompts), -1, -1, -1), strength=0.7,
                       num_inference_steps=4, height=HEIGHT, width=WIDTH, output_type="latent", **PROMPT_KWARGS,
                       generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images

    stock = run(PROMPTS)
    with sa.apply(img2img):
        shared = run(PROMPTS)
    torch.testing.assert_close(shared[:1], run(PROMPTS[:1]), atol=1e-5, rtol=1e-5)
    assert (per_image_change(shared, stock)[1:] > 1e-3).all()


def test_starting_latents_are_fp32_as_the_pipeline_draws_them(pipe):
    """ZImagePipeline keeps its latents in fp32 with a bf16 transformer: generate_set's noise (and a trajectory's
    start) is not rounded to the transformer's dtype."""
    pipe.transformer.to(torch.bfloat16)
    noise = backbone_for(pipe).initial_noise([0, 3], 5, HEIGHT, WIDTH)
    assert noise.dtype == torch.float32 and noise.shape == (2, 4, HEIGHT // 2, WIDTH // 2)
    expected = torch.randn((1, 4, HEIGHT // 2, WIDTH // 2), generator=torch.Generator().manual_seed(8))
    assert torch.equal(noise[1:], expected)


def test_a_chosen_attention_backend_runs_every_shared_call_and_equals_the_oracle(pipe, dispatch_spy):  # noqa: F811
    """Z-Image's processor goes through diffusers' dispatcher: with "native" chosen, so do ours (masked joint
    layers: captions of different lengths)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    config = sa.StyleAlignedConfig(shared_layers=1.0, shared_score_shift=0.69)
    expected = oracle_latents(pipe, config, guidance_scale=4.0)
    with native_backend(pipe.transformer), sa.apply(pipe, config) as handle:
        fast = latents(pipe, guidance_scale=4.0)
    torch.testing.assert_close(fast, expected, **FP32)
    # two steps, each shared layer attends twice (the references, then the targets), each through the dispatcher
    assert len(dispatch_spy) == 2 * 2 * len(handle.layers) and set(dispatch_spy) == {AttentionBackendName.NATIVE}
