"""benchmarks/effect.py end to end on the built-in transformer, one set, one step: the knob experiments' arms, what
each generates with (the family's AdaIN, share_until, the prompted control's styled prompts), and the reports."""

import json
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_knob_experiments_write_their_arms_and_the_frontier(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect

    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["effect.py", "--model", "builtin-flux", "--experiment",
                                      "adain-queries,share-until,adain-values,prompted", "--sets", "1", "--steps", "2",
                                      "--device", "cpu", "--out", str(out), "--by-style"])
    effect.main()
    arms = json.loads((out / "parameters.json").read_text())["arms"]
    assert list(arms) == ["full", "adain-queries-and-keys", "until-0.3", "until-0.5", "until-0.7", "adain-values",
                          "adain-values-until-0.5", "no-share", "prompted"]
    assert arms["full"]["config"]["adain_queries"] is False  # the FLUX family's, resolved
    assert arms["adain-queries-and-keys"]["config"]["adain_queries"] is True
    assert [arms[f"until-{level}"]["config"]["share_until"] for level in ("0.3", "0.5", "0.7")] == [0.3, 0.5, 0.7]
    assert arms["adain-values"]["config"]["adain_values"] and arms["adain-values"]["config"]["share_until"] == 0
    assert {key: arms["adain-values-until-0.5"]["config"][key] for key in ("adain_values", "share_until")} == {
        "adain_values": True, "share_until": 0.5}
    assert arms["prompted"]["prompted"] and arms["prompted"]["layers"] == []
    with Image.open(out / "images" / "prompted" / "000-1.png") as target, \
            Image.open(out / "images" / "no-share" / "000-1.png") as plain:
        assert target.info["prompt"] == f"{plain.info['prompt']} in {effect.random_sets(1, 0)[0].style} style"
    report = (out / "effect.md").read_text()
    assert all(f"| {name} | 1 |" in report for name in arms)
    style = effect.random_sets(1, 0)[0].style
    assert "Split by the reference's style" in report and all(f"| {name}, {style} | 1 |" in report for name in arms)
    assert (out / "frontier.png").is_file() and (out / "effect.png").is_file()


def test_transfer_adain_compares_the_family_default_with_the_papers(monkeypatch, builtin_flux_pipe):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect
    from stylealigned.backbones import backbone_for

    backbone = backbone_for(builtin_flux_pipe)
    arms = {variant.name: effect.arm_record(backbone, variant)
            for variant in effect.variants("transfer-adain", [], backbone)}
    assert [(arm["config"]["adain_queries"], arm["drawn"]) for arm in arms.values()] == [(False, True), (True, True)]
    assert all(arm["config"]["shared_score_shift"] > 0 for arm in arms.values())  # the transfer preset's log 2
