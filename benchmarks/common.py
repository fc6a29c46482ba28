"""Helpers shared by the benchmark scripts (and the memory test): timing, peak memory, random-weight pipelines.

The pipelines have the real architectures (config values copied from the released models) and random weights,
which cost the same time and memory as trained ones; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from diffusers import (AutoencoderKL, AutoencoderKLFlux2, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       Flux2KleinPipeline, Flux2Transformer2DModel, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from stylealigned.toy.vocab import word_level_tokenizer

MIB = 2**20

# runwayml/stable-diffusion-v1-5 unet/config.json (values that differ from diffusers' defaults)
SD15_UNET = dict(
    sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json ("attention_head_dim" holds head counts: 5/10/20 of 64)
SDXL_UNET = dict(
    sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
# the SDXL VAE (sdxl-vae/config.json); SD1.5's differs only in scaling_factor (0.18215) and force_upcast
SDXL_VAE = dict(
    sample_size=1024, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    scaling_factor=0.13025, force_upcast=True,
)
SD15_LITE = dict(block_out_channels=(160, 320, 640, 640), layers_per_block=1)  # half the channels, 1 layer
SD15_VAE = SDXL_VAE | dict(scaling_factor=0.18215, force_upcast=False)
# a stand-in VAE with the same 8x latent downsampling at a fraction of the cost (for CPU runs timing the UNet)
SMALL_VAE = dict(
    latent_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
)
# text encoders: SD1.5's and SDXL's first are CLIP ViT-L/14's, SDXL's second is OpenCLIP ViT-bigG/14's
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      hidden_act="gelu", projection_dim=1280)
# both models' scheduler settings, with DDIM (the paper's sampler)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)


# black-forest-labs/FLUX.1-dev transformer/config.json: 19 double-stream + 38 single-stream blocks of 24 x 128
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
# stabilityai/stable-diffusion-3.5-medium transformer/config.json: 24 joint blocks of 24 x 64, blocks 0-12 with the
# extra image self-attention (dual attention), qk RMS norm
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# FLUX.1's and SD3's schedulers (flow matching; FLUX shifts by the image's token count)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
SD3_SCHEDULER = dict(shift=3.0)
# stand-in VAEs with the real ones' 16 latent channels, 8x downsampling, no quant convs and latent scaling, at a
# fraction of their cost (the benchmarks time the transformer, not the VAE)
SMALL_FLUX_VAE = SMALL_VAE | dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                  scaling_factor=0.3611, shift_factor=0.1159)
SMALL_SD3_VAE = SMALL_FLUX_VAE | dict(scaling_factor=1.5305, shift_factor=0.0609)
# small text encoders of the real output widths: CLIP-L (768, FLUX's pooled projection and SD3's first), OpenCLIP
# bigG (1280, SD3's second), T5-XXL (4096); one layer, narrow insides: their cost is not what is measured
SMALL_CLIP_L = CLIP_L_TEXT | dict(num_hidden_layers=1, intermediate_size=256)
SMALL_CLIP_BIGG = CLIP_BIGG_TEXT | dict(num_hidden_layers=1, intermediate_size=256)
SMALL_T5 = dict(d_model=4096, d_kv=16, d_ff=256, num_layers=1, num_heads=4, relative_attention_num_buckets=32,
                relative_attention_max_distance=128, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def text_encoder(cls, config: dict, vocab_size: int):
    """A random CLIP text encoder; the vocabulary is the word-level tokenizer's (its size does not affect cost)."""
    return cls(CLIPTextConfig(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, **config))


