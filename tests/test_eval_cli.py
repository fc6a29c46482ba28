"""`stylealigned eval` end to end on the tiny SD pipeline, including the transfer configuration."""

import csv
import os
import subprocess
import sys

from PIL import Image

from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)
from tests.test_eval_metrics import noise_image
from tests.test_eval_score import run_cli


def eval_args(model, out, clip, dino, *extra):
    return ["eval", "--model", model, "--out", str(out), "--styles", "1", "--steps", "2", "--clip-model", clip,
            "--dino-model", dino, "--device", "cpu", *extra]


def test_eval_command_prints_the_summary(tmp_path, monkeypatch, capsys, tiny_sd_path, tiny_clip_path, tiny_dino_path):
    args = eval_args(tiny_sd_path, tmp_path / "out", tiny_clip_path, tiny_dino_path, "--configs", "full")
    assert run_cli(monkeypatch, *args) in (0, None)
    printed = capsys.readouterr().out
    assert "| full | 1 |" in printed and "results.csv" in printed
    assert (tmp_path / "out" / "tradeoff.png").is_file()


def test_transfer_sets_follow_an_inverted_real_image(tmp_path, monkeypatch, tiny_sd_path, tiny_clip_path,
                                                     tiny_dino_path):
    noise_image(3, size=(32, 32)).save(tmp_path / "reference.png")
    args = eval_args(tiny_sd_path, tmp_path / "out", tiny_clip_path, tiny_dino_path, "--configs", "transfer",
                     "--reference-image", str(tmp_path / "reference.png"), "--reference-prompt", "a cat",
                     "--reference-style", "watercolor")
    assert run_cli(monkeypatch, *args) in (0, None)

    out = tmp_path / "out"
    assert (out / "reference.safetensors").is_file()
    with open(out / "results.csv", newline="") as file:
        [row] = list(csv.DictReader(file))
    assert (row["config"], row["style"]) == ("transfer", "watercolor")
    names = sorted(path.name for path in (out / row["folder"]).glob("*.png"))
    assert names[0] == "00-a-cat.png" and len(names) == 5  # the reference, then the 4 objects
    assert names[1].endswith("-watercolor.png")
    with Image.open(out / row["folder"] / names[0]) as reference:
        assert reference.size == (32, 32)


def test_transfer_without_a_reference_is_a_one_line_error(tmp_path, monkeypatch, capsys, tiny_sd_path):
    args = eval_args(tiny_sd_path, tmp_path / "out", "unused", "unused", "--configs", "full,transfer")
    assert run_cli(monkeypatch, *args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "--reference-image" in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_two_processes_split_the_sets_and_the_main_one_merges(tmp_path, tiny_sd_path, tiny_clip_path,
                                                               tiny_dino_path):
    """What `accelerate launch` does on GPUs, here with torchrun and two CPU processes."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "stylealigned.cli", *eval_args(tiny_sd_path, out, tiny_clip_path, tiny_dino_path,
                                                    "--configs", "full,no-share", "--styles", "2")]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted((row["config"], row["style_index"]) for row in rows) == [
        ("full", "0"), ("full", "1"), ("no-share", "0"), ("no-share", "1")]
    assert done.stdout.count("| full | 2 |") == 1  # only the main process reports
