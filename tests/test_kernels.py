"""The score shift reaches a fast SDPA kernel exactly: merged by log-sum-exps (the CPU), as a broadcast mask row or as
a padded head channel.

No GPU was lent to this work: the CUDA choice (the head channel, so that flash attention runs in fp16/bf16) is
exercised on the CPU through a `kernel` argument that refuses masks, and the kernel-restricted test runs
on CUDA where there is one and on the CPU's flash kernel otherwise.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from stylealigned.attention import (attend_with_reference, bias_in_channel, channel_bias, key_biased_attention,
                                    merged_attention)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}  # ~ output rounding


def inputs(dim: int, dtype: torch.dtype, queries: int = 24, own: int = 24, shared: int = 16, seed: int = 0):
    """(2, 3 heads) queries over own + shared keys, with a finite bias per key (0 own, log-weights + shift shared)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, queries, dim, generator=generator, dtype=torch.float64)
    keys, values = (torch.randn(2, 3, own + shared, dim, generator=generator, dtype=torch.float64) for _ in "kv")
    bias = torch.zeros(own + shared, dtype=torch.float64)
    bias[own:] = math.log(2) + torch.rand(shared, generator=generator, dtype=torch.float64).log()
    return [x.to(DEVICE, dtype) for x in (q, keys, values, bias)]


def explicit(q, keys, values, bias, mask=None):
    """softmax(q k^T / sqrt(D) + bias [+ mask]) v in float64: the formula."""
    q, keys, values, bias = (x.double() for x in (q, keys, values, bias))
    logits = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    if mask is not None:
        logits[..., :mask.shape[-1]] = logits[..., :mask.shape[-1]].masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1) @ values


class MaskSpy:
    """Records the mask SDPA gets; optionally refuses masks, as flash attention does."""

    def __init__(self, monkeypatch, refuse: bool = False):
        self.masks, self.shapes, self.refuse = [], [], refuse
        self.original = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, attn_mask=None, scale=None, **kwargs):
        assert not (self.refuse and attn_mask is not None), "a mask reached a kernel that takes none"
        self.masks.append(attn_mask)
        self.shapes.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return self.original(q, k, v, attn_mask=attn_mask, scale=scale, **kwargs)


