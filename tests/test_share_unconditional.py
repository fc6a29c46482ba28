"""`share_unconditional=False`: under true CFG only the prompt's denoiser call shares; the negative prompt's call,
which the pipelines name "uncond", runs as the plain model.

Each family whose pipeline names that call is checked against its oracle, which shares in the first of the two
calls at each noise level only (it reads no names). The same set under the paper's setting (both calls share) moves
the targets far beyond the tolerance and leaves the reference as it is, so the oracle tells the two apart. Families
that batch the negative prompt with the prompt, or make no unconditional prediction, refuse the knob in one line.
"""

import math

import pytest
import torch

import stylealigned as sa
from stylealigned.apply import layers_to_share
from stylealigned.backbones import backbone_for
from stylealigned.backbones.base import Conditioning
from stylealigned.cli.common import build_config
from stylealigned.errors import UserError
from tests import oracle_dit
from tests.families import FP64, families, knob_id
from tests.test_wan import ORACLE as WAN_ORACLE
from tests.test_wan import latents as wan_latents
from tests.test_wan import with_oracle as wan_with_oracle

KNOBS = [{}, dict(adain_values=True, shared_layers=1.0)]
PROMPTS = ["a star in polka style", "a circle", "a heart"]
BATCHED = ("encoder_hidden_states", "pooled_projections")  # FLUX inputs with a batch dimension


def assert_targets_moved(unshared, shared, tolerance: float):
    """The reference is the same under both settings; every target differs far beyond the tolerance."""
    change = (unshared - shared).flatten(1).abs().amax(1)
    assert change[0] <= tolerance and (change[1:] > 100 * tolerance).all(), change


@pytest.mark.parametrize("knobs", KNOBS, ids=knob_id)
@pytest.mark.parametrize("family", families("flux2", "qwen"))
def test_the_negative_prompts_call_runs_plain_as_the_oracle_says(request, family, knobs):
    pipe = family.pipe(request, family.dtype)
    config = sa.StyleAlignedConfig(share_unconditional=False, **knobs)
    fast, expected = family.fast_and_oracle(pipe, config, **family.guided)
    torch.testing.assert_close(fast, expected, **family.tolerance)
    with sa.apply(pipe, config.replace(share_unconditional=True)):
        both = family.latents(pipe, **family.guided)
    assert_targets_moved(fast, both, family.tolerance["atol"])


def builtin_flux_latents(pipe, steps=2):
    """builtin-flux's final latents for PROMPTS under true CFG 5 against the empty prompt, image i from seed i."""
    backbone = backbone_for(pipe)
    noise = backbone.start_latents(backbone.initial_noise(range(len(PROMPTS)), 0, 64, 64), 64, 64)
    return pipe(prompt=PROMPTS, num_inference_steps=steps, height=64, width=64, latents=noise.to(pipe.dtype),
                true_cfg_scale=5.0, negative_prompt="", max_sequence_length=12, output_type="latent").images


@pytest.mark.parametrize("knobs", KNOBS, ids=knob_id)
def test_builtin_flux_true_cfg_equals_the_oracle(builtin_flux_pipe, knobs):
    """FluxPipeline's true CFG, on the built-in transformer in float64."""
    pipe = builtin_flux_pipe.to(dtype=torch.float64)
    config = sa.StyleAlignedConfig(share_unconditional=False, **knobs)
    with sa.apply(pipe, config):
        fast = builtin_flux_latents(pipe)
    undo = oracle_dit.install(pipe, config, layers_to_share(backbone_for(pipe), config))
    try:
        expected = builtin_flux_latents(pipe)
    finally:
        undo()
    torch.testing.assert_close(fast, expected, **FP64)
    with sa.apply(pipe, config.replace(share_unconditional=True)):
        both = builtin_flux_latents(pipe)
    assert_targets_moved(fast, both, FP64["atol"])


