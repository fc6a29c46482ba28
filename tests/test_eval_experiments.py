"""The named experiments end to end on the tiny SD pipeline (rows, summary, plot, resume), the degradations, the
diversity metric and the CSD loader."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import stylealigned.eval.runner as runner
from stylealigned.backbones import backbone_for
from stylealigned.errors import UserError
from stylealigned.eval import load_benchmark, set_consistency
from stylealigned.eval.csd import csd_style_embeddings, csd_style_similarity, load_csd
from stylealigned.eval.degrade import DEGRADATIONS, LEVELS, degrade
from stylealigned.eval.experiments import (EXPERIMENTS, LAYER_FRACTIONS, NO_GROUPS, choice_spread, layer_conditions,
                                           layer_section)
from stylealigned.eval.metrics import diversity, score_set
from stylealigned.eval.runner import evaluate
from tests.eval_models import build_csd_checkpoint, tiny_clip_path, tiny_csd_path, tiny_dino_path  # noqa: F401
from tests.test_eval_metrics import near_copy, noise_image
from tests.test_eval_score import run_cli


@pytest.fixture
def run_experiment(sd_pipe, tiny_clip_path, tiny_dino_path, tmp_path):
    def start(experiment, styles=1, out="eval", **extra):
        return evaluate(sd_pipe, tmp_path / out, styles=styles, clip_model=tiny_clip_path, dino_model=tiny_dino_path,
                        experiment=experiment, num_inference_steps=2, **extra)

    return start


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=int)


def set_images(out, row) -> list:
    return sorted((out / row["folder"]).glob("*.png"))


def table(out) -> list[dict]:
    with open(out / "results.csv", newline="") as file:
        return list(csv.DictReader(file))


def check_outputs(out, experiment, rows):
    """results.csv holds the rows, summary.md a line per condition, the plot opens; a rerun generates nothing."""
    assert [(row["config"], int(row["style_index"])) for row in table(out)] == [
        (row["config"], row["style_index"]) for row in rows]
    summary = (out / "summary.md").read_text()
    for name in dict.fromkeys(row["config"] for row in rows):
        assert f"| {name} | " in summary
    with Image.open(out / EXPERIMENTS[experiment].plot) as plot:
        plot.load()
        assert plot.format == "PNG" and plot.width > 300
    assert json.loads((out / "eval.json").read_text())["experiment"] == experiment
    return summary


def test_set_size_keeps_references_and_seeds(run_experiment, tmp_path, generated_sets, tiny_dino_path):
    rows = run_experiment("set-size", set_sizes=[4, 8])
    out = tmp_path / "eval"
    check_outputs(out, "set-size", rows)
    small, large = (set_images(out, row) for row in rows)
    assert (len(small), len(large)) == (4, 8) and [row["set_size"] for row in rows] == [4, 8]
    style = load_benchmark()[0]
    assert generated_sets[1][:4] == style.prompts() and generated_sets[1][4].endswith(style.style)
    # same reference and seeds: the first 4 images of the set of 8 are those of the set of 4
    for first, second in zip(small, large[:4]):
        assert np.abs(pixels(first) - pixels(second)).max() <= 2
    # diversity is 1 - the DINO consistency of the targets alone
    images = [Image.open(path) for path in large]
    assert rows[1]["diversity"] == pytest.approx(
        1 - set_consistency(images, tiny_dino_path, include_reference=False, device="cpu"), abs=1e-5)

    assert run_experiment("set-size", set_sizes=[4, 8]) == rows and len(generated_sets) == 2  # resumed: nothing to do
    (out / rows[0]["folder"] / "scores.json").unlink()
    run_experiment("set-size", set_sizes=[4, 8])
    assert len(generated_sets) == 3


def test_layer_sweep_spreads_fractions_and_names_blocks(run_experiment, tmp_path, sd_pipe):
    rows = run_experiment("layer-sweep")
    out = tmp_path / "eval"
    summary = check_outputs(out, "layer-sweep", rows)
    layers = backbone_for(sd_pipe).attention_layers()
    names = [row["config"] for row in rows]
    assert names == [f"layers-{f:.3f}" for f in LAYER_FRACTIONS] + ["down-blocks", "mid-block", "up-blocks"]
    assert [row["layers_shared"] for row in rows[:9]] == [round(f * len(layers)) for f in LAYER_FRACTIONS]
    assert rows[-1]["layers_shared"] == len([name for name in layers if "up_blocks" in name]) > 0
    assert "Attention layers shared: layers-0.000 0" in summary
    # no layer shared is the plain model; all of them is the paper default, and they differ
    plain = run_experiment("ablations", out="plain", configs=["no-share", "full"])
    for fraction_row, plain_row in zip([rows[0], rows[8]], plain):
        assert fraction_row["set_consistency"] == pytest.approx(plain_row["set_consistency"], abs=1e-5)
    assert rows[0]["set_consistency"] != rows[8]["set_consistency"]


def test_reference_choice_rotates_the_reference(run_experiment, tmp_path):
    rows = run_experiment("reference-choice", styles=2)
    out = tmp_path / "eval"
    summary = check_outputs(out, "reference-choice", rows)
    objects = load_benchmark()[0].objects
    firsts = [row["prompts"][0] for row in rows if row["style_index"] == 0]
    assert firsts == [f"{name}, {load_benchmark()[0].style}" for name in objects]
    consistency = [row["set_consistency"] for row in rows if row["style_index"] == 1]
    spread = choice_spread(rows)["set_consistency"]
    by_style = [[row["set_consistency"] for row in rows if row["style_index"] == i] for i in (0, 1)]
    assert spread[0] == pytest.approx(np.mean([max(v) - min(v) for v in by_style]))
    assert spread[2] == pytest.approx(max(max(v) - min(v) for v in by_style)) and max(consistency) > min(consistency)
    assert f"| set consistency | {spread[0]:.3f} |" in summary


def test_reference_quality_transfers_from_degraded_references(run_experiment, tmp_path):
    rows = run_experiment("reference-quality")
    out = tmp_path / "eval"
    summary = check_outputs(out, "reference-quality", rows)
    assert [row["config"] for row in rows] == ["clean"] + [f"{k}-{level}" for k in DEGRADATIONS for level in LEVELS]
    with Image.open(out / "references" / "000.png") as opened:
        source = opened.convert("RGB")
    by_name = {row["config"]: row for row in rows}
    assert np.array_equal(pixels(set_images(out, by_name["clean"])[0]), np.asarray(source, dtype=int))
    expected = np.asarray(degrade(source, "noise", 3, seed=0), dtype=int)
    assert np.array_equal(pixels(set_images(out, by_name["noise-3"])[0]), expected)
    assert by_name["clean"]["texts"][0] is None and by_name["blur-2"]["degradation"] == "blur"
    assert len({round(row["set_consistency"], 6) for row in rows}) > 1  # the degradation changes the transfer
    assert "clean reference" in summary


def test_abstract_vs_concrete_splits_by_kind_with_csd(run_experiment, tmp_path, monkeypatch, tiny_csd_path):
    styles = load_benchmark()
    monkeypatch.setattr(runner, "load_benchmark", lambda: [styles[74], styles[0], styles[75]])
    rows = run_experiment("abstract-vs-concrete", styles=3, csd_model=tiny_csd_path)
    out = tmp_path / "eval"
    summary = check_outputs(out, "abstract-vs-concrete", rows)
    assert [row["kind"] for row in rows[:3]] == ["abstract", "concrete", "abstract"]
    abstract = [row["set_consistency"] for row in rows if row["config"] == "full" and row["kind"] == "abstract"]
    assert "| full, abstract | 2 | " in summary and f"{np.mean(abstract):.3f} ±" in summary
    assert "CSD style similarity" in summary and tiny_csd_path in summary
    images = [Image.open(path) for path in set_images(out, rows[4])]
    assert rows[4]["csd_style_similarity"] == pytest.approx(csd_style_similarity(images, tiny_csd_path, "cpu"),
                                                            abs=1e-5)
    assert "csd_style_similarity" in table(out)[0]


def test_layer_groups_follow_the_family(flux_pipe, sd3_pipe):
    flux = backbone_for(flux_pipe)
    groups = {c.name: c for c in layer_conditions(flux) if not c.name.startswith("layers-")}
    assert list(groups) == ["double-stream", "single-stream"]
    assert sum(c.columns["layers_shared"] for c in groups.values()) == len(flux.attention_layers())
    assert all("single" not in name for name in groups["double-stream"].config().shared_layers)
    sd3 = layer_conditions(backbone_for(sd3_pipe))
    assert [c.name for c in sd3] == [f"layers-{f:.3f}" for f in LAYER_FRACTIONS]
    rows = [{"config": c.name, "layers_shared": c.columns["layers_shared"]} for c in sd3]
    assert layer_section(rows)[-1] == NO_GROUPS + "."


def test_degradations_are_deterministic_and_grow_with_the_level():
    image = noise_image(5, size=(64, 64)).filter(ImageFilter.GaussianBlur(2))  # the built-in model's size
    for kind in DEGRADATIONS:
        distances = []
        for level in LEVELS:
            once, again = degrade(image, kind, level, seed=3), degrade(image, kind, level, seed=3)
            assert once.size == image.size and np.array_equal(np.asarray(once), np.asarray(again))
            distances.append(np.abs(np.asarray(once, dtype=int) - np.asarray(image, dtype=int)).mean())
        assert 0 < distances[0] < distances[1] < distances[2], kind
    assert not np.array_equal(np.asarray(degrade(image, "noise", 1, seed=1)), np.asarray(degrade(image, "noise", 1)))
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(image, "blur", 4)


def test_diversity_is_zero_for_identical_targets_and_grows_with_difference(tiny_clip_path, tiny_dino_path):
    base = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    direction = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    spreads = [diversity(torch.nn.functional.normalize(base + step * direction * torch.tensor([[0.0], [1.0], [2.0]]),
                                                       dim=-1)) for step in (0.0, 0.1, 0.5, 2.0)]
    assert spreads[0] == pytest.approx(0.0, abs=1e-6) and spreads[1] < spreads[2] < spreads[3]

    reference, target = noise_image(1), noise_image(2)
    texts = ["a fox"] * 4
    same = score_set([reference, target, target, target], texts, tiny_clip_path, tiny_dino_path, "cpu")
    close = score_set([reference, target, near_copy(target, 1), near_copy(target, 2)], texts, tiny_clip_path,
                      tiny_dino_path, "cpu")
    apart = score_set([reference, noise_image(3), noise_image(4), noise_image(6)], texts, tiny_clip_path,
                      tiny_dino_path, "cpu")
    assert same["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < close["diversity"] < apart["diversity"]


def test_csd_loader_matches_the_checkpoint_layout(tmp_path):
    tower, style = build_csd_checkpoint(tmp_path / "csd.pth")
    encoder = load_csd(str(tmp_path / "csd.pth"))
    images = [noise_image(seed, size=(40, 36)) for seed in range(3)]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(tower(encoder.pixels(images)) @ style, dim=-1)
    embeddings = csd_style_embeddings(encoder, images)
    assert torch.allclose(embeddings, expected, atol=1e-5)
    assert csd_style_similarity(images, str(tmp_path / "csd.pth"), "cpu") == pytest.approx(
        (expected[1:] @ expected[0]).mean().item(), abs=1e-5)


def test_a_wrong_csd_checkpoint_is_refused_in_one_line(tmp_path):
    build_csd_checkpoint(tmp_path / "good.pth")
    state = torch.load(tmp_path / "good.pth", weights_only=True)["model_state_dict"]
    cases = {
        "text.pth": b"not a checkpoint",
        "dino.pth": {"embeddings.cls_token": torch.zeros(1, 1, 8)},
        "no-head.pth": {key: value for key, value in state.items() if "last_layer_style" not in key},
        "short.pth": {key: value for key, value in state.items() if "resblocks.1.ln_2" not in key},
        "head.pth": state | {"module.last_layer_style": torch.zeros(7, 16)},
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        with pytest.raises(UserError) as refused:
            load_csd(str(path))
        assert "\n" not in str(refused.value) and str(path) in str(refused.value), name
    with pytest.raises(UserError, match="no CSD checkpoint"):
        load_csd(str(tmp_path / "missing.pth"))


def test_eval_command_runs_an_experiment(tmp_path, monkeypatch, capsys, tiny_sd_path, tiny_clip_path,
                                         tiny_dino_path):
    args = ["eval", "--model", tiny_sd_path, "--out", str(tmp_path / "out"), "--styles", "1", "--steps", "2",
            "--clip-model", tiny_clip_path, "--dino-model", tiny_dino_path, "--device", "cpu"]
    sizes = ["--experiment", "set-size", "--set-sizes", "3,5", "--batch-size", "2"]
    assert run_cli(monkeypatch, *args, *sizes) in (0, None)
    printed = capsys.readouterr().out
    assert "| size-3 | 1 |" in printed and "| size-5 | 1 |" in printed and "set-size.png" in printed
    rows = table(tmp_path / "out")
    assert [len(list((tmp_path / "out" / row["folder"]).glob("*.png"))) for row in rows] == [3, 5]
    for extra, message in [(["--experiment", "bogus"], "unknown experiment"),
                           (["--experiment", "layer-sweep", "--configs", "full"], "--configs"),
                           (["--set-sizes", "4,8"], "--set-sizes"),
                           (["--experiment", "set-size", "--set-sizes", "4,x"], "whole numbers"),
                           (["--csd-model", str(tmp_path / "none.pth")], "no CSD checkpoint")]:
        assert run_cli(monkeypatch, *args[:4], str(tmp_path / "refused"), *args[5:], *extra) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error and error.count("\n") == 1, extra
        assert not (tmp_path / "refused").exists()
