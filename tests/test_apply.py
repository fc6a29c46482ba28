"""`apply` on real (tiny) SD1 and SDXL pipelines: exact removal, the reference, the oracle end to end, layers."""

import itertools

import pytest
import torch
from diffusers import DiffusionPipeline

import stylealigned as sa
from stylealigned.apply import hooked_layers, layers_to_share, select_layers
from stylealigned.backbones import backbone_for
from tests import oracle
from tests.tolerance import assert_rounding_close, denoising_depth

PROMPTS = ["a cat in watercolor style", "a dog", "a house", "a tree"]


def noise(count, seed=0):
    """Initial latents for `count` images at the tiny size, image i seeded by seed + i."""
    return torch.cat([torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed + i))
                      for i in range(count)])


def latents(pipe, prompts, guidance=5.0, steps=3, seed=0, **kwargs):
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                latents=noise(len(prompts), seed).to(pipe.unet.dtype), output_type="latent", **kwargs).images


@pytest.fixture(params=["sd", "sdxl"])
def pipe(request):
    return request.getfixturevalue(f"{request.param}_pipe")


def test_removed_or_never_applied_is_bit_identical(pipe):
    stock = latents(pipe, PROMPTS)
    with sa.apply(pipe, sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)):
        shared = latents(pipe, PROMPTS)
    assert not torch.equal(shared, stock)
    assert torch.equal(latents(pipe, PROMPTS), stock)
    handle = sa.apply(pipe)
    handle.remove()
    handle.remove()  # idempotent
    assert torch.equal(latents(pipe, PROMPTS), stock)


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_reference_is_unchanged_by_its_set(pipe, guidance):
    """In float64, up to the rounding of the loop (tests/tolerance.py): batched with others, the reference's
    numbers are summed in another order, which in float32 is 1e-5 off on a bad day."""
    pipe.to(dtype=torch.float64)
    alone = latents(pipe, PROMPTS[:1], guidance)
    with sa.apply(pipe):
        in_set = latents(pipe, PROMPTS, guidance)
    assert_rounding_close(in_set[:1], alone, denoising_depth(pipe, steps=3))


def test_targets_differ_from_vanilla(pipe):
    vanilla = latents(pipe, PROMPTS)
    with sa.apply(pipe):
        shared = latents(pipe, PROMPTS)
    assert ((shared[1:] - vanilla[1:]).abs().amax(dim=(1, 2, 3)) > 1e-3).all()


KNOB_GRID = [dict(zip(("share_attention", "adain_queries", "adain_keys", "adain_values"), flags))
             for flags in itertools.product([False, True], repeat=4)]
EXTRA = [dict(shared_score_scale=1.7, shared_score_shift=0.69), dict(shared_score_shift=-0.5, adain_values=True),
         dict(full_attention_share=True), dict(shared_layers=0.5, shared_score_scale=0.8)]


def install_oracle(pipe, config, groups):
    """Replace the selected self-attention processors (and GroupNorms if shared) by the oracle's."""
    names = layers_to_share(backbone_for(pipe), config)
    processors = dict(pipe.unet.attn_processors)
    for name in names:
        processors[f"{name}.processor"] = oracle.OracleProcessor(config, groups)
    pipe.unet.set_attn_processor(processors)
    if config.share_group_norm:
        for module in pipe.unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.forward = oracle.shared_group_norm(module, groups)