def test_wan_equals_the_oracle(wan_pipe):
    config = sa.StyleAlignedConfig(share_unconditional=False)
    with sa.apply(wan_pipe, config):
        fast = wan_latents(wan_pipe)
    torch.testing.assert_close(fast, wan_with_oracle(wan_pipe, config), atol=WAN_ORACLE, rtol=WAN_ORACLE)
    with sa.apply(wan_pipe, sa.StyleAlignedConfig()):
        both = wan_latents(wan_pipe)
    assert_targets_moved(fast, both, WAN_ORACLE)


def test_the_packages_own_loops_name_their_calls_too(builtin_flux_pipe):
    """`Backbone.predict` (inversion, panoramas) names the negative prompt's call as the pipelines do: under
    share_unconditional=False a guided prediction is the plain model's negative velocity guided toward the shared
    prompted one."""
    pipe = builtin_flux_pipe.to(dtype=torch.float64)
    backbone = backbone_for(pipe)
    latents = backbone.start_latents(backbone.initial_noise(range(3), 0, 64, 64), 64, 64).to(torch.float64)
    guided = backbone.conditioning("a star", 5.0, 64, 64)

    def rows(inputs):  # one prompt's inputs for the three images
        return {key: value.expand(3, *value.shape[1:]) if key in BATCHED else value for key, value in inputs.items()}

    prompted, negative = rows(guided.inputs), rows(guided.negative)
    timestep = torch.tensor(800.0)
    with sa.apply(pipe, sa.StyleAlignedConfig(share_unconditional=False, shared_layers=1.0)):
        fast = backbone.predict(latents, timestep, Conditioning(prompted, False, negative), 5.0)
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0)):
        shared = backbone.predict(latents, timestep, Conditioning(prompted, False), 1.0)
    plain = backbone.predict(latents, timestep, Conditioning(negative, False), 1.0)
    torch.testing.assert_close(fast, plain + 5.0 * (shared - plain), **FP64)


@pytest.mark.parametrize("fixture", ["sd_pipe", "sd3_pipe", "zimage_pipe", "chroma_pipe", "flux_pipe"])
def test_families_without_a_named_unconditional_call_refuse_it(request, fixture):
    """UNets, SD3 and Z-Image batch the negative prompt with the prompt; ChromaPipeline does not name its call;
    FLUX.1-dev embeds its guidance. By default the knob is the paper's on each."""
    pipe = request.getfixturevalue(fixture)
    with pytest.raises(UserError, match="^share_unconditional=False needs a pipeline that predicts the unconditional "
                                        "branch in a denoiser call of its own; .*turn it on for"):
        sa.apply(pipe, sa.StyleAlignedConfig(share_unconditional=False))
    with sa.apply(pipe, sa.StyleAlignedConfig()) as handle:
        assert handle.config.share_unconditional is True


def test_the_guided_preset_shares_the_familys_guided_layers(builtin_flux_pipe, flux2_pipe):
    """builtin-flux: its first double-stream block and the last three eighths (6 of 16) of its single-stream blocks;
    FLUX.2-klein by the same rule; layers given explicitly win."""
    backbone = backbone_for(builtin_flux_pipe)
    config = backbone.fit_preset(sa.StyleAlignedConfig.guided())
    assert (config.share_unconditional, config.share_until, config.adain_values) == (False, 0.5, True)
    assert layers_to_share(backbone, config) == ["transformer_blocks.0.attn"] + [
        f"single_transformer_blocks.{i}.attn" for i in range(10, 16)]
    assert layers_to_share(backbone, config.replace(shared_layers=1.0)) == backbone.attention_layers()
    klein = backbone_for(flux2_pipe)
    double, single = klein.blocks()
    assert layers_to_share(klein, klein.fit_preset(sa.StyleAlignedConfig.guided())) == [
        *double[:math.ceil(len(double) / 2)], *single[len(single) - math.ceil(3 * len(single) / 8):]]


def test_the_knob_validates_and_round_trips():
    with pytest.raises(ValueError, match="share_unconditional must be True or False"):
        sa.StyleAlignedConfig(share_unconditional="no")
    assert sa.StyleAlignedConfig().share_unconditional is True
    assert sa.StyleAlignedConfig(share_unconditional=False).to_dict()["share_unconditional"] is False
    assert build_config("text-to-image", False, share_unconditional=False).share_unconditional is False
