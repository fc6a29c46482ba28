"""Several references: the fast path equals the loop-per-image oracle (tensors, and end to end through a tiny SD
pipeline in fp64); one reference of weight 1, or two of weights (1, 0), is exactly the single-reference method."""

import math

import pytest
import torch

import stylealigned as sa
from stylealigned import sets
from stylealigned.attention import make_reference, shared_attention, token_stats
from stylealigned.backbones import backbone_for
from stylealigned.inversion import invert
from tests import oracle
from tests.test_apply import latents
from tests.tolerance import assert_rounding_close, denoising_depth

PROMPTS = ["a cat in watercolor style", "a dog in oil style", "a house", "a tree", "a car"]
SETTINGS = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)
KNOBS = [{}, dict(shared_score_scale=1.7, shared_score_shift=0.69), dict(adain_values=True, shared_score_shift=-0.5),
         dict(share_attention=False), dict(adain_queries=False, adain_keys=False)]
IDS = ["default", "scale-shift", "adain-values", "adain-only", "attention-only"]


def qkv(groups=2, images=6, heads=2, tokens=7, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(groups, images, heads, tokens, dim, generator=generator, dtype=torch.float64) * (1 + i)
            for i in range(3)]


def by_oracle(q, k, v, config, weights):
    groups = q.shape[0]
    flat = [x.flatten(0, 1) for x in (q, k, v)]
    return oracle.self_attention(*flat, groups, config, weights).view(q.shape)


@pytest.mark.parametrize("knobs", KNOBS, ids=IDS)
@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.2, 0.5, 0.3), (0.6, 0.0, 0.4)])
def test_tensors_equal_oracle(knobs, weights):
    config = sa.StyleAlignedConfig(**knobs)
    q, k, v = qkv()
    fast = shared_attention(q.clone(), k.clone(), v.clone(), config, weights=weights)
    torch.testing.assert_close(fast, by_oracle(q, k, v, config, weights), atol=1e-12, rtol=1e-12)


def test_mixture_statistics_are_the_pooled_moments():
    """Equal weights over equal-sized references: the mixture is the pooled sample (biased variances + EPS)."""
    x = torch.randn(1, 2, 1, 50, 3, dtype=torch.float64)
    ref = make_reference(x, x, x, sa.StyleAlignedConfig(), weights=(1.0, 1.0))
    pooled = x.transpose(1, 2).flatten(2, 3)
    mean, std = ref.query_stats
    torch.testing.assert_close(mean, pooled.mean(-2, keepdim=True))
    unbiased = token_stats(x)[1].square() - 1e-5  # each reference's unbiased variance (+ EPS in token_stats)
    expected = pooled.var(-2, keepdim=True, correction=0) + unbiased.mean(1) / 50 + 1e-5
    torch.testing.assert_close(std.square(), expected)


