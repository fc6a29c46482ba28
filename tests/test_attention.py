"""The fast attention math against the loop-per-image oracle, at the tensor level."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stylealigned import StyleAlignedConfig
from stylealigned.attention import (adain, attend_with_reference, make_reference, shared_attention,
                                    token_stats)
from stylealigned.backbones.layers import SelfAttention
from stylealigned.processors import RECORD, REPLAY, SharedProcessor, SharedState
from tests import oracle
from tests.tolerance import assert_rounding_close

KNOBS = ("share_attention", "adain_queries", "adain_keys", "adain_values", "full_attention_share")


def qkv(groups, images, heads, tokens, dim, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shape = (groups * images, heads, tokens, dim)
    return [torch.randn(shape, generator=gen).to(dtype) * 2 + 0.5 for _ in range(3)]


def fast(q, k, v, groups, config):
    """The fast path on a flat batch, reshaped as the processor does."""
    grouped = [t.view(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return shared_attention(*grouped, config).reshape(q.shape)


# From 4 tokens up: with 2 or 3 tokens a near-zero std makes AdaIN so ill-conditioned that rounding alone (the same
# formula evaluated in another order) grows without bound. Real layers have 64 tokens or more. From 4 tokens up
# AdaIN's division amplifies rounding at most ADAIN_CONDITION times (in float32 the worst was 80 units).
ADAIN_CONDITION = 100
@settings(max_examples=120, deadline=None)
@given(groups=st.integers(1, 2), images=st.integers(1, 4), heads=st.integers(1, 3), tokens=st.integers(4, 16),
       dim=st.integers(1, 8), flags=st.lists(st.booleans(), min_size=len(KNOBS), max_size=len(KNOBS)),
       scale=st.floats(0.25, 3.0), shift=st.sampled_from([0.0, math.log(2), math.log(3), -0.7, 1.3]),
       seed=st.integers(0, 2**16))
def test_fast_path_equals_oracle(groups, images, heads, tokens, dim, flags, scale, shift, seed):
    config = StyleAlignedConfig(**dict(zip(KNOBS, flags)), shared_score_scale=scale, shared_score_shift=shift)
    q, k, v = qkv(groups, images, heads, tokens, dim, seed, dtype=torch.float64)
    expected = oracle.self_attention(q, k, v, groups, config)
    # sums over the group's tokens and the channels, amplified at most ADAIN_CONDITION times by AdaIN's division
    depth = ADAIN_CONDITION * (groups * images * tokens + dim)
    assert_rounding_close(fast(q, k, v, groups, config), expected, depth)


@pytest.mark.parametrize("config", [StyleAlignedConfig(), StyleAlignedConfig.transfer(shared_score_scale=2.0),
                                    StyleAlignedConfig(adain_values=True, shared_score_shift=-1.0)])
def test_reference_attends_as_if_alone(config):
    q, k, v = qkv(2, 3, 2, 16, 8, dtype=torch.float64)
    out = fast(q, k, v, 2, config)
    for r in (0, 3):
        alone = oracle.softmax_attention(q[r], k[r], v[r])
        assert_rounding_close(out[r], alone, depth=16 + 8)  # sums over the keys and the channels


@pytest.mark.parametrize("copies", [2, 3, 5])
def test_shift_log_k_equals_k_copies_of_reference(copies):
    q, k, v = qkv(1, 3, 2, 12, 8, seed=3, dtype=torch.float64)
    shifted = fast(q, k, v, 1, StyleAlignedConfig(adain_queries=False, adain_keys=False,
                                                   shared_score_shift=math.log(copies)))
    for n in (1, 2):
        keys = torch.cat([k[n]] + [k[0]] * copies, dim=-2)
        values = torch.cat([v[n]] + [v[0]] * copies, dim=-2)
        torch.testing.assert_close(shifted[n], oracle.softmax_attention(q[n], keys, values), atol=1e-12, rtol=1e-12)


def test_targets_change_when_sharing():
    q, k, v = qkv(1, 3, 2, 16, 8)
    shared = fast(q, k, v, 1, StyleAlignedConfig())
    plain = fast(q, k, v, 1, StyleAlignedConfig.disabled())
    assert (shared[1:] - plain[1:]).abs().max() > 1e-2
    torch.testing.assert_close(shared[0], plain[0])


def test_adain_matches_reference_statistics():
    x, ref = torch.randn(2, 4, 50, 8) * 3 + 1, torch.randn(2, 4, 60, 8) * 0.5 - 2
    y = adain(x, token_stats(x), token_stats(ref))
    torch.testing.assert_close(y, oracle.adain(x, ref), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.mean(-2), ref.mean(-2).expand_as(y.mean(-2)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_follows_fp32(dtype):
    config = StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)
    rounded = [t.to(dtype) for t in qkv(2, 3, 2, 32, 16, seed=1)]
    expected = fast(*(t.double() for t in rounded), 2, config)  # the same inputs, computed exactly (float64)
    low = fast(*rounded, 2, config)
    assert low.dtype == dtype
    assert_rounding_close(low.double(), expected, depth=2, dtype=dtype)  # AdaIN, then attention, each rounded


def test_record_then_replay_equals_one_batch():
    """Targets in chunks against stored references give the one-batch result."""
    config = StyleAlignedConfig.transfer(adain_values=True, shared_score_scale=1.5)
    q, k, v = (t.view(2, 4, *t.shape[1:]) for t in qkv(2, 4, 2, 10, 8, seed=5))
    one_batch = shared_attention(q, k, v, config)
    ref = make_reference(q[:, 0], k[:, 0], v[:, 0], config)
    from stylealigned.attention import align_targets
    chunks = [align_targets(q[:, s], k[:, s], v[:, s], ref, config) for s in (slice(1, 3), slice(3, 4))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_batch[:, 1:], atol=1e-6, rtol=1e-6)


class OutputShapes(TorchDispatchMode):
    """The shapes of every op's tensor outputs inside the block."""

    def __enter__(self):
        self.shapes = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


