"""torch.compile of a denoiser with StyleAligned applied: one whole graph (fullgraph=True), the eager numbers.

The checks use dynamo's "eager" backend: tracing is what breaks graphs, and code generation is not ours (an inductor
compile of the tiny FLUX.1 takes minutes on this CPU, too slow for a test; benchmarks/ can time it on a GPU).
"""

import pytest
import torch
from torch._dynamo.utils import counters

import stylealigned as sa
from tests.test_backends import native_backend
from tests.families import latents

TRANSFER = sa.StyleAlignedConfig.transfer(share_group_norm=True, share_layer_norm=True)  # AdaIN of queries and keys, the log 2 shift, shared GroupNorm
SHIFTED = sa.StyleAlignedConfig(shared_score_shift=0.69, adain_values=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch and leaves no compiled code behind."""
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


def unet_latents(pipe, prompts=("a cat", "a dog", "a house"), **kwargs):
    """Two DDIM steps with classifier-free guidance: two guidance groups of three."""
    return pipe(list(prompts), num_inference_steps=2, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_unet_compiles_as_one_graph_equals_eager_and_comes_off(sd_pipe):
    """`pipe.unet.compile(fullgraph=True)` raises at any graph break in our hooks, processors or math; taking
    StyleAligned off the compiled UNet, the guards see the hooks gone and the plain model runs."""
    plain = unet_latents(sd_pipe)
    with sa.apply(sd_pipe, TRANSFER):
        eager = unet_latents(sd_pipe)
    sd_pipe.unet.compile(fullgraph=True, backend="eager")
    with sa.apply(sd_pipe, TRANSFER):
        compiled = unet_latents(sd_pipe)
    assert compiled_graphs() == 1  # both steps, both guidance groups: one graph, no recompilation
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    torch.testing.assert_close(unet_latents(sd_pipe), plain, atol=1e-5, rtol=0)
    assert (eager - plain).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_transformer_compiles_as_one_graph_and_equals_eager(request, family):
    pipe = request.getfixturevalue(f"{family}_pipe")
    with sa.apply(pipe, SHIFTED):
        eager = latents(pipe, guidance_scale=5.0)
        pipe.transformer.compile(fullgraph=True, backend="eager")
        compiled = latents(pipe, guidance_scale=5.0)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert compiled_graphs() == 1



def test_chosen_attention_backend_compiles_as_one_graph(flux_pipe):
    """With a backend set, our calls go through diffusers' dispatcher, which traces into the same graph."""
    with native_backend(flux_pipe.transformer), sa.apply(flux_pipe, SHIFTED):
        eager = latents(flux_pipe)
        flux_pipe.transformer.compile(fullgraph=True, backend="eager")
        compiled = latents(flux_pipe)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert compiled_graphs() == 1


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_the_compile_wrapper_form_works_too(request, family):
    """`pipe.unet = torch.compile(pipe.unet)`, as diffusers' docs write it: StyleAligned installs on the wrapped
    module and reads the call's layout from it, so the wrapper traces one graph too."""
    pipe = request.getfixturevalue(f"{family}_pipe")
    name, config = ("unet", TRANSFER) if family == "sd" else ("transformer", SHIFTED)
    run = unet_latents if family == "sd" else (lambda pipe: latents(pipe))
    with sa.apply(pipe, config):
        eager = run(pipe)
    setattr(pipe, name, torch.compile(getattr(pipe, name), fullgraph=True, backend="eager"))
    with sa.apply(pipe, config):
        compiled = run(pipe)
    assert compiled_graphs() == 1
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)


def test_a_chunked_set_compiles_without_graph_breaks_and_equals_eager(sd_pipe, decoded):
    """generate_set in chunks: the reference pass, the target chunks and the tagged prompts' lookup all trace
    with fullgraph=True."""
    def run():
        decoded.clear()
        sa.generate_set(sd_pipe, ["a cat", "a dog", "a house", "a tree", "a car"], seed=1, batch_size=2,
                        num_inference_steps=2, guidance_scale=5.0, height=32, width=32)
        return torch.cat(decoded.take())

    eager = run()
    sd_pipe.unet.compile(fullgraph=True, backend="eager")
    torch.testing.assert_close(run(), eager, atol=1e-4, rtol=0)
    assert compiled_graphs() == 1  # the reference's pass and every chunk: one graph, no recompilation


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_share_until_compiles_with_a_break_per_call_and_equals_eager(request, family):
    """`share_until` decides in Python from the call's timestep: without fullgraph the graph breaks there (a graph
    for sharing steps, one for plain steps), with the eager numbers."""
    pipe = request.getfixturevalue(f"{family}_pipe")
    name, config = ("unet", TRANSFER) if family == "sd" else ("transformer", SHIFTED)
    run = unet_latents if family == "sd" else (lambda pipe: latents(pipe, steps=3))
    config = config.replace(share_until=0.3 if family == "sd" else 0.99)  # the first step shares, the next do not
    with sa.apply(pipe, config):
        eager = run(pipe)
        getattr(pipe, name).compile(backend="eager")
        compiled = run(pipe)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=0)
    assert counters["stats"]["calls_captured"] > 0 and compiled_graphs() >= 2
