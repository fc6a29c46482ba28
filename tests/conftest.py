"""Tiny random-weight SD1-, SDXL-, FLUX.1-, Chroma-, SD3.5-, FLUX.2-klein-, Qwen-Image- and Z-Image-style pipelines,
saved once, loaded by load_pipeline: fixtures `tiny_<name>_path` and `<name>_pipe` (tests/families.py names them);
Wan's `wan_pipe` and `wan_i2v_pipe`."""

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from stylealigned.models import load_pipeline
from stylealigned.toy.vocab import word_level_tokenizer
from tests.dit_pipelines import WORDS, build_chroma, build_flux, build_sd3
from tests.flux2_pipelines import build_flux2_klein
from tests.qwen_pipelines import build_qwen
from tests.zimage_pipelines import build_zimage
# Wan's fixtures (`wan_pipe`, `wan_i2v_pipe`: one per layout) live beside its builders; found here as every family's
from tests.wan_pipelines import tiny_wan_i2v_paths, tiny_wan_paths, wan_i2v_pipe, wan_pipe  # noqa: F401 (fixtures)

# One thread per test process: tiny models gain nothing from more, and `pytest -n` runs processes side by side.
torch.set_num_threads(1)

TEXT_HIDDEN = 32
SIZE = 32  # image side in pixels; latents are SIZE // 2


def tiny_tokenizer(folder):
    return word_level_tokenizer(WORDS, folder)


def tiny_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=SIZE,
    )


def tiny_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_unet(**kwargs) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, **kwargs,
    )


def build_sd(folder) -> None:
    """SD1-style: cross-attention in both down blocks, the mid block and both up blocks; 8 heads."""
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer)))
    unet = tiny_unet(
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        attention_head_dim=8, cross_attention_dim=TEXT_HIDDEN,
    )
    StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)


def build_sdxl(folder) -> None:
    """SDXL-style: two text encoders, text_time added conditioning, no attention in the first block, 2 layers deep."""
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(tiny_text_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(len(tokenizer)))
    time_embed_dim = 8
    unet = tiny_unet(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        # six micro-conditioning numbers (original size, crop, target size) plus text_encoder_2's pooled projection
        projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
    )
    StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=tiny_scheduler(),
    ).save_pretrained(folder)


def saved(tmp_path_factory, name: str, build) -> str:
    folder = tmp_path_factory.mktemp(name)
    build(folder)
    return str(folder)


def loaded(path: str):
    pipe = load_pipeline(path, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"sd": build_sd, "sdxl": build_sdxl, "flux": build_flux, "sd3": build_sd3, "chroma": build_chroma,
            "flux2": build_flux2_klein, "qwen": build_qwen, "zimage": build_zimage}


def pipeline_fixtures(name: str, build):
    """Fixtures `tiny_<name>_path` (built and saved once per session) and `<name>_pipe` (loaded anew per test)."""

    @pytest.fixture(scope="session", name=f"tiny_{name}_path")
    def path(tmp_path_factory) -> str:
        return saved(tmp_path_factory, f"tiny-{name}", build)

    @pytest.fixture(name=f"{name}_pipe")
    def pipe(request):
        return loaded(request.getfixturevalue(f"tiny_{name}_path"))

    return path, pipe


for _name, _build in BUILDERS.items():
    globals()[f"tiny_{_name}_path"], globals()[f"{_name}_pipe"] = pipeline_fixtures(_name, _build)


@pytest.fixture(scope="session")
def tiny_builtin_flux_path() -> str:
    """The shipped built-in transformer, by name: small enough to stand beside the tiny pipelines in tests."""
    return "builtin-flux"


@pytest.fixture
def builtin_flux_pipe(tiny_builtin_flux_path):
    return loaded(tiny_builtin_flux_path)


@pytest.fixture(scope="session")
def run():
    """`run(pipe, prompts, **kw)` -> numpy images [N, SIZE, SIZE, 3]: 3 DDIM steps, seed 0, overridable."""

    def run_pipe(pipe, prompts, **kwargs):
        settings = dict(
            num_inference_steps=3, height=SIZE, width=SIZE, output_type="np",
            generator=torch.Generator("cpu").manual_seed(0),
        )
        return pipe(prompts, **(settings | kwargs)).images

    return run_pipe



class Decoded(list):
    """The latents of each Backbone.decode call, in order; `take()` returns them and starts afresh."""

    def take(self) -> list:
        entries = list(self)
        self.clear()
        return entries


@pytest.fixture
def decoded(monkeypatch) -> Decoded:
    """Record the latents every Backbone.decode call receives and tag each decoded image with its latent
    (`image.info["latent"]`), so comparisons are made before 8-bit rounding."""
    from stylealigned.backbones import FAMILIES, Backbone

    seen = Decoded()

    def spying(original):
        def spy(backbone, latents, height, width):
            seen.append(latents.clone())
            images = original(backbone, latents, height, width)
            for latent, image in zip(latents, images):  # whole chunks are decoded: tag each image with its latent
                image.info["latent"] = latent.clone()
            return images

        return spy

    for family in (Backbone, *FAMILIES):  # every class with a decode of its own
        if "decode" in vars(family):
            monkeypatch.setattr(family, "decode", spying(vars(family)["decode"]))
    return seen


@pytest.fixture
def generated_sets(monkeypatch) -> list:
    """The prompts of every set the eval runner generates, in order."""
    from stylealigned.eval import runner

    calls, real = [], runner.generate_set

    def counting(pipe, prompts, config, **kwargs):
        calls.append(list(prompts))
        return real(pipe, prompts, config, **kwargs)

    monkeypatch.setattr(runner, "generate_set", counting)
    return calls
