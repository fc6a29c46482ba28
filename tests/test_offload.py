"""Offloading and low-memory VAE modes compose with StyleAligned: same images, hooks that really run, clean removal.

No GPU here: accelerate's offload hooks are installed with the CPU as execution device (`device="cpu"`); they wrap
every forward as they do on a GPU (model offload moves whole models, sequential offload loads each submodule's
weights from the meta device and drops them after), so what is tested is that our hooks compose with theirs.
"""

import numpy as np
import pytest
import torch
from accelerate.hooks import AlignDevicesHook, CpuOffload

import stylealigned as sa

PROMPTS = ["a cat in watercolor style", "a dog", "a house", "a tree", "a car"]
CONFIG = sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)  # shared GroupNorm and the score shift: every hook kind we install
SETTINGS = dict(num_inference_steps=2, height=32, width=32)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


def chunked_set(pipe, reference=None, prompts=PROMPTS) -> np.ndarray:
    """Targets two per denoiser call: the reference recorded once per step, replayed for each chunk."""
    return pixels(sa.generate_set(pipe, prompts, CONFIG, reference=reference, batch_size=2, **SETTINGS))


def plain_call(pipe, prompts=PROMPTS[:2]) -> np.ndarray:
    return pipe(prompts, output_type="np", generator=torch.Generator().manual_seed(0), **SETTINGS).images


def offload(pipe, mode: str) -> None:
    """enable_{mode}_cpu_offload on the CPU. diffusers names that device "cpu:0", which accelerate's sequential
    offload then fails to compare with "cpu" when dropping weights (upstream, also without StyleAligned; a GPU's
    "cuda:0" is fine), so the hooks get the plain "cpu"."""
    getattr(pipe, f"enable_{mode}_cpu_offload")(device="cpu")
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        for module in component.modules():
            hook = getattr(module, "_hf_hook", None)
            if isinstance(hook, AlignDevicesHook) and hook.execution_device is not None:
                hook.execution_device = torch.device("cpu")


def low_memory_vae(pipe) -> None:
    """VAE slicing, and tiling with tiles small enough to tile these 32-pixel images (16 pixels, 8 latents)."""
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 16, 8


@pytest.fixture
def offload_calls(monkeypatch):
    """How often accelerate's offload hooks ran, per hook class."""
    calls = {CpuOffload: 0, AlignDevicesHook: 0}
    for cls in calls:
        original = cls.pre_forward

        def counted(self, module, *args, _cls=cls, _original=original, **kwargs):
            calls[_cls] += 1
            return _original(self, module, *args, **kwargs)

        monkeypatch.setattr(cls, "pre_forward", counted)
    return calls


def chunked_call(pipe) -> np.ndarray:
    """The pipeline's own call inside `handle.chunked(2)`: the reference once per step, then targets two at a time."""
    with sa.apply(pipe, CONFIG) as handle, handle.chunked(2):
        return plain_call(pipe, PROMPTS)


@pytest.mark.parametrize("vae", ["plain", "sliced+tiled"])
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offloaded_equals_plain_and_removal_restores(sd_pipe, offload_calls, mode, vae):
    if vae != "plain":
        low_memory_vae(sd_pipe)
    expected_chunked, expected_plain = chunked_call(sd_pipe), plain_call(sd_pipe)
    with sa.apply(sd_pipe, CONFIG):
        expected_batch = plain_call(sd_pipe)
    offload(sd_pipe, mode)
    assert sd_pipe.unet.conv_in.weight.device.type == ("meta" if mode == "sequential" else "cpu")

    np.testing.assert_array_equal(chunked_call(sd_pipe), expected_chunked)
    assert offload_calls[CpuOffload if mode == "model" else AlignDevicesHook] > 0
    with sa.apply(sd_pipe, CONFIG):
        np.testing.assert_array_equal(plain_call(sd_pipe), expected_batch)
    np.testing.assert_array_equal(plain_call(sd_pipe), expected_plain)  # removed: the plain pipeline again
    assert not hasattr(sd_pipe.unet, "_diffusers_hook") and hasattr(sd_pipe.unet, "_hf_hook")


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_generate_set_and_inversion_under_offload_equal_plain(sd_pipe, offload_calls, mode):
    """Chunked `generate_set`, from a prompt and from an inverted image, and `invert` itself."""
    low_memory_vae(sd_pipe)
    expected_set = chunked_set(sd_pipe)
    image = sa.generate_set(sd_pipe, PROMPTS[:1], CONFIG, **SETTINGS)[0]
    expected = sa.invert(sd_pipe, image, PROMPTS[0], num_inference_steps=2)
    expected_transfer = chunked_set(sd_pipe, expected, PROMPTS[1:])
    offload(sd_pipe, mode)
    assert np.array_equal(chunked_set(sd_pipe), expected_set)
    trajectory = sa.invert(sd_pipe, image, PROMPTS[0], num_inference_steps=2)
    assert offload_calls[CpuOffload if mode == "model" else AlignDevicesHook] > 0
    torch.testing.assert_close(trajectory.latents, expected.latents, atol=0, rtol=0)
    assert np.array_equal(chunked_set(sd_pipe, trajectory, PROMPTS[1:]), expected_transfer)


def test_inversion_under_sequential_offload_equals_plain(sd_pipe, offload_calls):
    image = sa.generate_set(sd_pipe, PROMPTS[:1], CONFIG, **SETTINGS)[0]
    expected = sa.invert(sd_pipe, image, PROMPTS[0], num_inference_steps=2)
    offload(sd_pipe, "sequential")
    with sa.apply(sd_pipe, CONFIG):  # suspended during the inversion
        trajectory = sa.invert(sd_pipe, image, PROMPTS[0], num_inference_steps=2)
    assert offload_calls[AlignDevicesHook] > 0
    torch.testing.assert_close(trajectory.latents, expected.latents, atol=0, rtol=0)
