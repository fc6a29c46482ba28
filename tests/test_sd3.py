"""SD3.5 specifics. The checks every family shares are in tests/test_transformer_*.py."""

import torch

import stylealigned as sa
from tests.families import SD3


def test_sd3_without_guidance_is_one_group(sd3_pipe):
    fast, expected = SD3.fast_and_oracle(sd3_pipe.to(dtype=torch.float64), sa.StyleAlignedConfig(), guidance_scale=1.0)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)
