"""`stylealigned generate` on the tiny Wan pipelines: one MP4 per clip, a contact sheet, run.json, resume, and
the options a video or an image model refuses."""

import json

import numpy as np
import pytest
from PIL import Image

from stylealigned.io import read_video
from tests.test_cli import cli
from tests.test_transformer_cli import one_error_line
from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)
from tests.wan_pipelines import WAN_HEIGHT, WAN_WIDTH

FAST = ["--steps", "3", "--width", str(WAN_WIDTH), "--height", str(WAN_HEIGHT), "--device", "cpu"]
NAMES = ["00-a-cat-watercolor.mp4", "01-a-dog-watercolor.mp4", "02-a-house-watercolor.mp4"]


def generate(capsys, path, out, *extra):
    return cli(capsys, "generate", "a cat", "a dog", "a house", "--style", "watercolor", "--model", path,
               "--out", out, "--frames", "5", "--fps", "8", "--batch-size", "1", *FAST, *extra)


@pytest.mark.parametrize("experts", [1, 2])
def test_generate_writes_one_mp4_per_clip_a_contact_sheet_and_the_record(tiny_wan_paths, tmp_path, capsys,
                                                                        experts):
    out = tmp_path / "run"
    code, stdout, err = generate(capsys, tiny_wan_paths[experts], out)
    assert code == 0, err
    assert "wrote 3 clips" in stdout
    assert sorted(p.name for p in out.iterdir()) == NAMES + ["grid.png", "run.json"]
    for name in NAMES:  # every MP4 decodes to the generated clip's frame count and size
        frames = read_video(out / name)
        assert len(frames) == 5 and all(frame.size == (WAN_WIDTH, WAN_HEIGHT) for frame in frames)
        assert np.asarray(frames[2]).std() > 1  # not a blank clip
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] and record["files"] == NAMES + ["grid.png"]
    assert record["parameters"]["num_frames"] == 5 and record["parameters"]["fps"] == 8
    assert record["parameters"]["config"]["shared_layers"] is None  # the family's default, recorded as asked
    with Image.open(out / "grid.png") as grid:  # frames 0, 1, 3 and 4 of each clip, one row per clip
        assert grid.width >= 4 * WAN_WIDTH and 3 * WAN_HEIGHT <= grid.height < 3 * (WAN_HEIGHT + 20)


def test_resume_writes_the_missing_clip_again(tiny_wan_paths, tmp_path, capsys):
    out = tmp_path / "run"
    assert generate(capsys, tiny_wan_paths[1], out)[0] == 0
    before = [np.asarray(frame) for frame in read_video(out / NAMES[1])]
    (out / NAMES[1]).unlink()
    code, _, err = generate(capsys, tiny_wan_paths[1], out, "--resume")
    assert code == 0, err
    after = [np.asarray(frame) for frame in read_video(out / NAMES[1])]
    assert len(after) == len(before) and all(np.array_equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("args, words", [
    (["--frames", "6"], "one more than a multiple of 4"),
    (["--frames", "5", "--width", "40"], "multiple of 16"),
    (["--fps", "0"], "--fps must lie in"),
])
def test_bad_video_options_are_one_line_and_write_nothing(tiny_wan_paths, tmp_path, capsys, args, words):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", tiny_wan_paths[1], "--out", out, *FAST,
                       *args)
    assert code == 2 and words in one_error_line(err)
    assert not out.exists()


def test_frames_on_an_image_model_are_refused(tiny_sd_path, tmp_path, capsys):
    code, _, err = cli(capsys, "generate", "a cat", "--model", tiny_sd_path, "--out", tmp_path / "run",
                       "--frames", "5", "--steps", "2", "--device", "cpu")
    assert code == 2 and "video models" in one_error_line(err)


