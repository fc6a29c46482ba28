"""Checks of the DiT oracle itself against stock diffusers transformers (tiny, random weights, fp64)."""

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from tests.oracle_dit import (
    Context,
    FluxOracleProcessor,
    SD3OracleProcessor,
    adain,
    attend_group,
    flux_reference_rotary,
    install,
    rope,
    softmax_attention,
)

TEXT, HEIGHT, WIDTH = 5, 4, 6  # FLUX: text tokens, latent grid in tokens
FLUX_LAYERS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
SD3_LAYERS = ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn"]


@dataclass
class Config:
    share_attention: bool = True
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = True
    shared_score_scale: float = 1.3
    shared_score_shift: float = 0.4
    reference_positions: str = "shifted"
    text_sees_reference: bool = True
    share_until: float = 0.0
    share_unconditional: bool = True


OFF = Config(share_attention=False, adain_queries=False, adain_keys=False, adain_values=False)


def flux_model():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).double().eval()
    return SimpleNamespace(transformer=transformer, do_classifier_free_guidance=False)


def sd3_model(cfg=True):
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=(0,),
    ).double().eval()
    return SimpleNamespace(transformer=transformer, do_classifier_free_guidance=cfg)


def flux_inputs(batch):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, HEIGHT * WIDTH, 16, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(batch, TEXT, 32, generator=g, dtype=torch.float64),
        pooled_projections=torch.randn(batch, 32, generator=g, dtype=torch.float64),
        timestep=torch.rand(batch, generator=g, dtype=torch.float64),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, HEIGHT, WIDTH, "cpu", torch.float64),
        txt_ids=torch.zeros(TEXT, 3, dtype=torch.float64),
    )


def sd3_inputs(batch):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(batch, 7, 32, generator=g, dtype=torch.float64),
        pooled_projections=torch.randn(batch, 32, generator=g, dtype=torch.float64),
        timestep=torch.rand(batch, generator=g, dtype=torch.float64) * 1000,
    )


MODELS = {"flux": (flux_model, flux_inputs, FLUX_LAYERS), "sd3": (sd3_model, sd3_inputs, SD3_LAYERS)}


def take(inputs, rows):
    """The inputs restricted to the batch rows `rows` (position ids are not batched)."""
    return {key: value if key.endswith("_ids") else value[rows] for key, value in inputs.items()}


def run(pipe, inputs):
    with torch.no_grad():
        return pipe.transformer(**inputs, return_dict=False)[0]


def run_with(pipe, config, layers, inputs):
    undo = install(pipe, config, layers)
    try:
        return run(pipe, inputs)
    finally:
        undo()


def layer_call(model, layer, batch=4):
    """A tiny model's attention module `layer` and the keyword arguments the stock model calls it with."""
    build, make_inputs, _ = MODELS[model]
    pipe = build()
    module = pipe.transformer.get_submodule(layer)
    seen = []
    handle = module.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    run(pipe, make_inputs(batch))
    handle.remove()
    kwargs, = seen
    return module, kwargs


def use_oracle(module, model, config):
    """Put the oracle processor on `module`, with the context the install hook would set for a batch of 4."""
    kind = FluxOracleProcessor if model == "flux" else SD3OracleProcessor
    module.set_processor(kind(config, Context(groups=2 if model == "sd3" else 1, text_tokens=TEXT)))


def run_module(module, kwargs):
    """The module's outputs as a tuple."""
    with torch.no_grad():
        out = module(**kwargs)
    return out if isinstance(out, tuple) else (out,)


LAYERS = [("flux", name) for name in FLUX_LAYERS] + [("sd3", name) for name in SD3_LAYERS]