@pytest.mark.parametrize("knobs", KNOBS[:3], ids=IDS[:3])
def test_one_and_then_zero_weights_equal_one_reference_bit_for_bit(knobs):
    config = sa.StyleAlignedConfig(**knobs)
    q, k, v = qkv()
    one = shared_attention(*(x[:, [0, 2, 3, 4, 5]] for x in (q, k, v)), config)
    assert torch.equal(shared_attention(*(x[:, [0, 2, 3, 4, 5]] for x in (q, k, v)), config, weights=(1.0,)), one)
    two = shared_attention(q, k, v, config, weights=(1.0, 0.0))
    assert torch.equal(two[:, 2:], one[:, 1:]) and torch.equal(two[:, 0], one[:, 0])
    paper = by_oracle(*(x[:, [0, 2, 3, 4, 5]] for x in (q, k, v)), config, (1.0,))  # the single-reference oracle
    torch.testing.assert_close(one, paper, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("knobs", [{}, dict(adain_values=True, shared_score_scale=1.7, shared_score_shift=-0.5)],
                         ids=["default", "values-scale-shift"])
def test_two_references_equal_oracle_end_to_end(sd_pipe, knobs):
    """fp64 through three denoising steps with guidance (two groups, each starting with its two references)."""
    sd_pipe.to(dtype=torch.float64)
    config, weights = sa.StyleAlignedConfig(**knobs), (0.7, 0.3)
    with sa.apply(sd_pipe, config) as handle:
        handle.set_weights(weights)
        fast = latents(sd_pipe, PROMPTS)
        with handle.chunked(1):
            chunked = latents(sd_pipe, PROMPTS)
    oracle.install(sd_pipe, config, groups=2, weights=weights)
    expected = latents(sd_pipe, PROMPTS)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(chunked, expected, atol=1e-9, rtol=1e-9)


def test_weights_move_targets_between_the_references(sd_pipe):
    """A target with weights (w, 1-w) moves from the second reference's set toward the first's as w grows."""
    sd_pipe.to(dtype=torch.float64)
    with sa.apply(sd_pipe) as handle:
        ends = {}
        for w in (1.0, 0.0):
            handle.set_weights((w, 1 - w))
            ends[w] = latents(sd_pipe, PROMPTS)[2:]
        handle.set_weights((0.5, 0.5))
        middle = latents(sd_pipe, PROMPTS)[2:]
    assert (middle - ends[1.0]).norm() < (ends[0.0] - ends[1.0]).norm()
    assert (middle - ends[0.0]).norm() < (ends[0.0] - ends[1.0]).norm()


def test_generate_set_with_one_then_a_zero_weight_reference_equals_one_reference(sd_pipe, decoded):
    sd_pipe.to(dtype=torch.float64)
    sets.generate_set(sd_pipe, PROMPTS[:1] + PROMPTS[2:], seed=3, **SETTINGS)
    one = decoded.take()[0]
    sets.generate_set(sd_pipe, PROMPTS[2:], references=PROMPTS[:1], seed=3, **SETTINGS)
    assert torch.equal(decoded.take()[0], one)  # references=[r] is today's reference
    sets.generate_set(sd_pipe, PROMPTS[2:], references=[PROMPTS[0], "a red car"], weights=[2, 0], seed=3, **SETTINGS)
    two = decoded.take()[0]
    assert two.shape[0] == one.shape[0] + 1
    torch.testing.assert_close(two[0], one[0], atol=1e-12, rtol=0)
    # with two references target j sits at position j + 2 and starts from noise seed + j + 2: compare with one
    # reference whose targets start from those noises
    noise = backbone_for(sd_pipe).initial_noise([0, 2, 3, 4], 3, 32, 32)
    with sa.apply(sd_pipe):
        expected = sd_pipe(PROMPTS[:1] + PROMPTS[2:], latents=noise, output_type="latent", **SETTINGS).images
    torch.testing.assert_close(two[2:], expected[1:], atol=1e-12, rtol=0)


def test_trajectory_and_prompt_references_chunked_equal_one_batch(sd_pipe, decoded):
    """A trajectory reference keeps its slot on the trajectory; waves and chunks hold both references."""
    from PIL import Image

    trajectory = invert(sd_pipe, Image.new("RGB", (32, 32), (200, 40, 40)), "a red cat", num_inference_steps=3)
    config = sa.StyleAlignedConfig(shared_score_shift=math.log(2))
    kwargs = dict(references=[PROMPTS[1], trajectory], weights=[0.4, 0.6], **SETTINGS)
    found = {}
    sets.generate_set(sd_pipe, PROMPTS[2:], config, **kwargs)
    one = torch.cat(decoded.take())
    assert torch.equal(one[1], trajectory.latents[-1])
    sets.generate_set(sd_pipe, PROMPTS[2:], config, batch_size=1, wave_size=2, **kwargs,
                      on_image=lambda i, image: found.setdefault(i, image.info["latent"]))
    assert sorted(found) == list(range(5))
    assert_rounding_close(torch.stack([found[i] for i in range(5)]), one, denoising_depth(sd_pipe, 3))


@pytest.fixture(params=["flux", "sd3"])
def dit_pipe(request):
    return request.getfixturevalue(f"{request.param}_pipe").to(dtype=torch.float64)


@pytest.mark.parametrize("knobs", [{}, dict(adain_values=True, shared_score_shift=0.69, shared_layers=1.0)],
                         ids=["default", "values-shift-all-layers"])
def test_two_references_on_transformers_equal_oracle(dit_pipe, knobs):
    """FLUX (RoPE: every reference's keys at the shifted positions) and SD3 with guidance, fp64, chunked too."""
    from stylealigned.apply import layers_to_share
    from tests import oracle_dit
    from tests.dit_pipelines import PROMPT_KWARGS
    from tests.families import latents as dit_latents

    config, weights = sa.StyleAlignedConfig(**knobs), (0.3, 0.7)
    with sa.apply(dit_pipe, config) as handle:
        handle.set_weights(weights)
        fast = dit_latents(dit_pipe, PROMPTS, guidance_scale=5.0)
        with handle.chunked(2):
            chunked = dit_latents(dit_pipe, PROMPTS, guidance_scale=5.0)
        handle.set_weights((1.0, 0.0))
        first_only = dit_latents(dit_pipe, PROMPTS, guidance_scale=5.0)
        handle.set_weights((1.0,))
        noise = backbone_for(dit_pipe).initial_noise([0, 2, 3, 4], 0, 32, 32)  # the targets' own noises
        one = dit_pipe(PROMPTS[:1] + PROMPTS[2:], num_inference_steps=2, height=32, width=32, latents=noise,
                       output_type="latent", guidance_scale=5.0, **PROMPT_KWARGS).images
    undo = oracle_dit.install(dit_pipe, config, layers_to_share(backbone_for(dit_pipe), config), weights)
    try:
        expected = dit_latents(dit_pipe, PROMPTS, guidance_scale=5.0)
    finally:
        undo()
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(chunked, expected, atol=1e-9, rtol=1e-9)
    # (1, 0): the first reference and the targets as with the first reference alone; the second one drops out
    torch.testing.assert_close(first_only[[0, 2, 3, 4]], one, atol=1e-12, rtol=0)


def test_cli_generate_with_two_reference_prompts(tiny_sd_path, tmp_path, capsys):
    """The references come first (00, 01), every prompt is a target; the images are the API's set."""
    import json

    import numpy as np

    from tests.conftest import loaded
    from tests.test_cli import FAST, cli, pixels

    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a house", "a tree", "--reference-prompt", PROMPTS[0], "--reference-prompt",
                       PROMPTS[1], "--reference-weight", "3", "--reference-weight", "1", "--model", tiny_sd_path,
                       "--out", out, "--batch-size", "1", *FAST)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record["prompts"] == PROMPTS[:2] + ["a house", "a tree"]
    assert record["parameters"]["reference_weights"] == [3, 1]
    expected = sets.generate_set(loaded(tiny_sd_path), ["a house", "a tree"], references=PROMPTS[:2],
                                 weights=[0.75, 0.25], num_inference_steps=3, width=32, height=32)
    found = pixels(out)
    assert sorted(found)[2:] == ["02-a-house.png", "03-a-tree.png"]
    for name, image in zip(sorted(found), expected):
        assert np.abs(found[name].astype(int) - np.asarray(image)).max() <= 1, name


