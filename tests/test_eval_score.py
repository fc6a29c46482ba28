"""`stylealigned score DIR` on a folder laid out as `stylealigned generate` writes it."""

import json
import sys

import pytest
from PIL import Image

from stylealigned.cli import main
from stylealigned.eval import set_consistency, text_alignment
from stylealigned.eval.run_folder import full_text, object_text
from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)
from tests.test_eval_metrics import noise_image

PROMPTS = ["a fox", "a red house", "the boat"]
STYLE = "watercolor painting"


def write_run(folder, prompts=PROMPTS, style=STYLE, count=None):
    folder.mkdir(exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"prompts": prompts, "style": style, "seed": 0}))
    images = [noise_image(seed) for seed in range(len(prompts) if count is None else count)]
    for index, image in enumerate(images):
        image.save(folder / f"{index:02d}-image-{index}.png")
    Image.new("RGB", (8, 8)).save(folder / "grid.png")  # must be ignored
    return images


def run_cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["stylealigned", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code


def score_args(folder, clip, dino, *extra):
    return ["score", str(folder), "--clip-model", clip, "--dino-model", dino, "--device", "cpu", *extra]


@pytest.mark.parametrize("full_prompt", [False, True])
def test_score_prints_and_writes_both_metrics(tmp_path, monkeypatch, capsys, tiny_clip_path, tiny_dino_path,
                                              full_prompt):
    images = write_run(tmp_path / "run")
    texts = [f"{prompt}, {STYLE}" for prompt in PROMPTS] if full_prompt else PROMPTS
    extra = ["--full-prompt"] if full_prompt else []

    assert run_cli(monkeypatch, *score_args(tmp_path / "run", tiny_clip_path, tiny_dino_path, *extra)) in (0, None)

    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    per_image = text_alignment(images, texts, model=tiny_clip_path, device="cpu")
    assert scores["text_alignment"] == pytest.approx(sum(per_image) / 3, abs=1e-6)
    assert scores["set_consistency"] == pytest.approx(set_consistency(images, tiny_dino_path, device="cpu"), abs=1e-6)
    assert scores["set_consistency_includes_reference"] is True
    assert [entry["text"] for entry in scores["images"]] == texts
    assert [entry["file"] for entry in scores["images"]] == ["00-image-0.png", "01-image-1.png", "02-image-2.png"]
    printed = capsys.readouterr().out
    assert f"{scores['text_alignment']:.4f}" in printed and f"{scores['set_consistency']:.4f}" in printed


def test_prompts_recorded_with_or_without_the_suffix_give_the_same_texts():
    assert object_text("a fox, watercolor painting", STYLE) == object_text("a fox", STYLE) == "a fox"
    assert full_text("a fox, watercolor painting", STYLE) == full_text("a fox", STYLE) == "a fox, watercolor painting"
    assert object_text("a fox", None) == full_text("a fox", None) == "a fox"


@pytest.mark.parametrize("problem, message", [
    ("no run.json", "has no run.json"),
    ("missing image", "finish the run"),
    ("bad json", "not a readable run record"),
])
def test_bad_folder_is_one_line_error(tmp_path, monkeypatch, capsys, problem, message):
    folder = tmp_path / "run"
    write_run(folder, count=2 if problem == "missing image" else None)
    if problem == "no run.json":
        (folder / "run.json").unlink()
    if problem == "bad json":
        (folder / "run.json").write_text("{not json")

    assert run_cli(monkeypatch, *score_args(folder, "unused-clip", "unused-dino")) == 2

    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert not (folder / "scores.json").exists()


def test_score_reads_what_generate_wrote(tmp_path, monkeypatch, tiny_sd_path, tiny_clip_path, tiny_dino_path):
    out = tmp_path / "run"
    generate = ["generate", "a cat", "a dog", "a house", "--style", "watercolor painting", "--model", tiny_sd_path,
                "--out", str(out), "--steps", "2", "--device", "cpu"]
    assert run_cli(monkeypatch, *generate) in (0, None)

    assert run_cli(monkeypatch, *score_args(out, tiny_clip_path, tiny_dino_path)) in (0, None)

    scores = json.loads((out / "scores.json").read_text())
    assert [entry["text"] for entry in scores["images"]] == ["a cat", "a dog", "a house"]
    assert [entry["file"][:3] for entry in scores["images"]] == ["00-", "01-", "02-"]
