"""StyleAligned on the tiny Wan pipelines (Wan 2.1's one transformer, Wan 2.2's two experts): the fast path equals
the loop-per-clip oracle for every knob, the reference clip is generated as alone, removal is exact, chunked sets
equal one batch, and the shared layers count both experts in order.

Tolerances: every computation is fp32 (the pipeline keeps its latents in fp32 whatever the model's dtype). Ours and
the oracle's order the same sums differently, and batches of other sizes run other kernels, so each of the 2 x 2
blocks x 4 steps rounds differently at fp32's 6e-8 relative; on latents of size ~1-3 that stays well under 1e-5
(measured: 2e-6), which the comparisons of one path with the same path use; the oracle comparisons use the brief's
1e-4.
"""

import itertools

import pytest
import torch

import stylealigned as sa
from stylealigned.apply import hooked_layers, layers_to_share
from stylealigned.backbones import backbone_for
from stylealigned.backbones.wan import WanBackbone
from tests import oracle_wan
from tests.wan_pipelines import WAN_FRAMES, WAN_HEIGHT, WAN_KWARGS, WAN_WIDTH

PROMPTS = ["a cat in watercolor style", "a dog", "a house"]
STEPS = 4  # timesteps 999, 900, 750, 500: two on each side of Wan 2.2's boundary (875)
GUIDANCE = 5.0  # the negative prompt in a call of its own: two transformer calls per step
SAME_PATH = 1e-5
ORACLE = 1e-4
FLAGS = ("share_attention", "adain_queries", "adain_keys", "adain_values")
KNOB_GRID = [dict(zip(FLAGS, flags)) for flags in itertools.product([False, True], repeat=4)]
EXTRA = [dict(shared_score_scale=1.7, shared_score_shift=0.69), dict(shared_score_shift=-0.5, adain_values=True),
         dict(reference_positions="same"), dict(reference_positions="same", adain_values=True, shared_score_scale=0.8),
         dict(shared_layers=0.5), dict(shared_layers="blocks.1")]


def noise(pipe, count, seed=0, **settings):
    backbone = backbone_for(pipe)
    backbone.read_settings(WAN_KWARGS | settings)
    return backbone.initial_noise(range(count), seed, WAN_HEIGHT, WAN_WIDTH)


def latents(pipe, prompts=PROMPTS, **kwargs):
    """The final latents (clips, channels, latent frames, rows, columns), clip i from the noise seeded i."""
    return pipe(prompt=prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                latents=noise(pipe, len(prompts), **kwargs), output_type="latent", **WAN_KWARGS, **kwargs).frames


def with_oracle(pipe, config, prompts=PROMPTS, **kwargs):
    undo = oracle_wan.install(pipe, config, layers_to_share(backbone_for(pipe), config))
    try:
        return latents(pipe, prompts, **kwargs)
    finally:
        undo()


