"""Flow inversion (the Euler step run backwards) on every transformer family's tiny pipeline (tests/families.py) and
the FLUX.1-schnell and Chroma variants: exact round trips, the noise mode, trajectories and their files, the schedule
at every size, and transfer from a trajectory through generate_set."""

import dataclasses
import functools

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

import stylealigned as sa
from stylealigned.backbones import backbone_for
from stylealigned.inversion import Trajectory, invert
from tests.families import FLUX, FLUX2, QWEN, SD3, ZIMAGE, Family
from tests.test_sets import record_pins

PROMPT = "a photo of a cat"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A family's pipeline as one fixture loads it, and its sampling settings without guidance (those of an
    unguided inversion)."""

    name: str
    family: Family
    fixture: str
    unguided: dict


VARIANTS = {variant.name: variant for variant in [
    Variant("flux", FLUX, "flux_pipe", {}),  # FLUX.1-dev keeps its embedded default guidance
    Variant("flux-schnell", FLUX, "flux_schnell_pipe", {}),
    Variant("chroma", FLUX, "chroma_pipe", {"guidance_scale": 1.0}),  # Chroma's CFG: a second call
    Variant("sd3", SD3, "sd3_pipe", {"guidance_scale": 1.0}),
    Variant("flux2", FLUX2, "flux2_pipe", {"guidance_scale": 1.0}),
    Variant("qwen", QWEN, "qwen_pipe", {}),  # true CFG only with a negative prompt
    Variant("zimage", ZIMAGE, "zimage_pipe", {"guidance_scale": 0.0}),  # Z-Image guides for any scale > 0
]}
DIT = ("flux", "flux-schnell", "chroma", "sd3")


def variants(*names: str) -> list:
    return [pytest.param(VARIANTS[name], id=name) for name in names]


def rescheduled(pipe, **changes):
    pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, **changes))
    return pipe


@pytest.fixture
def flux_schnell_pipe(flux_pipe):
    """The tiny FLUX pipeline on FLUX.1-schnell's schedule: no resolution-dependent shift (the stock tiny FLUX
    pipeline has FLUX.1-dev's dynamic shifting)."""
    return rescheduled(flux_pipe, use_dynamic_shifting=False, shift=1.0)


@pytest.fixture
def sd3_dynamic_pipe(sd3_pipe):
    """The tiny SD3 pipeline with resolution-dependent shifting (mu from the patch count)."""
    return rescheduled(sd3_pipe, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)


