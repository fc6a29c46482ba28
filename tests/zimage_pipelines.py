"""A tiny random-weight Z-Image pipeline (`ZImagePipeline`: Qwen3 text encoder, single-stream transformer).

Built locally with no download: the tokenizer is `dit_pipelines.t5_tokenizer`'s in-memory Unigram vocabulary (words
one token each, other text one token per character, so prompt lengths are easy to set) with a chat template, as
Qwen's tokenizer has one. The builder saves to a folder, for tests to load back as a user's model would be.

Z-Image pads each caption to a multiple of 32 tokens and places the image at the t coordinate after the padded
caption: with `PROMPT_KWARGS` (48 tokens at most), a short prompt pads to 32 and a long one to 64, so images of one
batch sit at different positions. A WIDTH x HEIGHT image is (HEIGHT // 4) x (WIDTH // 4) patches (VAE /2, patch 2):
6 x 10 = 60, padded to 64 with 4 image padding tokens.
"""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from tests.dit_pipelines import WORDS, t5_tokenizer, tiny_vae

HEIGHT, WIDTH = 24, 40
# Qwen pads every prompt to max_sequence_length (512 by default) before the pipeline keeps the real tokens.
PROMPT_KWARGS = {"max_sequence_length": 48}
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
SHORT = "a cat"            # 32 caption tokens once padded
LONG = "a dog in oil painting style with zigzag qwxyz stripes and knotty pebbles"  # 64 once padded


def tiny_qwen3(vocab_size: int) -> Qwen3Model:
    """A two-layer Qwen3 (grouped-query attention, q/k norms); the pipeline takes its second-to-last hidden state."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         attention_dropout=0.0, pad_token_id=0)
    return Qwen3Model(config).eval()


def tiny_transformer(text_width: int) -> ZImageTransformer2DModel:
    """One refiner block each for image and caption, two joint blocks; heads of 16 channels rotated over
    (t, row, column) with 4 + 6 + 6 channels; tables long enough for a 64-token caption and a shifted column."""
    torch.manual_seed(1)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=text_width, axes_dims=[4, 6, 6], axes_lens=[128, 32, 32],
    ).eval()


def randomised(transformer: ZImageTransformer2DModel) -> ZImageTransformer2DModel:
    """Random padding tokens (zeros at init), so that image padding that leaked into the sharing would show."""
    torch.manual_seed(2)
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    return transformer


def build_zimage(folder) -> None:
    """Z-Image-style pipeline with Z-Image's scheduler (shift 3, no resolution-dependent shift)."""
    tokenizer = t5_tokenizer(WORDS)
    tokenizer.chat_template = CHAT_TEMPLATE
    text_encoder = tiny_qwen3(len(tokenizer))
    ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False), vae=tiny_vae(WIDTH),
        text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=randomised(tiny_transformer(text_encoder.config.hidden_size)),
    ).save_pretrained(folder)
