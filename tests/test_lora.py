"""`apply` with LoRA and IP-Adapter weights loaded: the shared attention runs on the LoRA'd projections (equal to the
oracle's), whether the LoRA comes before or after apply, fused or not; IP-Adapter processors on cross-attention
stay and still run; removal restores each pipeline bit for bit."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

import stylealigned as sa
from stylealigned.errors import UserError
from stylealigned.models import load_loras, parse_lora
from tests import oracle
from tests.conftest import loaded
from tests.test_apply import PROMPTS, latents

CONFIG = sa.StyleAlignedConfig(shared_score_shift=0.5, adain_values=True)


@pytest.fixture(scope="module")
def lora_file(tiny_sd_path, tmp_path_factory):
    """A random LoRA (non-zero up weights) on every attention projection of the tiny SD UNet, saved as diffusers
    saves LoRA weights."""
    pipe = loaded(tiny_sd_path)
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return folder / "pytorch_lora_weights.safetensors"


def with_lora(pipe, path, scale=1.0):
    load_loras(pipe, [f"{path}:{scale}"])
    return pipe


def test_lora_changes_the_model(sd_pipe, lora_file):
    stock = latents(sd_pipe, PROMPTS[:3])
    assert not torch.allclose(latents(with_lora(sd_pipe, lora_file), PROMPTS[:3]), stock, atol=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_lora_before_or_after_apply_equals_oracle_and_removal_is_exact(tiny_sd_path, lora_file, fused):
    """fp64: apply on a LoRA'd pipeline (LoRA loaded before or after apply) equals the oracle's shared attention
    over the LoRA'd projections; removing apply gives back the LoRA'd pipeline to the bit."""
    before = with_lora(loaded(tiny_sd_path), lora_file, 0.8).to(dtype=torch.float64)
    if fused:
        before.fuse_lora()
    plain = latents(before, PROMPTS[:3])
    handle = sa.apply(before, CONFIG)
    fast = latents(before, PROMPTS[:3])
    handle.remove()
    assert torch.equal(latents(before, PROMPTS[:3]), plain)

    after = loaded(tiny_sd_path).to(dtype=torch.float64)
    handle = sa.apply(after, CONFIG)
    with_lora(after, lora_file, 0.8)
    if fused:
        after.fuse_lora()
    torch.testing.assert_close(latents(after, PROMPTS[:3]), fast, atol=1e-9, rtol=1e-9)
    handle.remove()
    torch.testing.assert_close(latents(after, PROMPTS[:3]), plain, atol=1e-9, rtol=1e-9)

    oracle.install(before, CONFIG, groups=2)
    torch.testing.assert_close(fast, latents(before, PROMPTS[:3]), atol=1e-9, rtol=1e-9)


def test_unloading_the_lora_under_apply_gives_the_stock_set(sd_pipe, lora_file):
    with sa.apply(sd_pipe, CONFIG):
        stock_set = latents(sd_pipe, PROMPTS[:3])
        with_lora(sd_pipe, lora_file)
        assert not torch.allclose(latents(sd_pipe, PROMPTS[:3]), stock_set, atol=1e-3)
        sd_pipe.unload_lora_weights()
        assert torch.equal(latents(sd_pipe, PROMPTS[:3]), stock_set)


def test_lora_scale_follows_set_adapters(sd_pipe, lora_file):
    with sa.apply(sd_pipe, CONFIG):
        with_lora(sd_pipe, lora_file, 0.0)
        zero = latents(sd_pipe, PROMPTS[:3])
        sd_pipe.set_adapters(["lora0"], [1.0])
        full = latents(sd_pipe, PROMPTS[:3])
        sd_pipe.unload_lora_weights()
        torch.testing.assert_close(latents(sd_pipe, PROMPTS[:3]), zero, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(full, zero, atol=1e-3)


def tiny_ip_adapter(unet, image_dim=8, seed=0):
    """A random IP-Adapter for `unet` in the original state-dict layout: an image projection to 4 tokens and, per
    cross-attention layer (ids 1, 3, 5, ...), to_k_ip / to_v_ip weights."""
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    image_proj = {"proj.weight": torch.randn(4 * cross, image_dim, generator=generator) * 0.3,
                  "proj.bias": torch.zeros(4 * cross), "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    ip_adapter, key = {}, 1
    for name, module in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            for kind in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{key}.{kind}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.3
            key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def ip_latents(pipe, embeds):
    """A set with image embeddings for the IP-Adapter: [negative, positive] per image, under guidance."""
    return latents(pipe, PROMPTS[:3], ip_adapter_image_embeds=[embeds])


def test_ip_adapter_processors_are_kept_and_still_run(sd_pipe):
    """fp64: with an IP-Adapter on cross-attention, the set equals the oracle on self-attention beside it."""
    sd_pipe.unet._load_ip_adapter_weights([tiny_ip_adapter(sd_pipe.unet)], low_cpu_mem_usage=False)
    sd_pipe.to(dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    embeds = [torch.cat([torch.zeros(1, 1, 8), torch.randn(1, 1, 8, generator=generator)]).double() for _ in range(2)]
    processors = dict(sd_pipe.unet.attn_processors)
    plain = ip_latents(sd_pipe, embeds[0])
    with sa.apply(sd_pipe, CONFIG) as handle:
        assert all(isinstance(sd_pipe.unet.attn_processors[name], IPAdapterAttnProcessor2_0)
                   for name in processors if name.endswith("attn2.processor"))
        assert all(name.replace(".processor", "") in handle.layers for name in processors
                   if name.endswith("attn1.processor"))
        first, second = ip_latents(sd_pipe, embeds[0]), ip_latents(sd_pipe, embeds[1])
    assert not torch.allclose(first, second, atol=1e-3)  # the image prompt still acts on the set
    assert not torch.allclose(first, plain, atol=1e-3)  # and the sharing on top of it
    assert all(sd_pipe.unet.attn_processors[name] is processor for name, processor in processors.items())
    assert torch.equal(ip_latents(sd_pipe, embeds[0]), plain)
    oracle.install(sd_pipe, CONFIG, groups=2)
    assert all(isinstance(sd_pipe.unet.attn_processors[name], IPAdapterAttnProcessor2_0)
               for name in processors if name.endswith("attn2.processor"))
    torch.testing.assert_close(ip_latents(sd_pipe, embeds[0]), first, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("spec, expected", [("a/b.safetensors", ("a/b.safetensors", 1.0)),
                                            ("a/b.safetensors:0.5", ("a/b.safetensors", 0.5)),
                                            ("C:/x/y:2", ("C:/x/y", 2.0))])
def test_lora_specs_parse(spec, expected):
    path, scale = parse_lora(spec)
    assert (str(path), scale) == expected


def test_a_missing_lora_is_a_user_error(sd_pipe, tmp_path):
    with pytest.raises(UserError, match="cannot load LoRA"):
        load_loras(sd_pipe, [str(tmp_path / "nope.safetensors")])


def test_cli_lora_option_loads_it_at_its_scale(tiny_sd_path, lora_file, tmp_path, capsys):
    import numpy as np

    from stylealigned import sets
    from tests.test_cli import FAST, cli, pixels

    out = tmp_path / "run"
    code, _, err = cli(capsys, "generate", "a cat", "a dog", "--lora", f"{lora_file}:0.7", "--model", tiny_sd_path,
                       "--out", out, *FAST)
    assert code == 0, err
    expected = sets.generate_set(with_lora(loaded(tiny_sd_path), lora_file, 0.7), ["a cat", "a dog"],
                                 num_inference_steps=3, width=32, height=32)
    plain = sets.generate_set(loaded(tiny_sd_path), ["a cat", "a dog"], num_inference_steps=3, width=32, height=32)
    found = [image for _, image in sorted(pixels(out).items())]
    assert all(np.abs(a.astype(int) - np.asarray(b)).max() <= 1 for a, b in zip(found, expected))
    assert any(np.abs(a.astype(int) - np.asarray(b)).max() > 1 for a, b in zip(found, plain))
    code, _, err = cli(capsys, "generate", "a cat", "--lora", tmp_path / "none.safetensors", "--model", tiny_sd_path,
                       "--out", tmp_path / "o", *FAST)
    assert code == 2 and "cannot load LoRA" in err.splitlines()[-1], err
    assert not (tmp_path / "o").exists()


def test_lora_on_flux_equals_oracle_and_removal_is_exact(flux_pipe, tmp_path):
    """A transformer LoRA (FLUX.1's to_q/k/v/out), saved and loaded as diffusers does: the fast path equals the DiT
    oracle on the LoRA'd projections in fp64, and removal gives back the LoRA'd pipeline to the bit."""
    from diffusers import FluxPipeline

    from stylealigned.apply import layers_to_share
    from stylealigned.backbones import backbone_for
    from tests import oracle_dit
    from tests.families import latents as dit_latents

    torch.manual_seed(2)
    flux_pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(flux_pipe.transformer)))
    flux_pipe.transformer.delete_adapters("default")
    stock = dit_latents(flux_pipe)
    with_lora(flux_pipe, tmp_path / "pytorch_lora_weights.safetensors").to(dtype=torch.float64)
    plain = dit_latents(flux_pipe)
    assert not torch.allclose(plain, stock.double(), atol=1e-3)
    config = sa.StyleAlignedConfig(shared_layers=1.0, shared_score_shift=0.3)
    with sa.apply(flux_pipe, config):
        fast = dit_latents(flux_pipe)
    assert torch.equal(dit_latents(flux_pipe), plain)
    undo = oracle_dit.install(flux_pipe, config, layers_to_share(backbone_for(flux_pipe), config))
    try:
        torch.testing.assert_close(fast, dit_latents(flux_pipe), atol=1e-9, rtol=1e-9)
    finally:
        undo()


def test_ip_adapter_sets_in_chunks_equal_one_batch(sd_pipe):
    """The image prompt's embeddings are batched with the images, so the chunked denoiser slices them too."""
    import numpy as np

    from stylealigned import sets

    sd_pipe.unet._load_ip_adapter_weights([tiny_ip_adapter(sd_pipe.unet)], low_cpu_mem_usage=False)
    embeds = torch.cat([torch.zeros(1, 1, 8), torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(3))])
    kwargs = dict(num_inference_steps=3, height=32, width=32, guidance_scale=5.0, ip_adapter_image_embeds=[embeds])
    whole = sets.generate_set(sd_pipe, PROMPTS, CONFIG, **kwargs)
    chunked = sets.generate_set(sd_pipe, PROMPTS, CONFIG, batch_size=1, **kwargs)
    assert all(np.abs(np.asarray(a).astype(int) - np.asarray(b)).max() <= 1 for a, b in zip(whole, chunked))
