"""Tiny random-weight Wan pipelines: text-to-video with Wan 2.1's one transformer and Wan 2.2's two experts, and
image-to-video in both of diffusers' layouts (Wan 2.1 I2V: the first frame's latent and mask as extra input channels
and a CLIP image encoder's tokens for attn2; Wan 2.2 TI2V, `expand_timesteps`: the first latent frame replaced by
the image's, at timestep 0).

Everything is built locally, with no download: a UMT5 encoder with the in-memory T5 tokenizer of `dit_pipelines`,
a tiny causal `AutoencoderKLWan` (8x spatial, 4x temporal: WAN_FRAMES frames are 2 latent frames) and transformers
with 3D RoPE. WAN_HEIGHT x WAN_WIDTH is a non-square grid of (WAN_HEIGHT // 16) x (WAN_WIDTH // 16) tokens per
latent frame after the transformer's 2x2 patches, so a row/column swap shows. The builders save to a folder; the
fixtures load them back through `load_pipeline`, as a user's local folder.
"""

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from tests.dit_pipelines import TINY_T5, WORDS, t5_tokenizer

WAN_HEIGHT, WAN_WIDTH, WAN_FRAMES = 32, 48, 5  # 2 latent frames of 2 x 3 tokens
LATENT_CHANNELS = 4
TEXT_WIDTH = 32
IMAGE_WIDTH = 32  # the CLIP image encoder's width (Wan 2.1 I2V)
BOUNDARY_RATIO = 0.875  # Wan 2.2 A14B's: `transformer` at t >= 875, `transformer_2` below
# UMT5 pads every prompt to max_sequence_length tokens (226 by default); 16 keeps tests fast.
WAN_KWARGS = {"max_sequence_length": 16, "height": WAN_HEIGHT, "width": WAN_WIDTH, "num_frames": WAN_FRAMES}


def tiny_umt5(vocab_size: int) -> UMT5EncoderModel:
    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=TEXT_WIDTH, **TINY_T5)).eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    """Three downsamplings (8x), two of them in time (4x); per-channel latent mean and std, so dropping them shows."""
    torch.manual_seed(1)
    return AutoencoderKLWan(
        base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.3, -0.2, 0.1, -0.5],
        latents_std=[1.5, 0.8, 2.0, 1.2],
    ).eval()


def tiny_wan_transformer(seed: int, in_channels: int = LATENT_CHANNELS, **image) -> WanTransformer3DModel:
    """2 blocks, 2 heads of 12 channels: RoPE's frame, row and column axes get 4 channels each. `in_channels` and
    `image` (image_dim, added_kv_proj_dim): an image-to-video model's."""
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=LATENT_CHANNELS, text_dim=TEXT_WIDTH, freq_dim=16, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **image,
    ).eval()


def tiny_clip_vision() -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """Wan 2.1 I2V's image encoder, tiny: 32x32 inputs in 8x8 patches, 32 wide."""
    torch.manual_seed(4)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=IMAGE_WIDTH, intermediate_size=37,
                              num_hidden_layers=2, num_attention_heads=4)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModel(config).eval(), processor


def build_wan(folder, experts: int = 1) -> None:
    """Wan 2.1-style (one transformer) or, with experts=2, Wan 2.2-style: `transformer` for high noise and
    `transformer_2` for low noise, switched at BOUNDARY_RATIO. UniPC with flow sigmas, as Wan ships."""
    tokenizer = t5_tokenizer(WORDS)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    two = experts == 2
    WanPipeline(
        tokenizer=tokenizer, text_encoder=tiny_umt5(len(tokenizer)), vae=tiny_wan_vae(), scheduler=scheduler,
        transformer=tiny_wan_transformer(seed=2), transformer_2=tiny_wan_transformer(seed=3) if two else None,
        boundary_ratio=BOUNDARY_RATIO if two else None,
    ).save_pretrained(folder)


def build_wan_i2v(folder, layout: str) -> None:
    """An image-to-video pipeline: "wan2.1" (the first frame's latent and a 4-channel frame mask concatenated to
    the noise, CLIP image tokens for attn2) or "wan2.2-ti2v" (`expand_timesteps`: no image encoder, the first
    latent frame replaced by the image's)."""
    tokenizer = t5_tokenizer(WORDS)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    if layout == "wan2.1":
        encoder, processor = tiny_clip_vision()
        transformer = tiny_wan_transformer(5, in_channels=2 * LATENT_CHANNELS + 4, image_dim=IMAGE_WIDTH,
                                           added_kv_proj_dim=24)
        extra = dict(image_encoder=encoder, image_processor=processor)
    else:
        transformer, extra = tiny_wan_transformer(6), dict(expand_timesteps=True)
    WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=tiny_umt5(len(tokenizer)), vae=tiny_wan_vae(),
                            scheduler=scheduler, transformer=transformer, **extra).save_pretrained(folder)


def load_wan(path: str) -> WanPipeline:
    """A saved tiny pipeline loaded back as a user's folder, fp32 on the CPU."""
    from stylealigned.models import load_pipeline

    pipe = load_pipeline(path, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_wan_paths(tmp_path_factory) -> dict[int, str]:
    """The saved tiny pipelines by number of experts (1: Wan 2.1, 2: Wan 2.2), built once per session."""
    paths = {}
    for experts in (1, 2):
        paths[experts] = str(tmp_path_factory.mktemp(f"tiny-wan-{experts}"))
        build_wan(Path(paths[experts]), experts)
    return paths


@pytest.fixture(params=[1, 2], ids=["one-transformer", "two-experts"])
def wan_pipe(request, tiny_wan_paths) -> WanPipeline:
    """Each layout, loaded anew per test."""
    return load_wan(tiny_wan_paths[request.param])


I2V_LAYOUTS = ("wan2.1", "wan2.2-ti2v")


@pytest.fixture(scope="session")
def tiny_wan_i2v_paths(tmp_path_factory) -> dict[str, str]:
    """The saved tiny image-to-video pipelines by layout, built once per session."""
    paths = {}
    for layout in I2V_LAYOUTS:
        paths[layout] = str(tmp_path_factory.mktemp(f"tiny-wan-i2v-{layout}"))
        build_wan_i2v(Path(paths[layout]), layout)
    return paths


@pytest.fixture(params=I2V_LAYOUTS)
def wan_i2v_pipe(request, tiny_wan_i2v_paths) -> WanImageToVideoPipeline:
    """Each image-to-video layout, loaded anew per test."""
    return load_wan(tiny_wan_i2v_paths[request.param])
