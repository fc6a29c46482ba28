"""Float tolerances derived from the dtype and the computation, so that no comparison fails by chance.

Two computations of one function that differ only in the order of their floating-point operations (another batch
size or chunking, a fused kernel, an oracle written as loops, a compiled graph) agree up to rounding. Each
operation rounds to within one unit in the last place (`eps` of the dtype, relative); along a chain of `depth`
operations these errors add up, at worst about linearly, on values of the order of the largest one compared
(`scale`, at least 1). `MARGIN` covers what a linear count misses (cancellation, a few amplifying layers):

    tolerance = MARGIN * depth * eps(dtype) * scale

A denoising loop is a chain of `steps` denoiser calls, each as deep as the denoiser has modules. In float32 that
bound is loose (1e-3 on a tiny UNet), so whole loops are compared in float64, where the same count is ~1e-11.
"""

import torch

MARGIN = 10


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def rounding(dtype: torch.dtype, depth: int, scale: float = 1.0) -> float:
    """The largest difference rounding can make along `depth` chained operations on values of size `scale`."""
    return MARGIN * depth * eps(dtype) * max(scale, 1.0)


def denoising_depth(pipe, steps: int) -> int:
    """The depth of a denoising loop: `steps` calls of the pipeline's denoiser (and ControlNet), one operation per
    module."""
    networks = [getattr(pipe, "unet", None) or pipe.transformer, getattr(pipe, "controlnet", None)]
    return steps * sum(1 for network in networks if network is not None for _ in network.modules())


def assert_rounding_close(actual: torch.Tensor, expected: torch.Tensor, depth: int,
                          dtype: torch.dtype | None = None) -> None:
    """`actual` equals `expected` up to the rounding of `depth` chained operations in `dtype` (default: theirs)."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    tolerance = rounding(dtype or expected.dtype, depth, scale)
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0)