@pytest.mark.parametrize("knobs", KNOB_GRID + EXTRA, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_every_knob_equals_oracle(wan_pipe, knobs):
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(wan_pipe, config):
        fast = latents(wan_pipe)
    torch.testing.assert_close(fast, with_oracle(wan_pipe, config), atol=ORACLE, rtol=ORACLE)


def test_the_oracle_sees_the_change(wan_pipe):
    """The knobs matter: sharing moves the targets far beyond the tolerance, and the oracle of a disabled config is
    the stock model."""
    stock = latents(wan_pipe)
    torch.testing.assert_close(with_oracle(wan_pipe, sa.StyleAlignedConfig.disabled()), stock, atol=ORACLE, rtol=0)
    change = (with_oracle(wan_pipe, sa.StyleAlignedConfig()) - stock).flatten(1).abs().amax(1)
    assert change[0] < SAME_PATH and (change[1:] > 100 * ORACLE).all(), change


@pytest.mark.parametrize("knobs", [{}, dict(adain_values=True, shared_score_shift=0.7, reference_positions="same")])
def test_reference_clip_equals_its_prompt_generated_alone(wan_pipe, knobs):
    alone = latents(wan_pipe, PROMPTS[:1])
    with sa.apply(wan_pipe, sa.StyleAlignedConfig(**knobs)):
        in_set = latents(wan_pipe)
    torch.testing.assert_close(in_set[:1], alone, atol=SAME_PATH, rtol=SAME_PATH)


def leftovers(pipe) -> list[str]:
    """Modules of every expert that still carry a hook registry or an instance-level forward."""
    experts = [pipe.transformer] + ([pipe.transformer_2] if pipe.transformer_2 is not None else [])
    return [name for expert in experts for name, module in expert.named_modules()
            if hasattr(module, "_diffusers_hook") or "forward" in vars(module)]


def test_removed_or_never_applied_is_bit_identical(wan_pipe):
    stock = latents(wan_pipe)
    handle = sa.apply(wan_pipe, sa.StyleAlignedConfig(adain_values=True, shared_score_shift=0.5))
    with handle.chunked(1):
        shared = latents(wan_pipe)
    handle.remove()
    handle.remove()
    assert not torch.equal(shared, stock)
    assert leftovers(wan_pipe) == [] and not hasattr(wan_pipe, "_stylealigned_handle")
    assert torch.equal(latents(wan_pipe), stock)


def test_layers_are_every_attn1_of_both_experts_in_order(wan_pipe):
    backbone = backbone_for(wan_pipe)
    two = wan_pipe.transformer_2 is not None
    blocks = ["blocks.0.attn1", "blocks.1.attn1"]
    names = [f"{expert}.{name}" for expert in ("transformer", "transformer_2") for name in blocks] if two else blocks
    assert isinstance(backbone, WanBackbone) and backbone.attention_layers() == names
    assert layers_to_share(backbone, sa.StyleAlignedConfig()) == names  # the default: every attn1
    half = layers_to_share(backbone, sa.StyleAlignedConfig(shared_layers=0.5))
    assert half == (["transformer.blocks.1.attn1", "transformer_2.blocks.1.attn1"] if two else ["blocks.1.attn1"])
    with sa.apply(wan_pipe) as handle:
        hooked = hooked_layers(wan_pipe.transformer)
        if two:
            hooked = [f"transformer.{n}" for n in hooked] + [f"transformer_2.{n}" for n in
                                                              hooked_layers(wan_pipe.transformer_2)]
        assert hooked == handle.layers == names


def test_only_the_low_noise_expert_can_share(tiny_wan_paths):
    """A layer-name filter picks one expert: the high-noise steps then run as the stock model's."""
    from tests.wan_pipelines import load_wan

    pipe = load_wan(tiny_wan_paths[2])
    stock = latents(pipe)
    seen = []
    pipe.transformer.register_forward_hook(lambda module, args, out: seen.append(out[0].clone()))
    config = sa.StyleAlignedConfig(shared_layers="transformer_2.")
    with sa.apply(pipe, config) as handle:
        assert handle.layers == ["transformer_2.blocks.0.attn1", "transformer_2.blocks.1.attn1"]
        shared = latents(pipe)
    high_noise_steps = len(seen)
    latents(pipe)
    assert high_noise_steps == 4 and all(torch.equal(a, b) for a, b in zip(seen[:4], seen[4:]))
    assert not torch.equal(shared[1:], stock[1:])
    torch.testing.assert_close(shared, with_oracle(pipe, config), atol=ORACLE, rtol=ORACLE)


# generate_set


@pytest.fixture
def decoded_latents(monkeypatch) -> dict:
    """Every clip's latents as WanBackbone.decode receives them, by clip (each decoded chunk in order); a still
    reference's one frame, decoded alone, is left out."""
    seen, original = [], WanBackbone.decode

    def spy(backbone, latents, height, width):
        if latents.shape[2] > 1:
            seen.extend(latents.clone())
        return original(backbone, latents, height, width)

    monkeypatch.setattr(WanBackbone, "decode", spy)
    return seen


def test_chunked_set_equals_one_batch(wan_pipe, decoded_latents):
    prompts = PROMPTS + ["a tree"]
    settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, **WAN_KWARGS)
    config = sa.StyleAlignedConfig(adain_values=True)
    clips = sa.generate_set(wan_pipe, prompts, config, seed=3, batch_size=1, **settings)
    chunked = torch.stack(decoded_latents)
    decoded_latents.clear()
    sa.generate_set(wan_pipe, prompts, config, seed=3, **settings)
    one_batch = torch.stack(decoded_latents)
    assert len(clips) == 4 and all(len(clip) == WAN_FRAMES for clip in clips)
    assert all(frame.size == (WAN_WIDTH, WAN_HEIGHT) for clip in clips for frame in clip)
    torch.testing.assert_close(chunked, one_batch, atol=SAME_PATH, rtol=SAME_PATH)
    # and the set is the pipeline's own call from the same noise (clip i seeded 3 + i), under StyleAligned
    with sa.apply(wan_pipe, config):
        direct = wan_pipe(prompts, latents=noise(wan_pipe, 4, seed=3), output_type="latent", **settings).frames
    torch.testing.assert_close(one_batch, direct, atol=SAME_PATH, rtol=SAME_PATH)


