"""`apply` and `generate_set` on the tiny transformer pipelines (tests/families.py): the reference, chunks and
subsets, the shared layers, refused knobs, reference positions, replacing, and composing with a foreign hook. (Exact
removal and the reference in chunks, on every family: tests/test_transformer_oracle.py.)"""

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_flux import FluxAttention

import stylealigned as sa
from stylealigned import sets
from stylealigned.apply import HOOK, applied, hooked_layers, layers_to_share
from stylealigned.backbones import backbone_for
from tests.families import families, family_of
from tests.test_transformer_oracle import leftovers, per_image_change
from tests.tolerance import assert_rounding_close, denoising_depth

PROMPTS = ["a cat in watercolor style", "a dog", "a house", "a tree", "a car"]
STEPS = 3
# FLUX.1-dev embeds its guidance (the pipeline's default, 3.5); SD3 batches classifier-free guidance; klein runs it
# in two calls.
GUIDANCE = {"flux": {}}


@pytest.fixture(params=families("flux", "sd3", "flux2"))
def pipe(request):
    return request.param.pipe(request)


def family(pipe) -> str:
    return backbone_for(pipe).family


def calls_per_step(pipe) -> int:
    """Transformer calls per denoising step: klein runs the negative prompt in a call of its own."""
    return family_of(pipe).calls_per_step


def settings(pipe, **kwargs) -> dict:
    table = family_of(pipe)
    guidance = GUIDANCE.get(table.name, table.guided)
    size = dict(height=table.height, width=table.width)
    return dict(num_inference_steps=STEPS, **size, **table.prompt_kwargs) | guidance | kwargs


def latents(pipe, prompts, seed=0, **kwargs):
    """The pipeline's final latents (its own layout), image i starting from the noise seeded seed + i."""
    table = family_of(pipe)
    return table.latents(pipe, prompts, STEPS, seed, **(GUIDANCE.get(table.name, table.guided) | kwargs))


# the reference, targets


REFERENCE_CASES = [
    pytest.param("flux_pipe", {}, {}, id="flux-default-layers"),
    pytest.param("flux_pipe", {}, dict(shared_layers=1.0, adain_values=True, shared_score_scale=1.3,
                                       reference_positions="same"), id="flux-every-layer"),
    pytest.param("sd3_pipe", {"guidance_scale": 1.0}, {}, id="sd3-no-cfg"),
    pytest.param("sd3_pipe", {"guidance_scale": 5.0}, {}, id="sd3-cfg"),
    pytest.param("sd3_pipe", {"guidance_scale": 5.0}, dict(adain_values=True, shared_score_shift=0.7),
                 id="sd3-cfg-adain-values"),
    pytest.param("flux2_pipe", {"guidance_scale": 4.0}, {}, id="flux2-cfg"),
    pytest.param("flux2_pipe", {"guidance_scale": 1.0}, dict(shared_layers=1.0, adain_values=True),
                 id="flux2-every-layer"),
]


@pytest.mark.parametrize("pipe_name, guidance, knobs", REFERENCE_CASES)
def test_reference_equals_its_prompt_generated_alone(request, pipe_name, guidance, knobs):
    pipe = request.getfixturevalue(pipe_name).to(dtype=torch.float64)  # rounding of the loop: tests/tolerance.py
    alone = latents(pipe, PROMPTS[:1], **guidance)
    with sa.apply(pipe, sa.StyleAlignedConfig(**knobs)):
        in_set = latents(pipe, PROMPTS[:4], **guidance)
    assert_rounding_close(in_set[:1], alone, denoising_depth(pipe, STEPS))


@pytest.mark.parametrize("guidance", [None, 1.0])
def test_targets_differ_from_vanilla(pipe, guidance):
    extra = {} if guidance is None else {"guidance_scale": guidance}
    vanilla = latents(pipe, PROMPTS[:4], **extra)
    with sa.apply(pipe):
        shared = latents(pipe, PROMPTS[:4], **extra)
    change = per_image_change(shared, vanilla)
    assert change[0] < 1e-5 and (change[1:] > 1e-3).all(), change


