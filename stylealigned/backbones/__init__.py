"""One module per model family; `backbone_for(pipe)` picks the one that fits a pipeline.

Adding a family is one module with a `Backbone` subclass, listed in FAMILIES (most specific first).
"""

from __future__ import annotations

from ..errors import UserError
from .base import Backbone, Conditioning
from .flux import ChromaBackbone, FluxBackbone
from .flux2 import Flux2Backbone
from .qwenimage import QwenImageBackbone
from .sd3 import SD3Backbone
from .unet import UNetBackbone
from .wan import WanBackbone
from .zimage import ZImageBackbone

FAMILIES: tuple[type[Backbone], ...] = (UNetBackbone, ChromaBackbone, FluxBackbone, Flux2Backbone, SD3Backbone,
                                        QwenImageBackbone, ZImageBackbone, WanBackbone)
SUPPORTED = ("Stable Diffusion 1.x/2.x and SDXL (UNet), FLUX.1 and Chroma, FLUX.2 and FLUX.2-klein, SD3 and SD3.5, "
             "Qwen-Image and Z-Image pipelines (text-to-image and img2img variants), and Wan 2.1 / 2.2 "
             "text-to-video (WanPipeline) and image-to-video from one first frame (WanImageToVideoPipeline)")


def backbone_for(pipe) -> Backbone:
    """The backbone of `pipe`'s model family; an unsupported pipeline is a UserError naming what is supported."""
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    found = f" with a {type(denoiser).__name__}" if denoiser is not None else ""
    raise UserError(f"stylealigned does not support {type(pipe).__name__}{found}; it supports {SUPPORTED}")


__all__ = ["Backbone", "Conditioning", "FAMILIES", "SUPPORTED", "backbone_for"]