@pytest.mark.parametrize("knobs", [{}, dict(adain_values=True, shared_score_shift=0.69),
                                   dict(reference_positions="same"), dict(share_attention=False)],
                         ids=["defaults", "values-shift", "same-positions", "adain-only"])
def test_chunks_project_the_reference_clips_cached_input_again(wan_pipe, knobs, monkeypatch):
    """A clip's cache is a chunked set's memory, so it keeps each shared layer's input at the reference clip's
    tokens (half the size of its keys and values), which every chunk projects again; chunks of one clip equal the
    oracle. Nothing but statistics where targets do not attend to the reference."""
    from stylealigned import processors

    kept, store = [], processors.stored
    monkeypatch.setattr(processors, "stored", lambda ref, inputs=None: kept.append(inputs) or store(ref, inputs))
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(wan_pipe, config) as handle, handle.chunked(1):
        fast = latents(wan_pipe)
    torch.testing.assert_close(fast, with_oracle(wan_pipe, config), atol=ORACLE, rtol=ORACLE)
    transformer = wan_pipe.transformer.config
    tokens = noise(wan_pipe, 1)[0, 0].numel() // (transformer.patch_size[1] * transformer.patch_size[2])
    backbone = backbone_for(wan_pipe)  # each call runs one expert's layers
    assert len(kept) == STEPS * 2 * len(layers_to_share(backbone, config)) // len(backbone.denoisers())
    for inputs in kept:  # one guidance group per call (Wan guides in two calls), the clip's tokens, the model's width
        assert inputs is None if not config.share_attention else inputs.shape == (
            1, tokens, transformer.num_attention_heads * transformer.attention_head_dim)


def test_a_subset_of_clips_matches_the_full_set(wan_pipe, decoded_latents):
    settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, **WAN_KWARGS)
    full = sa.generate_set(wan_pipe, PROMPTS, seed=1, batch_size=1, **settings)
    part = sa.generate_set(wan_pipe, PROMPTS, seed=1, batch_size=1, indices=[2], **settings)
    assert len(part) == 1 and [f.tobytes() for f in part[0]] == [f.tobytes() for f in full[2]]


def test_clips_decode_as_the_pipeline_decodes_them(wan_pipe):
    """Frames as the pipeline's own output; 8-bit rounding of the same value may differ by one level."""
    import numpy as np

    settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, **WAN_KWARGS)
    with sa.apply(wan_pipe):
        own = wan_pipe(PROMPTS, latents=noise(wan_pipe, 3, seed=5), output_type="np", **settings).frames
    clips = sa.generate_set(wan_pipe, PROMPTS, seed=5, **settings)
    ours = np.stack([np.stack([np.asarray(frame) for frame in clip]) for clip in clips]).astype(np.float64)
    assert ours.shape == own.shape == (3, WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH, 3)
    assert np.abs(ours - own * 255).max() <= 1.0 and own.std() > 0.01


# a still image leading clips


def still_latents(pipe, prompts=PROMPTS, still=None):
    """Final latents with clip 0 a still image (its noise's first frame on every frame), run as one frame."""
    start = noise(pipe, len(prompts))
    start[0] = start[0, :, :1]
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=start, output_type="latent",
                **WAN_KWARGS).frames


@pytest.mark.parametrize("knobs", [{}, dict(adain_values=True, shared_score_scale=1.3, shared_score_shift=0.4),
                                   dict(reference_positions="same"), dict(share_attention=False)])
