"""Qwen-Image specifics through the tiny `QwenImagePipeline` (fp32): the oracle itself and the rotary tables,
text-padding masks under true CFG, the reference without masks, chunked sets, decoding, the shared layers,
refusals, the inversion's schedule and its true CFG. The checks every family shares (every knob, chunks, the
reference, removal, img2img, inversion, transfer, the CLI) are in tests/test_transformer_*.py."""

import pytest
import torch

import stylealigned as sa
from stylealigned import sets
from stylealigned.apply import layers_to_share
from stylealigned.backbones import backbone_for
from stylealigned.backbones.qwenimage import image_freqs
from stylealigned.errors import UserError
from stylealigned.inversion import sampling_timesteps
from tests import oracle_qwen
from tests.families import QWEN
from tests.qwen_pipelines import QWEN_HEIGHT, QWEN_WIDTH
from tests.test_transformer_inversion import pipeline_schedule

# token lengths 5, 2 and 6 (padded text keys masked); then three prompts of one length (no mask at all)
PROMPTS = list(QWEN.prompts)
EVEN = ["a cat", "a dog", "a car"]
CFG = QWEN.guided  # true CFG: a second transformer call per step
ATOL, RTOL = QWEN.tolerance["atol"], QWEN.tolerance["rtol"]


def ids(knobs: dict) -> str:
    return ",".join(f"{a}={b}" for a, b in knobs.items()) or "defaults"


def latents(pipe, prompts=PROMPTS, steps=2, **kwargs):
    """Final latents, image i from the noise seeded i, at the non-square QWEN_HEIGHT x QWEN_WIDTH."""
    return QWEN.latents(pipe, prompts, steps, **kwargs)


def with_oracle(pipe, config, prompts=PROMPTS, **kwargs):
    return QWEN.oracle_latents(pipe, config, prompts, **kwargs)


def fast_and_oracle(pipe, config, prompts=PROMPTS, **kwargs):
    return QWEN.fast_and_oracle(pipe, config, prompts, **kwargs)


# the oracle itself, and the rotary tables


def test_the_oracle_with_every_knob_off_is_the_stock_model(qwen_pipe):
    """The oracle's own RoPE (from the frequency table) and masks reproduce the stock processor; its reference
    (image 0) is the stock model's with every knob on."""
    off = sa.StyleAlignedConfig(share_attention=False, adain_queries=False, adain_keys=False, shared_layers=1.0)
    for prompts in (PROMPTS, EVEN):
        stock = latents(qwen_pipe, prompts)
        torch.testing.assert_close(with_oracle(qwen_pipe, off, prompts=prompts), stock, atol=ATOL, rtol=RTOL)
        on = with_oracle(qwen_pipe, sa.StyleAlignedConfig(shared_layers=1.0), prompts=prompts)
        torch.testing.assert_close(on[0], stock[0], atol=ATOL, rtol=RTOL)
        assert (on[1:] - stock[1:]).abs().amax() > 1e-2


def test_image_frequencies_are_the_models_own_and_shifted_by_the_latent_width(qwen_pipe):
    pos_embed = qwen_pipe.transformer.pos_embed
    height, width = QWEN_HEIGHT // 8, QWEN_WIDTH // 8  # tokens: the VAE's factor 4, then 2x2 packing
    own, text = pos_embed([(1, height, width)], max_txt_seq_len=5, device="cpu")
    assert torch.equal(image_freqs(pos_embed, 1, height, width, 0, "cpu"), own)
    assert torch.equal(oracle_qwen.image_freqs(pos_embed, height, width), own)
    assert torch.equal(oracle_qwen.text_freqs(pos_embed, height, width, 5), text)
    shifted = image_freqs(pos_embed, 1, height, width, width, "cpu")
    assert torch.equal(shifted, oracle_qwen.image_freqs(pos_embed, height, width, width))
    # row r, column c of the shifted grid is column c + W of the table: the unshifted grid's row r, column c + W
    wide = image_freqs(pos_embed, 1, height, 3 * width, 0, "cpu").view(height, 3 * width, -1)
    grid = shifted.view(height, width, -1)
    centre = 3 * width - 3 * width // 2 - (width - width // 2)  # where the narrow grid's column 0 sits in the wide
    assert torch.equal(grid, wide[:, centre + width:centre + 2 * width])