@pytest.mark.parametrize("model,layer", LAYERS)
def test_flags_off_equal_the_stock_layer(model, layer):
    module, kwargs = layer_call(model, layer)
    stock = run_module(module, kwargs)
    use_oracle(module, model, OFF)
    oracle = run_module(module, kwargs)
    assert len(oracle) == len(stock)
    for o, s in zip(oracle, stock):
        torch.testing.assert_close(o, s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model,layer", [layer for layer in LAYERS if not layer[1].endswith("attn2")])
def test_the_reference_text_tokens_do_not_reach_the_targets(model, layer):
    """Perturbing the references' text tokens leaves the targets' layer outputs alone; their image tokens do not."""
    module, kwargs = layer_call(model, layer)
    use_oracle(module, model, Config())
    single = "encoder_hidden_states" not in kwargs  # FLUX single-stream: hidden_states is [text, image]
    text = ("hidden_states", slice(0, TEXT)) if single else ("encoder_hidden_states", slice(None))
    image = ("hidden_states", slice(TEXT, None)) if single else ("hidden_states", slice(None))
    references, targets = ([0], [1, 2, 3]) if model == "flux" else ([0, 2], [1, 3])

    def targets_after(key=None, rows=None):
        changed = dict(kwargs)
        if key is not None:
            changed[key] = kwargs[key].clone()
            changed[key][references, rows] += 1.0
        return torch.cat([out[targets].flatten() for out in run_module(module, changed)])

    base = targets_after()
    torch.testing.assert_close(targets_after(*text), base, rtol=0, atol=1e-12)
    assert (targets_after(*image) - base).abs().max() > 1e-4


@pytest.mark.parametrize("model", MODELS)
def test_flags_off_equal_the_stock_model_and_undo_restores(model):
    build, make_inputs, layers = MODELS[model]
    pipe, inputs = build(), make_inputs(4)
    stock = run(pipe, inputs)
    processors = [pipe.transformer.get_submodule(name).processor for name in layers]
    torch.testing.assert_close(run_with(pipe, OFF, layers, inputs), stock, rtol=0, atol=1e-12)
    assert [pipe.transformer.get_submodule(name).processor for name in layers] == processors
    assert not pipe.transformer._forward_pre_hooks
    assert torch.equal(run(pipe, inputs), stock)


@pytest.mark.parametrize("model", MODELS)
def test_reference_equals_the_stock_model_alone_and_targets_differ(model):
    build, make_inputs, layers = MODELS[model]
    pipe, inputs = build(), make_inputs(6)
    references = [0] if model == "flux" else [0, 3]  # SD3 with guidance: groups [uncond 0-2, cond 3-5]
    shared = run_with(pipe, Config(), layers, inputs)
    stock = run(pipe, inputs)
    torch.testing.assert_close(shared[references], run(pipe, take(inputs, references)), rtol=0, atol=1e-12)
    for target in sorted(set(range(6)) - set(references)):
        assert (shared[target] - stock[target]).abs().max() > 1e-4


def test_sd3_groups_follow_classifier_free_guidance():
    pipe, inputs = sd3_model(cfg=False), sd3_inputs(6)
    one_group = run_with(pipe, Config(), SD3_LAYERS, inputs)
    torch.testing.assert_close(one_group[:1], run(pipe, take(inputs, [0])), rtol=0, atol=1e-12)
    pipe.do_classifier_free_guidance = True
    two_groups = run_with(pipe, Config(), SD3_LAYERS, inputs)
    torch.testing.assert_close(two_groups[:3], one_group[:3], rtol=0, atol=1e-12)
    assert (two_groups[3:] - one_group[3:]).abs().max() > 1e-4


def test_adain_alone_changes_targets_only():
    pipe, inputs = flux_model(), flux_inputs(3)
    out = run_with(pipe, Config(share_attention=False), FLUX_LAYERS, inputs)
    stock = run(pipe, inputs)
    torch.testing.assert_close(out[0], stock[0], rtol=0, atol=1e-12)
    assert (out[1:] - stock[1:]).abs().max() > 1e-4


def test_shift_log2_equals_duplicating_the_shared_tokens():
    g = torch.Generator().manual_seed(2)
    q, k, v, ref_k, ref_v = (torch.randn(2, n, 8, generator=g, dtype=torch.float64) for n in (9, 9, 9, 6, 6))
    shifted = softmax_attention(q, torch.cat([k, ref_k], 1), torch.cat([v, ref_v], 1), shift_from=9, shift=math.log(2))
    duplicated = softmax_attention(q, torch.cat([k, ref_k, ref_k], 1), torch.cat([v, ref_v, ref_v], 1))
    torch.testing.assert_close(shifted, duplicated, rtol=0, atol=1e-12)
    assert (shifted - softmax_attention(q, torch.cat([k, ref_k], 1), torch.cat([v, ref_v], 1))).abs().max() > 1e-3


def test_group_attention_shares_the_reference_image_tokens_only():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    image = slice(0, 6)  # SD3 joint layout: [image, text]
    config = Config(adain_queries=False, adain_keys=False, adain_values=False, shared_score_scale=1.0,
                    shared_score_shift=math.log(2))
    out = attend_group(q, k, v, image, config)
    torch.testing.assert_close(out[0], softmax_attention(q[0], k[0], v[0]), rtol=0, atol=1e-12)
    for i in (1, 2):
        keys = torch.cat([k[i], k[0][:, image], k[0][:, image]], 1)
        values = torch.cat([v[i], v[0][:, image], v[0][:, image]], 1)
        torch.testing.assert_close(out[i], softmax_attention(q[i], keys, values), rtol=0, atol=1e-12)


def test_target_attention_by_hand_on_the_flux_layout():
    """All flags on: AdaIN'd own tokens with RoPE, plus the raw reference image keys rotated elsewhere, scaled."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    cos, sin = (torch.randn(10, 8, generator=g) for _ in range(2))
    ref_cos, ref_sin = (torch.randn(6, 8, generator=g) for _ in range(2))
    config = Config()
    out = attend_group(q, k, v, slice(4, None), config, (cos, sin), (ref_cos, ref_sin))

    def rotate(x, c, s):  # (heads, tokens, dim) -> through diffusers' [batch, tokens, heads, dim] layout
        return apply_rotary_emb(x.transpose(0, 1)[None], (c, s), sequence_dim=1)[0].transpose(0, 1)

    def normalised(x, ref):
        return torch.cat([x[:, :4], adain(x[:, 4:], ref[:, 4:])], 1)

    qt, kt, vt = rotate(normalised(q[1], q[0]), cos, sin), rotate(normalised(k[1], k[0]), cos, sin), \
        normalised(v[1], v[0])
    shared_k = 1.3 * rotate(k[0][:, 4:], ref_cos, ref_sin)
    logits = qt @ torch.cat([kt, shared_k], 1).transpose(1, 2) / math.sqrt(8)
    logits[..., 10:] += 0.4
    want = logits.softmax(-1) @ torch.cat([vt, v[0][:, 4:]], 1)
    torch.testing.assert_close(out[1], want, rtol=0, atol=1e-12)
    reference = softmax_attention(rotate(q[0], cos, sin), rotate(k[0], cos, sin), v[0])
    torch.testing.assert_close(out[0], reference, rtol=0, atol=1e-12)


def test_same_positions_make_an_identical_reference_a_copy_of_the_own_image_tokens():
    """With identical images and "same" positions, the shared keys duplicate the own image keys: weight 1 + e^shift."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=g, dtype=torch.float64).expand(2, -1, -1, -1) for _ in range(3))
    rotary = tuple(torch.randn(10, 8, generator=g) for _ in range(2))
    config = Config(shared_score_scale=1.0, reference_positions="same")
    out = attend_group(q, k, v, slice(4, None), config, rotary)
    want = softmax_attention(rope(q[0], rotary), rope(k[0], rotary), v[0], shift_from=4,
                             shift=math.log(1 + math.exp(config.shared_score_shift)))
    torch.testing.assert_close(out[1], want, rtol=0, atol=1e-12)


def test_adain_touches_image_tokens_only():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g, dtype=torch.float64) for _ in range(3))
    text, image = slice(0, 4), slice(4, None)  # FLUX layout: [text, image]
    config = Config(share_attention=False, adain_queries=False, adain_keys=False)
    out = attend_group(q, k, v, image, config)[1]
    x, ref = v[1][:, image], v[0][:, image]
    normalised = (x - x.mean(-2, keepdim=True)) / (x.var(-2, keepdim=True) + 1e-5).sqrt() * (
        ref.var(-2, keepdim=True) + 1e-5).sqrt() + ref.mean(-2, keepdim=True)
    values = torch.cat([v[1][:, text], normalised], 1)
    torch.testing.assert_close(out, softmax_attention(q[1], k[1], values), rtol=0, atol=1e-12)
    assert (out - softmax_attention(q[1], k[1], v[1])).abs().max() > 1e-3


