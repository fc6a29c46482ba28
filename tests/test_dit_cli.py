"""`generate` and `transfer` on the tiny FLUX.1, SD3.5 and FLUX.2-klein pipelines, and knobs a transformer refuses."""

import csv
import json

import pytest

from stylealigned.inversion import Trajectory
from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)
from tests.test_eval_cli import eval_args
from tests.test_eval_metrics import noise_image
from tests.test_eval_score import run_cli
from tests.test_cli import FAST, cli, pixels
from tests.test_transfer_cli import painting  # noqa: F401  (fixture)


def one_error_line(err: str) -> str:
    """The single `error:` line of a refused command (loading progress bars may precede it), no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(params=["flux", "sd3", "flux2", "builtin_flux"])
def model(request):
    return request.param, request.getfixturevalue(f"tiny_{request.param}_path")


def test_generate_on_a_transformer(model, tmp_path, capsys):
    family, path = model
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--style", "watercolor", "--model", path,
                       "--out", out, "--batch-size", "1", *FAST)
    assert code == 0, err
    assert sorted(pixels(out)) == ["00-a-cat-watercolor.png", "01-a-dog-watercolor.png"]
    record = json.loads((out / "run.json").read_text())["parameters"]
    assert record["scheduler"] == "auto" and record["config"]["reference_positions"] == "shifted"
    assert record["config"]["shared_layers"] is None  # the family's default, recorded as asked


def test_transfer_on_a_transformer(model, tmp_path, capsys, painting):  # noqa: F811
    family, path = model
    out, saved = tmp_path / "run", tmp_path / "ref.safetensors"
    code, _, err = cli(capsys, "transfer", "a dog", "--reference", painting, "--reference-prompt", "a red tree",
                       "--save-trajectory", saved, "--model", path, "--out", out, *FAST)
    assert code == 0, err
    assert sorted(pixels(out)) == ["00-a-red-tree.png", "01-a-dog.png"]
    config = json.loads((out / "run.json").read_text())["parameters"]["config"]
    assert not config["share_group_norm"] and config["shared_score_shift"] > 0  # the transfer preset, fitted
    trajectory = Trajectory.load(saved)
    assert len(trajectory.timesteps) == 3 and not all(float(t).is_integer() for t in trajectory.timesteps)


@pytest.mark.parametrize("flag", ["--share-group-norm", "--full-attention-share"])
def test_a_knob_without_meaning_is_one_line_and_writes_nothing(model, tmp_path, capsys, flag):
    family, path = model
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", path, "--out", out, flag, *FAST)
    assert code == 2 and flag.strip("-").replace("-", "_") in one_error_line(err)
    assert not out.exists()


def test_a_noise_scheduler_on_a_flow_model_is_refused(tiny_flux_path, tmp_path, capsys):
    code, _, err = cli(capsys, "generate", "a cat", "--model", tiny_flux_path, "--out", tmp_path / "run",
                       "--scheduler", "ddim", *FAST)
    assert code == 2 and "flow-matching" in one_error_line(err)


def test_a_trajectory_from_another_model_is_refused(tiny_flux_path, tiny_sd3_path, tmp_path, capsys,
                                                    painting):  # noqa: F811
    saved = tmp_path / "ref.safetensors"
    assert cli(capsys, "transfer", "a dog", "--reference", painting, "--reference-prompt", "a tree",
               "--save-trajectory", saved, "--model", tiny_flux_path, "--out", tmp_path / "a", *FAST)[0] == 0
    code, _, err = cli(capsys, "transfer", "a dog", "--trajectory", saved, "--model", tiny_sd3_path,
                       "--out", tmp_path / "b", *FAST)
    assert code == 2 and "inverted with model" in one_error_line(err)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("family", ["sd3", "flux2", "builtin_flux"])
def test_eval_on_a_transformer_runs_the_configurations_that_apply(family, request, tmp_path, monkeypatch, capsys,
                                                                  tiny_clip_path, tiny_dino_path):  # noqa: F811
    noise_image(3, size=(32, 32)).save(tmp_path / "reference.png")
    out = tmp_path / "out"
    path = request.getfixturevalue(f"tiny_{family}_path")
    args = eval_args(path, out, tiny_clip_path, tiny_dino_path, "--width", "32", "--height", "32",
                     "--reference-image", str(tmp_path / "reference.png"), "--reference-prompt", "a cat",
                     "--reference-style", "watercolor")
    assert run_cli(monkeypatch, *args) in (0, None)
    with open(out / "results.csv", newline="") as file:
        configs = sorted({row["config"] for row in csv.DictReader(file)})
    assert configs == ["full", "no-adain", "no-share", "shared-layers-0.25", "shared-layers-0.5", "transfer"]


def test_eval_asked_for_a_configuration_a_transformer_cannot_run(tmp_path, monkeypatch, capsys, tiny_flux_path,
                                                                  tiny_clip_path, tiny_dino_path):  # noqa: F811
    out = tmp_path / "out"
    args = eval_args(tiny_flux_path, out, tiny_clip_path, tiny_dino_path, "--configs", "full,full-attention-share")
    assert run_cli(monkeypatch, *args) == 2
    assert "full-attention-share cannot run on a FLUX.1" in one_error_line(capsys.readouterr().err)
    assert not out.exists()
