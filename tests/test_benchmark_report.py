"""The speed benchmark: its arithmetic (times against the floor are paired within each round of repeats) and the
models it builds."""

import argparse

import pytest
import torch

from benchmarks.speed import Measurement, build, paired_ratio, parsed, report
from stylealigned.apply import layers_to_share
from stylealigned.backbones import backbone_for
from stylealigned.config import StyleAlignedConfig


def test_paired_ratio_cancels_load_that_drifts_between_rounds():
    floor = [10.0, 20.0, 30.0]  # the machine slows down round by round
    assert paired_ratio([10.2, 20.4, 30.6], floor) == pytest.approx(1.02)
    assert paired_ratio([10.2, 40.0, 30.6], floor) == pytest.approx(1.02)  # one disturbed run does not move it
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], floor)  # runs of different rounds never pair


def test_report_judges_ours_by_paired_ratios():
    # Medians alone would say ours is 20 % over the floor (12 against 10); round by round it is 1 % over.
    floor = Measurement([10.0, 20.0, 5.0], [1.0, 2.0, 0.5], 30.0, 100, 50)
    ours = Measurement([10.1, 20.2, 12.0], [1.01, 2.02, 0.6], 30.0, 100, 60)
    vanilla = Measurement([9.0, 18.0, 4.5], [0.9, 1.8, 0.45], 30.0, 100, 40)
    results = {(2, "vanilla"): vanilla, (2, "floor"): floor, (2, "apply"): ours}
    args = argparse.Namespace(sizes=[2], steps=1, batch_size="B")
    lines = report(results, args, ("vanilla", "floor", "apply"))
    verdict = next(line for line in lines if line.startswith("- set 2, apply"))
    assert "denoiser time +1.0 % (within 3%; shared attention layers +1.0 %), peak memory +0.0 % (within the " \
           "denoiser +20.0 %)" in verdict
    row = next(line for line in lines if line.startswith("| 2 | apply"))
    assert "| 12.000 | 6000.0 | 84.2 % | 1.122 | 1.010 |" in row


@pytest.mark.parametrize("model, width, heads, blocks, shared", [
    ("qwen", 3072, 24, {"transformer_blocks": 3}, 2),  # Qwen-Image's default shares half the blocks (2 of 3)
    ("zimage", 3840, 30, {"noise_refiner": 1, "context_refiner": 1, "layers": 2}, 2),  # the joint layers
])
def test_speed_builds_the_image_transformers_at_real_block_shapes_and_reduced_depth(model, width, heads, blocks,
                                                                                     shared):
    """`speed.py --model qwen|zimage` on the CPU: the real blocks' width and heads (of 128), few of them; built on
    the meta device, so nothing is allocated or run."""
    args, _, dtype = parsed(["--model", model])
    pipe = build(args, torch.device("meta"), dtype)
    backbone = backbone_for(pipe)
    assert all(len(backbone.denoiser.get_submodule(name)) == count for name, count in blocks.items())
    layers = layers_to_share(backbone, StyleAlignedConfig())
    attention = backbone.denoiser.get_submodule(layers[0])
    assert (len(layers), attention.heads, attention.inner_dim) == (shared, heads, width)
    assert (args.batch_size, args.sizes, args.steps) == (2, [4], 1)  # a 4-image set in chunks of 2 targets