@functools.cache
def picture(height: int, width: int) -> Image.Image:
    """Two colour ramps and a darker block, width x height."""
    red, green = np.meshgrid(np.linspace(0, 255, width), np.linspace(255, 0, height))
    pixels = np.stack([red, green, np.full((height, width), 128.0)], -1)
    pixels[height // 4: height // 2, width // 4: width // 2] *= 0.3
    return Image.fromarray(pixels.astype(np.uint8))


def loaded(request, variant: Variant):
    """The variant's pipeline and its picture."""
    return request.getfixturevalue(variant.fixture), picture(variant.family.height, variant.family.width)


def final_latent(variant, pipe, z_T: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    """z_0 (the denoising loop's layout) that the pipeline's own sampler reaches from z_T, unguided unless kwargs say
    otherwise."""
    family, seen = variant.family, []

    def keep(pipe, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return tensors

    pipe(prompt=PROMPT, num_inference_steps=steps, height=family.height, width=family.width, output_type="latent",
         latents=backbone_for(pipe).start_latents(z_T[None], family.height, family.width), callback_on_step_end=keep,
         **family.prompt_kwargs, **(variant.unguided | kwargs))
    return seen[-1][0]


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    return float((estimate - target).norm() / target.norm())


def recorded_schedule(scheduler, steps: int, monkeypatch, run) -> tuple[list[float], list[float]]:
    """(timesteps, sigmas + final 0) that `run()`, a real pipeline call, steps through, read off its scheduler."""
    seen, original = [], scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        out = original(model_output, timestep, sample, *args, **kwargs)
        seen.append((float(timestep), float(scheduler.sigmas[scheduler.step_index - 1])))
        return out

    monkeypatch.setattr(scheduler, "step", step)
    run()
    monkeypatch.undo()
    assert len(seen) == steps
    return [t for t, _ in seen], [s for _, s in seen] + [float(scheduler.sigmas[-1])]


def pipeline_schedule(pipe, steps: int, monkeypatch, height: int, width: int,
                      prompt_kwargs=FLUX.prompt_kwargs) -> tuple[list[float], list[float]]:
    """The schedule a real pipeline call at this size steps through (`recorded_schedule`)."""
    return recorded_schedule(pipe.scheduler, steps, monkeypatch, lambda: pipe(
        prompt=PROMPT, num_inference_steps=steps, height=height, width=width, output_type="latent", **prompt_kwargs))


def schedule(variant, pipe, steps, monkeypatch):
    family = variant.family
    return pipeline_schedule(pipe, steps, monkeypatch, family.height, family.width, family.prompt_kwargs)


def z_0_of(pipe, image) -> torch.Tensor:
    return backbone_for(pipe).encode(image)[0][0]


# the round trip


def time_of(variant, args, kwargs) -> float:
    """The scheduler's t / 1000 that a transformer call evaluates: FLUX, Chroma and Qwen-Image take it as such, SD3
    as t, Z-Image as 1 - t / 1000 (its second argument)."""
    if variant.family is ZIMAGE:
        return 1 - float(args[1].flatten()[0])
    return float(kwargs["timestep"].flatten()[0]) / (1000.0 if variant.family is SD3 else 1.0)


def as_output(variant, velocity: torch.Tensor, output):
    """The transformer's output for this velocity: Z-Image predicts minus it, one [C, 1, H, W] row per image."""
    if variant.family is ZIMAGE:
        return ([-velocity[:, None].to(row.dtype) for row in output[0]],)
    return (velocity.expand_as(output[0]).to(output[0].dtype),)


@pytest.mark.parametrize("variant", variants(*DIT, "qwen", "zimage"))
def test_round_trip_is_exact_when_the_velocity_depends_on_t_only(request, variant, monkeypatch):
    """With v = v(t), the sampler's Euler steps undo the inversion's exactly, step by step: pins sigmas, timesteps,
    which timestep each step evaluates the velocity at, the model's sign and time convention, and the latent layout
    (packing, the VAE's scaling) both ways."""
    pipe, image = loaded(request, variant)
    steps = 8
    z_0 = z_0_of(pipe, image)
    fixed = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(1))

    def velocity(t):
        return fixed * (0.5 + 2 * t)

    def velocity_of_t_only(module, args, kwargs, output):
        return as_output(variant, velocity(time_of(variant, args, kwargs)), output)

    pipe.transformer.register_forward_hook(velocity_of_t_only, with_kwargs=True)
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, **variant.unguided)
    assert torch.equal(trajectory.latents[-1], z_0)
    timesteps, sigmas = schedule(variant, pipe, steps, monkeypatch)
    assert trajectory.timesteps == timesteps
    for i in range(steps):  # z_i = z_{i+1} + (sigma_i - sigma_{i+1}) v(t_i), at the pipeline's own schedule
        expected = trajectory.latents[i + 1] + (sigmas[i] - sigmas[i + 1]) * velocity(timesteps[i] / 1000)
        torch.testing.assert_close(trajectory.latents[i], expected, atol=1e-5, rtol=1e-5)
    assert relative_error(final_latent(variant, pipe, trajectory.latents[0], steps), z_0) < 1e-5


ROUND_TRIPS = [pytest.param(VARIANTS[name], steps, bound, id=f"{name}-{steps}") for name, steps, bound in [
    *((name, 10, 0.25) for name in DIT), ("qwen", 10, 0.5), ("zimage", 8, 0.25), ("zimage", 20, 0.25),
    ("flux2", 50, 0.25)]]


@pytest.mark.parametrize("variant, steps, bound", ROUND_TRIPS)
def test_round_trip_is_far_closer_than_from_random_noise(request, variant, steps, bound):
    """Inverted unguided, sampled with the pipeline's own sampler (FLUX at its default embedded guidance, 3.5), the
    random-weight model misses z_0 by a fraction of the miss from a random z_T of the same norm; a flipped update or
    plain forward noising misses by about as much as a random start (ratios 0.98-1.02). Measured ratios: at 10 steps
    FLUX.1-dev schedule 0.065, FLUX.1-schnell 0.058, Chroma 0.048, SD3 0.025, Qwen-Image 0.10; Z-Image 0.13 at 8,
    0.054 at 20; FLUX.2, whose empirical shift puts a tiny image's last step at a large sigma, 0.53 at 8 steps,
    0.24 at 20, 0.094 at 50. (With the T5 length of the inversion unlike the sampling's, FLUX gave 0.13 and Chroma
    0.26.)"""
    pipe, image = loaded(request, variant)
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, **variant.unguided,
                        **variant.family.prompt_kwargs)  # the text length as sampled
    z_T, z_0 = trajectory.latents[0], trajectory.latents[-1]
    random = torch.randn(z_T.shape, generator=torch.Generator().manual_seed(1))
    round_trip = relative_error(final_latent(variant, pipe, z_T, steps), z_0)
    from_random = relative_error(final_latent(variant, pipe, random * z_T.norm() / random.norm(), steps), z_0)
    print(f"{variant.name}, {steps} steps: round trip {round_trip:.4f}, random start {from_random:.4f}, "
          f"ratio {round_trip / from_random:.4f}")
    assert round_trip < bound * from_random


