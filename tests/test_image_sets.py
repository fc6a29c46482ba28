"""img2img and inpainting sets: per-image arguments reach their waves, chunks equal one batch, per-image strength."""

import functools
import json

import numpy as np
import pytest
import torch
from diffusers import (AutoPipelineForImage2Image, AutoPipelineForInpainting, DPMSolverMultistepScheduler,
                       UNet2DConditionModel)
from PIL import Image

import stylealigned as sa
from stylealigned import sets
from stylealigned.apply import hooked_layers
from stylealigned.inversion import invert
from stylealigned.io import load_image
from stylealigned.models import with_image_input
from tests.test_cli import FAST, cli, pixels
from tests.test_cli_hostile import refused
from tests.test_sets import PROMPTS, SETTINGS, set_latents
from tests.tolerance import assert_rounding_close, denoising_depth


def noise_images(count: int, seed: int, mode: str = "RGB") -> list[Image.Image]:
    """Random 32x32 images: init images (RGB) or binary masks (L)."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        return [Image.fromarray((rng.random((32, 32)) > 0.5).astype(np.uint8) * 255) for _ in range(count)]
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def image_pipe(request, pipe_name: str, kind: str):
    """The img2img or inpainting pipeline made from a tiny text-to-image one; "inpaint9" with an inpainting UNet
    (latents, mask and masked image's latents in: 9 channels), random like the rest."""
    pipe = request.getfixturevalue(pipe_name)
    auto = AutoPipelineForImage2Image if kind == "img2img" else AutoPipelineForInpainting
    if kind == "inpaint9":
        torch.manual_seed(0)
        pipe.register_modules(unet=UNet2DConditionModel(**dict(pipe.unet.config, in_channels=9)).eval())
    image_pipeline = auto.from_pipe(pipe)
    image_pipeline.set_progress_bar_config(disable=True)
    return image_pipeline


def inputs(kind: str, count: int, **extra) -> dict:
    """Per-image init images (and masks for inpainting) for a set of `count` images."""
    given = dict(image=noise_images(count, 1), **extra)
    return given | ({"mask_image": noise_images(count, 2, "L")} if kind.startswith("inpaint") else {})


def record_calls(monkeypatch, cls) -> list[dict]:
    """The keyword arguments of every call of pipelines of class `cls` from now on."""
    seen, original = [], cls.__call__

    @functools.wraps(original)  # generate_set reads the call's signature through __wrapped__
    def recorded(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", recorded)
    return seen


def test_per_image_arguments_reach_their_waves(request, monkeypatch):
    pipe = image_pipe(request, "sd_pipe", "img2img")
    calls = record_calls(monkeypatch, type(pipe))
    given = inputs("img2img", 5, negative_prompt=[f"blurry {i}" for i in range(5)], strength=0.7)
    sets.generate_set(pipe, PROMPTS[:5], batch_size=1, wave_size=2, **SETTINGS, **given)
    assert [[given["image"].index(im) for im in call["image"]] for call in calls] == [[0, 1, 2], [0, 3, 4]]
    assert [call["negative_prompt"] for call in calls] == [["blurry 0", "blurry 1", "blurry 2"],
                                                            ["blurry 0", "blurry 3", "blurry 4"]]
    assert [[g.initial_seed() for g in call["generator"]] for call in calls] == [[0, 1, 2], [0, 3, 4]]
    for call in calls:
        assert call["strength"] == 0.7 and "latents" not in call and "height" not in call


CHUNKED = [("sd_pipe", "img2img"), ("sd_pipe", "inpaint"), ("sd_pipe", "inpaint9"), ("sdxl_pipe", "img2img"),
           ("sdxl_pipe", "inpaint"), ("sdxl_pipe", "inpaint9"), ("flux_pipe", "img2img"), ("flux_pipe", "inpaint"),
           ("sd3_pipe", "img2img")]


@pytest.mark.parametrize("pipe_name, kind", CHUNKED)
def test_chunked_image_set_equals_one_batch(request, pipe_name, kind, decoded):
    pipe = image_pipe(request, pipe_name, kind)
    given = inputs(kind, 5, strength=[1.0, 0.7, 0.7, 0.4, 1.0])
    whole = set_latents(pipe, PROMPTS[:5], decoded, **given)
    chunked = set_latents(pipe, PROMPTS[:5], decoded, batch_size=1, wave_size=2, **given)
    assert sorted(whole) == sorted(chunked) == list(range(5))
    for i in range(5):
        assert_rounding_close(chunked[i], whole[i], denoising_depth(pipe, 3))


def applied_pair(pipe, i: int, given: dict, strength: float) -> torch.Tensor:
    """Target i run by hand with the reference, both at `strength`, through the pipeline under apply."""
    pair = {key: [value[0], value[i]] for key, value in given.items()}
    with sa.apply(pipe):
        return pipe([PROMPTS[0], PROMPTS[i]], **pair, strength=strength, output_type="latent",
                    generator=[torch.Generator("cpu").manual_seed(7 + p) for p in (0, i)],
                    num_inference_steps=3, guidance_scale=5.0).images


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_each_image_starts_at_its_own_strength(request, kind, decoded):
    pipe = image_pipe(request, "sd_pipe", kind)
    strengths = [0.7, 0.7, 0.4, 1.0]
    given = inputs(kind, 4)
    ours = set_latents(pipe, PROMPTS[:4], decoded, strength=strengths, **given)
    alone = set_latents(pipe, PROMPTS[:4], decoded, strength=strengths, wave_size=1, **given)  # [ref, target i]
    for i in range(4):
        assert_rounding_close(ours[i], alone[i], denoising_depth(pipe, 3))
    assert_rounding_close(ours[1], applied_pair(pipe, 1, given, 0.7)[1], denoising_depth(pipe, 3))
    plain = pipe(PROMPTS[0], **{key: value[0] for key, value in given.items()}, strength=0.7, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(7), num_inference_steps=3, guidance_scale=5.0).images
    assert_rounding_close(ours[0], plain[0], denoising_depth(pipe, 3))


@pytest.mark.parametrize("pipe_name, kind", [("sd_pipe", "img2img"), ("sd_pipe", "inpaint"), ("sd_pipe", "inpaint9"),
                                             ("sdxl_pipe", "inpaint"), ("flux_pipe", "img2img"),
                                             ("sd3_pipe", "img2img")])
def test_without_sharing_each_image_is_the_plain_pipeline_at_its_strength(request, pipe_name, kind, decoded):
    pipe = image_pipe(request, pipe_name, kind)
    strengths, given = [1.0, 0.7, 0.4], inputs(kind, 3)
    ours = set_latents(pipe, PROMPTS[:3], decoded, config=sa.StyleAlignedConfig.disabled(), strength=strengths,
                       **given)
    for i, strength in enumerate(strengths):
        single = {key: value[i] for key, value in given.items()}
        plain = pipe(PROMPTS[i], **single, strength=strength, output_type="latent",
                     generator=torch.Generator("cpu").manual_seed(7 + i), num_inference_steps=3,
                     guidance_scale=5.0, **sets._size_inputs(pipe, 32, 32)).images
        assert_rounding_close(ours[i], plain[0], denoising_depth(pipe, 3))


def test_a_subset_reproduces_the_image_set(request, decoded):
    pipe = image_pipe(request, "sd_pipe", "inpaint")
    given = inputs("inpaint", 6, strength=[1.0, 0.4, 0.7, 1.0, 0.4, 0.7])
    whole = set_latents(pipe, PROMPTS[:6], decoded, batch_size=2, **given)
    part = set_latents(pipe, PROMPTS[:6], decoded, batch_size=2, indices=[2, 4], **given)
    assert sorted(part) == [2, 4]
    for i in (2, 4):
        assert_rounding_close(part[i], whole[i], denoising_depth(pipe, 3))


@pytest.mark.parametrize("bad, message", [
    (dict(image=noise_images(3, 1)), "image lists 3 entries for a set of 4 images"),
    (dict(image=noise_images(4, 1), strength=[0.5, 0.5]), "strength lists 2"),
    (dict(image=noise_images(4, 1), strength=[0.5, 0.5, 0.0, 1.0]), r"strength must lie in \(0, 1\]"),
    (dict(image=noise_images(1, 1)[0], generator=torch.Generator()), "pass seed= instead of generator="),
])
def test_wrongly_sized_inputs_are_user_errors(request, bad, message):
    pipe = image_pipe(request, "sd_pipe", "img2img")
    with pytest.raises(sa.UserError, match=message):
        sets.generate_set(pipe, PROMPTS[:4], **SETTINGS, **bad)


def test_different_strengths_need_a_one_step_sampler(request, decoded):
    pipe = image_pipe(request, "sd_pipe", "img2img")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    given = dict(image=noise_images(3, 1), **SETTINGS)
    with pytest.raises(sa.UserError, match="not DPMSolverMultistepScheduler;"):
        sets.generate_set(pipe, PROMPTS[:3], strength=[1.0, 0.5, 0.5], **given)
    with pytest.raises(sa.UserError, match="not DDIMScheduler with eta=1.0"):
        sets.generate_set(image_pipe(request, "sd_pipe", "img2img"), PROMPTS[:3], strength=[1.0, 0.5, 0.5], eta=1.0,
                          **given)
    same = set_latents(pipe, PROMPTS[:3], decoded, strength=[0.5] * 3, image=given["image"])
    chunked = set_latents(pipe, PROMPTS[:3], decoded, strength=0.5, image=given["image"], batch_size=1, wave_size=1)
    for i in range(3):  # one strength for all runs on any sampler
        assert_rounding_close(same[i], chunked[i], denoising_depth(pipe, 3))


def test_strengths_need_an_image_pipeline(sd_pipe):
    with pytest.raises(sa.UserError, match="takes no strength"):
        sets.generate_set(sd_pipe, PROMPTS[:2], strength=[1.0, 0.5], **SETTINGS)


def test_a_trajectory_cannot_lead_an_image_set(request, sd_pipe):
    trajectory = invert(sd_pipe, noise_images(1, 3)[0], "a cat", num_inference_steps=3)
    pipe = image_pipe(request, "sd_pipe", "img2img")
    with pytest.raises(sa.UserError, match="give the reference's init image as the first image"):
        sets.generate_set(pipe, PROMPTS[1:3], reference=trajectory, image=noise_images(3, 1), **SETTINGS)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_the_pipeline_is_restored_bit_for_bit(request, kind):
    pipe = image_pipe(request, "sd_pipe", kind)
    given = inputs(kind, 3)
    single = {key: value[1] for key, value in given.items()}

    def plain():
        return pipe(PROMPTS[1], **single, strength=0.7, output_type="latent", num_inference_steps=3,
                    generator=torch.Generator("cpu").manual_seed(3)).images

    before = plain()
    sets.generate_set(pipe, PROMPTS[:3], batch_size=1, strength=[1.0, 0.7, 0.4], **SETTINGS, **given)
    assert torch.equal(plain(), before)
    assert "prepare_latents" not in vars(pipe) and not hooked_layers(pipe.unet)


@pytest.fixture
def image_files(tmp_path) -> dict:
    """Two init images and a mask on disk."""
    files = {}
    for name, image in zip(("a", "b", "mask"), noise_images(2, 1) + noise_images(1, 2, "L")):
        files[name] = tmp_path / f"{name}.png"
        image.save(files[name])
    return files


def test_cli_writes_the_library_img2img_set(tiny_sd_path, sd_pipe, tmp_path, image_files, capsys):
    out = tmp_path / "run"
    code, stdout, _ = cli(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST,
                          "--init-image", image_files["a"], "--init-image", image_files["b"],
                          "--strength", "1.0", "--strength", "0.5")
    assert code == 0, stdout
    record = json.loads((out / "run.json").read_text())["parameters"]
    assert record["init_images"] == [str(image_files["a"]), str(image_files["b"])] and record["strength"] == [1, 0.5]
    assert len(record["init_images_sha256"]) == 2
    expected = sets.generate_set(with_image_input(sd_pipe), ["a cat", "a dog"], num_inference_steps=3, width=32,
                                 height=32, image=[load_image(image_files[n], 32, 32) for n in "ab"],
                                 strength=[1.0, 0.5])
    written = pixels(out)
    assert [np.array_equal(written[name], np.asarray(image)) for name, image in zip(sorted(written), expected)] == [
        True, True]
    noise_images(1, 5)[0].save(image_files["b"])  # another init image at the same path: no resume
    refused(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST, "--resume",
            "--init-image", image_files["a"], "--init-image", image_files["b"], "--strength", "1.0", "--strength",
            "0.5", expected="init_images_sha256")


def test_cli_inpaints_with_one_image_and_mask_for_all(tiny_sd_path, tmp_path, image_files, capsys):
    out = tmp_path / "run"
    code, stdout, _ = cli(capsys, "generate", "a cat", "a dog", "a house", "--model", tiny_sd_path, "--out", out,
                          *FAST, "--init-image", image_files["a"], "--mask-image", image_files["mask"])
    assert code == 0, stdout
    assert len(pixels(out)) == 3 and json.loads((out / "run.json").read_text())["parameters"]["mask_images"] == [
        str(image_files["mask"])]


@pytest.mark.parametrize("options, expected", [
    ("--init-image {a} --init-image {b} --init-image {a}", "--init-image is given 3 times for 2 prompts"),
    ("--init-image {dir}/missing.png", "no such image file"),
    ("--init-image {a} --strength 0", "--strength must lie in (0, 1]"),
    ("--init-image {a} --strength nan", "--strength must lie in (0, 1]"),
    ("--mask-image {mask}", "need --init-image"),
    ("--init-image {a} --mask-image {dir}/a.txt", "is not an image"),
    ("--init-image {a} --scheduler dpm++ --strength 1 --strength 0.5", "use --scheduler ddim, or one strength for all"),
])
def test_bad_image_options_are_one_line_and_write_nothing(tiny_sd_path, tmp_path, image_files, capsys, options,
                                                          expected):
    (tmp_path / "a.txt").write_text("not an image")
    given = options.format(dir=tmp_path, **image_files).split()
    refused(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST, *given,
            expected=expected)
    assert not (tmp_path / "o").exists()
