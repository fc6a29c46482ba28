"""The CLI end to end on a tiny pipeline folder: files, metadata, resume, two processes, and every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylealigned import sets
from stylealigned.cli import common, main
from stylealigned.io import read_png_metadata

FAST = ["--steps", "3", "--width", "32", "--height", "32", "--device", "cpu"]


def cli(capsys, *args):
    """Run `stylealigned ARGS` in this process; returns (exit code, stdout, stderr)."""
    argv = sys.argv
    sys.argv = ["stylealigned", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit:
            main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    return exit.value.code, out, err


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(Path(folder).glob("[0-9]*.png"))}


def test_generate_writes_images_grid_and_record(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = cli(capsys, "generate", "a cat", "a dog", "a house", "--style", "watercolor style",
                          "--model", tiny_sd_path, "--out", out, "--seed", "3", "--shared-score-shift", "0.5", *FAST)
    assert code == 0, stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00-a-cat-watercolor-style.png", "01-a-dog-watercolor-style.png",
                     "02-a-house-watercolor-style.png", "grid.png", "run.json"]
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"][1] == "a dog, watercolor style" and record["complete"]
    assert record["parameters"]["seed"] == 3 and record["parameters"]["config"]["shared_score_shift"] == 0.5
    assert set(record["versions"]) >= {"stylealigned", "torch", "diffusers", "transformers"}
    meta = read_png_metadata(out / "01-a-dog-watercolor-style.png")
    assert meta["prompt"] == "a dog, watercolor style" and meta["seed_of_image"] == 4
    assert meta["config"] == record["parameters"]["config"]
    assert Image.open(out / "grid.png").size[0] >= 3 * 32


def test_no_share_is_the_plain_model(tiny_sd_path, tmp_path, capsys):
    shared, plain = tmp_path / "shared", tmp_path / "plain"
    for folder, extra in ((shared, []), (plain, ["--no-share"])):
        assert cli(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", folder, *FAST, *extra)[0] == 0
    a, b = pixels(shared), pixels(plain)
    assert np.array_equal(a["00-a-cat.png"], b["00-a-cat.png"])
    assert not np.array_equal(a["01-a-dog.png"], b["01-a-dog.png"])


def test_one_prompt_says_so_and_still_generates(tiny_sd_path, tmp_path, capsys):
    code, _, err = cli(capsys, "generate", "a cat", "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST)
    assert code == 0 and "nothing to align" in err
    assert (tmp_path / "o" / "00-a-cat.png").exists()


def test_prompts_file(tiny_sd_path, tmp_path, capsys):
    listing = tmp_path / "prompts.txt"
    listing.write_text("a dog\n\na house\n")
    assert cli(capsys, "generate", "a cat", "--prompts-file", listing, "--model", tiny_sd_path,
               "--out", tmp_path / "o", *FAST)[0] == 0
    assert len(list((tmp_path / "o").glob("0*.png"))) == 3


BAD = {
    "no prompts": ([], "no prompts"),
    "unknown model path": (["a cat", "--model", "./no/such/model"], "no such model"),
    "negative scale": (["a cat", "a dog", "--shared-score-scale", "-1"], "shared_score_scale"),
    "nan shift": (["a cat", "a dog", "--shared-score-shift", "nan"], "shared_score_shift"),
    "layer fraction": (["a cat", "a dog", "--shared-layers", "1.5"], "shared_layers"),
    "unknown preset": (["a cat", "--preset", "nope"], "preset"),
    "guided preset on a UNet": (["a cat", "a dog", "--preset", "guided"], "share_unconditional=False needs a pipeline"),
    "missing prompts file": (["--prompts-file", "/no/such.txt"], "prompts-file"),
    "bad dtype": (["a cat", "--dtype", "fp8"], "dtype"),
    "bad size": (["a cat", "--width", "30"], "--width must be a multiple of 8, got 30; pass 24 or 32"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tiny_sd_path, tmp_path, capsys, case):
    args, expected = BAD[case]
    model = [] if "--model" in args else ["--model", tiny_sd_path]
    code, stdout, err = cli(capsys, "generate", *FAST, *args, *model, "--out", tmp_path / "out")
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and err.rstrip().endswith(errors[0]), err
    assert "Traceback" not in err + stdout
    assert not (tmp_path / "out").exists()


def test_unwritable_out(tiny_sd_path, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", blocker / "sub", *FAST)
    assert code == 2 and err.rstrip().splitlines()[-1].startswith("error: ") and "--out" in err
    assert blocker.read_text() == "mine"


def test_earlier_results_are_refused_unless_overwrite(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = pixels(out)
    code, _, err = cli(capsys, "generate", "a tree", "a car", "--model", tiny_sd_path, "--out", out, *FAST)
    assert code == 2 and "--overwrite" in err and pixels(out).keys() == before.keys()
    assert cli(capsys, "generate", "a tree", "a car", "--model", tiny_sd_path, "--out", out, "--overwrite",
               *FAST)[0] == 0
    assert sorted(pixels(out)) == ["00-a-tree.png", "01-a-car.png"]
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_after_interruption_completes_the_identical_set(tiny_sd_path, tmp_path, capsys, monkeypatch):
    args = ["generate", "a cat", "a dog", "a house", "a tree", "a car", "--model", tiny_sd_path, *FAST,
            "--batch-size", "1"]
    assert cli(capsys, *args, "--out", tmp_path / "full")[0] == 0
    saved, original = [], common.RunFolder.save

    def save_then_die(self, position, image):
        if len(saved) == 2:
            raise KeyboardInterrupt
        original(self, position, image)
        saved.append(position)

    monkeypatch.setattr(common.RunFolder, "save", save_then_die)
    code, _, err = cli(capsys, *args, "--out", tmp_path / "cut")
    assert code == 130 and "--resume" in err
    assert len(pixels(tmp_path / "cut")) == 2 and not list((tmp_path / "cut").glob("*.tmp*"))
    monkeypatch.setattr(common.RunFolder, "save", original)
    generated = []
    real_generate = sets.generate_set
    monkeypatch.setattr(sets, "generate_set", lambda *a, **k: generated.extend(k["indices"]) or real_generate(*a, **k))
    assert cli(capsys, *args, "--out", tmp_path / "cut", "--resume")[0] == 0
    assert sorted(generated) == sorted(set(range(5)) - set(saved))
    full, resumed = pixels(tmp_path / "full"), pixels(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    for name in full:
        assert np.abs(full[name].astype(int) - resumed[name]).max() <= 1, name
    code, _, err = cli(capsys, *args[:-2], "--out", tmp_path / "cut", "--resume", "--seed", "9")
    assert code == 2 and "other parameters" in err


def test_two_accelerate_processes_equal_one(tiny_sd_path, tmp_path, capsys):
    prompts = ["a cat", "a dog", "a house", "a tree", "a car"]
    assert cli(capsys, "generate", *prompts, "--model", tiny_sd_path, "--out", tmp_path / "one", *FAST,
               "--batch-size", "1")[0] == 0
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "stylealigned.cli", "generate", *prompts, "--model", tiny_sd_path, "--out", tmp_path / "two",
               *FAST, "--batch-size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    one, two = pixels(tmp_path / "one"), pixels(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 5
    for name in one:
        assert np.abs(one[name].astype(int) - two[name]).max() <= 1, name


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stylealigned.cli", "generate", "a cat", "--model",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing" in lines[0], result.stderr
