"""DDIM inversion, the forward-noising reference mode and Trajectory files, on the tiny pipelines."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image

from stylealigned.errors import UserError
from stylealigned.inversion import Trajectory, encode_image, invert
from tests.conftest import SIZE
from tests.tolerance import assert_rounding_close

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A smooth picture with some structure: two colour ramps and a darker square."""
    ramp = np.linspace(0, 255, SIZE)
    red, green = np.meshgrid(ramp, ramp[::-1])
    pixels = np.stack([red, green, np.full((SIZE, SIZE), 128.0)], -1)
    pixels[SIZE // 4 : SIZE // 2, SIZE // 4 : SIZE // 2] *= 0.3
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(params=["sd_pipe", "sdxl_pipe"])
def pipe(request):
    return request.getfixturevalue(request.param)


def sample_from(pipe, z_T: torch.Tensor, steps: int) -> torch.Tensor:
    """z_0 that the pipeline's own DDIM sampler reaches from z_T, without guidance."""
    return pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=1.0, latents=z_T[None], output_type="latent",
        height=SIZE, width=SIZE,
    ).images[0]


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    return float((estimate - target).norm() / target.norm())


def count_unet_calls(pipe) -> list:
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def test_ddim_round_trip_is_exact_when_eps_ignores_the_latent(pipe, image):
    """If eps depends on t only, the sampler undoes the inversion exactly: this pins the alphas and timesteps."""
    fixed = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1))

    def eps_of_t_only(module, args, kwargs, output):
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        return (fixed.expand_as(output[0]) * (1 + float(timestep) / 1000),)

    pipe.unet.register_forward_hook(eps_of_t_only, with_kwargs=True)
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=10)
    assert relative_error(sample_from(pipe, trajectory.latents[0], 10), trajectory.latents[-1]) < 1e-4


def test_ddim_round_trip_is_far_closer_than_from_random_noise(pipe, image):
    """Sampling back from z_T lands far nearer z_0 than sampling from a random z_T of the same norm.

    A random-weight UNet makes the sampler strongly expansive, so even a correct inversion misses z_0 by about 10x
    (SD) and 21x (SDXL) its norm at 50 steps; that is 7% and 21% of the random start's miss (20 steps: 14%, 29%).
    A flipped update gives 125-160% and plain forward noising 210-300%. Schedule slips of one step hide in the
    random UNet's own error; the exact test above pins those.
    """
    steps = 50
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps)
    z_T, z_0 = trajectory.latents[0], trajectory.latents[-1]
    random = torch.randn(z_T.shape, generator=torch.Generator().manual_seed(1))
    round_trip = relative_error(sample_from(pipe, z_T, steps), z_0)
    from_random = relative_error(sample_from(pipe, random * z_T.norm() / random.norm(), steps), z_0)
    print(f"round trip {round_trip:.3f}, random start {from_random:.3f}, ratio {round_trip / from_random:.3f}")
    assert round_trip < 0.25 * from_random