# the noise mode and the trajectory's layout


def latent_shape(variant) -> tuple[int, ...]:
    """One latent of a trajectory: FLUX.1 and FLUX.2 pack 2x2 patches of the VAE's latent into 16-channel tokens,
    Qwen-Image too (its VAE's factor 4); SD3 and Z-Image keep the 4-channel grid (the VAE's factor 2)."""
    height, width, name = variant.family.height, variant.family.width, variant.family.name
    if name in ("flux", "flux2"):
        return ((height // 4) * (width // 4), 16)
    if name == "qwen":
        return ((height // 8) * (width // 8), 16)
    return (4, height // 2, width // 2)


LAYOUTS = [pytest.param(VARIANTS[name], mode, id=f"{name}-{mode}") for name in DIT for mode in ("ddim", "noise")] + [
    pytest.param(VARIANTS[name], "ddim", id=f"{name}-ddim") for name in ("flux2", "qwen", "zimage")]


@pytest.mark.parametrize("variant, mode", LAYOUTS)
def test_trajectory_layout_and_timesteps(request, variant, mode, monkeypatch):
    pipe, image = loaded(request, variant)
    steps, height, width = 4, variant.family.height, variant.family.width
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, guidance_scale=3.0, mode=mode)
    assert trajectory.latents.shape == (steps + 1, *latent_shape(variant))
    assert trajectory.latents.dtype == torch.float32 and trajectory.latents.device.type == "cpu"
    assert torch.isfinite(trajectory.latents).all()
    timesteps, _ = schedule(variant, pipe, steps, monkeypatch)
    assert trajectory.timesteps == timesteps  # sigma x 1000, exactly as the pipeline steps through them
    assert (trajectory.width, trajectory.height, trajectory.mode) == (width, height, mode)
    assert trajectory.model == str(pipe.name_or_path) and trajectory.guidance_scale == 3.0
    assert trajectory.prompt == PROMPT
    assert torch.equal(trajectory.latents[-1], z_0_of(pipe, image))
    trajectory.check_compatible(pipe, steps, width, height)


@pytest.mark.parametrize("variant", variants(*DIT))
def test_noise_mode_follows_the_interpolation_without_transformer_calls(request, variant, monkeypatch):
    pipe, image = loaded(request, variant)
    steps, calls = 5, []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, mode="noise", seed=7)
    assert calls == [] and trajectory.mode == "noise"
    z_0 = trajectory.latents[-1]
    assert torch.equal(z_0, z_0_of(pipe, image))
    noise = torch.randn(z_0[None].shape, generator=torch.Generator("cpu").manual_seed(7))[0]
    timesteps, sigmas = schedule(variant, pipe, steps, monkeypatch)
    assert trajectory.timesteps == timesteps and sigmas[0] == 1.0
    expected = torch.stack([(1 - sigma) * z_0 + sigma * noise for sigma in sigmas[:-1]])
    torch.testing.assert_close(trajectory.latents[:-1], expected, atol=1e-6, rtol=1e-6)
    again = invert(pipe, image, PROMPT, num_inference_steps=steps, mode="noise", seed=7)
    other_seed = invert(pipe, image, PROMPT, num_inference_steps=steps, mode="noise", seed=8)
    assert torch.equal(again.latents, trajectory.latents) and not torch.equal(other_seed.latents, trajectory.latents)


@pytest.mark.parametrize("variant", variants(*DIT, "zimage"))
def test_guidance_changes_the_inversion(request, variant):
    """SD3 and Z-Image batch CFG; FLUX.1-dev-style transformers embed the guidance value."""
    pipe, image = loaded(request, variant)
    unguided, guided = (invert(pipe, image, PROMPT, 4, **settings).latents
                        for settings in (variant.unguided, {"guidance_scale": 5.0}))
    assert torch.equal(unguided[-1], guided[-1]) and not torch.allclose(unguided[0], guided[0])


@pytest.mark.parametrize("variant", variants(*DIT))
def test_an_applied_handle_does_not_touch_the_inversion(request, variant):
    pipe, image = loaded(request, variant)
    plain = invert(pipe, image, PROMPT, num_inference_steps=3)
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0)) as handle:
        applied = invert(pipe, image, PROMPT, num_inference_steps=3)
        assert handle.active and handle.layers
    assert torch.equal(plain.latents, applied.latents)


# files and compatibility


@pytest.mark.parametrize("variant", variants(*DIT))
def test_save_load_round_trip_is_exact(request, variant, tmp_path):
    pipe, image = loaded(request, variant)
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=3, guidance_scale=2.0)
    path = tmp_path / "reference.safetensors"
    trajectory.save(path)
    loaded_back = Trajectory.load(path)
    assert torch.equal(loaded_back.latents, trajectory.latents)
    assert loaded_back.latents.shape == trajectory.latents.shape
    assert dataclasses.replace(loaded_back, latents=None) == dataclasses.replace(trajectory, latents=None)
    loaded_back.check_compatible(pipe, 3, variant.family.width, variant.family.height)


