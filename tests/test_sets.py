"""generate_set: chunked == one batch, subsets reproduce the set, trajectory references stay pinned."""

import pytest
import torch

import stylealigned as sa
from stylealigned import sets
from stylealigned.apply import hooked_layers
from stylealigned.backbones import backbone_for
from stylealigned.inversion import invert
from tests.tolerance import assert_rounding_close, denoising_depth

PROMPTS = ["a cat in watercolor style", "a dog", "a house", "a tree", "a car", "a bird", "a red cat", "a blue dog",
           "a tree in oil style"]
SETTINGS = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)


def loop_depth(pipe) -> int:
    """The depth of one set's denoising loop (tests/tolerance.py)."""
    return denoising_depth(pipe, SETTINGS["num_inference_steps"])


def set_latents(pipe, prompts, decoded, **kwargs):
    decoded.clear()
    found = {}
    sa_images = sets.generate_set(pipe, prompts, seed=7, **SETTINGS, **kwargs,
                                  on_image=lambda i, image: found.setdefault(i, image.info["latent"]))
    assert len(sa_images) == len(found)
    return found


def test_one_chunk_equals_the_apply_path(sd_pipe, decoded):
    sd_pipe.to(dtype=torch.float64)  # up to the rounding of the loop: tests/tolerance.py
    ours = set_latents(sd_pipe, PROMPTS[:4], decoded)
    with sa.apply(sd_pipe):
        expected = sd_pipe(PROMPTS[:4], latents=backbone_for(sd_pipe).initial_noise(range(4), 7, 32, 32),
                           output_type="latent", **SETTINGS).images
    assert_rounding_close(torch.stack([ours[i] for i in range(4)]), expected, loop_depth(sd_pipe))


@pytest.mark.parametrize("pipe_name", ["sd_pipe", "sdxl_pipe"])
def test_batches_of_four_equal_one_batch_of_nine(request, pipe_name, decoded):
    pipe = request.getfixturevalue(pipe_name).to(dtype=torch.float64)  # tests/tolerance.py
    whole = set_latents(pipe, PROMPTS, decoded, batch_size=9)
    chunked = set_latents(pipe, PROMPTS, decoded, batch_size=4)
    waves = set_latents(pipe, PROMPTS, decoded, batch_size=2, wave_size=3)
    assert sorted(whole) == sorted(chunked) == sorted(waves) == list(range(9))
    for i in range(9):
        assert_rounding_close(chunked[i], whole[i], loop_depth(pipe))
        assert_rounding_close(waves[i], whole[i], loop_depth(pipe))


def test_a_subset_of_positions_reproduces_the_set(sd_pipe, decoded):
    sd_pipe.to(dtype=torch.float64)  # tests/tolerance.py
    whole = set_latents(sd_pipe, PROMPTS[:6], decoded, batch_size=2)
    part = set_latents(sd_pipe, PROMPTS[:6], decoded, batch_size=2, indices=[2, 5])
    assert sorted(part) == [2, 5]
    for i in (2, 5):
        assert_rounding_close(part[i], whole[i], loop_depth(sd_pipe))


def test_images_are_pil_in_order(sd_pipe, decoded):
    """The list holds image i at index i: the image made for position i (its own seed and prompt), whatever the
    order in which chunks finish."""
    by_position = {}
    images = sets.generate_set(sd_pipe, PROMPTS[:5], seed=7, batch_size=2, **SETTINGS,
                               on_image=lambda i, image: by_position.setdefault(i, image))
    assert [im.size for im in images] == [(32, 32)] * 5
    assert all(images[i] is by_position[i] for i in range(5))
    again = set_latents(sd_pipe, PROMPTS[:5], decoded, batch_size=2, indices=[3, 4])  # the same chunk, alone
    assert torch.equal(images[3].info["latent"], again[3]) and torch.equal(images[4].info["latent"], again[4])
    assert not torch.equal(images[2].info["latent"], again[3])


def test_a_single_prompt_is_just_the_reference(sd_pipe):
    assert len(sets.generate_set(sd_pipe, PROMPTS[:1], **SETTINGS)) == 1


