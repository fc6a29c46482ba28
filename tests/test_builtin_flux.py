"""The built-in transformer (`builtin-flux`): a stock FluxPipeline shipped in the package, its guidance as true CFG
and its short T5 length, through sets and inversion."""

import shutil

import numpy as np
import torch
from diffusers import FluxPipeline

import stylealigned as sa
from stylealigned.backbones import backbone_for
from stylealigned.inversion import invert
from stylealigned.models import BUILTIN_MODELS
from stylealigned.toy.world import render, styled_caption

PROMPTS = [styled_caption("star", "neon"), "a circle", "a heart"]
SETTINGS = {"num_inference_steps": 3, "guidance_scale": 5.0}


def test_it_loads_offline_as_a_flux_pipeline_at_its_trained_size(builtin_flux_pipe):
    pipe, backbone = builtin_flux_pipe, backbone_for(builtin_flux_pipe)
    assert isinstance(pipe, FluxPipeline) and not pipe.transformer.config.guidance_embeds
    assert backbone.native_size() == (64, 64) and backbone.default_guidance() == 1.0
    assert backbone.text_length(None) == pipe.tokenizer_2.model_max_length < 512
    assert backbone.text_length(30) == 30


def test_a_sets_guidance_is_true_cfg_against_the_empty_prompt(builtin_flux_pipe):
    backbone = backbone_for(builtin_flux_pipe)
    assert backbone.pipeline_inputs(dict(SETTINGS)) == {"num_inference_steps": 3, "true_cfg_scale": 5.0,
                                                        "negative_prompt": "", "max_sequence_length": 12}
    given = {"guidance_scale": 5.0, "negative_prompt": "a square", "max_sequence_length": 8}
    assert backbone.pipeline_inputs(given) == {"true_cfg_scale": 5.0, "negative_prompt": "a square",
                                               "max_sequence_length": 8}
    assert backbone.pipeline_inputs({"guidance_scale": 1.0}) == {"true_cfg_scale": 1.0, "max_sequence_length": 12}


def test_a_set_is_the_pipelines_own_guided_call(builtin_flux_pipe):
    pipe, config = builtin_flux_pipe, sa.StyleAlignedConfig()
    made = sa.generate_set(pipe, PROMPTS, config, seed=4, **SETTINGS)
    generators = [torch.Generator().manual_seed(4 + i) for i in range(len(PROMPTS))]
    with sa.apply(pipe, config):
        direct = pipe(PROMPTS, generator=generators, num_inference_steps=3, true_cfg_scale=5.0, negative_prompt="",
                      max_sequence_length=12).images
    assert [np.asarray(image).tolist() for image in made] == [np.asarray(image).tolist() for image in direct]


def test_guided_inversion_runs_the_empty_prompt_in_a_call_of_its_own(builtin_flux_pipe):
    backbone = backbone_for(builtin_flux_pipe)
    assert backbone.conditioning("a star", 1.0, 64, 64).negative is None
    guided = backbone.conditioning("a star", 3.0, 64, 64)
    assert guided.negative is not None and guided.negative["encoder_hidden_states"].shape[1] == 12
    drawing = render("star", "neon", np.random.default_rng(0))
    trajectory = invert(builtin_flux_pipe, drawing, PROMPTS[0], 3, guidance_scale=3.0)
    assert len(trajectory.latents) == 4 and torch.isfinite(torch.stack(list(trajectory.latents))).all()  # z_0..z_T


def test_a_copy_of_its_folder_loads_at_its_trained_size_too(tmp_path):
    folder = shutil.copytree(BUILTIN_MODELS["builtin-flux"], tmp_path / "my-copy")
    assert backbone_for(sa.load_pipeline(str(folder), device="cpu")).native_size() == (64, 64)
    (folder / "training.json").unlink()  # any other FluxPipeline folder keeps FluxPipeline's own default
    assert sa.load_pipeline(str(folder), device="cpu").default_sample_size == 128


def test_the_shipped_folder_stays_within_its_15_mb_with_its_vae_and_text_encoders():
    files = [path for path in BUILTIN_MODELS["builtin-flux"].rglob("*") if path.is_file()]
    assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= {path.parent.name for path in files}
    assert sum(path.stat().st_size for path in files) <= 15 * 10**6