def test_transfer_of_a_still_image_to_clips(tiny_wan_paths, tmp_path, capsys):
    """The image inverted as a one-frame clip: 00 is its still reconstruction on every frame, then the targets."""
    from stylealigned.inversion import Trajectory

    image, out, saved = tmp_path / "photo.png", tmp_path / "run", tmp_path / "ref.safetensors"
    ramp = np.linspace(0, 255, 40 * 60, dtype=np.uint8).reshape(40, 60)
    Image.fromarray(np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], -1)).save(image)
    code, stdout, err = cli(capsys, "transfer", "a dog", "a house", "--reference", image, "--reference-prompt",
                            "a red tree", "--save-trajectory", saved, "--model", tiny_wan_paths[2], "--out", out,
                            "--frames", "5", *FAST)
    assert code == 0, err
    assert "2 clips" in stdout
    assert sorted(p.name for p in out.glob("*.mp4")) == ["00-a-red-tree.mp4", "01-a-dog.mp4", "02-a-house.mp4"]
    still = [np.asarray(frame, dtype=int) for frame in read_video(out / "00-a-red-tree.mp4")]
    assert len(still) == 5 and max(np.abs(frame - still[0]).max() for frame in still) <= 8  # H.264 noise only
    assert all(len(read_video(out / name)) == 5 for name in ("01-a-dog.mp4", "02-a-house.mp4"))
    assert Trajectory.load(saved).latents.shape == (4, 4, 1, WAN_HEIGHT // 8, WAN_WIDTH // 8)


def test_score_a_set_of_clips(tiny_wan_paths, tiny_clip_path, tiny_dino_path, tmp_path, capsys):  # noqa: F811
    """Text alignment per clip (mean over its frames), set consistency frame by frame, temporal consistency of
    neighbouring frames: against the image metrics applied to the decoded MP4s' frames."""
    from stylealigned.eval import set_consistency, text_alignment

    out = tmp_path / "run"
    assert generate(capsys, tiny_wan_paths[1], out)[0] == 0
    code, stdout, err = cli(capsys, "score", out, "--clip-model", tiny_clip_path, "--dino-model", tiny_dino_path,
                            "--device", "cpu")
    assert code in (0, None), err
    scores = json.loads((out / "scores.json").read_text())
    clips = [read_video(out / name) for name in NAMES]
    texts = ["a cat", "a dog", "a house"]  # the prompts without the style suffix
    per_clip = [sum(text_alignment(clip, [text] * 5, tiny_clip_path, "cpu")) / 5 for clip, text in zip(clips, texts)]
    across = sum(set_consistency([clip[f] for clip in clips], tiny_dino_path, device="cpu") for f in range(5)) / 5
    temporal = [sum(set_consistency(clip[f:f + 2], tiny_dino_path, device="cpu") for f in range(4)) / 4
                for clip in clips]
    assert [entry["text_alignment"] for entry in scores["images"]] == pytest.approx(per_clip, abs=1e-5)
    assert scores["set_consistency"] == pytest.approx(across, abs=1e-5)
    assert [entry["temporal_consistency"] for entry in scores["images"]] == pytest.approx(temporal, abs=1e-5)
    assert scores["temporal_consistency"] == pytest.approx(sum(temporal) / 3, abs=1e-5)
    assert "temporal consistency" in stdout


def test_transfer_of_a_clip_to_clips(tiny_wan_paths, tmp_path, capsys):
    """A clip reference (7 frames: its first 5 are taken) is inverted as itself: 00 is its reconstruction, a moving
    clip, and the trajectory holds the set's 2 latent frames."""
    from stylealigned.inversion import Trajectory
    from stylealigned.io import save_video
    from tests.test_wan import gradient_clip

    clip, out, saved = tmp_path / "clip.mp4", tmp_path / "run", tmp_path / "ref.safetensors"
    save_video(gradient_clip(7), clip, fps=8)
    code, stdout, err = cli(capsys, "transfer", "a dog", "--reference", clip, "--reference-prompt", "a red tree",
                            "--save-trajectory", saved, "--model", tiny_wan_paths[1], "--out", out, "--frames", "5",
                            *FAST)
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.mp4")) == ["00-a-red-tree.mp4", "01-a-dog.mp4"]
    frames = [np.asarray(frame, dtype=int) for frame in read_video(out / "00-a-red-tree.mp4")]
    assert len(frames) == 5 and np.abs(frames[-1] - frames[0]).max() > 8  # it moves: not a held still
    assert Trajectory.load(saved).latents.shape == (4, 4, 2, WAN_HEIGHT // 8, WAN_WIDTH // 8)


@pytest.mark.parametrize("frames, words", [("9", "has 7 frames but the clips have 9"), (None, "video models only")])
def test_a_short_clip_or_a_clip_on_an_image_model_is_one_line(tiny_wan_paths, tiny_sd_path, tmp_path, capsys,
                                                              frames, words):
    from stylealigned.io import save_video
    from tests.test_wan import gradient_clip

    clip = tmp_path / "clip.mp4"
    save_video(gradient_clip(7), clip, fps=8)
    model = ["--model", tiny_wan_paths[1], "--frames", frames] if frames else ["--model", tiny_sd_path]
    code, _, err = cli(capsys, "transfer", "a dog", "--reference", clip, "--reference-prompt", "a red tree",
                       "--out", tmp_path / "run", *model, "--steps", "2", "--device", "cpu")
    assert code == 2 and words in one_error_line(err)


def test_eval_on_clips_scores_temporal_consistency(tiny_wan_paths, tiny_clip_path, tiny_dino_path,  # noqa: F811
                                                   tmp_path, monkeypatch, capsys):
    """`stylealigned eval` on a video model: each set's clips as MP4s, scored as `stylealigned score` scores clips,
    with and without sharing; reference-quality (still images) is refused in one line."""
    import csv

    from tests.test_eval_cli import eval_args
    from tests.test_eval_score import run_cli

    out = tmp_path / "eval"
    args = eval_args(tiny_wan_paths[1], out, tiny_clip_path, tiny_dino_path, "--configs", "no-share,full",
                     "--frames", "5", "--width", str(WAN_WIDTH), "--height", str(WAN_HEIGHT))
    assert run_cli(monkeypatch, *args) in (0, None)
    assert "temporal consistency" in capsys.readouterr().out
    with open(out / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["config"] for row in rows] == ["no-share", "full"]
    assert all(0 < float(row["temporal_consistency"]) <= 1 for row in rows)
    clips = sorted((out / rows[1]["folder"]).glob("*.mp4"))
    assert len(clips) == 4 and all(len(read_video(clip)) == 5 for clip in clips)
    code = run_cli(monkeypatch, *eval_args(tiny_wan_paths[1], tmp_path / "q", tiny_clip_path, tiny_dino_path,
                                           "--experiment", "reference-quality", "--frames", "5"))
    assert code == 2 and "reference-quality degrades still images" in one_error_line(capsys.readouterr().err)


def test_an_image_to_video_model_is_one_line(tiny_wan_i2v_paths, tmp_path, capsys):
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", tiny_wan_i2v_paths["wan2.1"], "--out",
                       tmp_path / "run", *FAST)
    assert code == 2 and "the CLI and web app run text-to-video Wan" in one_error_line(err)
    assert not (tmp_path / "run").exists()
