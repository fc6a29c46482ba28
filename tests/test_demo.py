"""`stylealigned demo` end to end on the shipped built-in model (few steps), and the toy sets it draws."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from stylealigned.demo import CELL, TARGETS, load_judge, random_sets, run_demo
from stylealigned.models import load_pipeline
from stylealigned.toy.world import OBJECTS, STYLES

from .test_cli import cli


@pytest.mark.parametrize("model", ["builtin", "builtin-flux"])
def test_demo_writes_grid_and_summary(tmp_path, capsys, model):
    out, threads = tmp_path / "demo", torch.get_num_threads()
    try:
        code, stdout, stderr = cli(capsys, "demo", "--out", out, "--sets", "1", "--steps", "4", "--device", "cpu",
                                   "--model", model)
    finally:
        torch.set_num_threads(threads)  # the demo runs on one thread by default; leave other tests as they were
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "grid.png"]
    summary = json.loads((out / "demo.json").read_text())
    assert list(summary) == ["sets", "style_agreement", "object_accuracy"] and summary["sets"] == 1
    for metric in ("style_agreement", "object_accuracy"):
        assert list(summary[metric]) == ["shared", "unshared"]
        for rate in summary[metric].values():  # a fraction of 3 targets
            assert 0 <= rate <= 1 and round(rate * TARGETS, 6).is_integer()
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("style agreement") and str(out / "grid.png") in lines[2]
    with Image.open(out / "grid.png") as grid:  # rows: no sharing, shared, transfer; 4 columns after the labels
        assert grid.width > (TARGETS + 1) * CELL and 3 * CELL < grid.height < 4 * CELL
        written = np.asarray(grid.convert("RGB"))
    agreement, accuracy = summary["style_agreement"], summary["object_accuracy"]
    assert f"{agreement['shared']:.2f} shared vs {agreement['unshared']:.2f} not shared" in lines[0]
    assert f"{accuracy['shared']:.2f} shared vs {accuracy['unshared']:.2f} not shared" in lines[1]
    pipe = load_pipeline(model, device="cpu")  # the same demo in this process: the files hold its results
    pipe.set_progress_bar_config(disable=True)
    expected = run_demo(pipe, load_judge(), 1, 4, 0)
    assert summary == json.loads(json.dumps(expected.summary))
    assert np.array_equal(written, np.asarray(expected.grid.convert("RGB")))


def test_demo_refuses_a_model_its_classifier_cannot_judge(tmp_path, capsys):
    code, _, stderr = cli(capsys, "demo", "--out", tmp_path / "demo", "--model", "black-forest-labs/FLUX.1-dev")
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "builtin-flux" in stderr
    assert not (tmp_path / "demo").exists()


def test_demo_keeps_earlier_results_without_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "grid.png").write_bytes(b"earlier")
    code, _, stderr = cli(capsys, "demo", "--out", out)
    assert code == 2 and "--overwrite" in stderr
    assert (out / "grid.png").read_bytes() == b"earlier"


def test_random_sets_are_seeded_balanced_prefix_stable_and_never_repeat_the_reference_object():
    sets = random_sets(2 * len(STYLES), seed=7)
    assert sets == random_sets(2 * len(STYLES), seed=7) and sets != random_sets(2 * len(STYLES), seed=8)
    assert random_sets(5, seed=7) == sets[:5]  # a longer run extends a shorter one
    assert Counter(s.style for s in sets) == {style: 2 for style in STYLES}
    for toy_set in sets:
        assert len(set(toy_set.targets)) == TARGETS and toy_set.object not in toy_set.targets
        assert {toy_set.object, *toy_set.targets} <= set(OBJECTS)
        assert toy_set.reference_prompt == f"a {toy_set.object} in {toy_set.style} style"
        assert toy_set.target_prompts == [f"a {target}" for target in toy_set.targets]
