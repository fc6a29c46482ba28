"""A tiny random-weight Qwen-Image pipeline (`QwenImagePipeline`), built offline and saved to a folder.

The text encoder is the class the pipeline requires, `Qwen2_5_VLForConditionalGeneration`, at 2 layers of width
32 (its vision tower, unused by text-to-image, one block of width 16). The tokenizer is a `Qwen2Tokenizer` whose
byte-level BPE is trained here on the pipeline's prompt template and WORDS: the template's system prefix is 34
tokens, as with Qwen's own tokenizer (the pipeline drops exactly 34), and each listed word is one token.
The VAE is Qwen-Image's video VAE (`AutoencoderKLQwenImage`, frame axis and per-channel latents mean/std) with a
spatial factor 4; the transformer packs 2x2 latent patches, so a QWEN_HEIGHT x QWEN_WIDTH image is a 4 x 6 token
grid: non-square, so that a row/column swap shows.
"""

import json

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from tests.dit_pipelines import WORDS

QWEN_HEIGHT, QWEN_WIDTH = 32, 48  # pixels: latents 8 x 12, tokens 4 x 6
TEXT_WIDTH = 32
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen_tokenizer(template: str) -> Qwen2Tokenizer:
    """Qwen's byte-level BPE tokenizer (its pre-tokenizer regex), its merges trained on `template` and WORDS."""
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=100_000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([template.format(" ".join(WORDS)), " ".join(WORDS)], trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    return tokenizer


def tiny_qwen_vl(vocab_size: int, eos_token_id: int) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL at 2 text layers (4 query heads of 8 channels, 2 key/value heads, multimodal RoPE sections
    summing to 4 = half a head); a 1-block vision tower, which text-only prompts never run."""
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e4}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=TEXT_WIDTH,
                           fullatt_block_indexes=[0], patch_size=2, window_size=8),
        # the vision special tokens, at the end of the vocabulary (unused by text-to-image)
        image_token_id=vocab_size - 4, video_token_id=vocab_size - 3, vision_start_token_id=vocab_size - 2,
        vision_end_token_id=vocab_size - 1,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_vae() -> AutoencoderKLQwenImage:
    """Two 2x spatial downsamplings (no temporal one), 4 latent channels with their own mean and std."""
    torch.manual_seed(1)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, False],
        latents_mean=[0.1, -0.2, 0.3, 0.05], latents_std=[1.5, 0.8, 2.0, 1.2],
    ).eval()


def build_qwen(folder) -> None:
    """Qwen-Image-style: 3 double-stream blocks of 2 heads x 16 channels, complex RoPE over (frame, row, column)
    = (4, 6, 6) channels; the pipeline's resolution shift with its sequence lengths scaled down."""
    bare = QwenImagePipeline(None, None, None, None, None)  # its prompt template, set in __init__
    tokenizer = qwen_tokenizer(bare.prompt_template_encode)
    prefix = tokenizer(bare.prompt_template_encode.split("{}")[0]).input_ids
    assert len(prefix) == bare.prompt_template_encode_start_idx, "the template's prefix must be what the pipeline drops"
    text_encoder = tiny_qwen_vl(len(tokenizer) + 4, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(2)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=16,
        max_image_seq_len=256,
    )
    QwenImagePipeline(scheduler=scheduler, vae=tiny_qwen_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer).save_pretrained(folder)