# generate_set


def set_latents(pipe, prompts, decoded, seed=7, **kwargs) -> dict[int, torch.Tensor]:
    """generate_set's decoded latents by set position."""
    decoded.clear()
    found = {}
    images = sets.generate_set(pipe, prompts, seed=seed, **settings(pipe), **kwargs,
                               on_image=lambda i, image: found.setdefault(i, image.info["latent"]))
    size = (family_of(pipe).width, family_of(pipe).height)
    assert len(images) == len(found) and all(image.size == size for image in images)
    return found


def test_chunks_and_waves_equal_one_batch_and_the_apply_path(pipe, decoded):
    whole = set_latents(pipe, PROMPTS, decoded)
    chunked = set_latents(pipe, PROMPTS, decoded, batch_size=2)
    waves = set_latents(pipe, PROMPTS, decoded, batch_size=2, wave_size=3)
    assert sorted(whole) == sorted(chunked) == sorted(waves) == list(range(len(PROMPTS)))
    for i in range(len(PROMPTS)):
        assert_rounding_close(chunked[i], whole[i], denoising_depth(pipe, 3))
        assert_rounding_close(waves[i], whole[i], denoising_depth(pipe, 3))
    with sa.apply(pipe):
        expected = latents(pipe, PROMPTS, seed=7)
    torch.testing.assert_close(torch.stack([whole[i] for i in range(len(PROMPTS))]), expected, atol=1e-4, rtol=1e-4)
    assert leftovers(pipe.transformer) == []


@pytest.mark.parametrize("indices", [[2, 4], [0, 3]])
def test_a_subset_of_positions_reproduces_the_set(pipe, decoded, indices):
    whole = set_latents(pipe, PROMPTS, decoded, batch_size=2)
    part = set_latents(pipe, PROMPTS, decoded, batch_size=2, indices=indices)
    assert sorted(part) == indices
    for i in indices:
        assert_rounding_close(part[i], whole[i], denoising_depth(pipe, 3))


