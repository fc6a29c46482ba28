"""StyleAligned on the tiny Wan image-to-video pipelines, both of diffusers' layouts (Wan 2.1 I2V with a CLIP image
encoder; Wan 2.2 TI2V's `expand_timesteps`): every clip of a set starts from the one first frame the call takes,
and attn1 shares as on text-to-video. Same oracle and tolerances as test_wan (fp32 throughout)."""

import pytest
import torch

import stylealigned as sa
from stylealigned.errors import UserError
from tests.test_wan import (  # noqa: F401 (fixture)
    EXTRA, GUIDANCE, ORACLE, PROMPTS, SAME_PATH, STEPS, decoded_latents, latents, leftovers, noise, photo,
    with_oracle,
)
from tests.wan_pipelines import WAN_FRAMES, WAN_KWARGS

KNOBS = [{}, dict(adain_values=True), dict(share_attention=False)] + EXTRA


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_every_knob_equals_oracle(wan_i2v_pipe, photo, knobs):
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(wan_i2v_pipe, config):
        fast = latents(wan_i2v_pipe, image=photo)
    torch.testing.assert_close(fast, with_oracle(wan_i2v_pipe, config, image=photo), atol=ORACLE, rtol=ORACLE)


def test_the_reference_clip_is_as_alone_and_targets_move(wan_i2v_pipe, photo):
    stock = latents(wan_i2v_pipe, image=photo)
    alone = latents(wan_i2v_pipe, PROMPTS[:1], image=photo)
    with sa.apply(wan_i2v_pipe, sa.StyleAlignedConfig(adain_values=True)):
        shared = latents(wan_i2v_pipe, image=photo)
    torch.testing.assert_close(shared[:1], alone, atol=SAME_PATH, rtol=SAME_PATH)
    assert ((shared[1:] - stock[1:]).flatten(1).abs().amax(1) > 100 * ORACLE).all()


def test_removed_is_bit_identical(wan_i2v_pipe, photo):
    stock = latents(wan_i2v_pipe, image=photo)
    handle = sa.apply(wan_i2v_pipe, sa.StyleAlignedConfig(shared_score_shift=0.5))
    with handle.chunked(1):
        shared = latents(wan_i2v_pipe, image=photo)
    handle.remove()
    assert not torch.equal(shared, stock) and leftovers(wan_i2v_pipe) == []
    assert torch.equal(latents(wan_i2v_pipe, image=photo), stock)


def test_a_chunked_set_equals_one_batch_and_the_pipelines_call(wan_i2v_pipe, photo, decoded_latents):
    settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, image=photo, **WAN_KWARGS)
    config = sa.StyleAlignedConfig(adain_values=True)
    clips = sa.generate_set(wan_i2v_pipe, PROMPTS, config, seed=3, batch_size=1, **settings)
    chunked = torch.stack(decoded_latents)
    decoded_latents.clear()
    sa.generate_set(wan_i2v_pipe, PROMPTS, config, seed=3, **settings)
    assert len(clips) == 3 and all(len(clip) == WAN_FRAMES for clip in clips)
    torch.testing.assert_close(chunked, torch.stack(decoded_latents), atol=SAME_PATH, rtol=SAME_PATH)
    with sa.apply(wan_i2v_pipe, config):
        direct = wan_i2v_pipe(prompt=PROMPTS, latents=noise(wan_i2v_pipe, 3, seed=3, image=photo),
                              output_type="latent", **settings).frames
    torch.testing.assert_close(chunked, direct, atol=SAME_PATH, rtol=SAME_PATH)


def test_a_frame_per_clip_or_none_is_one_line(wan_i2v_pipe, photo):
    settings = dict(num_inference_steps=STEPS, **WAN_KWARGS)
    for image in ([photo] * 3, None):
        with pytest.raises(UserError, match="one first frame: pass generate_set image= one PIL image"):
            sa.generate_set(wan_i2v_pipe, PROMPTS, image=image, **settings)
    with pytest.raises(UserError, match="inverted on a text-to-video Wan pipeline"):
        sa.invert(wan_i2v_pipe, photo, "a red tree", num_inference_steps=STEPS)