# true CFG, with and without text masks


@pytest.mark.parametrize("knobs", [{}, dict(shared_score_scale=1.7, shared_score_shift=0.69),
                                   dict(adain_values=True, shared_layers=1.0, reference_positions="same")],
                         ids=ids)
@pytest.mark.parametrize("prompts", [PROMPTS, EVEN], ids=["masked", "unmasked"])
def test_true_cfg_runs_two_groups_of_one_and_equals_the_oracle(qwen_pipe, knobs, prompts):
    config = sa.StyleAlignedConfig(**knobs)
    fast, expected = fast_and_oracle(qwen_pipe, config, prompts=prompts, **CFG)
    torch.testing.assert_close(fast, expected, atol=ATOL, rtol=RTOL)
    unguided = with_oracle(qwen_pipe, config, prompts=prompts)
    assert (fast - unguided).abs().amax() > 1e-2  # the guidance ran


def test_reference_positions_move_the_targets(qwen_pipe):
    shifted, same = (fast_and_oracle(qwen_pipe, sa.StyleAlignedConfig(reference_positions=where))[0]
                     for where in ("shifted", "same"))
    torch.testing.assert_close(shifted[0], same[0], atol=0, rtol=0)
    assert (shifted[1:] - same[1:]).abs().amax() > 1e-3


# the reference without masks, sets


@pytest.mark.parametrize("guidance", [{}, CFG], ids=["even", "even-cfg"])
def test_reference_equals_its_prompt_generated_alone_without_text_masks(qwen_pipe, guidance):
    """Prompts of one token length: no mask at all (with masks, guided: tests/test_transformer_oracle.py)."""
    prompts = EVEN
    alone = latents(qwen_pipe, prompts[:1], **guidance)
    with sa.apply(qwen_pipe, sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True)):
        in_set = latents(qwen_pipe, prompts, **guidance)
    torch.testing.assert_close(in_set[:1], alone, atol=1e-5, rtol=1e-5)


def set_latents(pipe, prompts, decoded, **kwargs) -> dict[int, torch.Tensor]:
    """generate_set's decoded latents by set position."""
    found = {}
    images = sets.generate_set(pipe, prompts, seed=3, num_inference_steps=2, height=QWEN_HEIGHT, width=QWEN_WIDTH,
                               on_image=lambda i, image: found.setdefault(i, image.info["latent"]), **CFG, **kwargs)
    assert all(image.size == (QWEN_WIDTH, QWEN_HEIGHT) for image in images)
    return found


