"""Flow inversion (the Euler step run backwards), the noise mode and trajectories on the tiny FLUX.1 and SD3.5
pipelines, and transfer from a trajectory through generate_set."""

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import stylealigned as sa
from stylealigned.backbones import Backbone, backbone_for
from stylealigned.inversion import Trajectory, invert
from tests.dit_pipelines import FLUX_SIZE, PROMPT_KWARGS, SD3_SIZE
from tests.test_sets import record_pins
from tests.test_inversion import image  # noqa: F401 (fixture: FLUX_SIZE = SD3_SIZE = the UNets' SIZE)

PROMPT = "a photo of a cat"
SIZES = {"flux": FLUX_SIZE, "chroma": FLUX_SIZE, "sd3": SD3_SIZE}


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


@pytest.fixture(params=["flux", "flux_schnell", "chroma", "sd3"], ids=lambda name: name.replace("_", "-"))
def pipe(request):
    return request.getfixturevalue(f"{request.param}_pipe")


def family(pipe) -> str:
    return backbone_for(pipe).family


def size(pipe) -> int:
    return SIZES[family(pipe)]


def no_guidance(pipe) -> dict:
    """Sampling settings that match an unguided inversion: SD3 and Chroma without CFG; FLUX keeps its embedded
    default."""
    return {"guidance_scale": 1.0} if family(pipe) in ("sd3", "chroma") else {}


def sample_from(pipe, z_T: torch.Tensor, steps: int, **kwargs) -> torch.Tensor:
    """z_0 that the pipeline's own sampler reaches from z_T (one latent in the pipeline's layout)."""
    return pipe(PROMPT, num_inference_steps=steps, latents=z_T[None], output_type="latent", height=size(pipe),
                width=size(pipe), **PROMPT_KWARGS, **(no_guidance(pipe) | kwargs)).images[0]


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


def pipeline_schedule(pipe, steps: int, monkeypatch, height=None, width=None) -> tuple[list[float], list[float]]:
    """The schedule a real pipeline call at this size steps through (`recorded_schedule`)."""
    return recorded_schedule(pipe.scheduler, steps, monkeypatch, lambda: pipe(
        PROMPT, num_inference_steps=steps, height=height or size(pipe), width=width or size(pipe),
        output_type="latent", **PROMPT_KWARGS))


def count_transformer_calls(pipe) -> list:
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def z_0_of(pipe, image) -> torch.Tensor:
    return backbone_for(pipe).encode(image)[0][0]


# the round trip


def test_round_trip_is_exact_when_the_velocity_depends_on_t_only(pipe, image, monkeypatch):
    """With v = v(t), the sampler's Euler steps undo the inversion's exactly, step by step: pins sigmas, timesteps
    and which timestep each step evaluates the velocity at."""
    steps = 10
    fixed = torch.randn(z_0_of(pipe, image).shape, generator=torch.Generator().manual_seed(1))
    per_unit = 1000.0 if family(pipe) == "sd3" else 1.0  # FLUX and Chroma take t / 1000, SD3 t

    def velocity(t):
        return fixed * (0.5 + 2 * t)

    def velocity_of_t_only(module, args, kwargs, output):
        t = float(kwargs["timestep"].flatten()[0]) / per_unit
        return (velocity(t).expand_as(output[0]).to(output[0].dtype),)

    pipe.transformer.register_forward_hook(velocity_of_t_only, with_kwargs=True)
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps)
    z_0 = trajectory.latents[-1]
    timesteps, sigmas = pipeline_schedule(pipe, steps, monkeypatch)
    for i in range(steps):  # z_i = z_{i+1} + (sigma_i - sigma_{i+1}) v(t_i), at the pipeline's own schedule
        expected = trajectory.latents[i + 1] + (sigmas[i] - sigmas[i + 1]) * velocity(timesteps[i] / 1000)
        torch.testing.assert_close(trajectory.latents[i], expected, atol=1e-5, rtol=1e-5)
    assert relative_error(sample_from(pipe, trajectory.latents[0], steps), z_0) < 1e-5