class RecordBatches(ModelHook):
    """A foreign hook registered before `apply`: it sits inside ours and sees each chunk's batch size."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def pre_forward(self, module, *args, **kwargs):
        self.batches.append(kwargs["hidden_states"].shape[0])
        return args, kwargs


def test_chunked_apply_runs_the_reference_once_then_targets_in_chunks(pipe):
    recorder = RecordBatches()
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(recorder, "recorder")
    groups = family_of(pipe).groups  # SD3 batches [uncond..., cond...]
    calls = calls_per_step(pipe)
    with sa.apply(pipe) as handle, handle.chunked(2):
        latents(pipe, PROMPTS)
    assert recorder.batches == [groups * 1, groups * 2, groups * 2] * calls * STEPS  # [reference], [t1, t2], [t3, t4]
    recorder.batches.clear()
    with sa.apply(pipe) as handle, handle.chunked(4):  # all targets fit: one call
        latents(pipe, PROMPTS)
    assert recorder.batches == [groups * len(PROMPTS)] * calls * STEPS


# which layers share


def test_default_shared_layers_per_family(flux_pipe, sd3_pipe):
    flux_all = [name for name, module in flux_pipe.transformer.named_modules() if isinstance(module, FluxAttention)]
    assert flux_all[-2:] == ["single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
    assert flux_all[0].startswith("transformer_blocks.")
    sd3_all = [name for name, module in sd3_pipe.transformer.named_modules() if isinstance(module, Attention)]
    assert sd3_all == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn",
                       "transformer_blocks.2.attn"]
    double = [name for name in flux_all if name.startswith("transformer_blocks.")]
    default = {"flux": [*double, "single_transformer_blocks.1.attn"],  # every double-stream block, the last single
               "sd3": ["transformer_blocks.0.attn2", "transformer_blocks.2.attn"]}  # half, evenly spread
    for pipe, family, layers in ((flux_pipe, "flux", flux_all), (sd3_pipe, "sd3", sd3_all)):
        with sa.apply(pipe) as handle:
            assert handle.layers == hooked_layers(pipe.transformer) == default[family]
            assert set(handle.layers) < set(layers)


@pytest.mark.parametrize("shared_layers, expected", [
    pytest.param(0.5, {"flux": ["transformer_blocks.1.attn", "single_transformer_blocks.1.attn"],
                       "sd3": ["transformer_blocks.0.attn2", "transformer_blocks.2.attn"]}, id="half"),
    pytest.param(1.0, {"flux": ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                                "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"],
                       "sd3": ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn",
                               "transformer_blocks.2.attn"]}, id="all"),
    pytest.param({"flux": "single_transformer_blocks.1", "sd3": "attn2"},
                 {"flux": ["single_transformer_blocks.1.attn"], "sd3": ["transformer_blocks.0.attn2"]}, id="filter"),
])
def test_shared_layers_fraction_and_name_filter(pipe, shared_layers, expected):
    name = "flux" if family(pipe) == "flux2" else family(pipe)  # FLUX.2's blocks are named as FLUX.1's
    shared_layers = shared_layers[name] if isinstance(shared_layers, dict) else shared_layers
    vanilla = latents(pipe, PROMPTS[:3])
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=shared_layers)) as handle:
        assert handle.layers == hooked_layers(pipe.transformer) == expected[name]
        shared = latents(pipe, PROMPTS[:3])
    change = per_image_change(shared, vanilla)
    assert change[0] < 1e-5 and (change[1:] > 1e-4).all(), change


def test_no_shared_layer_leaves_the_model_bit_identical(pipe):
    vanilla = latents(pipe, PROMPTS[:3])
    with sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=0.0)) as handle:
        assert handle.layers == hooked_layers(pipe.transformer) == []
        assert torch.equal(latents(pipe, PROMPTS[:3]), vanilla)


@pytest.mark.parametrize("table", families())
@pytest.mark.parametrize("knob", ["share_group_norm", "share_layer_norm", "full_attention_share"])
def test_knobs_without_meaning_on_transformers_are_refused(request, table, knob):
    pipe = table.pipe(request)
    with pytest.raises(sa.UserError) as refused:
        sa.apply(pipe, sa.StyleAlignedConfig(**{knob: True}))
    message = str(refused.value)
    assert knob in message and "\n" not in message
    assert not hasattr(pipe, "_stylealigned_handle") and leftovers(pipe.transformer) == []
    with pytest.raises(sa.UserError, match=knob):
        sets.generate_set(pipe, PROMPTS[:2], sa.StyleAlignedConfig(**{knob: True}), **settings(pipe))


# reference positions, replacing, composing


def test_reference_positions_move_flux_targets_only(flux_pipe, sd3_pipe):
    def both(pipe):
        out = []
        for positions in ("shifted", "same"):
            with sa.apply(pipe, sa.StyleAlignedConfig(reference_positions=positions)):
                out.append(latents(pipe, PROMPTS[:3]))
        return out

    shifted, same = both(flux_pipe)
    change = per_image_change(shifted, same)
    assert change[0] < 1e-5 and (change[1:] > 1e-4).all(), change
    shifted, same = both(sd3_pipe)  # no RoPE: the knob means nothing, bit for bit
    assert torch.equal(shifted, same)


def test_applying_twice_replaces(pipe):
    with sa.apply(pipe):
        expected = latents(pipe, PROMPTS[:3])
    first = sa.apply(pipe, sa.StyleAlignedConfig(shared_layers=1.0, adain_values=True))
    second = sa.apply(pipe)
    assert not first.active and second.active and applied(pipe) is second
    registries = {name: list(module._diffusers_hook.hooks) for name, module in pipe.transformer.named_modules()
                  if hasattr(module, "_diffusers_hook")}
    assert registries == {name: [HOOK] for name in ["", *second.layers]}
    assert hooked_layers(pipe.transformer) == second.layers
    first.remove()  # no effect: it was replaced
    assert hooked_layers(pipe.transformer) == second.layers
    assert torch.equal(latents(pipe, PROMPTS[:3]), expected)
    second.remove()
    assert leftovers(pipe.transformer) == []


class CountCalls(ModelHook):
    """A foreign hook, e.g. a user's profiler: counts the transformer's calls and leaves them alone."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_foreign_hook_on_the_transformer_keeps_running_and_stays(pipe, order):
    """A foreign hook registered before `apply` sits inside ours (it sees each chunk's call), one registered after
    sits outside (one call per step); either way it runs while applied and is there, unchanged, after remove."""
    vanilla = latents(pipe, PROMPTS[:3])
    with sa.apply(pipe):
        expected = latents(pipe, PROMPTS[:3])
    counter, steps = CountCalls(), STEPS * calls_per_step(pipe)

    def register():
        registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
        registry.register_hook(counter, "counter")
        return registry

    if order == "before":
        registry = register()
        assert torch.equal(latents(pipe, PROMPTS[:3]), vanilla) and counter.calls == steps
    with sa.apply(pipe) as handle:
        if order == "after":
            registry = register()
        assert list(registry.hooks) == (["counter", HOOK] if order == "before" else [HOOK, "counter"])
        calls = counter.calls
        assert torch.equal(latents(pipe, PROMPTS[:3]), expected) and counter.calls == calls + steps
        with handle.chunked(1):  # [reference], [t1], [t2]
            assert_rounding_close(latents(pipe, PROMPTS[:3]), expected, denoising_depth(pipe, 3))
        assert counter.calls == calls + steps + (3 if order == "before" else 1) * steps

    calls = counter.calls
    assert pipe.transformer._diffusers_hook is registry and registry.hooks == {"counter": counter}
    assert hooked_layers(pipe.transformer) == []
    assert [name for name, module in pipe.transformer.named_modules() if hasattr(module, "_diffusers_hook")] == [""]
    assert torch.equal(latents(pipe, PROMPTS[:3]), vanilla) and counter.calls == calls + steps
    registry.remove_hook("counter")
    assert torch.equal(latents(pipe, PROMPTS[:3]), vanilla) and counter.calls == calls + steps