def test_a_still_reference_equals_the_oracle(wan_pipe, knobs):
    """The still reference runs as a one-frame clip; targets attend to its frame at their frame 0 positions."""
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(wan_pipe, config) as handle:
        handle.run.still_reference = True
        fast = still_latents(wan_pipe)
    undo = oracle_wan.install(wan_pipe, config, layers_to_share(backbone_for(wan_pipe), config), still=True)
    try:
        expected = still_latents(wan_pipe)
    finally:
        undo()
    torch.testing.assert_close(fast, expected, atol=ORACLE, rtol=ORACLE)
    alone = wan_pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent",
                     latents=noise(wan_pipe, 1)[:, :, :1], **(WAN_KWARGS | {"num_frames": 1})).frames
    torch.testing.assert_close(fast[:1], alone.expand_as(fast[:1]), atol=SAME_PATH, rtol=SAME_PATH)


def gradient_clip(frames: int) -> list:
    """`frames` smooth RGB frames of the clips' size: a gradient in two channels that drifts from frame to frame."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, WAN_HEIGHT * WAN_WIDTH).reshape(WAN_HEIGHT, WAN_WIDTH)
    return [Image.fromarray(np.stack([np.roll(ramp, 3 * f, 1), ramp[::-1], np.full_like(ramp, 90 + 20 * f)],
                                     -1).astype("uint8")) for f in range(frames)]


@pytest.fixture
def photo():
    return gradient_clip(1)[0]


@pytest.mark.parametrize("frames", [1, WAN_FRAMES], ids=["still", "clip"])
def test_a_real_reference_round_trip_beats_a_random_start(wan_pipe, frames):
    """A still image inverted as a one-frame clip (z_0 of shape C x 1 x h x w), or a clip of the set's length as
    itself, sampled back from its z_T with the pipeline's own sampler, comes back far closer than from random noise
    (measured 11-16x at 10 steps, both layouts)."""
    steps, reference = 10, gradient_clip(frames)
    trajectory = sa.invert(wan_pipe, reference if frames > 1 else reference[0], "a red tree",
                           num_inference_steps=steps, max_sequence_length=16)
    z_0 = trajectory.latents[-1:]
    assert z_0.shape == (1, 4, (frames - 1) // 4 + 1, WAN_HEIGHT // 8, WAN_WIDTH // 8)

    def sample(start):
        return wan_pipe(["a red tree"], num_inference_steps=steps, guidance_scale=1.0, latents=start,
                        output_type="latent", **(WAN_KWARGS | {"num_frames": frames})).frames

    random = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(0))
    error, random_error = ((sample(start) - z_0).abs().mean() for start in (trajectory.latents[:1], random))
    assert error < random_error / 4, (error, random_error)


def test_a_still_image_leads_a_set_of_clips(wan_pipe, photo, decoded_latents, tmp_path):
    """Through generate_set: the trajectory (saved and loaded back) pins the reference slot on every frame, its
    clip is the still reconstruction, and chunks equal one batch."""
    from stylealigned.inversion import Trajectory

    settings = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, **WAN_KWARGS)
    sa.invert(wan_pipe, photo, "a red tree", num_inference_steps=STEPS, max_sequence_length=16).save(tmp_path / "t")
    trajectory = Trajectory.load(tmp_path / "t")
    clips = sa.generate_set(wan_pipe, PROMPTS[1:], reference=trajectory, seed=2, **settings)
    one_batch = torch.stack(decoded_latents)
    decoded_latents.clear()
    sa.generate_set(wan_pipe, PROMPTS[1:], reference=trajectory, seed=2, batch_size=1, **settings)
    torch.testing.assert_close(torch.stack(decoded_latents), one_batch, atol=SAME_PATH, rtol=SAME_PATH)
    assert torch.equal(one_batch[0], trajectory.latents[-1].expand_as(one_batch[0]))  # z_0 on every frame
    assert len(clips) == 3 and all(len(clip) == WAN_FRAMES for clip in clips)
    assert all(frame.tobytes() == clips[0][0].tobytes() for frame in clips[0])  # the still, held
    decoded_latents.clear()
    sa.generate_set(wan_pipe, PROMPTS[1:], sa.StyleAlignedConfig.disabled(), reference=trajectory, seed=2,
                    **settings)
    assert (torch.stack(decoded_latents)[1:] - one_batch[1:]).abs().amax() > 100 * ORACLE  # the style moved them
