"""`stylealigned transfer` end to end, trajectory reuse, and every bad reference image through the CLI."""

import json

import numpy as np
import pytest
from PIL import Image

from stylealigned.inversion import Trajectory
from tests.test_cli import FAST, cli, pixels


@pytest.fixture
def painting(tmp_path):
    path = tmp_path / "painting.jpg"
    gradient = np.linspace(0, 255, 48 * 64, dtype=np.uint8).reshape(48, 64)
    Image.fromarray(np.stack([gradient, gradient[::-1], np.full_like(gradient, 90)], -1)).save(path)
    return path


def test_transfer_writes_reconstruction_targets_and_trajectory(tiny_sd_path, tmp_path, capsys, painting):
    out, saved = tmp_path / "run", tmp_path / "ref.safetensors"
    code, stdout, err = cli(capsys, "transfer", "a dog", "a house", "--reference", painting, "--reference-prompt",
                            "a red tree", "--save-trajectory", saved, "--model", tiny_sd_path, "--out", out, *FAST)
    assert code == 0, err
    assert sorted(pixels(out)) == ["00-a-red-tree.png", "01-a-dog.png", "02-a-house.png"]
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"] == ["a red tree", "a dog", "a house"] and record["parameters"]["inversion"] == "ddim"
    assert Image.open(out / "grid.png").size[0] >= 4 * 32  # the input image, its reconstruction and two targets
    trajectory = Trajectory.load(saved)
    assert trajectory.prompt == "a red tree" and len(trajectory.timesteps) == 3

    again = tmp_path / "again"
    assert cli(capsys, "transfer", "a dog", "a house", "--trajectory", saved, "--model", tiny_sd_path,
               "--out", again, *FAST)[0] == 0
    first, second = pixels(out), pixels(again)
    assert all(np.abs(first[name].astype(int) - second[name]).max() <= 1 for name in first)


def test_noise_inversion_mode(tiny_sd_path, tmp_path, capsys, painting):
    assert cli(capsys, "transfer", "a dog", "--reference", painting, "--reference-prompt", "a tree",
               "--inversion", "noise", "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST)[0] == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["parameters"]["inversion"] == "noise"


def bad_images(folder):
    """Every kind of reference image the CLI must refuse, by name."""
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    Image.new("RGB", (64, 64), "red").save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "a-folder.png").mkdir()
    Image.new("L", (12_000, 9_000)).save(folder / "huge.png")  # 108 megapixels: over the decompression-bomb limit
    return {name: folder / name for name in ("empty.png", "text.png", "truncated.png", "a-folder.png", "huge.png",
                                             "missing.png")}


def test_every_bad_reference_image_is_one_line_and_writes_nothing(tiny_sd_path, tmp_path, capsys):
    for name, path in bad_images(tmp_path / "bad").items():
        out = tmp_path / f"out-{name}"
        code, stdout, err = cli(capsys, "transfer", "a dog", "--reference", path, "--reference-prompt", "a tree",
                                "--model", tiny_sd_path, "--out", out, "--save-trajectory", tmp_path / f"{name}.st",
                                *FAST)
        assert code == 2, name
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err + stdout, (name, err)
        assert not out.exists() and not (tmp_path / f"{name}.st").exists(), name


@pytest.mark.parametrize("args, expected", [
    ([], "--reference"),
    (["--trajectory", "/no/such.safetensors"], "not found"),
    (["--reference", "IMG", "--reference-prompt", "x", "--inversion", "sideways"], "--inversion"),
])
def test_bad_transfer_arguments(tiny_sd_path, tmp_path, capsys, painting, args, expected):
    args = [str(painting) if a == "IMG" else a for a in args]
    code, _, err = cli(capsys, "transfer", "a dog", *args, "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST)
    assert code == 2 and expected in err.splitlines()[-1]
    assert not (tmp_path / "o").exists()
