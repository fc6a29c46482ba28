"""Memory of a style-aligned set is bounded by `batch_size`, not by the size of the set.

What is measured: the peak total size of the tensor storages alive at the same time while `generate_set` runs,
counted by `benchmarks.common.LiveTensorBytes`, a TorchDispatchMode that adds up every new op output until its
storage is freed. That is the memory that grows with the batch (activations, attention inputs, the reference's
cached keys and values, prompt embeddings, latents, decoded images) and nothing else: weights made before the block,
the interpreter and the allocator's caches are left out, whereas they dominate the RSS of a tiny model. The count
is exact and deterministic, and each measurement sees only tensors created inside it, so no fresh process is
needed to keep runs apart. Images are 64x64 pixels (32x32 latents, 1024 tokens in the first attention layers) so
activations outweigh the per-image constants such as text embeddings.
"""

import contextlib

import pytest
import torch

import stylealigned as sa
from benchmarks.common import LiveTensorBytes
from stylealigned import sets
from stylealigned.config import StyleAlignedConfig
from stylealigned.processors import RECORD, REPLAY, SharedAttention, SharedState
from stylealigned.sets import generate_set

SUBJECTS = "cat dog house tree car bird".split()
PROMPTS = [f"a {SUBJECTS[i % len(SUBJECTS)]} in watercolor style" for i in range(16)]
SETTINGS = dict(num_inference_steps=1, guidance_scale=7.5, height=64, width=64)  # every step peaks alike


def peak_bytes(pipe, size: int, batch_size: int | None) -> int:
    with LiveTensorBytes() as tracker:
        generate_set(pipe, PROMPTS[:size], batch_size=batch_size, **SETTINGS)
    return tracker.peak


def test_live_tensor_bytes_counts_new_storages_until_freed():
    weight = torch.ones(1000)  # made before the block: not counted
    with LiveTensorBytes() as tracker:
        a = torch.zeros(1000)  # 4000 bytes live
        b = a + weight  # 8000
        view = b[10:].t()  # a view: nothing new
        b.mul_(2)  # in place: nothing new
        del a  # 4000
        c = torch.empty(500, dtype=torch.float64)  # 8000 again
        del b  # the view keeps b's storage alive
        assert tracker.live == 8000
        del view, c
    assert (tracker.peak, tracker.live) == (8000, 0)


def test_peak_memory_within_a_modules_calls_leaves_out_what_runs_around_them():
    from benchmarks.common import peak_memory

    class Scratch(torch.nn.Module):
        def forward(self, x):
            _scratch = torch.zeros(250)  # 1000 bytes while the call runs
            return x.view(-1)  # a view: nothing new

    module = Scratch()
    with peak_memory(torch.device("cpu"), [module]) as peak:
        before = torch.zeros(2000)  # 8000 bytes, freed before the call
        del before
        kept = torch.zeros(100)  # 400 bytes, alive across the call
        module(kept)
    assert (peak.bytes, peak.within_bytes) == (8000, 400 + 1000)


def test_chunked_set_memory_does_not_grow_with_set_size(sd_pipe):
    four, sixteen = peak_bytes(sd_pipe, 4, batch_size=4), peak_bytes(sd_pipe, 16, batch_size=4)
    assert sixteen <= 1.3 * four, f"16 images took {sixteen / four:.2f}x the peak memory of 4 with batch_size=4"


def test_tagged_prompts_lower_a_chunked_sets_peak(sd_pipe, monkeypatch):
    """The pipeline call keeping one-token tags instead of its prompt embeddings three times over shows in the peak
    (the same images: tests/test_prompts.py)."""
    tagged = peak_bytes(sd_pipe, 16, batch_size=4)
    monkeypatch.setattr(sets, "tagged_prompts", lambda handle: contextlib.nullcontext())
    untagged = peak_bytes(sd_pipe, 16, batch_size=4)
    encoder = sd_pipe.text_encoder.config
    one_copy = 16 * encoder.max_position_embeddings * encoder.hidden_size * 4  # the 16 prompts' fp32 embeddings
    assert untagged - tagged >= one_copy, (untagged - tagged, one_copy)  # of the three copies an untagged call keeps


