"""Flow inversion, transfer sets and the CLI (generate, transfer, eval) on the tiny Qwen-Image pipeline
(non-square, fp32)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import stylealigned as sa
from stylealigned.backbones import backbone_for
from stylealigned.inversion import Trajectory, invert, sampling_timesteps
from tests.conftest import pipeline_fixtures
from tests.qwen_pipelines import QWEN_HEIGHT, QWEN_WIDTH, build_qwen
from tests.test_cli import cli, pixels
from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)
from tests.test_dit_inversion import pipeline_schedule, record_reference_slot, relative_error
from tests.test_eval_cli import eval_args
from tests.test_eval_score import run_cli
from tests.test_sets import record_pins

tiny_qwen_path, qwen_pipe = pipeline_fixtures("qwen", build_qwen)

PROMPT = "a photo of a cat"
SIZE = dict(height=QWEN_HEIGHT, width=QWEN_WIDTH)
FAST = ["--steps", "3", "--width", str(QWEN_WIDTH), "--height", str(QWEN_HEIGHT), "--device", "cpu"]


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A QWEN_WIDTH x QWEN_HEIGHT picture: two colour ramps and a darker block."""
    red, green = np.meshgrid(np.linspace(0, 255, QWEN_WIDTH), np.linspace(255, 0, QWEN_HEIGHT))
    rgb = np.stack([red, green, np.full_like(red, 128.0)], -1)
    rgb[8:16, 12:24] *= 0.3
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.fixture
def painting(tmp_path, image):
    path = tmp_path / "painting.png"
    image.save(path)
    return path


def sample_from(pipe, z_T, steps, **kwargs):
    """z_0 that the pipeline's own sampler reaches from z_T (unguided unless kwargs say otherwise)."""
    return pipe(PROMPT, num_inference_steps=steps, latents=z_T[None], output_type="latent", **SIZE,
                **kwargs).images[0]


def test_the_schedule_is_the_pipelines(qwen_pipe, monkeypatch):
    for steps in (3, 10):
        timesteps, _ = pipeline_schedule(qwen_pipe, steps, monkeypatch, **SIZE)
        assert sampling_timesteps(qwen_pipe, steps, QWEN_WIDTH, QWEN_HEIGHT) == pytest.approx(timesteps, abs=1e-3)


def test_round_trip_is_exact_when_the_velocity_depends_on_t_only(qwen_pipe, image, monkeypatch):
    """With v = v(t) the sampler's Euler steps undo the inversion's exactly: pins the sigmas, the timesteps, and
    the latent layout (packing, the VAE's frame axis, mean and std) both ways."""
    steps = 6
    z_0 = backbone_for(qwen_pipe).encode(image)[0][0]
    fixed = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(1))

    def velocity_of_t_only(module, args, kwargs, output):
        t = float(kwargs["timestep"].flatten()[0])  # the pipeline passes t / 1000
        return ((fixed * (0.5 + 2 * t)).expand_as(output[0]).to(output[0].dtype),)

    qwen_pipe.transformer.register_forward_hook(velocity_of_t_only, with_kwargs=True)
    trajectory = invert(qwen_pipe, image, PROMPT, num_inference_steps=steps)
    assert torch.equal(trajectory.latents[-1], z_0) and (trajectory.width, trajectory.height) == (QWEN_WIDTH,
                                                                                                   QWEN_HEIGHT)
    timesteps, sigmas = pipeline_schedule(qwen_pipe, steps, monkeypatch, **SIZE)
    for i in range(steps):
        expected = trajectory.latents[i + 1] + (sigmas[i] - sigmas[i + 1]) * fixed * (0.5 + 2 * timesteps[i] / 1000)
        torch.testing.assert_close(trajectory.latents[i], expected, atol=1e-5, rtol=1e-5)
    assert relative_error(sample_from(qwen_pipe, trajectory.latents[0], steps), z_0) < 1e-5


def test_round_trip_is_far_closer_than_from_random_noise(qwen_pipe, image):
    """The real (random-weight) transformer: the round trip misses z_0 by 0.10 of the miss from a random start of
    the same norm (measured); an inversion that does not follow the sampler (a flipped update, forward noising)
    misses by about as much as a random start."""
    steps = 10
    trajectory = invert(qwen_pipe, image, PROMPT, num_inference_steps=steps)
    z_T, z_0 = trajectory.latents[0], trajectory.latents[-1]

    def miss(start):
        return relative_error(sample_from(qwen_pipe, start, steps), z_0)

    random = torch.randn(z_T.shape, generator=torch.Generator().manual_seed(1))
    assert miss(z_T) < 0.5 * miss(random * z_T.norm() / random.norm())


