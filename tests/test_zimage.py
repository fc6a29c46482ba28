"""Z-Image specifics on its tiny pipeline: the oracle itself, `cfg_truncation` dropping guidance on late steps,
few-step (Turbo-like) sets, targets at other positions than their reference, several references, the layers,
refusals, fp32 starting latents and the attention backend. The checks every family shares (every knob, chunks, the
reference, removal, img2img) are in tests/test_transformer_*.py.

The prompts pad their captions to 64 (LONG) or 32 (SHORT, "a house") tokens, so targets sit at other image positions
than their reference; the 24 x 40 image is 6 x 10 patches (a row/column swap shows) plus 4 image padding tokens.
"""

import pytest
import torch

import stylealigned as sa
from stylealigned import sets
from stylealigned.apply import hooked_layers
from stylealigned.backbones import ZImageBackbone, backbone_for
from tests.families import FP32, ZIMAGE
from tests.test_backends import dispatch_spy, native_backend  # noqa: F401 (fixture)
from tests.test_transformer_oracle import leftovers, record_batches
from tests.zimage_pipelines import HEIGHT, LONG, PROMPT_KWARGS, SHORT, WIDTH

PROMPTS = list(ZIMAGE.prompts)  # [LONG, SHORT, "a house", LONG]


@pytest.fixture
def pipe(zimage_pipe):
    return zimage_pipe


def latents(pipe, prompts=PROMPTS, steps=2, seed=0, **kwargs):
    """The pipeline's final latents, image i from the noise seeded seed + i."""
    return ZIMAGE.latents(pipe, prompts, steps, seed, **kwargs)


def oracle_latents(pipe, config, prompts=PROMPTS, **kwargs):
    return ZIMAGE.oracle_latents(pipe, config, prompts, **kwargs)


def fast_and_oracle(pipe, config, prompts=PROMPTS, **kwargs):
    return ZIMAGE.fast_and_oracle(pipe, config, prompts, **kwargs)


# the oracle


def test_the_oracle_with_nothing_shared_is_the_stock_model(pipe):
    """Its own positions, RoPE, mask and explicit softmax reproduce the model (it asserts its positions are the
    model's); no-op knobs give the stock latents."""
    off = sa.StyleAlignedConfig(share_attention=False, adain_queries=False, adain_keys=False, shared_layers=1.0)
    torch.testing.assert_close(oracle_latents(pipe, off), latents(pipe), atol=1e-5, rtol=1e-5)


# guidance dropped on late steps, few steps


@pytest.mark.parametrize("knobs", [{}, dict(shared_score_scale=1.7, shared_score_shift=0.69),
                                   dict(shared_layers=1.0, adain_values=True, reference_positions="same")])
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


def test_targets_at_other_positions_than_the_reference_see_it_at_their_own(pipe):
    """A short-caption reference and long-caption targets sit at different t: the oracle rotates the shared keys at
    each target's own t, and so must the fast path (also with the reference's caption the longer)."""
    for prompts in ([SHORT, LONG, LONG], [LONG, SHORT, "a house"]):
        fast, expected = fast_and_oracle(pipe, sa.StyleAlignedConfig(shared_layers=1.0), prompts,
                                         guidance_scale=4.0)
        torch.testing.assert_close(fast, expected, **FP32)


# the reference unguided (guided: tests/test_transformer_oracle.py)


def test_reference_unguided_equals_its_prompt_generated_alone(pipe):
    """Turbo's setting, guidance 0: one group."""
    alone = latents(pipe, PROMPTS[:1], guidance_scale=0.0)
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True, shared_score_shift=0.5)):
        in_set = latents(pipe, guidance_scale=0.0)
    torch.testing.assert_close(in_set[:1], alone, atol=1e-5, rtol=1e-5)


# layers and refusals


def test_attention_layers_and_the_default(pipe):
    """The image refiner and the joint layers share, never the caption refiner; by default the joint layers."""
    backbone = backbone_for(pipe)
    assert isinstance(backbone, ZImageBackbone)
    assert backbone.attention_layers() == ["noise_refiner.0.attention", "layers.0.attention", "layers.1.attention"]
    with sa.apply(pipe) as handle:
        assert handle.layers == hooked_layers(pipe.transformer) == ["layers.0.attention", "layers.1.attention"]


@pytest.mark.parametrize("knobs", [{}, dict(adain_values=True, shared_score_shift=0.69, shared_layers=1.0)],
                         ids=["default", "values-shift-all-layers"])
def test_two_references_equal_the_oracle_and_a_zero_weight_drops_out(pipe, knobs):
    """References LONG and SHORT (at other positions than each other and than the targets) mixed (0.3, 0.7) with
    guidance: both references' keys at each target's own positions, the targets AdaIN-ed to their mixture, as the
    oracle computes it, chunked too. Weights (1, 0) give the first reference's set as if the second were absent."""
    from tests import oracle_zimage

    config, weights, guided = sa.StyleAlignedConfig(**knobs), (0.3, 0.7), {"guidance_scale": 4.0}
    with sa.apply(pipe, config) as handle:
        handle.set_weights(weights)
        fast = latents(pipe, **guided)
        with handle.chunked(1):
            chunked = latents(pipe, **guided)
        handle.set_weights((1.0, 0.0))
        first_only = latents(pipe, **guided)
        handle.set_weights((1.0,))
        backbone, size = backbone_for(pipe), (HEIGHT, WIDTH)
        noise = backbone.start_latents(backbone.initial_noise([0, 2, 3], 0, *size), *size)  # the same noises
        one = pipe(prompt=[PROMPTS[0], *PROMPTS[2:]], num_inference_steps=2, height=HEIGHT, width=WIDTH,
                   latents=noise, output_type="latent", **PROMPT_KWARGS, **guided).images
    undo = oracle_zimage.install(pipe, config, handle.layers, len(PROMPTS), weights)
    try:
        expected = latents(pipe, **guided)
    finally:
        undo()
    torch.testing.assert_close(fast, expected, **FP32)
    torch.testing.assert_close(chunked, expected, **FP32)
    torch.testing.assert_close(first_only[[0, 2, 3]], one, **FP32)
    assert not torch.allclose(fast[2:], first_only[2:], **FP32)  # the second reference moves the targets


# generate_set


def set_latents(pipe, prompts, decoded, **kwargs) -> dict[int, torch.Tensor]:
    """generate_set's decoded latents by set position."""
    found = {}
    images = sets.generate_set(pipe, prompts, seed=7, height=HEIGHT, width=WIDTH, **PROMPT_KWARGS, **kwargs,
                               on_image=lambda i, image: found.setdefault(i, image.info["latent"]))
    assert len(images) == len(found) and all(image.size == (WIDTH, HEIGHT) for image in images)
    return found


def test_a_set_with_two_reference_prompts_in_waves_equals_one_batch(pipe, decoded):
    """generate_set's references= path: the two references recorded once, the targets replayed in waves."""
    kwargs = dict(references=PROMPTS[:2], weights=[0.4, 0.6], num_inference_steps=2, guidance_scale=4.0)
    whole = set_latents(pipe, PROMPTS[2:] + ["a tree"], decoded, **kwargs)
    waves = set_latents(pipe, PROMPTS[2:] + ["a tree"], decoded, batch_size=1, wave_size=2, **kwargs)
    assert sorted(whole) == sorted(waves) == list(range(5))
    for i in range(5):
        torch.testing.assert_close(waves[i], whole[i], **FP32)


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