def round_trip_ratio(pipe, image, steps=10) -> tuple[float, float]:
    """Relative misses of z_0 from the inverted z_T and from a random z_T of the same norm."""
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, **PROMPT_KWARGS)  # T5 length as sampled
    z_T, z_0 = trajectory.latents[0], trajectory.latents[-1]
    random = torch.randn(z_T.shape, generator=torch.Generator().manual_seed(1))
    round_trip = relative_error(sample_from(pipe, z_T, steps), z_0)
    from_random = relative_error(sample_from(pipe, random * z_T.norm() / random.norm(), steps), z_0)
    return round_trip, from_random


def test_round_trip_is_far_closer_than_from_random_noise(pipe, image):
    """Inverted with invert's defaults (no guidance), sampled with the pipeline's own sampler: SD3 and Chroma
    unguided, FLUX at its default embedded guidance (3.5). Measured ratios at 10 steps: FLUX.1-dev schedule 0.065,
    FLUX.1-schnell 0.058, Chroma 0.048, SD3 0.025; a flipped update or plain forward noising gives 0.98-1.02. (With
    the T5 length of the inversion unlike the sampling's, FLUX gave 0.13 and Chroma 0.26.)"""
    round_trip, from_random = round_trip_ratio(pipe, image)
    print(f"{family(pipe)}: round trip {round_trip:.4f}, random start {from_random:.4f}, "
          f"ratio {round_trip / from_random:.4f}")
    assert round_trip < 0.25 * from_random


# the noise mode and the trajectory's layout


def test_noise_mode_follows_the_interpolation_without_transformer_calls(pipe, image, monkeypatch):
    steps = 5
    calls = count_transformer_calls(pipe)
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, mode="noise", seed=7)
    assert calls == [] and trajectory.mode == "noise"
    z_0 = trajectory.latents[-1]
    assert torch.equal(z_0, z_0_of(pipe, image))
    noise = torch.randn(z_0[None].shape, generator=torch.Generator("cpu").manual_seed(7))[0]
    timesteps, sigmas = pipeline_schedule(pipe, steps, monkeypatch)
    assert trajectory.timesteps == timesteps and sigmas[0] == 1.0
    expected = torch.stack([(1 - sigma) * z_0 + sigma * noise for sigma in sigmas[:-1]])
    torch.testing.assert_close(trajectory.latents[:-1], expected, atol=1e-6, rtol=1e-6)
    again = invert(pipe, image, PROMPT, num_inference_steps=steps, mode="noise", seed=7)
    other_seed = invert(pipe, image, PROMPT, num_inference_steps=steps, mode="noise", seed=8)
    assert torch.equal(again.latents, trajectory.latents) and not torch.equal(other_seed.latents, trajectory.latents)


@pytest.mark.parametrize("mode", ["ddim", "noise"])
def test_trajectory_layout_and_timesteps(pipe, image, mode, monkeypatch):
    steps = 4
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps, guidance_scale=3.0, mode=mode)
    side = size(pipe)
    if family(pipe) in ("flux", "chroma"):  # packed 2x2: (side / 4)^2 tokens of 16 channels
        assert trajectory.latents.shape == (steps + 1, (side // 4) ** 2, 16)
    else:
        assert trajectory.latents.shape == (steps + 1, 4, side // 2, side // 2)
    assert trajectory.latents.dtype == torch.float32 and trajectory.latents.device.type == "cpu"
    assert torch.isfinite(trajectory.latents).all()
    timesteps, _ = pipeline_schedule(pipe, steps, monkeypatch)
    assert trajectory.timesteps == timesteps  # sigma x 1000, exactly as the pipeline steps through them
    assert (trajectory.width, trajectory.height, trajectory.mode) == (side, side, mode)
    assert trajectory.model == str(pipe.name_or_path) and trajectory.guidance_scale == 3.0
    assert trajectory.prompt == PROMPT
    assert torch.equal(trajectory.latents[-1], z_0_of(pipe, image))
    trajectory.check_compatible(pipe, steps, side, side)


def test_guidance_changes_the_inversion(pipe, image):
    """SD3 batches CFG; FLUX.1-dev-style transformers embed the guidance value."""
    unguided, guided = (invert(pipe, image, PROMPT, 4, guidance_scale=scale).latents for scale in (1.0, 5.0))
    assert torch.equal(unguided[-1], guided[-1]) and not torch.allclose(unguided[0], guided[0])


def test_an_applied_handle_does_not_touch_the_inversion(pipe, image):
    plain = invert(pipe, image, PROMPT, num_inference_steps=3)
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0)) as handle:
        applied = invert(pipe, image, PROMPT, num_inference_steps=3)
        assert handle.active and handle.layers
    assert torch.equal(plain.latents, applied.latents)


# files and compatibility


def test_save_load_round_trip_is_exact(pipe, image, tmp_path):
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=3, guidance_scale=2.0)
    path = tmp_path / "reference.safetensors"
    trajectory.save(path)
    loaded = Trajectory.load(path)
    assert torch.equal(loaded.latents, trajectory.latents) and loaded.latents.shape == trajectory.latents.shape
    assert dataclasses.replace(loaded, latents=None) == dataclasses.replace(trajectory, latents=None)
    loaded.check_compatible(pipe, 3, size(pipe), size(pipe))