def test_trajectory_layout(pipe, image):
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=4, guidance_scale=3.0)
    pipe.scheduler.set_timesteps(4)
    assert trajectory.latents.shape == (5, 4, SIZE // 2, SIZE // 2)
    assert trajectory.latents.dtype == torch.float32 and trajectory.latents.device.type == "cpu"
    assert trajectory.timesteps == pipe.scheduler.timesteps.tolist()
    assert (trajectory.width, trajectory.height, trajectory.mode) == (SIZE, SIZE, "ddim")
    assert trajectory.model == str(pipe.name_or_path) and trajectory.guidance_scale == 3.0
    assert torch.equal(trajectory.latents[-1], encode_image(pipe, image)[0])


def test_guidance_changes_the_inversion(sd_pipe, image):
    unguided, guided = (invert(sd_pipe, image, PROMPT, 4, guidance_scale=scale).latents for scale in (1.0, 5.0))
    assert torch.equal(unguided[-1], guided[-1]) and not torch.allclose(unguided[0], guided[0])


def test_encode_image_uses_the_mean_in_fp32_and_restores_the_vae_dtype(sd_pipe, image):
    sd_pipe.vae.half()
    from_half = encode_image(sd_pipe, image)
    assert sd_pipe.vae.dtype == torch.float16 and from_half.dtype == torch.float32
    sd_pipe.vae.float()
    assert torch.equal(from_half, encode_image(sd_pipe, image))


def test_noise_mode_follows_the_closed_form_without_unet_calls(sd_pipe, image):
    calls = count_unet_calls(sd_pipe)
    trajectory = invert(sd_pipe, image, PROMPT, num_inference_steps=5, mode="noise", seed=7)
    assert calls == [] and trajectory.mode == "noise"
    z_0 = trajectory.latents[-1]
    assert torch.equal(z_0, encode_image(sd_pipe, image)[0])
    alpha_bars = sd_pipe.scheduler.alphas_cumprod[trajectory.timesteps].view(-1, 1, 1, 1)
    noise = (trajectory.latents[0] - alpha_bars[0].sqrt() * z_0) / (1 - alpha_bars[0]).sqrt()
    expected = alpha_bars.sqrt() * z_0 + (1 - alpha_bars).sqrt() * noise
    torch.testing.assert_close(trajectory.latents[:-1], expected, rtol=1e-5, atol=1e-5)
    assert 0.9 < noise.std() < 1.1
    again = invert(sd_pipe, image, PROMPT, num_inference_steps=5, mode="noise", seed=7)
    other_seed = invert(sd_pipe, image, PROMPT, num_inference_steps=5, mode="noise", seed=8)
    assert torch.equal(again.latents, trajectory.latents) and not torch.equal(other_seed.latents, trajectory.latents)


def test_img2img_pipelines_invert_like_their_text_to_image_pipeline(sd_pipe, sdxl_pipe, image):
    for text_to_image, img2img_class in ((sd_pipe, StableDiffusionImg2ImgPipeline),
                                         (sdxl_pipe, StableDiffusionXLImg2ImgPipeline)):
        img2img = img2img_class(**text_to_image.components)
        img2img.set_progress_bar_config(disable=True)
        expected = invert(text_to_image, image, PROMPT, num_inference_steps=3, guidance_scale=2.0).latents
        assert torch.equal(invert(img2img, image, PROMPT, num_inference_steps=3, guidance_scale=2.0).latents, expected)


def test_unsupported_pipeline_and_mode_are_user_errors(sd_pipe, image):
    with pytest.raises(UserError, match="does not support object"):
        invert(object(), image, PROMPT)
    with pytest.raises(UserError, match="unknown inversion mode"):
        invert(sd_pipe, image, PROMPT, mode="exact")


def test_save_load_round_trip_is_exact(sd_pipe, image, tmp_path):
    trajectory = invert(sd_pipe, image, PROMPT, num_inference_steps=3, guidance_scale=2.0)
    path = tmp_path / "reference.safetensors"
    trajectory.save(path)
    loaded = Trajectory.load(path)
    assert torch.equal(loaded.latents, trajectory.latents)
    assert dataclasses.replace(loaded, latents=None) == dataclasses.replace(trajectory, latents=None)
    with pytest.raises(UserError, match="already exists"):
        trajectory.save(path)
    trajectory.save(path, overwrite=True)


@pytest.mark.parametrize("content", [None, b"", b"not a safetensors file"])
def test_missing_or_corrupt_trajectory_file_is_a_user_error(tmp_path, content):
    path = tmp_path / "reference.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match="invert the reference again"):
        Trajectory.load(path)


def test_compatibility_check_names_the_mismatch(sd_pipe, image):
    trajectory = invert(sd_pipe, image, PROMPT, num_inference_steps=3, mode="noise")
    trajectory.check_compatible(sd_pipe, 3, SIZE, SIZE)
    with pytest.raises(UserError, match="inverted with model"):
        dataclasses.replace(trajectory, model="another/model").check_compatible(sd_pipe, 3, SIZE, SIZE)
    with pytest.raises(UserError, match=f"{SIZE}x{SIZE} but {2 * SIZE}x{SIZE}"):
        trajectory.check_compatible(sd_pipe, 3, 2 * SIZE, SIZE)
    with pytest.raises(UserError, match="has 3 steps but 4"):
        trajectory.check_compatible(sd_pipe, 4, SIZE, SIZE)
    sd_pipe.register_modules(scheduler=type(sd_pipe.scheduler).from_config(
        sd_pipe.scheduler.config, timestep_spacing="trailing"))
    with pytest.raises(UserError, match="timesteps differ"):
        trajectory.check_compatible(sd_pipe, 3, SIZE, SIZE)


def test_a_v_prediction_is_read_as_the_noise_it_stands_for():
    """v = sqrt(abar) eps - sqrt(1 - abar) z_0 at z_t = sqrt(abar) z_0 + sqrt(1 - abar) eps gives eps back."""
    from stylealigned.inversion import as_eps

    generator = torch.Generator().manual_seed(0)
    z_0, eps = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64).unbind()
    alpha_bar = torch.tensor(0.37, dtype=torch.float64)
    z_t = alpha_bar.sqrt() * z_0 + (1 - alpha_bar).sqrt() * eps
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * z_0
    assert_rounding_close(as_eps(v, z_t, alpha_bar, "v_prediction"), eps, depth=8)  # v, z_t, then as_eps: 8 ops
    assert as_eps(eps, z_t, alpha_bar, "epsilon") is eps
    with pytest.raises(UserError, match="predicts 'sample'"):
        as_eps(eps, z_t, alpha_bar, "sample")