@pytest.mark.parametrize("dim", [8, 40, 64, 72, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_head_channel_equals_the_formula(dim, dtype):
    q, keys, values, bias = inputs(dim, dtype, seed=dim)
    out = bias_in_channel(q, keys, values, bias)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), explicit(q, keys, values, bias), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chosen_method_builds_no_full_mask_and_equals_the_formula(monkeypatch, dtype):
    q, keys, values, bias = inputs(64, dtype)
    spy = MaskSpy(monkeypatch)
    out = key_biased_attention(q, keys, values, bias)
    torch.testing.assert_close(out.double(), explicit(q, keys, values, bias), atol=TOLERANCE[dtype], rtol=0)
    (mask,) = spy.masks
    if channel_bias(q):  # CUDA in half precision: no mask at all, a padded head
        assert mask is None and spy.shapes == [(72, 72, 72)]
    else:  # one broadcast row of biases, never (queries x keys)
        assert mask.shape == (1, 1, 1, keys.shape[-2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_kernel_without_masks_gets_the_head_channel(monkeypatch, dtype):
    """The CUDA half-precision path (and a user's mask-less attention backend): the bias as a channel, exact."""
    q, keys, values, bias = inputs(64, dtype)
    spy = MaskSpy(monkeypatch, refuse=True)
    def kernel(*args, **kwargs):
        return F.scaled_dot_product_attention(*args, **kwargs)

    assert channel_bias(q, kernel) and not channel_bias(q)  # without a kernel: SDPA's, which takes masks
    out = key_biased_attention(q, keys, values, bias, kernel=kernel)
    assert spy.masks == [None] and spy.shapes == [(72, 72, 72)]
    torch.testing.assert_close(out.double(), explicit(q, keys, values, bias), atol=TOLERANCE[dtype], rtol=0)


def test_zero_shift_passes_no_mask():
    """shared_score_shift = 0 off the CPU's merge (a GPU, a chosen backend): one call without a mask, which flash
    attention takes in fp16/bf16."""
    q, k, v = (torch.randn(1, 2, 3, 16, 8) for _ in "qkv")
    masks = []

    def kernel(q, k, v, attn_mask=None, scale=None):
        masks.append(attn_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    attend_with_reference(q, k, v, k[:, 0], v[:, 0], kernel=kernel)
    assert masks == [None]


@pytest.mark.parametrize("shift", [0.0, math.log(2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shift_runs_on_the_flash_kernel(dtype, shift):
    """Restricted to flash attention, the shared attention still runs: CUDA's flash kernel on a GPU (which takes no
    mask, so the channel is what makes it run), the CPU's flash kernel here."""
    q, keys, values, bias = inputs(64, dtype)
    bias = bias * (shift / math.log(2))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = key_biased_attention(q, keys, values, bias if shift else None)
    expected = explicit(q, keys, values, bias)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_mask_with_bias_equals_the_formula(dtype):
    q, keys, values, bias = inputs(64, dtype)
    mask = torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    out = key_biased_attention(q, keys, values, bias, mask.to(DEVICE))
    torch.testing.assert_close(out.double(), explicit(q, keys, values, bias, mask.to(DEVICE)),
                               atol=TOLERANCE[dtype], rtol=0)


def grouped_inputs(dim: int, dtype: torch.dtype, seed: int = 0):
    """Targets' q, k, v (2 groups, 3 targets, 2 heads, 24 tokens) and each group's shared keys and values (16)."""
    generator = torch.Generator().manual_seed(seed)
    own = [torch.randn(2, 3, 2, 24, dim, generator=generator, dtype=torch.float64) for _ in "qkv"]
    shared = [torch.randn(2, 2, 16, dim, generator=generator, dtype=torch.float64) for _ in "kv"]
    return [x.to(dtype) for x in own + shared]


def explicit_shifted(q, k, v, ref_k, ref_v, shift):
    """The formula per group: each target over its own keys and its group's shared ones, `shift` toward those."""
    bias = torch.cat([torch.zeros(k.shape[-2]), torch.full((ref_k.shape[-2],), shift, dtype=torch.float64)])
    return torch.stack([explicit(q[g], *(torch.cat([x[g], r[g].expand(q.shape[1], -1, -1, -1)], dim=-2)
                                         for x, r in ((k, ref_k), (v, ref_v))), bias) for g in range(q.shape[0])])


@pytest.mark.parametrize("shift", [0.0, math.log(2), -1.3, 4.0])
@pytest.mark.parametrize("dim", [8, 40, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_log_sum_exp_merge_equals_the_formula(dim, dtype, shift):
    """Exact up to rounding: each half leaves the kernel rounded to the dtype, so in half precision the merged
    output may be off by twice its rounding."""
    inputs = grouped_inputs(dim, dtype, seed=dim)
    out = merged_attention(*inputs, shift)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    tolerance = TOLERANCE[dtype] * (2 if dtype in (torch.float16, torch.bfloat16) else 1)
    torch.testing.assert_close(out.double(), explicit_shifted(*inputs, shift), atol=tolerance, rtol=0)


@pytest.mark.parametrize("shift", [0.0, math.log(2)])
def test_the_cpu_merges_without_a_mask(monkeypatch, shift):
    """Under torch's SDPA on the CPU targets take no mask and no SDPA call: the two flash calls, merged."""
    spy = MaskSpy(monkeypatch)
    inputs = grouped_inputs(40, torch.float32)
    out = attend_with_reference(*inputs, score_shift=shift)
    assert spy.masks == []
    torch.testing.assert_close(out.double(), explicit_shifted(*inputs, shift), atol=2e-6, rtol=0)


def test_autograd_gets_one_call_and_the_formula_s_gradients():
    """The kernel's log-sum-exp carries no gradient, so where autograd records targets take the single fused call."""
    inputs = [x.requires_grad_() for x in grouped_inputs(8, torch.float64)]
    attend_with_reference(*inputs, score_shift=math.log(2)).sum().backward()
    grads = [x.grad for x in inputs]
    for x in inputs:
        x.grad = None
    explicit_shifted(*inputs, math.log(2)).sum().backward()
    for grad, x in zip(grads, inputs):
        torch.testing.assert_close(grad, x.grad, atol=1e-10, rtol=0)


def test_a_chosen_kernel_still_gets_the_shift(monkeypatch):
    """A user's attention backend holds under a shift: it runs the attention, with the shift as a mask row."""
    calls = []

    def kernel(q, k, v, attn_mask=None, scale=None):
        calls.append(attn_mask.shape)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)

    kernel.takes_masks = True
    inputs = grouped_inputs(40, torch.float32)
    out = attend_with_reference(*inputs, score_shift=math.log(2), kernel=kernel)
    assert calls == [(1, 1, 1, 40)]
    torch.testing.assert_close(out.double(), explicit_shifted(*inputs, math.log(2)), atol=2e-6, rtol=0)
