"""The evaluation runner on the tiny SD pipeline with tiny CLIP/DINO: files, rows, resume, settings guard."""

import csv
import json

import pytest
from PIL import Image

from stylealigned.errors import UserError
from stylealigned.eval import load_benchmark, set_consistency, text_alignment
from stylealigned.eval import ablations
from stylealigned.eval.ablations import DEFAULT_CONFIGS, parse_configs
from stylealigned.eval.runner import SET_SEED_STRIDE, evaluate
from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)

CONFIGS = ["no-share", "full"]


@pytest.fixture
def run_eval(sd_pipe, tiny_clip_path, tiny_dino_path, tmp_path):
    def run(configs=CONFIGS, styles=2, seed=0):
        return evaluate(sd_pipe, tmp_path / "eval", configs, styles=styles, seed=seed, clip_model=tiny_clip_path,
                        dino_model=tiny_dino_path, num_inference_steps=2)

    return run


def test_runner_writes_rows_summary_and_plot(run_eval, tmp_path, tiny_clip_path, tiny_dino_path):
    rows = run_eval()
    out = tmp_path / "eval"
    with open(out / "results.csv", newline="") as file:
        table = list(csv.DictReader(file))
    assert [(row["config"], row["style_index"]) for row in table] == [
        ("no-share", "0"), ("no-share", "1"), ("full", "0"), ("full", "1")]
    styles = load_benchmark()
    for row, written in zip(rows, table):
        style = styles[row["style_index"]]
        assert written["style"] == style.style and int(written["seed"]) == SET_SEED_STRIDE * row["style_index"]
        images = [Image.open(path) for path in sorted((out / row["folder"]).glob("*.png"))]
        assert len(images) == 4
        # the row's numbers are the metrics of the saved images against the objects (no style text)
        expected_alignment = sum(text_alignment(images, list(style.objects), tiny_clip_path, device="cpu")) / 4
        assert float(written["text_alignment"]) == pytest.approx(expected_alignment, abs=1e-5)
        assert float(written["set_consistency"]) == pytest.approx(
            set_consistency(images, tiny_dino_path, device="cpu"), abs=1e-5)
    # the two configurations really differ, on the same seeds
    assert rows[0]["set_consistency"] != rows[2]["set_consistency"]

    summary = (out / "summary.md").read_text()
    for config in CONFIGS:
        mine = [row["set_consistency"] for row in rows if row["config"] == config]
        assert f"| {config} | 2 |" in summary and f"{sum(mine) / 2:.3f} ±" in summary
    assert "0.287 ± 0.03" in summary and "0.51 ± 0.14" in summary
    with Image.open(out / "tradeoff.png") as plot:
        plot.load()
        assert plot.format == "PNG" and plot.width > 200
    assert json.loads((out / "eval.json").read_text())["num_inference_steps"] == 2


def test_rerun_skips_finished_sets(run_eval, tmp_path, generated_sets):
    first = run_eval()
    assert len(generated_sets) == 4

    assert run_eval() == first
    assert len(generated_sets) == 4  # nothing left to do

    (tmp_path / "eval" / first[1]["folder"] / "scores.json").unlink()  # an unfinished set
    run_eval(configs=CONFIGS + ["no-adain"])
    assert len(generated_sets) == 4 + 1 + 2
    assert generated_sets[4] == load_benchmark()[1].prompts()


def test_rerun_with_other_settings_is_refused(run_eval, generated_sets):
    run_eval(styles=1)
    with pytest.raises(UserError, match="other settings"):
        run_eval(styles=1, seed=1)
    assert len(generated_sets) == 2


def test_config_names():
    assert parse_configs(None, has_reference=False) == DEFAULT_CONFIGS
    assert parse_configs(None, has_reference=True)[-1] == "transfer"
    assert parse_configs("full, no-share,full", has_reference=False) == ["full", "no-share"]
    on_request = ["adain-queries-and-keys", "adain-keys-only", "share-until-0.5"]
    assert not set(on_request) & set(DEFAULT_CONFIGS)
    assert parse_configs(",".join(on_request), has_reference=False) == on_request
    assert [ablations.CONFIGS[name]().adain_queries for name in on_request[:2]] == [True, False]
    assert ablations.CONFIGS["share-until-0.5"]().share_until == 0.5
    with pytest.raises(UserError, match="unknown configuration"):
        parse_configs("full,bogus", has_reference=False)
    with pytest.raises(UserError, match="needs a real reference"):
        parse_configs("transfer", has_reference=False)


def test_a_folder_with_other_files_is_refused(run_eval, tmp_path, generated_sets):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        run_eval(styles=1)
    assert generated_sets == [] and sorted(path.name for path in (tmp_path / "eval").iterdir()) == ["notes.txt"]