@pytest.mark.parametrize("per_key", [False, True])
def test_bias_is_not_materialised_per_query(per_key):
    """A shift alone is merged in on the CPU (no mask row, no keys concatenated: `merged_attention`); per-key
    biases (several references) travel as one broadcast row; never a (queries x keys) tensor; both give the formula."""
    q, k, v = (t.view(1, 3, *t.shape[1:]) for t in qkv(1, 3, 2, 10, 8, dtype=torch.float64))
    bias = torch.zeros(10, dtype=torch.float64) if per_key else None
    with OutputShapes() as outputs:
        out = attend_with_reference(q[:, 1:], k[:, 1:], v[:, 1:], k[:, 0], v[:, 0], score_shift=0.5,
                                    shared_bias=bias)
    assert not any(shape[-2:] == (10, 20) for shape in outputs.shapes)
    assert ((1, 1, 1, 20) in outputs.shapes) == per_key
    assert any(shape[-2:] == (20, 8) for shape in outputs.shapes) == per_key
    keys, values = (torch.cat([x[0, 1:], x[0, :1].expand(2, -1, -1, -1)], dim=-2) for x in (k, v))
    biased = torch.cat([torch.zeros(10), torch.full((10,), 0.5)]).double()
    expected = torch.softmax(q[0, 1:] @ keys.transpose(-1, -2) / 8**0.5 + biased, -1) @ values
    assert_rounding_close(out[0], expected, depth=20 + 8)  # sums over the keys and the channels


class _Attn(torch.nn.Module):
    """Just enough of diffusers' Attention for the processor."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.spatial_norm, self.group_norm, self.norm_q, self.norm_k = heads, None, None, None, None
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(dim, dim), torch.nn.Dropout(0.0)])
        self.residual_connection, self.rescale_output_factor = False, 1.0


def test_processor_modes_agree():
    torch.manual_seed(0)
    attn, config = _Attn(), StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)
    state = SharedState(groups=2)
    processor = SharedProcessor("layer", config, state, SelfAttention())
    x = torch.randn(2 * 4, 12, 16)
    expected = oracle.OracleProcessor(config, groups=2)(attn, x)
    torch.testing.assert_close(processor(attn, x), expected, atol=1e-5, rtol=1e-5)
    state.mode = RECORD
    refs = processor(attn, x[[0, 4]])
    state.mode = REPLAY
    targets = processor(attn, x[[1, 2, 3, 5, 6, 7]])
    torch.testing.assert_close(refs, expected[[0, 4]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(targets, expected[[1, 2, 3, 5, 6, 7]], atol=1e-5, rtol=1e-5)


def test_a_single_token_layer_stays_finite():
    q, k, v = (t.view(1, 3, *t.shape[1:]) for t in qkv(1, 3, 2, 1, 8))
    assert torch.isfinite(shared_attention(q, k, v, StyleAlignedConfig.transfer(adain_values=True))).all()


@pytest.mark.parametrize("image", [slice(3, None), slice(0, 9), slice(2, 10)], ids=["text-first", "text-last", "both"])
@pytest.mark.parametrize("mask_rows", [None, 1, 12], ids=["no-mask", "key-mask", "full-mask"])
def test_text_queries_off_the_reference_equal_the_oracle(image, mask_rows):
    """`text_sees_reference=False`: queries outside the image tokens attend to their own image's keys only, the
    image queries as before; with a key-padding mask (broadcast over queries) and a full one."""
    from tests import oracle_dit

    config = StyleAlignedConfig(text_sees_reference=False, shared_score_shift=0.4, adain_values=True)
    q, k, v = (t.view(1, 3, 2, 12, 4) for t in qkv(1, 3, 2, 12, 4, dtype=torch.float64))
    mask = None
    if mask_rows:
        draw = torch.rand((1, 3, 1, mask_rows, 12), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        mask = draw > 0.3
        mask[..., 0] = True  # every query keeps a key
    masks = None if mask is None else list(mask[0])
    expected = oracle_dit.attend_group(q[0], k[0], v[0], image, config, masks=masks)
    out = shared_attention(q, k, v, config, image, mask=mask)[0]
    assert_rounding_close(out, expected, depth=2 * 12 + 4)  # sums over own and shared keys, and the channels
    sharing = shared_attention(q, k, v, config.replace(text_sees_reference=True), image, mask=mask)[0]
    assert not torch.allclose(sharing[1:], out[1:])  # the knob changes the targets
