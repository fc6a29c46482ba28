"""FLUX.1 specifics: Chroma (a FLUX.1 variant) masks padded text tokens, and its shared reference stays unmasked.
The checks every family shares are in tests/test_transformer_*.py."""

import pytest
import torch

import stylealigned as sa
from tests.families import FLUX


@pytest.mark.parametrize("knobs", [{}, dict(shared_score_scale=1.7, shared_score_shift=0.69),
                                   dict(adain_values=True, shared_layers=1.0, reference_positions="same")])
def test_chroma_with_its_text_mask_equals_oracle(chroma_pipe, knobs):
    """Chroma masks padded text tokens (prompts of different lengths); the shared reference tokens stay unmasked."""
    chroma_pipe.to(dtype=torch.float64)
    prompts = ["a cat", "a red dog in the house with a tree", "a tree"]
    config = sa.StyleAlignedConfig(**knobs)
    fast, expected = FLUX.fast_and_oracle(chroma_pipe, config, prompts=prompts, guidance_scale=4.0)
    torch.testing.assert_close(fast, expected, atol=1e-9, rtol=1e-9)
    with sa.apply(chroma_pipe, config) as handle, handle.chunked(1):
        chunked = FLUX.latents(chroma_pipe, prompts, guidance_scale=4.0)
    torch.testing.assert_close(chunked, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fast[0], FLUX.latents(chroma_pipe, prompts[:1], guidance_scale=4.0)[0], atol=1e-12,
                               rtol=0)