def test_guided_prediction_is_the_pipelines_true_cfg(qwen_pipe):
    """`predict` with guidance > 1 is the pipeline's true CFG: the negative prompt's call, the combination
    rescaled to the conditional prediction's norm per token."""
    backbone, seen = backbone_for(qwen_pipe), []
    noise = backbone.initial_noise([0], 0, **SIZE)
    original = qwen_pipe.scheduler.step
    qwen_pipe.scheduler.step = lambda output, t, sample, **kw: seen.append((output, t)) or original(output, t,
                                                                                                  sample, **kw)
    qwen_pipe(PROMPT, negative_prompt=" ", true_cfg_scale=3.0, num_inference_steps=1, latents=noise, **SIZE)
    (expected, t), = seen
    conditioning = backbone.conditioning(PROMPT, 3.0, QWEN_HEIGHT, QWEN_WIDTH)
    torch.testing.assert_close(backbone.predict(noise, t, conditioning, 3.0), expected, atol=1e-6, rtol=1e-6)
    unguided = backbone.predict(noise, t, backbone.conditioning(PROMPT, 1.0, QWEN_HEIGHT, QWEN_WIDTH), 1.0)
    assert (unguided - expected).abs().amax() > 1e-3


@pytest.mark.parametrize("offset", [0, 1])
def test_transfer_keeps_the_reference_pinned_on_the_trajectory(qwen_pipe, image, offset, monkeypatch, decoded):
    steps = 4
    trajectory = invert(qwen_pipe, image, PROMPT, num_inference_steps=steps, guidance_scale=2.0)
    pinned, inputs = record_pins(monkeypatch), record_reference_slot(qwen_pipe)
    images = sa.generate_set(qwen_pipe, ["a dog", "a house in the tree"], reference=trajectory, offset=offset,
                             num_inference_steps=steps, **SIZE)
    assert len(images) == 3 and all(im.size == (QWEN_WIDTH, QWEN_HEIGHT) for im in images)
    assert len(pinned) == steps and len(inputs) == steps
    for step, latent in enumerate(pinned):
        assert torch.equal(latent, trajectory.latents[max(offset + 1, step + 1)])
    assert torch.equal(inputs[0], trajectory.latents[offset])
    assert torch.equal(decoded[0][0], trajectory.latents[-1])  # the reference decodes the inverted image's z_0


@pytest.mark.parametrize("negative", [[], ["--negative-prompt", "a blurry photo"]], ids=["plain", "true-cfg"])
def test_generate_cli_writes_a_set(tiny_qwen_path, tmp_path, capsys, caplog, negative):
    """With a negative prompt QwenImagePipeline runs true CFG (at its default scale): a second call per step."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a red dog in the house", "--style", "watercolor", "--model",
                       tiny_qwen_path, "--out", out, "--batch-size", "1", *negative, *FAST)
    assert code == 0, err
    assert ("classifier-free guidance is not enabled" in caplog.text) == (not negative)  # the pipeline's warning
    found = pixels(out)
    assert sorted(found) == ["00-a-cat-watercolor.png", "01-a-red-dog-in-the-house-watercolor.png"]
    assert all(array.shape == (QWEN_HEIGHT, QWEN_WIDTH, 3) for array in found.values())
    record = json.loads((out / "run.json").read_text())["parameters"]
    assert record["scheduler"] == "auto" and record["config"]["shared_layers"] is None


def test_transfer_cli_writes_the_reconstruction_and_targets(tiny_qwen_path, tmp_path, capsys, painting):
    out, saved = tmp_path / "run", tmp_path / "ref.safetensors"
    code, _, err = cli(capsys, "transfer", "a dog", "--reference", painting, "--reference-prompt", "a red tree",
                       "--save-trajectory", saved, "--model", tiny_qwen_path, "--out", out, *FAST)
    assert code == 0, err
    assert sorted(pixels(out)) == ["00-a-red-tree.png", "01-a-dog.png"]
    trajectory = Trajectory.load(saved)
    assert len(trajectory.timesteps) == 3 and (trajectory.width, trajectory.height) == (QWEN_WIDTH, QWEN_HEIGHT)


def test_eval_runs_the_configurations_that_apply(tiny_qwen_path, tmp_path, monkeypatch, painting, tiny_clip_path,
                                                  tiny_dino_path):  # noqa: F811
    out = tmp_path / "out"
    args = eval_args(tiny_qwen_path, out, tiny_clip_path, tiny_dino_path, "--width", str(QWEN_WIDTH), "--height",
                     str(QWEN_HEIGHT), "--reference-image", str(painting), "--reference-prompt", "a cat",
                     "--reference-style", "watercolor")
    assert run_cli(monkeypatch, *args) in (0, None)
    with open(out / "results.csv", newline="") as file:
        configs = sorted({row["config"] for row in csv.DictReader(file)})
    assert configs == ["full", "no-adain", "no-share", "shared-layers-0.25", "shared-layers-0.5", "transfer"]


def test_generate_cli_from_an_init_image(tiny_qwen_path, tmp_path, capsys, painting):
    """`--init-image` loads QwenImageImg2ImgPipeline from the same components."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", tiny_qwen_path, "--out", out, *FAST,
                       "--init-image", painting, "--strength", "0.6")
    assert code == 0, err
    found = pixels(out)
    assert len(found) == 2 and all(array.shape == (QWEN_HEIGHT, QWEN_WIDTH, 3) for array in found.values())
