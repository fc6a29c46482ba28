"""The tiny FLUX and SD3 test pipelines: deterministic builds that load back, run and keep the real models' layout."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from tests.dit_pipelines import (
    FLUX_SIZE, PROMPT_KWARGS, SD3_SIZE, TEXT_HIDDEN, WORDS, build_flux, build_sd3, t5_tokenizer,
)

PROMPTS = ["a cat", "a dog"]


def generate(pipe, size, **kwargs):
    settings = dict(
        num_inference_steps=2, height=size, width=size, output_type="np", generator=torch.Generator().manual_seed(0),
        **PROMPT_KWARGS,
    )
    return pipe(PROMPTS, **(settings | kwargs)).images


def weights(folder):
    return {f"{path.parent.name}.{name}": tensor for path in sorted(folder.glob("*/*.safetensors"))
            for name, tensor in load_file(path).items()}


@pytest.mark.parametrize("build", [build_flux, build_sd3])
def test_builds_are_deterministic(build, tmp_path):
    build(tmp_path / "one")
    build(tmp_path / "two")
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 0
    assert all(torch.equal(one[name], two[name]) for name in one)


def test_t5_tokenizer_is_t5_shaped_and_survives_saving(tmp_path):
    tokenizer = t5_tokenizer(WORDS)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a watercolor cat").input_ids
    assert len(ids) == 4 and ids[-1] == 1  # one token per listed word, then </s>
    tokenizer.save_pretrained(tmp_path)
    loaded = type(tokenizer).from_pretrained(tmp_path)
    for text in ["a watercolor cat", "zebra in the rain", ""]:
        assert loaded(text).input_ids == tokenizer(text).input_ids
    padded = loaded(PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids
    assert [row[:3] for row in padded] == [tokenizer("a cat").input_ids, tokenizer("a dog").input_ids]
    assert all(token == 0 for row in padded for token in row[3:])


def test_loaded_pipelines_are_in_eval_mode_with_a_shifted_vae(flux_pipe, sd3_pipe):
    assert isinstance(flux_pipe, FluxPipeline) and isinstance(sd3_pipe, StableDiffusion3Pipeline)
    for pipe in (flux_pipe, sd3_pipe):
        modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
        assert len(modules) >= 4 and not any(m.training for m in modules)
        assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5, 0.1)
    assert flux_pipe.scheduler.config.use_dynamic_shifting
    assert sd3_pipe.scheduler.config.shift == 3.0


def test_sd3_transformer_has_the_sd35_layout(sd3_pipe):
    blocks = sd3_pipe.transformer.transformer_blocks
    assert [block.attn2 is not None for block in blocks] == [True, False, False]
    assert [block.context_pre_only for block in blocks] == [False, False, True]
    assert blocks[0].attn.norm_q is not None  # qk RMS norm


def test_sd3_pads_the_clip_features_to_the_t5_width(sd3_pipe):
    embeds, _, pooled, _ = sd3_pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                  **PROMPT_KWARGS)
    assert embeds.shape == (2, 77 + 16, 4 * TEXT_HIDDEN) and pooled.shape == (2, 2 * TEXT_HIDDEN)
    assert embeds[:, :77, 2 * TEXT_HIDDEN:].abs().max() == 0 and embeds[:, :77, :2 * TEXT_HIDDEN].abs().max() > 0


def record_batches(transformer):
    """Record each call's (hidden_states, encoder_hidden_states) as the transformer sees them."""
    calls = []
    transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["hidden_states"], kwargs["encoder_hidden_states"])),
        with_kwargs=True,
    )
    return calls


def test_flux_generates_reproducible_images_and_packed_latents(flux_pipe):
    calls = record_batches(flux_pipe.transformer)
    images = generate(flux_pipe, FLUX_SIZE)
    assert images.shape == (2, FLUX_SIZE, FLUX_SIZE, 3) and np.isfinite(images).all()
    assert not np.allclose(images[0], images[1])
    np.testing.assert_array_equal(generate(flux_pipe, FLUX_SIZE), images)
    # guidance-distilled: one batch of the prompts per step, no unconditional half
    assert len(calls) == 4 and calls[0][0].shape == (2, (FLUX_SIZE // 4) ** 2, 16)
    assert calls[0][1].shape[:2] == (2, PROMPT_KWARGS["max_sequence_length"])
    latents = generate(flux_pipe, FLUX_SIZE, output_type="latent")
    assert latents.shape == (2, (FLUX_SIZE // 4) ** 2, 16) and torch.isfinite(latents).all()


def test_sd3_generates_reproducible_images_with_guidance_and_4d_latents(sd3_pipe):
    calls = record_batches(sd3_pipe.transformer)
    images = generate(sd3_pipe, SD3_SIZE, guidance_scale=5.0)
    assert images.shape == (2, SD3_SIZE, SD3_SIZE, 3) and np.isfinite(images).all()
    assert not np.allclose(images[0], images[1])
    np.testing.assert_array_equal(generate(sd3_pipe, SD3_SIZE, guidance_scale=5.0), images)
    # classifier-free guidance: [uncond, uncond, cond "a cat", cond "a dog"] in one batch
    latents_in, context = calls[0]
    assert len(calls) == 4 and latents_in.shape == (4, 4, SD3_SIZE // 2, SD3_SIZE // 2)
    assert torch.equal(context[0], context[1]) and not torch.equal(context[1], context[2])
    assert not torch.equal(context[2], context[3])
    latents = generate(sd3_pipe, SD3_SIZE, guidance_scale=5.0, output_type="latent")
    assert latents.shape == (2, 4, SD3_SIZE // 2, SD3_SIZE // 2) and torch.isfinite(latents).all()