@pytest.mark.parametrize("bad", [dict(prompts=[]), dict(batch_size=0), dict(indices=[12])])
def test_bad_arguments_are_user_errors(sd_pipe, bad):
    arguments = dict(prompts=PROMPTS[:3], **SETTINGS) | bad
    with pytest.raises(sa.UserError):
        sets.generate_set(sd_pipe, arguments.pop("prompts"), **arguments)


def test_full_attention_share_cannot_be_chunked(sd_pipe):
    with pytest.raises(ValueError, match="cannot run in chunks"):
        sets.generate_set(sd_pipe, PROMPTS[:4], sa.StyleAlignedConfig(full_attention_share=True), batch_size=2,
                          **SETTINGS)


def record_pins(monkeypatch) -> list:
    """The reference slot's latent after each step, as generate_set's step-end callback pins it."""
    pinned, original = [], sets.pin_reference

    def pin_and_record(trajectory, offset):
        pin = original(trajectory, offset)

        def callback(pipe, step, timestep, tensors):
            result = pin(pipe, step, timestep, tensors)
            pinned.append(result["latents"][0].clone())
            return result

        return callback

    monkeypatch.setattr(sets, "pin_reference", pin_and_record)
    return pinned


@pytest.mark.parametrize("offset", [0, 1])
def test_reference_slot_follows_the_trajectory(sd_pipe, offset, decoded, monkeypatch):
    from PIL import Image

    trajectory = invert(sd_pipe, Image.new("RGB", (32, 32), (200, 40, 40)), "a cat", num_inference_steps=4)
    pinned = record_pins(monkeypatch)
    decoded.clear()
    images = sets.generate_set(sd_pipe, ["a dog", "a house"], sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True), reference=trajectory,
                               offset=offset, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                               batch_size=1)
    assert len(images) == 3 and len(pinned) == 4
    for step, latent in enumerate(pinned):
        assert torch.equal(latent, trajectory.latents[max(offset + 1, step + 1)])
    assert torch.equal(decoded[0][0], trajectory.latents[-1])


def test_a_callers_step_end_callback_runs_after_the_pin(sd_pipe):
    """The set's step-end callbacks and the caller's compose into the call's one: the caller sees pinned latents,
    and gets the tensors it asks for."""
    from diffusers.callbacks import PipelineCallback
    from PIL import Image

    trajectory = invert(sd_pipe, Image.new("RGB", (32, 32), (40, 200, 40)), "a cat", num_inference_steps=3)
    seen = []

    class Look(PipelineCallback):
        tensor_inputs = ("prompt_embeds",)

        def callback_fn(self, pipe, step, timestep, tensors):
            seen.append((tensors["latents"][0].clone(), tensors["prompt_embeds"].shape))
            return {}

    sets.generate_set(sd_pipe, ["a dog"], sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True), reference=trajectory,
                      callback_on_step_end=Look(), **SETTINGS)
    assert len(seen) == 3
    for step, (latent, shape) in enumerate(seen):
        assert torch.equal(latent, trajectory.latents[step + 1]) and shape[0] == 4  # two images, two groups


def test_trajectory_mismatch_is_a_user_error(sd_pipe):
    from PIL import Image

    trajectory = invert(sd_pipe, Image.new("RGB", (32, 32)), "a cat", num_inference_steps=4)
    with pytest.raises(sa.UserError, match="steps"):
        sets.generate_set(sd_pipe, ["a dog"], reference=trajectory, num_inference_steps=3, height=32, width=32)


def test_inverting_under_an_applied_handle_uses_the_plain_model(sd_pipe):
    from PIL import Image

    image = Image.new("RGB", (32, 32), (20, 90, 200))
    plain = invert(sd_pipe, image, "a cat", num_inference_steps=3, guidance_scale=3.0)
    sd_pipe(["a cat", "a dog"], num_inference_steps=1, height=32, width=32, guidance_scale=1.0)  # stale guidance
    with sa.apply(sd_pipe, sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)) as handle:
        applied = invert(sd_pipe, image, "a cat", num_inference_steps=3, guidance_scale=3.0)
        assert hooked_layers(sd_pipe.unet) and handle.active
    assert torch.equal(plain.latents, applied.latents)
