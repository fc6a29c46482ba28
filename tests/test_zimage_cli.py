"""`generate` and `transfer` on the tiny Z-Image pipeline (a local folder), non-square, and a refused knob."""

import json

from stylealigned.inversion import Trajectory
from tests.test_cli import cli, pixels
from tests.test_dit_cli import one_error_line
from tests.test_transfer_cli import painting  # noqa: F401  (fixture)
from tests.zimage_pipelines import HEIGHT, WIDTH

FAST = ["--steps", "3", "--width", str(WIDTH), "--height", str(HEIGHT), "--device", "cpu"]


def test_generate_on_zimage(tiny_zimage_path, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "a house", "--style", "watercolor", "--model",
                       tiny_zimage_path, "--out", out, "--batch-size", "1", *FAST)
    assert code == 0, err
    images = pixels(out)
    assert sorted(images) == ["00-a-cat-watercolor.png", "01-a-dog-watercolor.png", "02-a-house-watercolor.png"]
    assert all(image.shape == (HEIGHT, WIDTH, 3) for image in images.values())
    record = json.loads((out / "run.json").read_text())["parameters"]
    assert record["config"]["shared_layers"] is None and record["config"]["reference_positions"] == "shifted"


def test_transfer_on_zimage_few_steps_unguided(tiny_zimage_path, tmp_path, capsys, painting):  # noqa: F811
    """Turbo's setting: no guidance in the sampling nor the inversion."""
    out, saved = tmp_path / "run", tmp_path / "ref.safetensors"
    code, _, err = cli(capsys, "transfer", "a dog", "a house", "--reference", painting, "--reference-prompt",
                       "a red tree", "--save-trajectory", saved, "--model", tiny_zimage_path, "--out", out,
                       "--guidance", "0", "--inversion-guidance", "0", *FAST)
    assert code == 0, err
    assert sorted(pixels(out)) == ["00-a-red-tree.png", "01-a-dog.png", "02-a-house.png"]
    trajectory = Trajectory.load(saved)
    assert len(trajectory.timesteps) == 3 and (trajectory.width, trajectory.height) == (WIDTH, HEIGHT)
    assert trajectory.guidance_scale == 0.0


def test_a_knob_without_meaning_is_one_line(tiny_zimage_path, tmp_path, capsys):
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", tiny_zimage_path, "--out", tmp_path / "run",
                       "--share-group-norm", *FAST)
    assert code == 2 and "share_group_norm" in one_error_line(err)
    assert not (tmp_path / "run").exists()
