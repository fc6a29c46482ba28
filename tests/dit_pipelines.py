"""Tiny random-weight FLUX.1-, Chroma- and SD3.5-style pipelines (transformer denoisers, CLIP + T5 text encoders).

Everything is built locally, with no download: CLIP tokenizers from `word_level_tokenizer`, the T5 tokenizer from an
in-memory Unigram vocabulary. The builders save to a folder, for tests to load back as a user's model would be.
"""

import torch
from diffusers import (
    AutoencoderKL,
    ChromaPipeline,
    ChromaTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from stylealigned.toy.vocab import t5_tokenizer, word_level_tokenizer

WORDS = "a an the cat dog house tree car bird in on of with watercolor oil style painting sketch photo red blue".split()
TEXT_HIDDEN = 32  # CLIP width (and projection); SD3 concatenates its two CLIPs' hidden states to 2 * TEXT_HIDDEN
# Image sides in pixels. The VAE halves them; FLUX packs 2x2 latent patches into 16-channel tokens, so a FLUX_SIZE
# image is (FLUX_SIZE // 4) ** 2 tokens, and SD3 sees (SD3_SIZE // 4) ** 2 patches of its 2x2 patch embedding.
FLUX_SIZE = 32
SD3_SIZE = 32
# T5 pads every prompt to max_sequence_length tokens (512 for FLUX, 256 for SD3 by default); 16 keeps tests fast.
PROMPT_KWARGS = {"max_sequence_length": 16}


# A tiny T5 v1.1-style encoder (gated GELU, untied embeddings, no dropout), as FLUX and SD3 use (and Wan's UMT5)
TINY_T5 = {"d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
           "relative_attention_max_distance": 16, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu",
           "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}


def tiny_t5(vocab_size: int, width: int, seed: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, **TINY_T5)).eval()


def tiny_clip(model_class, vocab_size: int, seed: int):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN, dropout=0.0,
        attention_dropout=0.0, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return model_class(config).eval()


def tiny_vae(size: int) -> AutoencoderKL:
    """Two blocks (downscale 2), 4 latent channels, no quant convs (as FLUX/SD3); a shift, so dropping it shows."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=size,
        scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def build_flux(folder) -> None:
    """FLUX.1-dev-style: 2 double-stream + 2 single-stream blocks, guidance embedding, pooled CLIP + T5 sequence."""
    tokenizer = word_level_tokenizer(WORDS, folder / "tokenizer")
    tokenizer_2 = t5_tokenizer(WORDS)
    text_encoder = tiny_clip(CLIPTextModel, len(tokenizer), seed=0)
    text_encoder_2 = tiny_t5(len(tokenizer_2), width=32, seed=1)
    torch.manual_seed(2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder_2.config.d_model, pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),  # rotary dims per (text, row, column) axis; sum = head dim
    ).eval()
    # FLUX.1-dev's resolution-dependent shift, with its sequence lengths scaled by 1/16 (a FLUX_SIZE image is 64
    # tokens, as a 512 px FLUX.1 image is 1024).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
        max_image_seq_len=256,
    )
    FluxPipeline(
        scheduler=scheduler, vae=tiny_vae(FLUX_SIZE), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    ).save_pretrained(folder)


def build_sd3(folder) -> None:
    """SD3.5-style: 3 joint blocks with qk RMS norm, block 0 with the extra image self-attention `attn2`; the last
    block updates no context (context_pre_only). Two CLIPs (hidden states concatenated, pooled projections too) + T5.
    """
    tokenizer = word_level_tokenizer(WORDS, folder / "tokenizer")
    tokenizer_3 = t5_tokenizer(WORDS)
    text_encoder = tiny_clip(CLIPTextModelWithProjection, len(tokenizer), seed=0)
    text_encoder_2 = tiny_clip(CLIPTextModelWithProjection, len(tokenizer), seed=1)
    # The pipeline zero-pads the CLIP features (2 * TEXT_HIDDEN) to T5's width, as SD3 pads 2048 to 4096.
    text_encoder_3 = tiny_t5(len(tokenizer_3), width=4 * TEXT_HIDDEN, seed=2)
    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(
        sample_size=SD3_SIZE // 2, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=16,  # = num_attention_heads * attention_head_dim: context and image share the width
        pooled_projection_dim=2 * TEXT_HIDDEN, out_channels=4, pos_embed_max_size=32, dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(SD3_SIZE),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    ).save_pretrained(folder)


def build_chroma(folder) -> None:
    """Chroma-style: FLUX.1's blocks without CLIP or guidance embedding; T5 only, padded text masked out."""
    tokenizer = t5_tokenizer(WORDS)
    text_encoder = tiny_t5(len(tokenizer), width=32, seed=1)
    torch.manual_seed(2)
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_encoder.config.d_model, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
        max_image_seq_len=256,
    )
    ChromaPipeline(scheduler=scheduler, vae=tiny_vae(FLUX_SIZE), text_encoder=text_encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(folder)
