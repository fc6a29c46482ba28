"""`generate` and `transfer` with --controlnet: the API's images, control images once or per target, the scale,
depth maps, a real-image reference, and every bad control option refused in one line before anything is written."""

import json

import numpy as np
import pytest
import torch

from stylealigned import sets
from stylealigned.control import depth_maps
from stylealigned.models import load_pipeline
from tests.test_cli import FAST, cli, pixels
from tests.test_cli_hostile import refused, snapshot
from tests.test_control import controlnet_path, controls, tiny_depth_path  # noqa: F401 (fixtures)
from tests.test_transfer_cli import painting  # noqa: F401 (fixture)

PROMPTS = ["a cat", "a dog", "a house"]


@pytest.fixture
def drawings(tmp_path):
    """Two control images on disk."""
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, image in zip(paths, controls(2, seed=9)):
        image.save(path)
    return paths


def generate(capsys, model, out, *args):
    code, stdout, err = cli(capsys, "generate", *PROMPTS, "--model", model, "--out", out, *FAST, *args)
    assert code == 0, err
    return pixels(out)


def change(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_generate_with_one_control_image_writes_the_apis_set(tiny_sd_path, controlnet_path, drawings, tmp_path,
                                                             capsys):
    cn = controlnet_path("sd")
    written = generate(capsys, tiny_sd_path, tmp_path / "run", "--controlnet", cn, "--control-image", drawings[0])
    record = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]
    assert record["controlnet"] == cn and record["control_images"] == [str(drawings[0])]
    assert len(record["control_images_sha256"][0]) == 64
    pipe = load_pipeline(tiny_sd_path, device="cpu", dtype=torch.float32, controlnet=cn)
    ours = sets.generate_set(pipe, PROMPTS, control_images=drawings[0], num_inference_steps=3, width=32, height=32)
    assert [np.asarray(image).tolist() for image in ours] == [image.tolist() for image in written.values()]


def test_a_flux_controlnet_set_keeps_fluxs_default_guidance(tiny_flux_path, controlnet_path, drawings, tmp_path,
                                                            capsys):
    cn = controlnet_path("flux")
    written = generate(capsys, tiny_flux_path, tmp_path / "run", "--controlnet", cn, "--control-image", drawings[0],
                       "--control-image", drawings[1])
    record = json.loads((tmp_path / "run" / "run.json").read_text())["parameters"]
    assert record["guidance_scale"] == 3.5  # FluxPipeline's default; FluxControlNetPipeline's own is 7
    pipe = load_pipeline(tiny_flux_path, device="cpu", dtype=torch.float32, controlnet=cn)
    ours = sets.generate_set(pipe, PROMPTS, control_images=drawings, num_inference_steps=3, width=32, height=32,
                             guidance_scale=3.5)
    assert [np.asarray(image).tolist() for image in ours] == [image.tolist() for image in written.values()]


def test_control_images_per_target_and_the_scale(tiny_sd_path, controlnet_path, drawings, tmp_path, capsys):
    cn = ["--controlnet", controlnet_path("sd")]
    once = list(generate(capsys, tiny_sd_path, tmp_path / "once", *cn, "--control-image", drawings[0]).values())
    each = list(generate(capsys, tiny_sd_path, tmp_path / "each", *cn, "--control-image", drawings[0],
                         "--control-image", drawings[1]).values())
    weak = list(generate(capsys, tiny_sd_path, tmp_path / "weak", *cn, "--control-image", drawings[0],
                         "--control-scale", "0.25").values())
    assert change(once[0], each[0]) == change(once[0], weak[0]) == 0  # the reference is uncontrolled
    assert change(once[1], each[1]) == 0 and change(once[2], each[2]) > 0.05  # target 2 alone got another image
    assert change(once[1], weak[1]) > 1 and change(once[2], weak[2]) > 1
    record = json.loads((tmp_path / "weak" / "run.json").read_text())["parameters"]
    assert record["controlnet_conditioning_scale"] == 0.25


def test_depth_from_is_control_by_its_depth_map(tiny_sd_path, controlnet_path, tiny_depth_path, painting, tmp_path,
                                                capsys):
    cn = ["--controlnet", controlnet_path("sd")]
    depth = tmp_path / "depth.png"
    depth_maps([painting], 32, 32, model=tiny_depth_path)[0].save(depth)
    made = generate(capsys, tiny_sd_path, tmp_path / "made", *cn, "--depth-from", painting, "--depth-model",
                    tiny_depth_path)
    given = generate(capsys, tiny_sd_path, tmp_path / "given", *cn, "--control-image", depth)
    assert all(np.array_equal(made[name], given[name]) for name in made)
    record = json.loads((tmp_path / "made" / "run.json").read_text())["parameters"]
    assert record["depth_from"] == [str(painting)] and record["depth_model"] == tiny_depth_path


def test_transfer_with_a_controlnet_keeps_the_reconstruction(tiny_sd_path, controlnet_path, drawings, painting,
                                                             tmp_path, capsys):
    def transfer(out, *args):
        code, _, err = cli(capsys, "transfer", "a dog", "a tree", "--reference", painting, "--reference-prompt",
                           "a house", "--model", tiny_sd_path, "--out", out, *FAST, *args)
        assert code == 0, err
        return list(pixels(out).values())

    controlled = transfer(tmp_path / "controlled", "--controlnet", controlnet_path("sd"), "--control-image",
                          drawings[0], "--control-image", drawings[1])
    plain = transfer(tmp_path / "plain")
    assert change(controlled[0], plain[0]) == 0 and change(controlled[1], plain[1]) > 0.01


@pytest.mark.parametrize("case, expected", [
    ("wrong-count", "--control-image is given 2 times for 3 targets"),
    ("missing-file", "no such image file"),
    ("unfit", "does not fit this UNet"),
    ("no-controlnet", "--control-image needs --controlnet MODEL"),
    ("no-images", "--controlnet needs control images"),
    ("both", "(one of the two)"),
    ("scale", "--control-scale must lie in (0, 10]"),
    ("depth-model", "no such depth model folder"),
])
def test_bad_control_options_are_one_line_and_write_nothing(tiny_sd_path, tiny_sdxl_path, controlnet_path, drawings,
                                                            tmp_path, capsys, case, expected):
    cn = ["--controlnet", controlnet_path("sd")]
    image = ["--control-image", drawings[0]]
    args = {"wrong-count": cn + image * 2, "missing-file": cn + ["--control-image", tmp_path / "none.png"],
            "unfit": cn + image + ["--model", tiny_sdxl_path], "no-controlnet": image, "no-images": cn,
            "both": cn + image + ["--depth-from", drawings[1]], "scale": cn + image + ["--control-scale", "0"],
            "depth-model": cn + ["--depth-from", drawings[1], "--depth-model", tmp_path / "none"]}[case]
    before = snapshot(tmp_path)
    refused(capsys, "generate", "a cat", "a dog", "a house", "a tree", "--model", tiny_sd_path,
            "--out", tmp_path / "out", *FAST, *args, expected=expected)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
