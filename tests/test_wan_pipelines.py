"""The tiny Wan pipelines: both layouts load back from their folders as Wan's, in eval mode, and make non-square
5-frame clips."""

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from transformers import UMT5EncoderModel

from tests.wan_pipelines import BOUNDARY_RATIO, WAN_FRAMES, WAN_HEIGHT, WAN_KWARGS, WAN_WIDTH


def test_both_layouts_load_back_as_wan_in_eval_mode(wan_pipe):
    assert isinstance(wan_pipe, WanPipeline) and isinstance(wan_pipe.text_encoder, UMT5EncoderModel)
    assert isinstance(wan_pipe.vae, AutoencoderKLWan) and isinstance(wan_pipe.transformer, WanTransformer3DModel)
    two = wan_pipe.transformer_2 is not None
    assert wan_pipe.config.boundary_ratio == (BOUNDARY_RATIO if two else None)
    if two:  # two experts with weights of their own
        assert not torch.equal(wan_pipe.transformer.proj_out.weight, wan_pipe.transformer_2.proj_out.weight)
    modules = [c for c in wan_pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert len(modules) == 3 + two and not any(m.training for m in modules)
    assert wan_pipe.vae.config.latents_mean != [0.0] * 4 and wan_pipe.vae.config.latents_std != [1.0] * 4
    ids = wan_pipe.tokenizer("a watercolor cat").input_ids
    assert len(ids) == 4 and ids[-1] == 1  # one token per listed word, then </s>


def test_clips_are_non_square_and_five_frames(wan_pipe):
    video = wan_pipe(["a cat", "a dog"], num_inference_steps=2, output_type="np", **WAN_KWARGS,
                     generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (2, WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH, 3) and WAN_HEIGHT != WAN_WIDTH
    assert video[0].std() > 0.01 and not (video[0] == video[1]).all()