@pytest.mark.parametrize("knobs", KNOB_GRID + EXTRA, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_every_knob_equals_oracle_end_to_end(sd_pipe, knobs):
    """In float64, so that a 1e-9 agreement through three full denoising steps shows the same function."""
    sd_pipe.to(dtype=torch.float64)
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(sd_pipe, config):
        fast = latents(sd_pipe, PROMPTS[:3])
    install_oracle(sd_pipe, config, groups=2)
    torch.testing.assert_close(fast, latents(sd_pipe, PROMPTS[:3]), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("knobs", [{}, EXTRA[0], EXTRA[1]], ids=["default", "scale-shift", "adain-values"])
def test_one_fp32_unet_step_equals_oracle(sd_pipe, knobs):
    config = sa.StyleAlignedConfig(**knobs)
    with sa.apply(sd_pipe, config):
        fast = latents(sd_pipe, PROMPTS[:3], steps=1)
    install_oracle(sd_pipe, config, groups=2)
    assert_rounding_close(fast, latents(sd_pipe, PROMPTS[:3], steps=1), denoising_depth(sd_pipe, steps=1))


@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("preset", ["text_to_image", "transfer"])
def test_presets_equal_oracle_on_sdxl_with_and_without_guidance(sdxl_pipe, preset, guidance):
    sdxl_pipe.to(dtype=torch.float64)
    config = getattr(sa.StyleAlignedConfig, preset)()
    with sa.apply(sdxl_pipe, config):
        fast = latents(sdxl_pipe, PROMPTS[:3], guidance)
    install_oracle(sdxl_pipe, config, groups=2 if guidance > 1 else 1)
    torch.testing.assert_close(fast, latents(sdxl_pipe, PROMPTS[:3], guidance), atol=1e-9, rtol=1e-9)


def joint_layer_norm(module: torch.nn.LayerNorm, groups: int):
    """share_layer_norm done literally: each image's tokens normalised together with its reference's tokens."""
    def forward(x):
        out = []
        for rows in x.chunk(groups):
            joint = torch.cat([rows, rows[:1].expand_as(rows)], dim=1)
            normed = torch.nn.functional.layer_norm(joint, module.normalized_shape, module.weight, module.bias,
                                                    module.eps)
            out.append(normed[:, :rows.shape[1]])
        return torch.cat(out)

    return forward


def test_layer_norm_sharing_changes_nothing(sd_pipe):
    """LayerNorm's statistics are per token, so normalising each image's tokens jointly with its reference's (the
    literal share_layer_norm, installed by hand below) changes no number, and StyleAligned rightly installs nothing
    for it. In float64, as the oracle tests."""
    sd_pipe.to(dtype=torch.float64)
    without = sa.StyleAlignedConfig(share_layer_norm=False)
    with sa.apply(sd_pipe, without.replace(share_layer_norm=True)):
        ours = latents(sd_pipe, PROMPTS[:3])
    norms = [m for m in sd_pipe.unet.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms
    for module in norms:
        module.forward = joint_layer_norm(module, groups=2)
    with sa.apply(sd_pipe, without):
        literal = latents(sd_pipe, PROMPTS[:3])
    torch.testing.assert_close(ours, literal, atol=1e-12, rtol=0)


def test_shared_layers_fraction_is_counted(sdxl_pipe):
    names = backbone_for(sdxl_pipe).attention_layers()
    assert len(names) == 8  # SDXL-style: 2 down + 2 mid... counted from the tiny model's blocks
    for fraction, count in [(1.0, 8), (0.5, 4), (0.25, 2), (0.0, 0)]:
        handle = sa.apply(sdxl_pipe, sa.StyleAlignedConfig(shared_layers=fraction))
        assert hooked_layers(sdxl_pipe.unet) == handle.layers and len(handle.layers) == count
        handle.remove()
    half = select_layers(names, 0.5)
    assert half[0] != names[0] or half[-1] != names[-1]  # spread, not a prefix block
    assert select_layers(names, "up_blocks") == [n for n in names if "up_blocks" in n]
    assert select_layers(names, (names[2],)) == [names[2]]
    with pytest.raises(ValueError, match="unknown layers"):
        select_layers(names, ("nope",))


def test_fewer_shared_layers_move_targets_less(sd_pipe):
    vanilla = latents(sd_pipe, PROMPTS)
    change = {}
    for fraction in (1.0, 0.5, 0.0):
        with sa.apply(sd_pipe, sa.StyleAlignedConfig(shared_layers=fraction)):
            change[fraction] = (latents(sd_pipe, PROMPTS)[1:] - vanilla[1:]).abs().mean().item()
    assert change[0.0] < 1e-6 < change[0.5] < change[1.0]


def test_apply_twice_replaces_and_remove_restores(sd_pipe):
    originals = dict(sd_pipe.unet.attn_processors)
    first = sa.apply(sd_pipe, sa.StyleAlignedConfig(share_group_norm=True))
    second = sa.apply(sd_pipe, sa.StyleAlignedConfig(shared_layers=0.5))
    assert not first.active and second.active
    assert not any("forward" in vars(m) for m in sd_pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm))
    assert hooked_layers(sd_pipe.unet) == second.layers
    second.remove()
    assert all(sd_pipe.unet.attn_processors[k] is v for k, v in originals.items())
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in sd_pipe.unet.modules())


def test_disabled_config_installs_nothing(sd_pipe):
    stock = latents(sd_pipe, PROMPTS)
    with sa.apply(sd_pipe, sa.StyleAlignedConfig.disabled()) as handle:
        assert handle.layers == []
        assert torch.equal(latents(sd_pipe, PROMPTS), stock)


def test_img2img_variant_is_supported(tiny_sd_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1)
    with sa.apply(pipe):
        out = pipe(PROMPTS[:2], image=image, strength=0.7, num_inference_steps=4, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 32, 32, 3)


def test_pipeline_of_no_supported_family_is_a_user_error():
    with pytest.raises(sa.UserError, match="does not support DiffusionPipeline; it supports Stable Diffusion"):
        sa.apply(DiffusionPipeline())


@pytest.mark.parametrize("preset", ["text_to_image", "transfer"])
def test_chunked_unet_equals_one_batch(sd_pipe, preset):
    config = getattr(sa.StyleAlignedConfig, preset)()
    prompts = PROMPTS + ["a car", "a bird"]
    sd_pipe.to(dtype=torch.float64)  # up to the rounding of the loop: tests/tolerance.py
    with sa.apply(sd_pipe, config) as handle:
        one_batch = latents(sd_pipe, prompts)
        with handle.chunked(2):
            chunked = latents(sd_pipe, prompts)
    assert_rounding_close(chunked, one_batch, denoising_depth(sd_pipe, steps=3))
    assert "forward" not in vars(sd_pipe.unet)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipelines_follow_fp32(sd_pipe, dtype):
    config = sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)
    with sa.apply(sd_pipe, config):
        full = latents(sd_pipe, PROMPTS[:3])
        sd_pipe.to(dtype=dtype)
        half = latents(sd_pipe, PROMPTS[:3])
    assert half.dtype == dtype and torch.isfinite(half).all()
    error = (half.float() - full).norm() / full.norm()
    assert error < 0.05, error


def test_processors_set_while_applied_survive_removal(sd_pipe):
    """Removal takes off only our hooks: a processor loaded meanwhile (as a LoRA or IP-Adapter loader does) stays."""
    from diffusers.models.attention_processor import AttnProcessor

    handle = sa.apply(sd_pipe)
    name = handle.layers[0]
    sd_pipe.unet.get_submodule(name).set_processor(AttnProcessor())
    assert hooked_layers(sd_pipe.unet) == handle.layers  # still ours while applied
    handle.remove()
    assert isinstance(sd_pipe.unet.get_submodule(name).processor, AttnProcessor)
    assert hooked_layers(sd_pipe.unet) == []