def random_sd15(words: list[str], unet_changes: dict, device: torch.device,
                vae: dict = SMALL_VAE) -> StableDiffusionPipeline:
    """SD1.5's UNet (with `unet_changes`), the `vae` config (small by default) and a one-layer CLIP-L-width text
    encoder, random weights."""
    torch.manual_seed(0)
    tokenizer = word_level_tokenizer(words, tempfile.mkdtemp(prefix="benchmark-tokenizer-"))
    with torch.device(device):  # weights are made where they will run (the scheduler stays on CPU, as usual)
        models = dict(vae=AutoencoderKL(**vae), unet=UNet2DConditionModel(**SD15_UNET | unet_changes),
                      text_encoder=text_encoder(CLIPTextModel, CLIP_L_TEXT | dict(num_hidden_layers=1), len(tokenizer)))
    return StableDiffusionPipeline(**models, tokenizer=tokenizer, scheduler=DDIMScheduler(**SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def random_sdxl(words: list[str], device: torch.device) -> StableDiffusionXLPipeline:
    """SDXL-base's UNet, VAE and both text encoders at full size, random weights."""
    torch.manual_seed(0)
    tokenizer = word_level_tokenizer(words, tempfile.mkdtemp(prefix="benchmark-tokenizer-"))
    with torch.device(device):
        models = dict(vae=AutoencoderKL(**SDXL_VAE), unet=UNet2DConditionModel(**SDXL_UNET),
                      text_encoder=text_encoder(CLIPTextModel, CLIP_L_TEXT, len(tokenizer)),
                      text_encoder_2=text_encoder(CLIPTextModelWithProjection, CLIP_BIGG_TEXT, len(tokenizer)))
    return StableDiffusionXLPipeline(**models, tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     scheduler=DDIMScheduler(**SCHEDULER), add_watermarker=False)


def _dit_tokenizers(words: list[str]):
    """A word-level CLIP tokenizer and a T5-style Unigram one (tests/dit_pipelines.py's, built offline)."""
    from tests.dit_pipelines import t5_tokenizer

    return word_level_tokenizer(words, tempfile.mkdtemp(prefix="benchmark-tokenizer-")), t5_tokenizer(words)


def _dit_parts(words: list[str], device: torch.device, transformer: Callable[[], torch.nn.Module], vae: dict,
               clips: dict[str, tuple[type, dict]], scheduler: dict) -> dict:
    """A transformer pipeline's random components: the transformer `transformer()` makes, a VAE, the CLIP encoders
    `clips` names (text_encoder...: class and config), a small T5 after them, their tokenizers, a flow scheduler."""
    torch.manual_seed(0)
    tokenizer, t5_tokenizer = _dit_tokenizers(words)
    t5 = f"_{len(clips) + 1}"
    with torch.device(device):
        models = dict(transformer=transformer(), vae=AutoencoderKL(**vae),
                      **{name: text_encoder(cls, config, len(tokenizer)) for name, (cls, config) in clips.items()},
                      **{"text_encoder" + t5: T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **SMALL_T5))})
    tokenizers = {name.replace("text_encoder", "tokenizer"): tokenizer for name in clips}
    return models | tokenizers | {"tokenizer" + t5: t5_tokenizer,
                                  "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler)}


def random_flux(words: list[str], device: torch.device, double_blocks: int = 19,
                single_blocks: int = 38) -> FluxPipeline:
    """FLUX.1-dev's transformer (at the given depth), a small 16-channel VAE and small CLIP-L / T5 encoders."""
    depth = dict(num_layers=double_blocks, num_single_layers=single_blocks)
    return FluxPipeline(**_dit_parts(words, device, lambda: FluxTransformer2DModel(**FLUX_TRANSFORMER | depth),
                                     SMALL_FLUX_VAE, {"text_encoder": (CLIPTextModel, SMALL_CLIP_L)}, FLUX_SCHEDULER))


def random_sd3(words: list[str], device: torch.device, blocks: int = 24) -> StableDiffusion3Pipeline:
    """SD3.5-medium's transformer (at the given depth; the first 13/24 of its blocks with dual attention, as in
    the real one), a small 16-channel VAE and small CLIP-L, OpenCLIP-bigG and T5 encoders."""
    dual = tuple(range(round(blocks * len(SD35_MEDIUM_TRANSFORMER["dual_attention_layers"])
                             / SD35_MEDIUM_TRANSFORMER["num_layers"])))
    depth = dict(num_layers=blocks, dual_attention_layers=dual)
    clips = {"text_encoder": (CLIPTextModelWithProjection, SMALL_CLIP_L),
             "text_encoder_2": (CLIPTextModelWithProjection, SMALL_CLIP_BIGG)}
    return StableDiffusion3Pipeline(**_dit_parts(words, device, lambda: SD3Transformer2DModel(
        **SD35_MEDIUM_TRANSFORMER | depth), SMALL_SD3_VAE, clips, SD3_SCHEDULER))


def random_flux2(words: list[str], device: torch.device, double_blocks: int = 8, single_blocks: int = 48,
                 heads: int = 48) -> Flux2KleinPipeline:
    """FLUX.2's transformer blocks (diffusers' defaults, FLUX.2 [dev]'s: heads of 128, SwiGLU MLPs of ratio 3, RoPE
    over 4 axes; at the given depth and head count: 48 is [dev]'s 6144 width) without guidance embedding (klein's
    CFG: two calls per step), a small FLUX.2 VAE with the real 32 latent channels, and the tests' small Qwen3 encoder
    (its three stacked hidden states are 48 wide, so the context embedder takes 48 channels instead of 15360: one
    linear layer over the text tokens)."""
    from tests.flux2_pipelines import TEXT_WIDTH, chat_tokenizer, tiny_qwen3

    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(num_layers=double_blocks, num_single_layers=single_blocks,
                                          num_attention_heads=heads, joint_attention_dim=3 * TEXT_WIDTH,
                                          guidance_embeds=False)
    vae = AutoencoderKLFlux2(**SMALL_VAE | dict(latent_channels=32))
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                              vae=vae, text_encoder=tiny_qwen3(len(tokenizer)), tokenizer=tokenizer,
                              transformer=transformer)
    return pipe.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(runs: dict[str, Callable[[], object]], repeats: int, device: torch.device,
              warmup: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each callable after `warmup` calls, taking turns so load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(warmup + repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            if repeat >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


class LiveTensorBytes(TorchDispatchMode):
    """Peak total size of the tensor storages created inside the block that are alive at the same time.

    Every op output whose storage is new (not a view of, or written into, an input) is counted until its storage is
    freed: PyTorch keeps one Python object per storage, so a weakref finalizer fires exactly then. Tensors made
    before the block (weights) are not counted, and neither are scratch buffers that kernels allocate internally.
    The count is deterministic and independent of the allocator, of other runs in the process and of the machine.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.inside = 0  # how many `within` modules' forward calls are running
        self.within_peak = 0  # the peak while one runs
        self._counted: set[int] = set()

    def enter(self, *_) -> None:
        self.inside += 1
        self.within_peak = max(self.within_peak, self.live)

    def leave(self, *_) -> None:
        self.inside -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor.untyped_storage(), inputs)
        return out

    def _count(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in inputs or key in self._counted:
            return
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        if self.inside:
            self.within_peak = max(self.within_peak, self.live)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size


@dataclass
class PeakMemory:
    """Filled in when its `peak_memory` block ends."""

    bytes: int = 0
    within_bytes: int = 0  # the peak while the `within` modules' forward calls run (0 if none were given)


def peak_memory_method(device: torch.device) -> str:
    """What `peak_memory` measures on this device."""
    return "CUDA allocator peak (max_memory_allocated)" if device.type == "cuda" else "live tensor storages"


@contextlib.contextmanager
def peak_memory(device: torch.device, within: list[torch.nn.Module] = ()) -> Iterator[PeakMemory]:
    """Peak bytes allocated inside the block above what was allocated before it, in all and while the `within`
    modules' forward calls run (a denoiser's steps without the text encoding and the decoding around them).

    On CUDA the caching allocator's own statistics (its peak restarted at each call of those modules, the block's
    taken as the largest of the pieces); elsewhere `LiveTensorBytes` (live tensor storages).
    """
    result = PeakMemory()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before, pieces = torch.cuda.memory_allocated(device), [0]

        def enter(*_):
            synchronize(device)
            pieces.append(torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)

        def leave(*_):
            synchronize(device)
            result.within_bytes = max(result.within_bytes, torch.cuda.max_memory_allocated(device) - before)

        with hooked(within, enter, leave):
            yield result
        synchronize(device)
        result.bytes = max(*pieces, torch.cuda.max_memory_allocated(device)) - before
    else:
        with LiveTensorBytes() as tracker, hooked(within, tracker.enter, tracker.leave):
            yield result
        result.bytes, result.within_bytes = tracker.peak, tracker.within_peak


@contextlib.contextmanager
def hooked(modules: list[torch.nn.Module], before, after) -> Iterator[None]:
    """`before` and `after` each forward call of `modules` (hook arguments ignored), for the block."""
    hooks = [hook for module in modules for hook in (module.register_forward_pre_hook(before),
                                                      module.register_forward_hook(after))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


# Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json: 30 blocks of 12 x 128, UMT5-XXL text (4096 wide)
WAN_1_3B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
# Wan's scheduler (UniPC with flow sigmas, shift 3) and a stand-in VAE with the real 16 latent channels and 8x / 4x
# (space / time) downsampling at a fraction of the cost
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
SMALL_WAN_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                     temperal_downsample=[False, True, True])


def random_wan(words: list[str], device: torch.device, blocks: int = 30):
    """Wan 2.1-T2V-1.3B's transformer (at the given depth), a small 16-channel video VAE and a small UMT5 encoder of
    the real 4096 width."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    _, tokenizer = _dit_tokenizers(words)
    with torch.device(device):
        models = dict(transformer=WanTransformer3DModel(**WAN_1_3B_TRANSFORMER | dict(num_layers=blocks)),
                      vae=AutoencoderKLWan(**SMALL_WAN_VAE),
                      text_encoder=UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **SMALL_T5)))
    return WanPipeline(**models, tokenizer=tokenizer, scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER))


