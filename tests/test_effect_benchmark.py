"""benchmarks/effect.py end to end on the built-in transformer, one set, one step: the knob experiments' arms and
custom --arm ones, what each generates with (the family's AdaIN, share_until, the prompted control's styled prompts),
and the reports (split by style and by prompted object), pooled over seeds by effect_pool.py."""

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_knob_experiments_write_their_arms_and_the_frontier(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect

    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["effect.py", "--model", "builtin-flux", "--experiment",
                                      "adain-queries,share-until,adain-values,prompted", "--sets", "1", "--steps", "2",
                                      "--device", "cpu", "--out", str(out), "--by-style", "--by-object",
                                      "--arm", "two:shared_layers=transformer_blocks.1.attn+"
                                      "single_transformer_blocks.3.attn,shared_score_shift=-0.5"])
    effect.main()
    arms = json.loads((out / "parameters.json").read_text())["arms"]
    assert list(arms) == ["full", "adain-queries-and-keys", "until-0.3", "until-0.5", "until-0.7", "adain-values",
                          "adain-values-until-0.5", "no-share", "prompted", "two"]
    assert arms["two"]["layers"] == ["transformer_blocks.1.attn", "single_transformer_blocks.3.attn"]
    assert arms["two"]["config"]["shared_score_shift"] == -0.5 and arms["two"]["config"]["adain_queries"] is False
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
    objects = effect.Variant("full", None).toy_set(effect.random_sets(1, 0)[0], 0, 0).targets
    assert "Split by the object" in report and all(f"| {name}, {thing} | 1 |" in report
                                                      for name in arms for thing in set(objects))
    assert (out / "frontier.png").is_file() and (out / "effect.png").is_file()
    records = json.loads((out / "records.json").read_text())
    assert records["trained"] in records["about"] and "FLUX training steps" in records["trained"]
    assert [record["config"] for record in records["records"]] == list(arms)


def test_drawn_instead_counts_what_each_arms_missed_targets_were_classified_as(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect

    def verdict(prompted, found):
        return {"prompted": prompted, "object": found, "object_right": prompted == found}

    records = [{"config": "full", "verdicts": [verdict("star", "cross"), verdict("cross", "star"),
                                                verdict("star", "star")]},
               {"config": "full", "verdicts": [verdict("star", "cross"), verdict("star", "heart")]},
               {"config": "no-share", "verdicts": [verdict("cross", "cross"), verdict("cross", "star")]}]
    assert effect.drawn_instead(records) == ["- full, cross: star 1", "- full, star: cross 2, heart 1",
                                             "- no-share, cross: star 1"]
    split = effect.split_by_object(records[:1])
    assert [(part["object"], len(part["verdicts"])) for part in split] == [("star", 2), ("cross", 1)]


def test_transfer_adain_compares_the_family_default_with_the_papers(monkeypatch, builtin_flux_pipe):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect
    from stylealigned.backbones import backbone_for

    backbone = backbone_for(builtin_flux_pipe)
    arms = {variant.name: effect.arm_record(backbone, variant)
            for variant in effect.variants("transfer-adain", [], backbone)}
    assert [(arm["config"]["adain_queries"], arm["drawn"]) for arm in arms.values()] == [(False, True), (True, True)]
    assert all(arm["config"]["shared_score_shift"] > 0 for arm in arms.values())  # the transfer preset's log 2


def test_custom_arms_parse_each_knob_by_its_type_and_refuse_bad_ones_in_one_line(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect

    arm = effect.custom_arm("mine: adain_keys=false, share_until=0.3, shared_layers=0.5")
    assert arm.name == "mine"
    config = arm.config()
    assert (config.adain_keys, config.share_until, config.shared_layers) == (False, 0.3, 0.5)
    assert effect.custom_arm("f:shared_layers=single_").config().shared_layers == "single_"
    assert effect.custom_arm("f:shared_layers=a.attn+b.attn").config().shared_layers == ("a.attn", "b.attn")
    for text, message in [("mine", "is not NAME:KNOB=VALUE"), ("m:sharpness=2", "unknown knob 'sharpness'"),
                          ("m:adain_keys=yes", "adain_keys takes true or false"),
                          ("m:share_until=late", "share_until takes a number"),
                          ("m:share_until=2", "share_until must be a noise level in")]:
        with pytest.raises(ValueError, match=message):
            effect.custom_arm(text)


def _run(folder: Path, seed: int, sets: list[tuple[str, list[bool]]], guidance: float = 5.0) -> Path:
    """A fake effect.py run: parameters.json and records.json, one record per (arm, objects right per target)."""
    folder.mkdir()
    (folder / "parameters.json").write_text(json.dumps({"steps": 20, "seed": seed, "model": f"copy-{seed}",
                                                        "guidance": guidance, "arms": {"full": {}}}))
    records = [{"config": arm, "set": index, "diversity": 0.5, "reference_style_right": True,
                "verdicts": [{"style_agrees": True, "object_right": right, "leaks": False, "seen_agrees": True,
                              "layout": 0.3} for right in rights]}
               for index, (arm, rights) in enumerate(sets)]
    (folder / "records.json").write_text(json.dumps({"about": "builtin-flux: 10 FLUX training steps.",
                                                     "trained": "10 FLUX training steps", "records": records}))
    return folder


def test_effect_pool_pools_sets_across_seeds_and_keeps_each_runs_rates(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect_pool

    one = _run(tmp_path / "one", 1, [("full", [True, True, False]), ("full", [True, True, True])])
    two = _run(tmp_path / "two", 2, [("full", [False, False, True])])
    text = effect_pool.pool([one, two])
    pooled = next(line for line in text.splitlines() if line.startswith("| full |"))
    assert pooled.startswith("| full | 3 | 1.00 [1.00, 1.00] | 0.67 [")  # 6 of 9 targets, copies of one model
    low, high = (float(bound) for bound in pooled.split(" | ")[3].split("[")[1].rstrip("]").split(", "))
    assert low < 0.67 < high  # sets resampled across both runs: their rates 2/3, 1 and 1/3 spread it
    assert "| 1 | 2 | 1.000 / 0.833 / 0.000 |" in text and "| 2 | 1 | 1.000 / 0.333 / 0.000 |" in text
    assert "Pooled over 2 runs (seeds 1, 2)" in text


def test_effect_pool_refuses_runs_it_cannot_pool_in_one_line(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import effect_pool

    one = _run(tmp_path / "one", 1, [("full", [True])])
    with pytest.raises(SystemExit, match="two or more"):
        effect_pool.pool([one])
    with pytest.raises(SystemExit, match=r"made differently \(guidance\)"):
        effect_pool.pool([one, _run(tmp_path / "other", 2, [("full", [True])], guidance=7.0)])
    with pytest.raises(SystemExit, match="seed 1 is given twice"):
        effect_pool.pool([one, _run(tmp_path / "again", 1, [("full", [True])])])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "parameters.json").write_text("{}")
    with pytest.raises(SystemExit, match="no records.json; write it with effect.py's --report-only"):
        effect_pool.pool([one, tmp_path / "old"])
    empty = _run(tmp_path / "empty", 3, [])
    with pytest.raises(SystemExit, match="no judged sets yet"):
        effect_pool.pool([one, empty])
    with pytest.raises(SystemExit, match="not an effect.py run"):
        effect_pool.pool([one, tmp_path])