def test_a_flux_trajectory_is_refused_by_the_sd3_pipeline(flux_schnell_pipe, sd3_pipe, tmp_path):
    size = SD3.height
    trajectory = invert(flux_schnell_pipe, picture(FLUX.height, FLUX.width), PROMPT, num_inference_steps=3)
    trajectory.save(tmp_path / "flux.safetensors")
    trajectory = Trajectory.load(tmp_path / "flux.safetensors")
    with pytest.raises(sa.UserError, match="inverted with model") as refused:
        trajectory.check_compatible(sd3_pipe, 3, size, size)
    assert "\n" not in str(refused.value)
    with pytest.raises(sa.UserError, match="inverted with model"):
        sa.generate_set(sd3_pipe, ["a dog"], reference=trajectory, num_inference_steps=3, height=size, width=size,
                        **SD3.prompt_kwargs)
    # the same model name (pipelines built in memory, say) still fails: another latent layout, in one line
    renamed = dataclasses.replace(trajectory, model=str(sd3_pipe.name_or_path))
    with pytest.raises(sa.UserError, match=r"latents are \(64, 16\) but a 32x32 latent of this model is") as refused:
        renamed.check_compatible(sd3_pipe, 3, size, size)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("pipe_name", ["flux_pipe", "flux_schnell_pipe", "sd3_pipe", "sd3_dynamic_pipe"])
