"""benchmarks/attention_parts.py: its split attention against the per-equation oracle, and its run end to end."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stylealigned import attention
from stylealigned.attention import shared_attention
from stylealigned.config import StyleAlignedConfig
from tests import oracle_dit
from tests.tolerance import assert_rounding_close

ROOT = Path(__file__).resolve().parents[1]
IMAGE = slice(3, None)  # FLUX: text tokens first
TOKENS = 12


@pytest.fixture
def parts(monkeypatch):
    """The script's module with its patches applied for this test only."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import attention_parts

    for module, name, value in attention_parts.patches():
        monkeypatch.setattr(module, name, value)
    return attention_parts


def group(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 2, TOKENS, 4, generator=generator, dtype=torch.float64) * 2 + 0.5 for _ in range(3)]


def by_oracle(q, k, v, **knobs):
    """The oracle's group with the FLUX default's AdaIN (keys alone) and `knobs`; shift -inf: no sharing."""
    if knobs.get("shared_score_shift") == -math.inf:
        knobs = {"share_attention": False}
    return oracle_dit.attend_group(q[0], k[0], v[0], IMAGE, StyleAlignedConfig(adain_queries=False, **knobs))


@pytest.mark.parametrize("text_shift, image_shift", [(0.0, -math.inf), (1.0, -math.inf), (0.0, -1.0), (0.5, 0.0)])
def test_streams_see_the_reference_with_their_own_shifts(parts, text_shift, image_shift):
    q, k, v = group()
    config = parts.PartConfig(adain_queries=False, text_shift=text_shift, image_shift=image_shift)
    expected = by_oracle(q, k, v, shared_score_shift=text_shift)
    expected[:, :, IMAGE] = by_oracle(q, k, v, shared_score_shift=image_shift)[:, :, IMAGE]
    out = shared_attention(q, k, v, config, IMAGE)[0]
    assert_rounding_close(out, expected, depth=2 * TOKENS + 4)  # sums over own and shared keys, and the channels


@pytest.mark.parametrize("heads", [(0,), (1,), (0, 1)])
def test_heads_that_do_not_share_attend_as_the_plain_model(parts, heads):
    q, k, v = group(1)
    shared = by_oracle(q, k, v)
    expected = oracle_dit.attend_group(q[0], k[0], v[0], IMAGE, StyleAlignedConfig.disabled())
    expected[:, list(heads)] = shared[:, list(heads)]
    out = shared_attention(q, k, v, parts.PartConfig(adain_queries=False, heads=heads), IMAGE)[0]
    assert_rounding_close(out, expected, depth=2 * TOKENS + 4)


def test_a_split_with_nothing_changed_is_the_package_to_the_bit(parts):
    q, k, v = group(2)
    assert attention.align_targets is parts.split_align_targets
    package = shared_attention(q, k, v, StyleAlignedConfig(adain_queries=False), IMAGE)
    for split in (parts.PartConfig(adain_queries=False), parts.PartConfig(adain_queries=False, heads=(0, 1))):
        assert torch.equal(shared_attention(q, k, v, split, IMAGE), package)


def test_the_script_runs_its_arms_on_effects_sets(parts, tmp_path, monkeypatch):
    effect = parts.effect
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["attention_parts.py", "--model", "builtin-flux", "--experiment", "streams,heads",
                                      "--sets", "1", "--steps", "2", "--device", "cpu", "--out", str(out)])
    effect.main()
    arms = json.loads((out / "parameters.json").read_text())["arms"]
    heads = ["heads-" + "".join(map(str, chosen)) for chosen in parts.HEAD_SETS]
    assert list(arms) == ["no-share", "full", *parts.STREAMS, *heads]
    assert arms["text-stream-only"]["config"]["image_shift"] == -math.inf
    assert arms["heads-123"]["config"]["heads"] == [1, 2, 3] and arms["full"]["config"].get("heads") is None
    assert arms["full"]["layers"] == arms["heads-0"]["layers"] == arms["image-queries-1"]["layers"]

    def pixels(name):
        return np.stack([np.asarray(effect.read_image(file)) for file in effect.set_files(out, name, 0)[1:]])

    assert not np.array_equal(pixels("text-stream-only"), pixels("full"))
    assert not np.array_equal(pixels("text-stream-only"), pixels("no-share"))
    report = (out / "effect.md").read_text()
    assert all(f"| {name} | 1 |" in report for name in arms)
