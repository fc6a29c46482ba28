"""The transformer families the shared tests run on, one `Family` each: which fixture loads its tiny pipeline, its
oracle, image size, prompt settings, guidance, precision and tolerances, and how to draw its final latents.

A test parametrised over `FAMILIES` (ids `[flux]`, `[sd3]`, `[flux2]`, `[qwen]`, `[zimage]`) asks the family, never
names one; checks that only one family has live in that family's file (`test_flux2.py`, `test_qwen.py`, ...).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from stylealigned.backbones import backbone_for
from tests import dit_pipelines, flux2_pipelines, oracle_dit, oracle_flux2, oracle_qwen, oracle_zimage, zimage_pipelines
from tests.qwen_pipelines import QWEN_HEIGHT, QWEN_WIDTH

# fp64: the fast path and the oracle differ in the order of sums only (tests/tolerance.py)
FP64 = dict(atol=1e-9, rtol=1e-9)
# fp32 end to end (Qwen-Image and Z-Image step their latents in fp32 and rotate in complex64): the contract's bound,
# orders of magnitude above single-precision rounding through 3 blocks and 2 steps in two orders of summation
FP32 = dict(atol=1e-4, rtol=1e-4)


@dataclass(frozen=True)
class Family:
    name: str  # the id in test names
    height: int
    width: int
    prompts: tuple[str, ...]  # the set the oracle tests draw
    install: Callable  # (pipe, config, layer names, images per group) -> undo(): the loop-per-image oracle
    named_layer: str  # a `shared_layers` name filter that picks some layers
    dtype: torch.dtype  # the oracle tests' precision
    tolerance: dict  # fast path against the oracle
    alone: dict  # the reference in a set against its prompt generated alone (and chunks against one batch)
    grid: dict  # the knob grid's pipeline settings
    guided: dict  # a guided call
    groups: int  # guidance groups in one transformer call of a guided call
    calls_per_step: int  # transformer calls per step of a guided call
    prompt_kwargs: dict = field(default_factory=dict)
    extra_knobs: tuple[dict, ...] = ()  # the knob grid's cases for this family beyond the common ones
    chunk_knobs: tuple[dict, ...] = ()  # the chunked oracle test's, likewise
    img2img: str | None = None  # the diffusers img2img pipeline class built from the same components

    @property
    def fixture(self) -> str:
        """The pipeline fixture in tests/conftest.py, loaded anew per test."""
        return f"{self.name}_pipe"

    @property
    def path_fixture(self) -> str:
        """The session fixture with the saved tiny pipeline's folder."""
        return f"tiny_{self.name}_path"

    def pipe(self, request, dtype: torch.dtype | None = None):
        """This family's tiny pipeline (from its fixture), in `dtype` if given."""
        pipe = request.getfixturevalue(self.fixture)
        return pipe if dtype is None else pipe.to(dtype=dtype)

    def latents(self, pipe, prompts=None, steps=2, seed=0, **kwargs) -> torch.Tensor:
        """The pipeline's final latents, image i from the noise seeded seed + i; the prompts passed as a copy (Z-Image
        rewrites its prompt list)."""
        prompts = list(self.prompts if prompts is None else prompts)
        backbone, size = backbone_for(pipe), (self.height, self.width)
        noise = backbone.start_latents(backbone.initial_noise(range(len(prompts)), seed, *size), *size)
        return pipe(prompt=prompts, num_inference_steps=steps, height=self.height, width=self.width, latents=noise,
                    output_type="latent", **self.prompt_kwargs, **kwargs).images

    def oracle_latents(self, pipe, config, prompts=None, **kwargs) -> torch.Tensor:
        """`latents` with the oracle installed on the layers `config` shares."""
        from stylealigned.apply import layers_to_share

        prompts = self.prompts if prompts is None else prompts
        undo = self.install(pipe, config, layers_to_share(backbone_for(pipe), config), len(prompts))
        try:
            return self.latents(pipe, prompts, **kwargs)
        finally:
            undo()

    def fast_and_oracle(self, pipe, config, prompts=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        import stylealigned as sa

        with sa.apply(pipe, config):
            fast = self.latents(pipe, prompts, **kwargs)
        return fast, self.oracle_latents(pipe, config, prompts, **kwargs)


def _without_count(install):
    return lambda pipe, config, layers, images: install(pipe, config, layers)


EXACT64 = dict(atol=1e-12, rtol=0)
NEAR32 = dict(atol=1e-5, rtol=1e-5)
DIT = dict(height=dit_pipelines.FLUX_SIZE, width=dit_pipelines.FLUX_SIZE, prompts=("a cat in watercolor style", "a dog",
           "a house"), install=_without_count(oracle_dit.install), named_layer="transformer_blocks.0",
           dtype=torch.float64, tolerance=FP64, alone=EXACT64, prompt_kwargs=dit_pipelines.PROMPT_KWARGS)

FLUX = Family("flux", **DIT, grid={"guidance_scale": 5.0}, guided={"guidance_scale": 5.0}, groups=1, calls_per_step=1,
              img2img="FluxImg2ImgPipeline")  # FLUX.1-dev embeds its guidance: one call, one group
SD3 = Family("sd3", **(DIT | dict(height=dit_pipelines.SD3_SIZE, width=dit_pipelines.SD3_SIZE)),
             grid={"guidance_scale": 5.0}, guided={"guidance_scale": 5.0}, groups=2, calls_per_step=1,
             img2img="StableDiffusion3Img2ImgPipeline")  # batched CFG [uncond..., cond...]: two groups
FLUX2 = Family("flux2", flux2_pipelines.HEIGHT, flux2_pipelines.WIDTH, ("a cat in watercolor style", "a dog",
               "a house with a red car"), _without_count(oracle_flux2.install), "transformer_blocks.1",
               torch.float64, FP64, EXACT64, grid={"guidance_scale": 4.0}, guided={"guidance_scale": 4.0}, groups=1,
               calls_per_step=2, prompt_kwargs=flux2_pipelines.PROMPT_KWARGS,  # klein: CFG in a call of its own
               extra_knobs=(dict(shared_layers=1.0, adain_values=True),))
# Qwen-Image: token lengths 5, 2 and 6 (padded text keys masked); its knob grid unguided, a guided call true CFG
QWEN = Family("qwen", QWEN_HEIGHT, QWEN_WIDTH, ("a cat in watercolor style", "a dog", "a red house with a tree"),
              _without_count(oracle_qwen.install), "transformer_blocks.0", torch.float32, FP32, NEAR32, grid={},
              guided=dict(negative_prompt=" ", true_cfg_scale=3.0), groups=1, calls_per_step=2,
              extra_knobs=(dict(reference_positions="same", shared_layers=1.0),),
              chunk_knobs=(dict(adain_values=True, shared_layers=1.0, shared_score_shift=0.5),),
              img2img="QwenImageImg2ImgPipeline")
# Z-Image: captions padded to 64 (LONG) or 32 (SHORT, "a house") tokens, so targets sit at other image positions than
# their reference; 24 x 40 is 6 x 10 patches plus 4 image padding tokens; guidance batched [cond..., uncond...]
ZIMAGE = Family("zimage", zimage_pipelines.HEIGHT, zimage_pipelines.WIDTH,
                (zimage_pipelines.LONG, zimage_pipelines.SHORT, "a house", zimage_pipelines.LONG),
                oracle_zimage.install, "noise_refiner", torch.float32, FP32, NEAR32, grid={"guidance_scale": 4.0},
                guided={"guidance_scale": 4.0}, groups=2, calls_per_step=1,
                prompt_kwargs=zimage_pipelines.PROMPT_KWARGS, img2img="ZImageImg2ImgPipeline")

FAMILIES = (FLUX, SD3, FLUX2, QWEN, ZIMAGE)
BY_NAME = {family.name: family for family in FAMILIES}


def families(*names: str) -> list:
    """`pytest.param`s of the named families (all by default), each with its name as the id."""
    return [pytest.param(BY_NAME[name], id=name) for name in (names or BY_NAME)]


def knob_id(knobs: dict) -> str:
    return ",".join(f"{a}={b}" for a, b in knobs.items()) or "defaults"


def family_of(pipe) -> Family:
    """The family of a pipeline (Chroma draws as FLUX.1 does)."""
    name = backbone_for(pipe).family
    return BY_NAME[{"chroma": "flux", "qwenimage": "qwen"}.get(name, name)]


def latents(pipe, prompts=None, **kwargs) -> torch.Tensor:
    """`Family.latents` of the pipeline's family."""
    return family_of(pipe).latents(pipe, prompts, **kwargs)
