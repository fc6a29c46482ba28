"""Flow inversion on the tiny Z-Image pipeline (its model predicts minus the velocity, takes t as 1 - sigma, and
batches guidance [cond, uncond]), trajectories, and transfer from one through generate_set, at few steps too."""

import numpy as np
import pytest
import torch
from PIL import Image

import stylealigned as sa
from stylealigned.backbones import Backbone, backbone_for
from stylealigned.inversion import invert
from tests.test_dit_inversion import recorded_schedule
from tests.test_sets import record_pins
from tests.zimage_pipelines import HEIGHT, PROMPT_KWARGS, WIDTH

PROMPT = "a photo of a cat"
UNGUIDED = {"guidance_scale": 0.0}  # Z-Image guides for any scale > 0


@pytest.fixture
def pipe(zimage_pipe):
    return zimage_pipe


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A WIDTH x HEIGHT picture with structure: two colour ramps and a darker rectangle."""
    red, green = np.meshgrid(np.linspace(0, 255, WIDTH), np.linspace(255, 0, HEIGHT))
    pixels = np.stack([red, green, np.full((HEIGHT, WIDTH), 128.0)], -1)
    pixels[HEIGHT // 4: HEIGHT // 2, WIDTH // 4: WIDTH // 2] *= 0.3
    return Image.fromarray(pixels.astype(np.uint8))


def sample_from(pipe, z_T, steps, **kwargs):
    """z_0 that the pipeline's own sampler reaches from z_T."""
    return pipe(PROMPT, num_inference_steps=steps, latents=z_T[None], output_type="latent", height=HEIGHT,
                width=WIDTH, **PROMPT_KWARGS, **(UNGUIDED | kwargs)).images[0]


def relative_error(estimate, target) -> float:
    return float((estimate - target).norm() / target.norm())


def pipeline_schedule(pipe, steps, monkeypatch) -> tuple[list[float], list[float]]:
    """The schedule a real pipeline call steps through (`recorded_schedule`)."""
    shape = backbone_for(pipe).packed_shape(HEIGHT, WIDTH)
    return recorded_schedule(pipe.scheduler, steps, monkeypatch, lambda: sample_from(pipe, torch.randn(shape), steps))


def test_round_trip_is_exact_when_the_velocity_depends_on_t_only(pipe, image, monkeypatch):
    """With the model's output o(t) = -v(t), the sampler's Euler steps undo the inversion's exactly: pins the sign,
    the model's t = 1 - t_scheduler / 1000, sigmas, and which timestep each step evaluates."""
    steps = 8
    z_0 = backbone_for(pipe).encode(image)[0][0]
    fixed = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(1))

    def velocity(t_scheduler):
        return fixed * (0.5 + 2 * t_scheduler / 1000)

    def output_of_t_only(module, args, kwargs, output):
        t = float(args[1].flatten()[0])  # the pipeline passes (1000 - t) / 1000
        return ([-velocity(1000 * (1 - t))[:, None].to(row.dtype) for row in output[0]],)

    pipe.transformer.register_forward_hook(output_of_t_only, with_kwargs=True)
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, **UNGUIDED)
    timesteps, sigmas = pipeline_schedule(pipe, steps, monkeypatch)
    assert trajectory.timesteps == timesteps
    for i in range(steps):
        expected = trajectory.latents[i + 1] + (sigmas[i] - sigmas[i + 1]) * velocity(timesteps[i])
        torch.testing.assert_close(trajectory.latents[i], expected, atol=1e-5, rtol=1e-5)
    assert relative_error(sample_from(pipe, trajectory.latents[0], steps), z_0) < 1e-5


@pytest.mark.parametrize("steps", [8, 20])
def test_round_trip_is_far_closer_than_from_random_noise(pipe, image, steps):
    """Unguided both ways. Measured relative misses of z_0 from the inverted z_T: 0.25 at 8 steps, 0.10 at 20;
    from a random z_T of its norm: 1.88 and 1.86 (ratios 0.13 and 0.054)."""
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, **UNGUIDED, **PROMPT_KWARGS)
    z_T, z_0 = trajectory.latents[0], trajectory.latents[-1]
    random = torch.randn(z_T.shape, generator=torch.Generator().manual_seed(1))
    round_trip = relative_error(sample_from(pipe, z_T, steps), z_0)
    from_random = relative_error(sample_from(pipe, random * z_T.norm() / random.norm(), steps), z_0)
    print(f"{steps} steps: round trip {round_trip:.4f}, random start {from_random:.4f}")
    assert round_trip < 0.25 * from_random


def test_trajectory_layout_and_guidance(pipe, image, monkeypatch):
    steps = 4
    unguided = invert(pipe, image, PROMPT, num_inference_steps=steps, **UNGUIDED)
    guided = invert(pipe, image, PROMPT, num_inference_steps=steps, guidance_scale=4.0)
    assert unguided.latents.shape == (steps + 1, 4, HEIGHT // 2, WIDTH // 2)
    assert (unguided.width, unguided.height) == (WIDTH, HEIGHT)
    assert unguided.timesteps == pipeline_schedule(pipe, steps, monkeypatch)[0]
    assert torch.equal(unguided.latents[-1], guided.latents[-1]) and not torch.allclose(unguided.latents[0],
                                                                                       guided.latents[0])
    unguided.check_compatible(pipe, steps, WIDTH, HEIGHT)


@pytest.mark.parametrize("settings", [dict(num_inference_steps=8, **UNGUIDED), dict(num_inference_steps=4,
                                                                                    guidance_scale=4.0)],
                         ids=["turbo", "guided"])
def test_transfer_keeps_the_reference_on_its_trajectory(pipe, image, monkeypatch, settings):
    """generate_set from a trajectory: the reference slot is pinned after every step and decodes z_0; chunked
    targets equal one batch."""
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=settings["num_inference_steps"], **PROMPT_KWARGS,
                        guidance_scale=settings["guidance_scale"])
    pinned, decoded, original_decode = record_pins(monkeypatch), [], Backbone.decode

    def decode_and_record(backbone, latents, height, width):
        decoded.append(latents.clone())
        return original_decode(backbone, latents, height, width)

    monkeypatch.setattr(Backbone, "decode", decode_and_record)
    targets = ["a dog", "a house in oil painting style"]
    images = sa.generate_set(pipe, targets, reference=trajectory, height=HEIGHT, width=WIDTH, **PROMPT_KWARGS,
                             **settings)
    assert len(images) == 3 and all(im.size == (WIDTH, HEIGHT) for im in images)
    steps = settings["num_inference_steps"]
    assert len(pinned) == steps
    for step, latent in enumerate(pinned):
        assert torch.equal(latent, trajectory.latents[step + 1])
    assert torch.equal(decoded[0][0], trajectory.latents[-1])
    sa.generate_set(pipe, targets, reference=trajectory, height=HEIGHT, width=WIDTH, batch_size=1,
                    **PROMPT_KWARGS, **settings)
    assert [len(part) for part in decoded] == [3, 1, 1, 1]  # one decode of the set, then one per chunk
    torch.testing.assert_close(torch.cat(decoded[1:]), decoded[0], atol=1e-4, rtol=1e-4)
