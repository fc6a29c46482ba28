"""The fast path on FLUX.1 and SD3.5 transformers equals the loop-per-image oracle of the rules, end to end."""

import itertools

import pytest
import torch

import stylealigned as sa
from stylealigned.apply import layers_to_share
from stylealigned.backbones import backbone_for
from tests import oracle_dit
from tests.dit_pipelines import PROMPT_KWARGS
from tests.tolerance import assert_rounding_close, denoising_depth

PROMPTS = ["a cat in watercolor style", "a dog", "a house"]
FLAGS = ("share_attention", "adain_queries", "adain_keys", "adain_values")
KNOB_GRID = [dict(zip(FLAGS, flags)) for flags in itertools.product([False, True], repeat=4)]
EXTRA = [dict(shared_score_scale=1.7, shared_score_shift=0.69), dict(shared_score_shift=-0.5, adain_values=True),
         dict(reference_positions="same"), dict(shared_layers=1.0), dict(shared_layers=0.5, shared_score_scale=0.8),
         dict(shared_layers="transformer_blocks.0")]


def latents(pipe, prompts=PROMPTS, steps=2, **kwargs):
    noise = backbone_for(pipe).initial_noise(range(len(prompts)), 0, 32, 32)
    return pipe(prompts, num_inference_steps=steps, height=32, width=32, latents=noise, output_type="latent",
                **PROMPT_KWARGS, **kwargs).images


def fast_and_oracle(pipe, config, **kwargs):
    with sa.apply(pipe, config):
        fast = latents(pipe, **kwargs)
    undo = oracle_dit.install(pipe, config, layers_to_share(backbone_for(pipe), config))
    try:
        return fast, latents(pipe, **kwargs)
    finally:
        undo()


@pytest.fixture(params=["flux", "sd3"])
def pipe(request):
    pipe = request.getfixturevalue(f"{request.param}_pipe")
    return pipe.to(dtype=torch.float64)


@pytest.mark.parametrize("knobs", KNOB_GRID + EXTRA, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_every_knob_equals_oracle_end_to_end(pipe, knobs):
    """fp64 through two full denoising steps (SD3 with classifier-free guidance: two groups)."""
    fast, expected = fast_and_oracle(pipe, sa.StyleAlignedConfig(**knobs), guidance_scale=5.0)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("knobs", [{}, EXTRA[0], dict(adain_values=True, shared_layers=1.0)])
def test_chunked_equals_oracle(pipe, knobs):
    config = sa.StyleAlignedConfig(**knobs)
    prompts = PROMPTS + ["a tree", "a car"]
    with sa.apply(pipe, config) as handle, handle.chunked(2):
        chunked = latents(pipe, prompts, guidance_scale=5.0)
    undo = oracle_dit.install(pipe, config, layers_to_share(backbone_for(pipe), config))
    try:
        expected = latents(pipe, prompts, guidance_scale=5.0)
    finally:
        undo()
    torch.testing.assert_close(chunked, expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("knobs", [{}, EXTRA[0], dict(adain_values=True, shared_layers=1.0, reference_positions="same")])
def test_chroma_with_its_text_mask_equals_oracle(chroma_pipe, knobs):
    """Chroma masks padded text tokens (prompts of different lengths); the shared reference tokens stay unmasked."""
    chroma_pipe.to(dtype=torch.float64)
    prompts = ["a cat", "a red dog in the house with a tree", "a tree"]
    config = sa.StyleAlignedConfig(**knobs)
    fast, expected = fast_and_oracle(chroma_pipe, config, prompts=prompts, guidance_scale=4.0)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)
    with sa.apply(chroma_pipe, config) as handle, handle.chunked(1):
        chunked = latents(chroma_pipe, prompts, guidance_scale=4.0)
    torch.testing.assert_close(chunked, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fast[0], latents(chroma_pipe, prompts[:1], guidance_scale=4.0)[0], atol=1e-12,
                               rtol=0)


def test_sd3_without_guidance_is_one_group(sd3_pipe):
    fast, expected = fast_and_oracle(sd3_pipe.to(dtype=torch.float64), sa.StyleAlignedConfig(), guidance_scale=1.0)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)


def test_fp32_follows_the_oracle(flux_pipe, sd3_pipe):
    for pipe in (flux_pipe, sd3_pipe):
        fast, expected = fast_and_oracle(pipe, sa.StyleAlignedConfig.transfer(share_group_norm=False,
                                                                              share_layer_norm=False))
        assert_rounding_close(fast, expected, denoising_depth(pipe, 3))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_img2img_variants_are_supported(request, family):
    from diffusers import FluxImg2ImgPipeline, StableDiffusion3Img2ImgPipeline

    text_to_image = request.getfixturevalue(f"{family}_pipe").to(dtype=torch.float64)  # tests/tolerance.py
    pipe = {"flux": FluxImg2ImgPipeline, "sd3": StableDiffusion3Img2ImgPipeline}[family](**text_to_image.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, dtype=torch.float64)

    def run(prompts):
        return pipe(prompts, image=image.expand(len(prompts), -1, -1, -1), strength=0.7, num_inference_steps=4,
                    height=32, width=32, output_type="latent", **PROMPT_KWARGS,
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images

    stock = run(PROMPTS)
    with sa.apply(pipe):
        shared = run(PROMPTS)
    alone = run(PROMPTS[:1])
    assert_rounding_close(shared[:1], alone, denoising_depth(pipe, steps=4))
    assert (shared[1:] - stock[1:]).abs().amax() > 1e-3