@pytest.mark.parametrize("height, width", [(32, 32), (64, 32), (32, 96)])
def test_the_inversion_schedule_is_the_pipelines_at_every_size(request, pipe_name, height, width, monkeypatch):
    """FLUX.1-dev and SD3 with dynamic shifting shift the schedule by the image's token count: sizes must agree."""
    pipe = request.getfixturevalue(pipe_name)
    timesteps, sigmas = pipeline_schedule(pipe, 4, monkeypatch, height=height, width=width)
    scheduled = backbone_for(pipe).scheduled(4, height, width)
    assert scheduled.timesteps.tolist() == timesteps and scheduled.sigmas.tolist() == sigmas
    assert sa.inversion.sampling_timesteps(pipe, 4, width, height) == timesteps


# transfer from a trajectory


def record_reference_slot(pipe) -> list[torch.Tensor]:
    """Slot 0 (the reference, the first of each guidance group) of every latent batch the transformer sees."""
    seen = []

    def record(module, args, kwargs):
        batch = kwargs.get("hidden_states")
        if batch is None:  # Z-Image: a list of [C, 1, H, W] latents, its first argument
            batch = torch.stack([latent[:, 0] for latent in (args[0] if args else kwargs["x"])])
        groups = backbone_for(pipe).guidance_groups()  # with batched CFG: two groups
        rows = batch.unflatten(0, (groups, -1))[:, 0]
        assert all(torch.equal(row, rows[0]) for row in rows)  # the same latent in every guidance group
        seen.append(rows[0].float().clone())

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


# (variant, sampling settings, inversion guidance): one transformer call per step (FLUX.1 embeds its guidance, SD3
# and Z-Image batch CFG, Chroma and Qwen-Image unguided), 4 steps unless said
TRANSFERS = [pytest.param(VARIANTS[name], offset, settings, guidance, id=f"{name}-{offset}")
             for name, settings, guidance in [*((name, {}, 1.0) for name in ("flux", "flux-schnell", "sd3")),
                                              ("chroma", {"guidance_scale": 1.0}, 1.0), ("qwen", {}, 2.0),
                                              ("zimage", {"guidance_scale": 4.0}, 4.0)]
             for offset in (0, 1)] + [  # Z-Image-Turbo's setting: few steps, no guidance either way
    pytest.param(VARIANTS["zimage"], 0, dict(num_inference_steps=8, guidance_scale=0.0), 0.0, id="zimage-0-turbo")]


@pytest.mark.parametrize("variant, offset, settings, inversion_guidance", TRANSFERS)
def test_transfer_keeps_the_reference_pinned_on_the_trajectory(request, variant, offset, settings, inversion_guidance,
                                                               monkeypatch, decoded):
    """generate_set from a trajectory: the reference slot is pinned after every step, each step's transformer call
    starts from the trajectory, the reference decodes the inverted image's z_0, and (from the start) a set in chunks
    equals one batch."""
    pipe, image = loaded(request, variant)
    family = variant.family
    settings = dict(num_inference_steps=4) | settings
    steps = settings["num_inference_steps"]
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, guidance_scale=inversion_guidance,
                        **family.prompt_kwargs)
    pinned, inputs = record_pins(monkeypatch), record_reference_slot(pipe)
    targets = ["a dog", "a house in oil painting style"]
    size = dict(height=family.height, width=family.width)
    images = sa.generate_set(pipe, targets, reference=trajectory, offset=offset, **size, **family.prompt_kwargs,
                             **settings)
    assert len(images) == 3 and all(im.size == (family.width, family.height) for im in images)
    assert len(pinned) == steps and len(inputs) == steps
    for step, latent in enumerate(pinned):  # after every step
        assert torch.equal(latent, trajectory.latents[max(offset + 1, step + 1)])
    assert torch.equal(inputs[0], trajectory.latents[offset])  # what each step's transformer call starts from
    for step in range(1, steps):
        assert torch.equal(inputs[step], trajectory.latents[max(offset + 1, step)])
    assert torch.equal(decoded[0][0], trajectory.latents[-1])
    if offset:
        return
    sa.generate_set(pipe, targets, reference=trajectory, offset=offset, batch_size=1, **size, **family.prompt_kwargs,
                    **settings)
    assert [len(part) for part in decoded] == [3, 1, 1, 1]  # one decode of the set, then one per chunk
    torch.testing.assert_close(torch.cat(decoded[1:]), decoded[0], atol=1e-4, rtol=1e-4)
