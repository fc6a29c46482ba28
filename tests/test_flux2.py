"""FLUX.2-klein end to end: the fast path equals the per-image oracle, the reference is generated as alone, removal
restores the stock model, chunks equal one batch, conditioning images stay unshared."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import stylealigned as sa
from stylealigned.apply import layers_to_share
from stylealigned.backbones import backbone_for
from tests import oracle_flux2
from tests.flux2_pipelines import HEIGHT, PROMPT_KWARGS, WIDTH

PROMPTS = ["a cat in watercolor style", "a dog", "a house with a red car"]
FLAGS = ("share_attention", "adain_queries", "adain_keys", "adain_values")
KNOB_GRID = [dict(zip(FLAGS, flags)) for flags in itertools.product([False, True], repeat=4)]
EXTRA = [dict(shared_score_scale=1.7, shared_score_shift=0.69), dict(reference_positions="same"),
         dict(shared_layers=1.0, adain_values=True), dict(shared_layers=0.5, shared_score_scale=0.8),
         dict(shared_layers="transformer_blocks.1")]


def latents(pipe, prompts=PROMPTS, steps=2, **kwargs):
    backbone = backbone_for(pipe)
    noise = backbone.start_latents(backbone.initial_noise(range(len(prompts)), 0, HEIGHT, WIDTH), HEIGHT, WIDTH)
    return pipe(prompt=prompts, num_inference_steps=steps, height=HEIGHT, width=WIDTH, latents=noise,
                output_type="latent", **PROMPT_KWARGS, **kwargs).images


def with_oracle(pipe, config, **kwargs):
    undo = oracle_flux2.install(pipe, config, layers_to_share(backbone_for(pipe), config))
    try:
        return latents(pipe, **kwargs)
    finally:
        undo()


@pytest.fixture
def pipe64(flux2_pipe):
    return flux2_pipe.to(dtype=torch.float64)


@pytest.mark.parametrize("knobs", KNOB_GRID + EXTRA, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_every_knob_equals_oracle(pipe64, knobs):
    """fp64 through two denoising steps with CFG (two transformer calls, one group each)."""
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(pipe64, config):
        fast = latents(pipe64, guidance_scale=4.0)
    torch.testing.assert_close(fast, with_oracle(pipe64, config, guidance_scale=4.0), atol=1e-9, rtol=1e-9)


def test_fp32_follows_the_oracle(flux2_pipe):
    config = sa.StyleAlignedConfig(adain_values=True, shared_layers=1.0, shared_score_shift=0.5)
    with sa.apply(flux2_pipe, config):
        fast = latents(flux2_pipe, guidance_scale=4.0)
    torch.testing.assert_close(fast, with_oracle(flux2_pipe, config, guidance_scale=4.0), atol=1e-4, rtol=1e-4)


def test_reference_alone_removal_and_chunks(pipe64):
    stock = latents(pipe64, guidance_scale=4.0)
    with sa.apply(pipe64, sa.StyleAlignedConfig(shared_layers=1.0)) as handle:
        shared = latents(pipe64, guidance_scale=4.0)
        with handle.chunked(1):
            chunked = latents(pipe64, guidance_scale=4.0)
    torch.testing.assert_close(shared[0], latents(pipe64, PROMPTS[:1], guidance_scale=4.0)[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked, shared, atol=1e-12, rtol=0)
    assert (shared[1:] - stock[1:]).abs().amax() > 1e-3
    assert torch.equal(latents(pipe64, guidance_scale=4.0), stock)


def test_conditioning_images_are_not_shared(pipe64):
    """With FLUX.2's own conditioning image (editing), only the set's image tokens are shared."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))  # 64 px at least
    config = sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True)
    with sa.apply(pipe64, config):
        fast = latents(pipe64, image=image, guidance_scale=1.0)
    torch.testing.assert_close(fast, with_oracle(pipe64, config, image=image, guidance_scale=1.0), atol=1e-9,
                               rtol=1e-9)
