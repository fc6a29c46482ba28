"""A user's diffusers attention backend holds under StyleAligned: our processors run what the stock one would."""

import contextlib

import pytest
import torch
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    attention_backend,
)

import stylealigned as sa
from stylealigned.apply import layers_to_share
from stylealigned.backbones import backbone_for
from tests import oracle_dit
from tests.families import latents
from tests.tolerance import assert_rounding_close, denoising_depth

CONFIGS = [sa.StyleAlignedConfig(), sa.StyleAlignedConfig(shared_score_shift=0.69, adain_values=True)]


@pytest.fixture
def dispatch_spy(monkeypatch):
    """The backends our code calls `dispatch_attention_fn` with, in call order (the stock processors imported the
    function by name, so their calls are not seen)."""
    calls = []
    original = attention_dispatch.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        calls.append(backend)
        return original(*args, backend=backend, **kwargs)

    monkeypatch.setattr(attention_dispatch, "dispatch_attention_fn", spy)
    return calls


@contextlib.contextmanager
def native_backend(model, backend="native"):
    """`model.set_attention_backend(backend)`, undone after (it also sets diffusers' global active backend)."""
    active = _AttentionBackendRegistry._active_backend
    model.set_attention_backend(backend)
    try:
        yield
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)


def oracle_latents(pipe, config, **kwargs):
    undo = oracle_dit.install(pipe, config, layers_to_share(backbone_for(pipe), config))
    try:
        return latents(pipe, **kwargs)
    finally:
        undo()


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "shift"])
@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_chosen_backend_runs_and_equals_the_oracle(request, dispatch_spy, family, config):
    """FLUX.1's and Chroma's processors go through the dispatcher: with "native" chosen, so do ours, every call."""
    pipe = request.getfixturevalue(f"{family}_pipe").to(dtype=torch.float64)
    expected = oracle_latents(pipe, config)
    layers = layers_to_share(backbone_for(pipe), config)
    with native_backend(pipe.transformer), sa.apply(pipe, config):
        fast = latents(pipe)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)
    # two steps, each shared layer attends twice (the reference, then the targets), each through the dispatcher
    assert len(dispatch_spy) >= 2 * 2 * len(layers) and set(dispatch_spy) == {AttentionBackendName.NATIVE}


def test_default_path_skips_the_dispatcher_and_an_active_backend_is_followed(flux_pipe, dispatch_spy):
    """No backend chosen: torch's SDPA directly, as the dispatcher would run. diffusers' `attention_backend(...)`
    block (the processors' backend left None) reaches our calls through the dispatcher."""
    config = sa.StyleAlignedConfig(shared_score_shift=0.69)
    with sa.apply(flux_pipe, config):
        plain = latents(flux_pipe)
        assert dispatch_spy == []
        with attention_backend("_native_math"):
            chosen = latents(flux_pipe)
    assert dispatch_spy and set(dispatch_spy) == {None}
    assert_rounding_close(chosen, plain, denoising_depth(flux_pipe, steps=2))  # two kernels, summed in two orders


def test_unet_stays_on_sdpa_as_its_own_processors_do(sd_pipe, dispatch_spy, run):
    """UNet processors call SDPA themselves whatever backend is set; ours do the same, so outputs are unchanged."""
    with sa.apply(sd_pipe, sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)):
        plain = run(sd_pipe, ["a", "b"])
        with native_backend(sd_pipe.unet):
            chosen = run(sd_pipe, ["a", "b"])
    assert dispatch_spy == []
    assert (chosen == plain).all()


def test_a_backend_without_masks_gets_the_shift_as_a_head_channel(flux_pipe, dispatch_spy):
    """diffusers' "_native_flash" refuses any mask (and runs the CPU's flash kernel here): the score shift still
    reaches it, exactly, as a head channel."""
    pipe = flux_pipe.to(dtype=torch.bfloat16)
    config = sa.StyleAlignedConfig(shared_score_shift=0.69)
    with sa.apply(pipe, config):
        plain = latents(pipe)  # the mask row into torch's SDPA (the same CPU flash kernel)
        with native_backend(pipe.transformer, "_native_flash"):
            chosen = latents(pipe)
    assert dispatch_spy and set(dispatch_spy) == {AttentionBackendName._NATIVE_FLASH}
    # the same kernel, the shift as a channel instead of a mask row: the two steps' bf16 roundings apart
    assert_rounding_close(chosen, plain, depth=2)
