"""A tiny random-weight FLUX.2-klein pipeline (Qwen3 text encoder, batch-normed FLUX.2 VAE), built offline.

The tokenizer is a word-level one with a chat template, written here; the text encoder has the 28 layers whose
hidden states 9, 18 and 27 the pipeline stacks, each a few channels wide. The builder saves to a folder, for tests to
load back as a user's model would be.
"""

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

WORDS = "a an the cat dog house tree car bird in on of with watercolor oil style painting sketch photo red blue".split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "user", "assistant"]
CHAT = ("{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
# Pixels: the VAE halves them, then 2x2 patches make tokens: a 32 x 48 image is 8 x 12 tokens (rows != columns).
HEIGHT, WIDTH = 32, 48
PROMPT_KWARGS = {"max_sequence_length": 24}
TEXT_WIDTH = 16


def chat_tokenizer() -> Qwen2TokenizerFast:
    """Whitespace word-level tokenizer with Qwen's special tokens and a minimal chat template."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys(SPECIAL + WORDS))}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Qwen2TokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>", unk_token="<unk>",
                              eos_token="<|im_end|>", chat_template=CHAT, model_max_length=512)


def tiny_qwen3(vocab_size: int) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=24, num_hidden_layers=28,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                         tie_word_embeddings=False, pad_token_id=0)
    return Qwen3ForCausalLM(config).eval()


def tiny_flux2_vae() -> AutoencoderKLFlux2:
    """Two blocks (downscale 2), 4 latent channels (16 after 2x2 patching), batch-norm statistics set non-trivially
    so that dropping them shows."""
    torch.manual_seed(1)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                             sample_size=HEIGHT, layers_per_block=1).eval()
    vae.bn.running_mean.copy_(torch.linspace(-0.2, 0.2, vae.bn.running_mean.numel()))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.running_var.numel()))
    return vae


def build_flux2_klein(folder) -> None:
    """FLUX.2-klein-style: 2 double-stream + 2 single-stream blocks, no guidance embedding (CFG in two calls)."""
    tokenizer = chat_tokenizer()
    text_encoder = tiny_qwen3(len(tokenizer))
    torch.manual_seed(2)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()
    Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                       vae=tiny_flux2_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer).save_pretrained(folder)
