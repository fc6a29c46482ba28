"""`share_until`: targets share only at steps whose noise level is at or above it.

On every family (an SD1 UNet with GroupNorm sharing, the five image transformers, Wan's one transformer and two
experts), a threshold between the second and third steps' noise levels gives, bit for bit, the set shared for two
steps and plain for the third: the same pipeline with the handle taken off in the step-end callback of step 2. The
levels come from the scheduler (its timesteps over its 1,000 training timesteps), so a backbone that read its
denoiser's timestep on the wrong scale, or reversed, would share at other steps and fail. The same run differs from
sharing every step and from sharing none, so the comparison sees the switch.
"""

import pytest
import torch

import stylealigned as sa
from stylealigned.cli.common import build_config
from stylealigned.errors import UserError
from tests.families import FAMILIES, FP64
from tests.test_wan import noise as wan_noise
from tests.wan_pipelines import WAN_KWARGS, load_wan

STEPS = 3
SWITCH = 2  # steps that share before the threshold


def sd_latents(pipe, **kwargs):
    noise = torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)])
    return pipe(["a cat in watercolor style", "a dog", "a house"], num_inference_steps=STEPS, guidance_scale=5.0,
                height=32, width=32, latents=noise.to(pipe.unet.dtype), output_type="latent", **kwargs).images


def wan_latents(pipe, **kwargs):
    prompts = ["a cat in watercolor style", "a dog", "a house"]
    return pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=5.0, latents=wan_noise(pipe, 3),
                output_type="latent", **WAN_KWARGS, **kwargs).frames


CASES = [pytest.param("sd", id="sd")] + [pytest.param(family, id=family.name) for family in FAMILIES] + [
    pytest.param(("wan", experts), id=f"wan-{experts}") for experts in (1, 2)]


@pytest.fixture
def run(request):
    """(pipeline, its config's knobs, a function running STEPS steps of a set and returning the final latents)."""
    case = request.param
    if case == "sd":  # GroupNorm shared too: the norms switch with the attention
        return request.getfixturevalue("sd_pipe"), dict(share_group_norm=True), sd_latents
    if isinstance(case, tuple):  # Wan 2.1's one transformer, Wan 2.2's two experts
        return load_wan(request.getfixturevalue("tiny_wan_paths")[case[1]]), {}, wan_latents
    pipe = case.pipe(request, case.dtype)
    return pipe, {}, lambda pipe, **kwargs: case.latents(pipe, steps=STEPS, **case.guided, **kwargs)


def noise_levels(pipe) -> list[float]:
    """The noise level of each step of the last call, from the scheduler alone."""
    return (pipe.scheduler.timesteps[:STEPS].double() / pipe.scheduler.config.num_train_timesteps).tolist()


@pytest.mark.parametrize("run", CASES, indirect=True)
def test_sharing_stops_below_the_threshold(run):
    pipe, knobs, latents = run
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(pipe, config) as handle:
        def take_off_after_switch(pipe, step, timestep, tensors):
            if step == SWITCH - 1:
                handle.remove()
            return {}

        expected = latents(pipe, callback_on_step_end=take_off_after_switch)
    levels = noise_levels(pipe)
    assert levels == sorted(levels, reverse=True) and levels[SWITCH - 1] > levels[SWITCH]
    until = (levels[SWITCH - 1] + levels[SWITCH]) / 2
    with sa.apply(pipe, config.replace(share_until=until)):
        switched = latents(pipe)
    assert torch.equal(switched, expected)
    with sa.apply(pipe, config):
        always = latents(pipe)
    never = latents(pipe)
    assert not torch.equal(switched, always) and not torch.equal(switched, never)


@pytest.mark.parametrize("case", ["sd", FAMILIES[0]], ids=["sd", "flux"])
def test_a_threshold_above_every_step_but_the_first_shares_the_first_only(request, case):
    """At or above: the threshold at the first step's level (pure noise: 1 on a flow model, 0.667 for 3 DDIM steps)
    shares that step alone."""
    pipe = request.getfixturevalue("sd_pipe") if case == "sd" else case.pipe(request, case.dtype)
    latents = sd_latents if case == "sd" else lambda pipe, **kwargs: case.latents(pipe, steps=STEPS, **case.guided,
                                                                                  **kwargs)
    with sa.apply(pipe) as handle:
        expected = latents(pipe, callback_on_step_end=lambda pipe, step, t, tensors: handle.remove() or {})
    first = noise_levels(pipe)[0]
    with sa.apply(pipe, sa.StyleAlignedConfig(share_until=first)):
        assert torch.equal(latents(pipe), expected)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_a_level_outside_zero_to_one_is_refused(value):
    with pytest.raises(ValueError, match="share_until"):
        sa.StyleAlignedConfig(share_until=value)
    with pytest.raises(UserError, match="share_until"):
        build_config("text-to-image", False, share_until=value)


def test_the_knob_is_recorded_and_off_by_default():
    assert sa.StyleAlignedConfig().share_until == 0.0 and sa.StyleAlignedConfig.transfer().share_until == 0.0
    assert sa.StyleAlignedConfig(share_until=0.5).to_dict()["share_until"] == 0.5


@pytest.mark.parametrize("run", CASES[:2], indirect=True)
def test_targets_in_chunks_switch_as_one_batch(run):
    """References recorded once per call, targets replayed one at a time: unshared steps run the chunks plainly, and
    the GroupNorm and attention caches of shared steps are not disturbed by them (fp64, FP64's rounding bound)."""
    pipe, knobs, latents = run
    pipe.to(dtype=torch.float64)
    with sa.apply(pipe, sa.StyleAlignedConfig(**knobs)):
        latents(pipe)  # for the scheduler's levels
    levels = noise_levels(pipe)
    config = sa.StyleAlignedConfig(**knobs, share_until=(levels[0] + levels[1]) / 2)
    with sa.apply(pipe, config) as handle:
        one = latents(pipe)
        with handle.chunked(1):
            chunked = latents(pipe)
    torch.testing.assert_close(chunked, one, **FP64)