def test_shifted_reference_positions_move_the_column_axis_by_the_width():
    transformer = flux_model().transformer
    img_ids = FluxPipeline._prepare_latent_image_ids(1, HEIGHT, WIDTH, "cpu", torch.float64)
    assert flux_reference_rotary(transformer, img_ids, "same") is None
    shifted = img_ids.clone()
    shifted[:, 2] += WIDTH  # AlignedGen: reference_image_ids[:, 2] += width // 16
    for got, want in zip(flux_reference_rotary(transformer, img_ids, "shifted"), transformer.pos_embed(shifted)):
        assert torch.equal(got, want)


def test_shifted_differs_from_same_on_flux():
    pipe, inputs = flux_model(), flux_inputs(3)
    shifted = run_with(pipe, Config(reference_positions="shifted"), FLUX_LAYERS, inputs)
    same = run_with(pipe, Config(reference_positions="same"), FLUX_LAYERS, inputs)
    torch.testing.assert_close(shifted[0], same[0], rtol=0, atol=1e-12)
    assert (shifted[1:] - same[1:]).abs().max() > 1e-4


def test_shifted_equals_same_on_sd3():
    pipe, inputs = sd3_model(), sd3_inputs(4)
    shifted = run_with(pipe, Config(reference_positions="shifted"), SD3_LAYERS, inputs)
    same = run_with(pipe, Config(reference_positions="same"), SD3_LAYERS, inputs)
    assert torch.equal(shifted, same)


def test_hook_sets_the_flux_context():
    pipe, inputs = flux_model(), flux_inputs(2)
    undo = install(pipe, Config(), FLUX_LAYERS[:1])
    context = pipe.transformer.get_submodule(FLUX_LAYERS[0]).processor.context
    run(pipe, inputs)
    undo()
    assert (context.groups, context.text_tokens) == (1, TEXT)
    assert context.reference_rotary[0].shape == (HEIGHT * WIDTH, 16)
