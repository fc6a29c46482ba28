"""`generate`'s image inputs: init images, masks and strengths of img2img and inpainting sets, each option given
once (for every image) or once per prompt (the reference's first), all checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import UserError
from ..io import load_image
from .common import file_digest

InitImage = Annotated[Optional[list[Path]], typer.Option(
    help="Init image of an img2img set: once for every image, or once per prompt (the reference's first).")]
MaskImage = Annotated[Optional[list[Path]], typer.Option(
    help="Inpainting mask (white is repainted), with --init-image: once, or once per prompt.")]
Strength = Annotated[Optional[list[float]], typer.Option(
    help="How far an image departs from its init image, in (0, 1] (default: the pipeline's, 0.8 on SD): once, or "
         "once per prompt.", show_default=False)]


def per_prompt(values: list | None, count: int, option: str) -> list:
    """An option's values, given once (for every image) or once per prompt; [] when not given."""
    values = list(values or [])
    if len(values) not in (0, 1, count):
        raise UserError(f"{option} is given {len(values)} times for {count} prompts; give it once (for every image) "
                        "or once per prompt, the reference's first")
    return values


@dataclass
class ImageOptions:
    """The img2img / inpainting options of one set (all empty: a text-to-image set)."""

    init_images: list[Path]
    mask_images: list[Path]
    strengths: list[float]

    @classmethod
    def check(cls, init_image, mask_image, strength, count: int) -> ImageOptions:
        """The options as given, or a UserError: counts, strengths in (0, 1], every file a readable image."""
        options = cls(per_prompt(init_image, count, "--init-image"), per_prompt(mask_image, count, "--mask-image"),
                      per_prompt(strength, count, "--strength"))
        if (options.mask_images or options.strengths) and not options.init_images:
            raise UserError("--mask-image and --strength need --init-image; pass the image(s) to start from")
        bad = [s for s in options.strengths if not 0 < s <= 1]
        if bad:
            raise UserError(f"--strength must lie in (0, 1], got {bad[0]}; pass a value in that range")
        for path in options.init_images + options.mask_images:
            load_image(path, 64, 64)  # fail on a bad image before the model loads
        return options

    @property
    def inpaint(self) -> bool:
        return bool(self.mask_images)

    def record(self) -> dict:
        """What run.json records (files with their digests, so a resume notices another file at the same path)."""
        record = {}
        for name, paths in (("init_images", self.init_images), ("mask_images", self.mask_images)):
            if paths:
                record |= {name: [str(p) for p in paths], f"{name}_sha256": [file_digest(p) for p in paths]}
        return record | ({"strength": self.strengths} if self.strengths else {})

    def setup(self, pipe, settings: dict) -> tuple:
        """(the pipeline to run: `pipe`'s img2img or inpainting variant where an init image is given, and
        generate_set's image arguments: one value for every image, or a list with one per image)."""
        if not self.init_images:
            return pipe, {}
        from ..models import with_image_input
        from ..strengths import check_steps_left, check_strengths

        pipe = with_image_input(pipe, self.inpaint)
        if self.strengths:
            check_strengths(pipe, self.strengths, settings)
        width, height = settings["width"], settings["height"]
        check_steps_left(pipe, self.strengths, settings["num_inference_steps"], height, width)
        given = {"image": [load_image(p, width, height) for p in self.init_images],
                 "mask_image": [load_image(p, width, height) for p in self.mask_images], "strength": self.strengths}
        return pipe, {key: values[0] if len(values) == 1 else values for key, values in given.items() if values}