def test_one_batch_set_memory_grows_with_set_size(sd_pipe):
    four, sixteen = peak_bytes(sd_pipe, 4, batch_size=None), peak_bytes(sd_pipe, 16, batch_size=None)
    assert sixteen >= 2.5 * four, f"16 images in one batch took only {sixteen / four:.2f}x the memory of 4"


class Turn:
    """A stand-in rotation of the shared keys (x -> -x) that counts its calls; `per_target` as Z-Image's says."""

    def __init__(self, per_target: bool):
        self.per_target, self.calls = per_target, 0

    def __call__(self, x):
        self.calls += 1
        return -x


@pytest.mark.parametrize("per_target", [False, True])
def test_the_cache_keeps_only_what_targets_read(per_target):
    """A RECORD pass caches, per layer, exactly the references' shared image keys and values (rotated where every
    target sees them alike; unrotated where each target sees them at positions of its own), each on a storage of its
    own of exactly their size (a view would keep the whole joined text + image projection alive), and statistics
    only for the AdaIN knobs on. REPLAY chunks read them as they are: nothing is projected again, and the keys are
    rotated once per call, or once per chunk where they are per target; the last chunk takes them out. No keys or
    values where targets do not attend to the references."""
    groups, heads, text, image, dim, targets = 2, 2, 5, 12, 8, 2
    q, k, v = torch.randn(3, groups, 1, heads, text + image, dim).unbind(0)  # RECORD: one reference per group
    turn = Turn(per_target)
    state = SharedState(groups=groups, mode=RECORD)
    layer = SharedAttention("layer", StyleAlignedConfig(adain_queries=False), state)
    layer.attend(q, k, v, slice(text, None), rotate_shared=turn)
    ref = state.cache["layer"]
    assert ref.query_stats is None and ref.value_stats is None and ref.key_stats is not None
    assert torch.equal(ref.key, (1 if per_target else -1) * k[:, 0, :, text:])
    assert torch.equal(ref.value, v[:, 0, :, text:])
    for x in (ref.key, ref.value):
        assert x.shape == (groups, heads, image, dim)
        assert x.untyped_storage().nbytes() == x.numel() * x.element_size()

    state.mode = REPLAY
    for last in (False, False, True):
        state.last = last
        chunk = torch.randn(3, groups, targets, heads, text + image, dim).unbind(0)
        assert layer.attend(*chunk, slice(text, None), rotate_shared=turn).shape == chunk[0].shape
        assert ("layer" in state.cache) != last and (last or state.cache["layer"] is ref)
    assert turn.calls == (3 if per_target else 1)

    state.mode = RECORD
    SharedAttention("layer", StyleAlignedConfig(share_attention=False), state).attend(q, k, v, slice(text, None))
    ref = state.cache["layer"]
    assert ref.key is None and ref.value is None and ref.query_stats is not None and ref.key_stats is not None


def test_the_cache_lives_for_one_denoiser_call(sd_pipe):
    """Every chunk of a call finds each shared layer's reference in the cache, the last one takes them out as it
    goes (so at its end nothing is left); nothing is left after the call."""
    seen = []
    with sa.apply(sd_pipe) as handle, handle.chunked(1):
        hook = sd_pipe.unet.conv_out.register_forward_hook(
            lambda *_: seen.append((handle.state.mode, sorted(handle.state.cache))))
        sd_pipe(PROMPTS[:4], **SETTINGS)
        hook.remove()
        assert handle.state.cache == {}
    assert [mode for mode, _ in seen] == [RECORD, REPLAY, REPLAY, REPLAY]
    assert [names for _, names in seen] == [sorted(handle.layers)] * 3 + [[]]