def test_a_foreign_hook_on_a_shared_attention_layer_keeps_running(pipe):
    name = layers_to_share(backbone_for(pipe), sa.StyleAlignedConfig())[0]
    counter = CountCalls()
    HookRegistry.check_if_exists_or_initialize(pipe.transformer.get_submodule(name)).register_hook(counter, "counter")
    with sa.apply(pipe):
        latents(pipe, PROMPTS[:3])
    assert counter.calls == STEPS * calls_per_step(pipe)


def test_sd3_skip_layer_guidance_runs_its_extra_call_as_one_group(sd3_pipe):
    """SD3's skip-layer guidance adds a call on the conditional half alone; the reference stays as generated alone."""
    settings = dict(guidance_scale=5.0, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                    skip_layer_guidance_stop=1.0)
    batches = []
    sd3_pipe.to(dtype=torch.float64)  # the rounding of the loop: tests/tolerance.py
    sd3_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    with sa.apply(sd3_pipe):
        in_set = latents(sd3_pipe, PROMPTS[:3], **settings)
    assert 3 in batches and 6 in batches  # the skip-layer calls (conditional half) ran beside the guided ones
    alone = latents(sd3_pipe, PROMPTS[:1], **settings)
    assert_rounding_close(in_set[:1], alone, denoising_depth(sd3_pipe, 2 * STEPS))  # guided and skip-layer calls
