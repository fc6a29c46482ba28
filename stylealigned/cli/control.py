"""The ControlNet options of `generate` and `transfer`: a ControlNet, its control images (given, or depth maps made
from given images) and its scale, all checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..io import load_image
from .common import LIMITS, file_digest

MAX_CONTROL_SCALE = LIMITS["control_scale"][1]

ControlNet = Annotated[Optional[str], typer.Option(
    "--controlnet", help="ControlNet guiding the targets (SD 1.x/2.x, SDXL, FLUX.1): hub id, local diffusers folder "
                         "or, on SD/SDXL, a single file; with --control-image or --depth-from.")]
ControlImage = Annotated[Optional[list[Path]], typer.Option(
    help="Control image: once (for every target) or once per target; once per image, the reference's first, "
         "gives the reference one too (else it is generated without control).")]
ControlScale = Annotated[Optional[float], typer.Option(
    help=f"How strongly the ControlNet steers, in (0, {MAX_CONTROL_SCALE:g}] (default: the pipeline's, 1).",
    show_default=False)]
DepthFrom = Annotated[Optional[list[Path]], typer.Option(
    help="Make the control images as depth maps of these images (--depth-model): once, or once per target.")]
DepthModel = Annotated[str, typer.Option(help="transformers depth-estimation model for --depth-from: hub id or "
                                              "local folder.")]


@dataclass
class ControlOptions:
    """The ControlNet options of one set (controlnet None: a set without control)."""

    controlnet: str | None
    images: list[Path]  # the control images, or the images to make depth maps of
    depth_model: str | None  # set: `images` are made into depth maps
    scale: float | None

    @classmethod
    def check(cls, controlnet, control_image, depth_from, depth_model, control_scale, targets: int,
              count: int) -> ControlOptions:
        """The options as given for a set of `count` images, `targets` of them targets, or a UserError: the scale's
        range, what needs --controlnet, counts, readable files."""
        if control_scale is not None and not 0 < control_scale <= MAX_CONTROL_SCALE:
            raise UserError(f"--control-scale must lie in (0, {MAX_CONTROL_SCALE:g}], got {control_scale}; pass a "
                            "value in that range")
        given = [(flag, paths) for flag, paths in (("--control-image", control_image), ("--depth-from", depth_from))
                 if paths]
        if controlnet is None:
            if given or control_scale is not None:
                raise UserError(f"{given[0][0] if given else '--control-scale'} needs --controlnet MODEL; pass the "
                                "ControlNet to guide the set with")
            return cls(None, [], None, None)
        if len(given) != 1:
            raise UserError("--controlnet needs control images: pass --control-image PATH or --depth-from IMAGE "
                            "(one of the two)")
        [(flag, paths)] = given
        if len(paths) not in (1, targets, count):
            raise UserError(f"{flag} is given {len(paths)} times for {targets} targets; give it once (for every "
                            f"target), once per target ({targets}) or once per image, the references' first "
                            f"({count})")
        for path in paths:
            load_image(path, 64, 64)  # fail on a bad image before the model loads
        return cls(controlnet, list(paths), depth_model if depth_from else None, control_scale)

    def setup(self, pipe, settings: dict):
        """(the ControlNet pipeline, generate_set's control_images); without a ControlNet, (pipe, None). The scale,
        and the base pipeline's default guidance (FLUX.1's ControlNet pipeline defaults to 7, not 3.5), join the
        pipeline `settings`."""
        if self.controlnet is None:
            return pipe, None
        from ..backbones import backbone_for
        from ..control import depth_maps
        from ..models import with_controlnet

        settings.setdefault("guidance_scale", backbone_for(pipe).default_guidance())
        pipe = with_controlnet(pipe, self.controlnet)
        if self.scale is not None:
            settings["controlnet_conditioning_scale"] = self.scale
        images = self.images
        if self.depth_model is not None:
            images = depth_maps(images, settings["height"], settings["width"], self.depth_model, pipe.device)
        return pipe, images[0] if len(images) == 1 else images

    def record(self) -> dict:
        """What run.json records: the ControlNet and the files with their digests (a resume notices other files)."""
        if self.controlnet is None:
            return {}
        name = "control_images" if self.depth_model is None else "depth_from"
        record = {"controlnet": self.controlnet, name: [str(p) for p in self.images],
                  f"{name}_sha256": [file_digest(p) for p in self.images]}
        return record | ({"depth_model": self.depth_model} if self.depth_model is not None else {})