def random_qwen(words: list[str], device: torch.device, blocks: int = 60):
    """Qwen-Image's transformer (diffusers' defaults, Qwen-Image's: 24 heads of 128, complex RoPE; at the given
    depth), true CFG (two calls per step), a small video VAE with the real 16 latent channels, and the tests' small
    Qwen2.5-VL encoder (32 wide, so the transformer's text input takes 32 channels instead of 3584: one linear layer
    over the text tokens)."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel

    from tests.qwen_pipelines import TEXT_WIDTH, qwen_tokenizer, tiny_qwen_vl

    template = QwenImagePipeline(None, None, None, None, None).prompt_template_encode
    tokenizer = qwen_tokenizer(template)
    encoder = tiny_qwen_vl(len(tokenizer) + 4, tokenizer.convert_tokens_to_ids("<|im_end|>"))
    torch.manual_seed(0)
    with torch.device(device):
        models = dict(transformer=QwenImageTransformer2DModel(num_layers=blocks, joint_attention_dim=TEXT_WIDTH),
                      vae=AutoencoderKLQwenImage(**SMALL_WAN_VAE), text_encoder=encoder.to(device))
    return QwenImagePipeline(**models, tokenizer=tokenizer,
                             scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True))


def random_zimage(words: list[str], device: torch.device, refiners: int = 2, layers: int = 30):
    """Z-Image's transformer (diffusers' defaults, Z-Image's: 30 heads of 128; at the given depth of noise and
    caption refiners each, and joint layers), CFG batched in one call, a small 16-channel VAE and the tests' small
    Qwen3 encoder (32 wide, so the caption embedder takes 32 channels instead of 2560)."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from tests.dit_pipelines import t5_tokenizer
    from tests.zimage_pipelines import CHAT_TEMPLATE, tiny_qwen3

    tokenizer = t5_tokenizer(words)
    tokenizer.chat_template = CHAT_TEMPLATE
    encoder = tiny_qwen3(len(tokenizer))
    torch.manual_seed(0)
    with torch.device(device):
        models = dict(transformer=ZImageTransformer2DModel(n_refiner_layers=refiners, n_layers=layers,
                                                           cap_feat_dim=encoder.config.hidden_size),
                      vae=AutoencoderKL(**SMALL_FLUX_VAE), text_encoder=encoder.to(device))
    return ZImagePipeline(**models, tokenizer=tokenizer,
                          scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False))
