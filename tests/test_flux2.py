"""FLUX.2-klein specifics: the position ids read once per call, conditioning images stay unshared, and its VAE's
batch norm (inversion and transfer). The checks every family shares are in tests/test_transformer_*.py."""

import numpy as np
import pytest
import torch
from PIL import Image

import stylealigned as sa
from stylealigned.backbones import backbone_for
from tests import test_transformer_inversion as transformer_inversion
from tests.families import FLUX2
from tests.flux2_pipelines import HEIGHT, PROMPT_KWARGS, WIDTH


def latents(pipe, prompts=None, **kwargs):
    return FLUX2.latents(pipe, prompts, **kwargs)


@pytest.fixture
def pipe64(flux2_pipe):
    return flux2_pipe.to(dtype=torch.float64)


def test_position_ids_are_read_once_per_pipeline_call(pipe64, monkeypatch):
    """The set's image-token count (a host read of the ids: a device sync) and the shared keys' rotary embedding come
    from the ids once per text-to-image call, which passes the same ids to every transformer call (2 steps x 2)."""
    backbone = type(backbone_for(pipe64))
    reads, read = [], backbone.reference_rotary

    def counted(self, ids, config):
        reads.append(ids)
        return read(self, ids, config)

    monkeypatch.setattr(backbone, "reference_rotary", counted)
    with sa.apply(pipe64):
        latents(pipe64, guidance_scale=4.0)
        latents(pipe64, guidance_scale=4.0)
    assert len(reads) == 2  # one per pipeline call


def test_conditioning_images_are_not_shared(pipe64):
    """With FLUX.2's own conditioning image (editing), only the set's image tokens are shared."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))  # 64 px at least
    config = sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True)
    fast, expected = FLUX2.fast_and_oracle(pipe64, config, image=image, guidance_scale=1.0)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)


# inversion and transfer (the round trip: tests/test_transformer_inversion.py)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return transformer_inversion.picture(HEIGHT, WIDTH)


def test_encode_then_decode_is_the_vae_round_trip(flux2_pipe, picture):
    """encode's batch-norm scaling and decode's inverse meet: decoding z_0 gives the VAE's own reconstruction."""
    backbone = backbone_for(flux2_pipe)
    z_0, height, width = backbone.encode(picture)
    vae = flux2_pipe.vae
    pixels = flux2_pipe.image_processor.preprocess(picture)
    with torch.no_grad():
        direct = vae.decode(vae.encode(pixels).latent_dist.mean, return_dict=False)[0]
    expected = flux2_pipe.image_processor.postprocess(direct, output_type="pil")[0]
    z_grid = backbone.start_latents(z_0, height, width)
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).view(1, -1, 1, 1)
    latents = flux2_pipe._unpatchify_latents(z_grid * std + vae.bn.running_mean.view(1, -1, 1, 1))
    decoded = backbone.decode(latents, height, width)[0]
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(expected, dtype=int)).max() <= 1


def test_transfer_pins_the_reference_on_its_trajectory(flux2_pipe, picture, monkeypatch):
    """With klein's CFG in a call of its own; its pipeline's latent output is the VAE's latent, not the trajectory's
    tokens (the shared transfer test's per-call and decoded checks: tests/test_transformer_inversion.py)."""
    from tests.test_sets import record_pins

    steps = 4
    trajectory = sa.invert(flux2_pipe, picture, "a photo of a cat", num_inference_steps=steps, **PROMPT_KWARGS)
    pinned = record_pins(monkeypatch)
    images = sa.generate_set(flux2_pipe, ["a dog", "a house"], reference=trajectory, num_inference_steps=steps,
                             height=HEIGHT, width=WIDTH, guidance_scale=4.0, **PROMPT_KWARGS)
    assert len(images) == 3 and all(image.size == (WIDTH, HEIGHT) for image in images)
    assert len(pinned) == steps
    for step, latent in enumerate(pinned):
        assert torch.equal(latent, trajectory.latents[step + 1])


def test_default_shares_the_double_stream_blocks_and_the_last_quarter_of_the_single_stream_ones(flux2_pipe):
    """FLUX.1's measured default carried over: every double-stream block, then the last ceil(n / 4) single-stream
    blocks of n."""
    import math

    from stylealigned.apply import hooked_layers

    layers = backbone_for(flux2_pipe).attention_layers()
    single = [name for name in layers if name.startswith("single_transformer_blocks.")]
    double = [name for name in layers if name not in single]
    assert double and single
    with sa.apply(flux2_pipe) as handle:
        expected = double + single[len(single) - math.ceil(len(single) / 4):]
        assert handle.layers == hooked_layers(flux2_pipe.transformer) == expected