def test_a_flux_trajectory_is_refused_by_the_sd3_pipeline(flux_schnell_pipe, sd3_pipe, image, tmp_path):
    trajectory = invert(flux_schnell_pipe, image, PROMPT, num_inference_steps=3)
    trajectory.save(tmp_path / "flux.safetensors")
    trajectory = Trajectory.load(tmp_path / "flux.safetensors")
    with pytest.raises(sa.UserError, match="inverted with model") as refused:
        trajectory.check_compatible(sd3_pipe, 3, SD3_SIZE, SD3_SIZE)
    assert "\n" not in str(refused.value)
    with pytest.raises(sa.UserError, match="inverted with model"):
        sa.generate_set(sd3_pipe, ["a dog"], reference=trajectory, num_inference_steps=3, height=SD3_SIZE,
                        width=SD3_SIZE, **PROMPT_KWARGS)
    # the same model name (pipelines built in memory, say) still fails: another latent layout, in one line
    renamed = dataclasses.replace(trajectory, model=str(sd3_pipe.name_or_path))
    with pytest.raises(sa.UserError, match=r"latents are \(64, 16\) but a 32x32 latent of this model is") as refused:
        renamed.check_compatible(sd3_pipe, 3, SD3_SIZE, SD3_SIZE)
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
        batch = kwargs["hidden_states"]
        groups = backbone_for(pipe).guidance_groups()  # SD3 with CFG: [uncond..., cond...]
        rows = batch.unflatten(0, (groups, -1))[:, 0]
        assert all(torch.equal(row, rows[0]) for row in rows)  # the same latent in every guidance group
        seen.append(rows[0].float().clone())

    pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    return seen


@pytest.mark.parametrize("offset", [0, 1])
def test_transfer_keeps_the_reference_pinned_on_the_trajectory(pipe, image, offset, monkeypatch):
    steps = 10
    trajectory = invert(pipe, image, PROMPT, num_inference_steps=steps)
    pinned, decoded, original_decode = record_pins(monkeypatch), [], Backbone.decode

    def decode_and_record(backbone, latents, height, width):
        decoded.append(latents.clone())
        return original_decode(backbone, latents, height, width)

    monkeypatch.setattr(Backbone, "decode", decode_and_record)
    inputs = record_reference_slot(pipe)
    one_call_per_step = {"guidance_scale": 1.0} if family(pipe) == "chroma" else {}  # Chroma's CFG: a second call
    images = sa.generate_set(pipe, ["a dog", "a house"], reference=trajectory, offset=offset,
                             num_inference_steps=steps, height=size(pipe), width=size(pipe), **PROMPT_KWARGS,
                             **one_call_per_step)
    assert len(images) == 3 and all(im.size == (size(pipe), size(pipe)) for im in images)
    assert len(pinned) == steps and len(inputs) == steps
    for step, latent in enumerate(pinned):  # after every step
        assert torch.equal(latent, trajectory.latents[max(offset + 1, step + 1)])
    assert torch.equal(inputs[0], trajectory.latents[offset])  # what each step's transformer call starts from
    for step in range(1, steps):
        assert torch.equal(inputs[step], trajectory.latents[max(offset + 1, step)])
    assert torch.equal(decoded[0][0], trajectory.latents[-1])  # the reference decodes the inverted image's z_0
