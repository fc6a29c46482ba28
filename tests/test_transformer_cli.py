"""`generate`, `transfer` and `eval` on every transformer family's tiny pipeline folder (tests/families.py) and the
built-in FLUX.1-style model, and what a transformer refuses, in one line."""

import csv
import json
from dataclasses import dataclass

import pytest

from stylealigned.inversion import Trajectory
from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)
from tests.families import FAMILIES
from tests.test_cli import cli, pixels
from tests.test_eval_cli import eval_args
from tests.test_eval_score import run_cli
from tests.test_transfer_cli import painting  # noqa: F401  (fixture)


@dataclass(frozen=True)
class Model:
    name: str
    path_fixture: str
    height: int
    width: int

    def args(self, steps=3) -> list[str]:
        return ["--steps", str(steps), "--width", str(self.width), "--height", str(self.height), "--device", "cpu"]


MODELS = {family.name: Model(family.name, family.path_fixture, family.height, family.width) for family in FAMILIES}
MODELS["builtin-flux"] = Model("builtin-flux", "tiny_builtin_flux_path", 32, 32)
# Z-Image-Turbo's setting: no guidance in the sampling nor the inversion
TRANSFER_ARGS = {"zimage": ["--guidance", "0", "--inversion-guidance", "0"]}


def models(*names: str) -> list:
    return [pytest.param(MODELS[name], id=name) for name in (names or MODELS)]


def one_error_line(err: str) -> str:
    """The single `error:` line of a refused command (loading progress bars may precede it), no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


GENERATE = [pytest.param(MODELS[name], [], id=name) for name in MODELS] + [
    pytest.param(MODELS["qwen"], ["--negative-prompt", "a blurry photo"], id="qwen-true-cfg")]


@pytest.mark.parametrize("model, negative", GENERATE)
def test_generate_writes_a_set(request, model, negative, tmp_path, capsys, caplog):
    """Prompts of different token lengths, one image per call. With a negative prompt QwenImagePipeline runs true
    CFG (at its default scale): a second call per step, and none of its warning that guidance is off."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a red dog in the house", "--style", "watercolor", "--model",
                       request.getfixturevalue(model.path_fixture), "--out", out, "--batch-size", "1", *negative,
                       *model.args())
    assert code == 0, err
    if model.name == "qwen":
        assert ("classifier-free guidance is not enabled" in caplog.text) == (not negative)  # the pipeline's warning
    found = pixels(out)
    assert sorted(found) == ["00-a-cat-watercolor.png", "01-a-red-dog-in-the-house-watercolor.png"]
    assert all(array.shape == (model.height, model.width, 3) for array in found.values())
    record = json.loads((out / "run.json").read_text())["parameters"]
    assert record["scheduler"] == "auto" and record["config"]["reference_positions"] == "shifted"
    assert record["config"]["shared_layers"] is None  # the family's default, recorded as asked
    flux_style = model.name in ("flux", "flux2", "builtin-flux")  # AdaIN on keys alone: the family's, resolved
    assert record["config"]["adain_queries"] is not flux_style


@pytest.mark.parametrize("flag, expected", [("--adain-queries", True), ("--no-adain-queries", False)])
def test_a_knob_given_wins_over_the_family(tiny_flux_path, tmp_path, capsys, flag, expected):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", tiny_flux_path, "--out", out, flag,
                       *MODELS["flux"].args(steps=1))
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["parameters"]["config"]["adain_queries"] is expected


@pytest.mark.parametrize("model", models())
def test_transfer_writes_the_reconstruction_targets_and_trajectory(request, model, tmp_path, capsys,
                                                                    painting):  # noqa: F811
    out, saved = tmp_path / "run", tmp_path / "ref.safetensors"
    extra = TRANSFER_ARGS.get(model.name, [])
    code, _, err = cli(capsys, "transfer", "a dog", "--reference", painting, "--reference-prompt", "a red tree",
                       "--save-trajectory", saved, "--model", request.getfixturevalue(model.path_fixture), "--out",
                       out, *extra, *model.args())
    assert code == 0, err
    found = pixels(out)
    assert sorted(found) == ["00-a-red-tree.png", "01-a-dog.png"]
    assert all(array.shape == (model.height, model.width, 3) for array in found.values())
    config = json.loads((out / "run.json").read_text())["parameters"]["config"]
    assert not config["share_group_norm"] and config["shared_score_shift"] > 0  # the transfer preset, fitted
    trajectory = Trajectory.load(saved)
    assert len(trajectory.timesteps) == 3 and not all(float(t).is_integer() for t in trajectory.timesteps)
    assert (trajectory.width, trajectory.height) == (model.width, model.height)
    if extra:
        assert trajectory.guidance_scale == 0.0