def test_chunked_sets_equal_one_batch(qwen_pipe, decoded):
    prompts = PROMPTS + ["a tree", "a bird on the car"]
    whole = set_latents(qwen_pipe, prompts, decoded)
    chunked = set_latents(qwen_pipe, prompts, decoded, batch_size=1)
    waves = set_latents(qwen_pipe, prompts, decoded, batch_size=2, wave_size=2)
    assert sorted(whole) == sorted(chunked) == sorted(waves) == list(range(len(prompts)))
    for i in whole:
        torch.testing.assert_close(chunked[i], whole[i], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(waves[i], whole[i], atol=ATOL, rtol=RTOL)


def test_a_sets_guidance_scale_is_true_cfg(qwen_pipe):
    """Qwen-Image reads guidance_scale only on guidance-distilled variants: generate_set (and so the CLI's
    --guidance and the web app's field) turns it into true CFG against the pipeline's suggested " "."""
    def images(**kwargs):
        return [image.tobytes() for image in sets.generate_set(qwen_pipe, PROMPTS, seed=3, num_inference_steps=2,
                                                               height=QWEN_HEIGHT, width=QWEN_WIDTH, **kwargs)]

    guided = images(guidance_scale=3.0)
    assert guided == images(**CFG)
    assert guided != images(guidance_scale=1.0) == images()


def test_decoding_is_the_pipelines(qwen_pipe):
    """The backbone's VAE decoding (frame axis, per-channel mean and std) gives the pipeline's own images."""
    packed = latents(qwen_pipe, EVEN[:2])
    images = backbone_for(qwen_pipe).decode(packed, QWEN_HEIGHT, QWEN_WIDTH)
    noise = backbone_for(qwen_pipe).initial_noise(range(2), 0, QWEN_HEIGHT, QWEN_WIDTH)
    own = qwen_pipe(EVEN[:2], num_inference_steps=2, height=QWEN_HEIGHT, width=QWEN_WIDTH, latents=noise).images
    for image, expected in zip(images, own):
        assert image.size == expected.size == (QWEN_WIDTH, QWEN_HEIGHT)
        assert image.tobytes() == expected.tobytes()


# the shared layers


def test_default_shared_layers_are_half_the_blocks(qwen_pipe):
    backbone = backbone_for(qwen_pipe)
    assert backbone.attention_layers() == [f"transformer_blocks.{i}.attn" for i in range(3)]
    half = layers_to_share(backbone, sa.StyleAlignedConfig(shared_layers=0.5))
    assert layers_to_share(backbone, sa.StyleAlignedConfig()) == half == ["transformer_blocks.0.attn",
                                                                          "transformer_blocks.2.attn"]


@pytest.mark.parametrize("shared_layers, expected", [(1.0, [0, 1, 2]), (0.34, [1]), (0.67, [0, 2]), (0.0, [])])
def test_shared_layers_fractions(qwen_pipe, shared_layers, expected):
    config = sa.StyleAlignedConfig(shared_layers=shared_layers)
    assert layers_to_share(backbone_for(qwen_pipe), config) == [f"transformer_blocks.{i}.attn" for i in expected]
    if expected:
        fast, oracle = fast_and_oracle(qwen_pipe, config)
        torch.testing.assert_close(fast, oracle, atol=ATOL, rtol=RTOL)


def test_an_editing_layout_is_refused_in_one_line(qwen_pipe):
    """Qwen-Image-Edit appends condition-image tokens (a second image shape per sample): not a set's images."""
    with sa.apply(qwen_pipe) as handle, pytest.raises(UserError, match="condition images"):
        handle.backbone.begin_call(handle.state, handle.config, {"img_shapes": [[(1, 4, 6), (1, 4, 6)]]})


# the schedule and true CFG of inversion


def test_the_schedule_is_the_pipelines(qwen_pipe, monkeypatch):
    for steps in (3, 10):
        timesteps, _ = pipeline_schedule(qwen_pipe, steps, monkeypatch, QWEN_HEIGHT, QWEN_WIDTH)
        assert sampling_timesteps(qwen_pipe, steps, QWEN_WIDTH, QWEN_HEIGHT) == pytest.approx(timesteps, abs=1e-3)


def test_guided_prediction_is_the_pipelines_true_cfg(qwen_pipe):
    """`predict` with guidance > 1 is the pipeline's true CFG: the negative prompt's call, the combination
    rescaled to the conditional prediction's norm per token."""
    backbone, seen = backbone_for(qwen_pipe), []
    size = dict(height=QWEN_HEIGHT, width=QWEN_WIDTH)
    noise = backbone.initial_noise([0], 0, **size)
    original = qwen_pipe.scheduler.step
    qwen_pipe.scheduler.step = lambda output, t, sample, **kw: seen.append((output, t)) or original(output, t,
                                                                                                  sample, **kw)
    qwen_pipe("a photo of a cat", negative_prompt=" ", true_cfg_scale=3.0, num_inference_steps=1, latents=noise,
              **size)
    (expected, t), = seen
    conditioning = backbone.conditioning("a photo of a cat", 3.0, QWEN_HEIGHT, QWEN_WIDTH)
    torch.testing.assert_close(backbone.predict(noise, t, conditioning, 3.0), expected, atol=1e-6, rtol=1e-6)
    unguided = backbone.predict(noise, t, backbone.conditioning("a photo of a cat", 1.0, QWEN_HEIGHT, QWEN_WIDTH), 1.0)
    assert (unguided - expected).abs().amax() > 1e-3