@pytest.mark.parametrize("args, expected", [
    (["--reference-prompt", "a cat", "--reference-weight", "1", "--reference-weight", "2"], "--reference-weight"),
    (["--reference-prompt", "a cat", "--reference-prompt", "a dog", "--reference-weight", "-1",
      "--reference-weight", "2"], ">= 0"),
    (["--reference-prompt", "a cat", "--reference-prompt", "a dog", "--share-group-norm", "true"], "one reference"),
])
def test_cli_bad_references_are_one_line_errors(tiny_sd_path, tmp_path, capsys, args, expected):
    from tests.test_cli import FAST, cli

    code, _, err = cli(capsys, "generate", "a dog", *args, "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST)
    assert code == 2 and expected in err.splitlines()[-1] and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_cli_transfer_mixes_two_images(tiny_sd_path, tmp_path, capsys):
    """Two inverted images lead the set; the transfer preset's GroupNorm sharing (one reference only) is dropped."""
    import json

    from PIL import Image

    from tests.test_cli import FAST, cli, pixels

    paths = []
    for number, color in enumerate([(200, 40, 40), (30, 60, 220)]):
        paths += ["--reference", tmp_path / f"{number}.png", "--reference-prompt", f"a {['red', 'blue'][number]} cat"]
        Image.new("RGB", (32, 32), color).save(tmp_path / f"{number}.png")
    out = tmp_path / "run"
    code, _, err = cli(capsys, "transfer", "a dog", *paths, "--model", tiny_sd_path, "--out", out, *FAST)
    assert code == 0, err
    assert sorted(pixels(out)) == ["00-a-red-cat.png", "01-a-blue-cat.png", "02-a-dog.png"]
    parameters = json.loads((out / "run.json").read_text())["parameters"]
    assert parameters["config"]["share_group_norm"] is False and len(parameters["reference"]) == 2