@pytest.mark.parametrize("model", models())
@pytest.mark.parametrize("flag", ["--share-group-norm", "--full-attention-share"])
def test_a_knob_without_meaning_is_one_line_and_writes_nothing(request, model, tmp_path, capsys, flag):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", request.getfixturevalue(model.path_fixture),
                       "--out", out, flag, *model.args())
    assert code == 2 and flag.strip("-").replace("-", "_") in one_error_line(err)
    assert not out.exists()


@pytest.mark.parametrize("model", models("sd3", "flux2", "qwen", "builtin-flux"))
def test_eval_runs_the_configurations_that_apply(request, model, tmp_path, monkeypatch, painting, tiny_clip_path,
                                                 tiny_dino_path):  # noqa: F811
    out = tmp_path / "out"
    args = eval_args(request.getfixturevalue(model.path_fixture), out, tiny_clip_path, tiny_dino_path, "--width",
                     str(model.width), "--height", str(model.height), "--reference-image", str(painting),
                     "--reference-prompt", "a cat", "--reference-style", "watercolor")
    assert run_cli(monkeypatch, *args) in (0, None)
    with open(out / "results.csv", newline="") as file:
        configs = sorted({row["config"] for row in csv.DictReader(file)})
    assert configs == ["full", "no-adain", "no-share", "shared-layers-0.25", "shared-layers-0.5", "transfer"]


@pytest.mark.parametrize("model", models("qwen"))
def test_generate_from_an_init_image(request, model, tmp_path, capsys, painting):  # noqa: F811
    """`--init-image` loads the family's img2img pipeline (QwenImageImg2ImgPipeline) from the same components; the
    img2img pipelines of the others are tested through the library (tests/test_transformer_oracle.py)."""
    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--model", request.getfixturevalue(model.path_fixture),
                       "--out", out, *model.args(), "--init-image", painting, "--strength", "0.6")
    assert code == 0, err
    found = pixels(out)
    assert len(found) == 2 and all(array.shape == (model.height, model.width, 3) for array in found.values())


# refusals across families


def test_a_noise_scheduler_on_a_flow_model_is_refused(tiny_flux_path, tmp_path, capsys):
    code, _, err = cli(capsys, "generate", "a cat", "--model", tiny_flux_path, "--out", tmp_path / "run",
                       "--scheduler", "ddim", *MODELS["flux"].args())
    assert code == 2 and "flow-matching" in one_error_line(err)


def test_a_trajectory_from_another_model_is_refused(tiny_flux_path, tiny_sd3_path, tmp_path, capsys,
                                                    painting):  # noqa: F811
    saved = tmp_path / "ref.safetensors"
    assert cli(capsys, "transfer", "a dog", "--reference", painting, "--reference-prompt", "a tree",
               "--save-trajectory", saved, "--model", tiny_flux_path, "--out", tmp_path / "a",
               *MODELS["flux"].args())[0] == 0
    code, _, err = cli(capsys, "transfer", "a dog", "--trajectory", saved, "--model", tiny_sd3_path,
                       "--out", tmp_path / "b", *MODELS["sd3"].args())
    assert code == 2 and "inverted with model" in one_error_line(err)
    assert not (tmp_path / "b").exists()


def test_eval_asked_for_a_configuration_a_transformer_cannot_run(tmp_path, monkeypatch, capsys, tiny_flux_path,
                                                                  tiny_clip_path, tiny_dino_path):  # noqa: F811
    out = tmp_path / "out"
    args = eval_args(tiny_flux_path, out, tiny_clip_path, tiny_dino_path, "--configs", "full,full-attention-share")
    assert run_cli(monkeypatch, *args) == 2
    assert "full-attention-share cannot run on a FLUX.1" in one_error_line(capsys.readouterr().err)
    assert not out.exists()

