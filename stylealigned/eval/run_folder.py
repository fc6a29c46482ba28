"""Read back a folder that `stylealigned generate` wrote: its prompts, style suffix and images (or clips) in prompt
order."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError
from .benchmark import PROMPT_TEMPLATE

IMAGE_NAME = re.compile(r"^(\d+)-.*\.(png|mp4)$")  # NN-<slug>.png or .mp4 (a set of clips); grid.png does not match


@dataclass(frozen=True)
class RunFolder:
    """The images of one generated set (reference first) and the prompts they were made from."""

    images: list[Path]
    prompts: list[str]
    style: str | None

    def texts(self, full_prompt: bool = False) -> list[str]:
        """What each image is scored against: its prompt without the style suffix, or the full prompt."""
        return [full_text(prompt, self.style) if full_prompt else object_text(prompt, self.style)
                for prompt in self.prompts]

    @property
    def clips(self) -> bool:
        """A set of clips (MP4s), not of images."""
        return self.images[0].suffix == ".mp4"

    def load_images(self) -> list:
        """The images, or for a set of clips each clip's frames."""
        if self.clips:
            from ..io import read_video

            return [read_video(path) for path in self.images]
        return [read_rgb(path) for path in self.images]


def read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def object_text(prompt: str, style: str | None) -> str:
    """`prompt` without a trailing `style` suffix and the separator before it."""
    if style and prompt.endswith(style) and prompt != style:
        return prompt[: -len(style)].rstrip(" ,.;")
    return prompt


def full_text(prompt: str, style: str | None) -> str:
    """The prompt as generated: `prompt` with the style suffix appended unless it is already there."""
    if not style or prompt.endswith(style):
        return prompt
    return PROMPT_TEMPLATE.format(object=prompt, style=style)


def read_run_folder(folder: str | Path) -> RunFolder:
    """Parse run.json and pair its prompts with the NN-<slug>.png images; a folder that does not fit is a UserError."""
    folder = Path(folder)
    record = folder / "run.json"
    if not record.is_file():
        raise UserError(f"{folder} has no run.json; pass a folder written by `stylealigned generate`")
    try:
        run = json.loads(record.read_text(encoding="utf-8"))
        prompts, style = list(run["prompts"]), run.get("style")
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{record} is not a readable run record ({error}); generate the set again") from None
    numbered = {int(match[1]): path for path in folder.iterdir() if (match := IMAGE_NAME.match(path.name))}
    if len(numbered) != len(prompts):
        raise UserError(f"{folder} holds {len(numbered)} NN-<slug>.png/.mp4 files for {len(prompts)} prompts in "
                        "run.json; finish the run with `stylealigned generate --resume` first")
    if len(prompts) < 2:
        raise UserError(f"{folder} holds a single image; set consistency needs a set of at least 2")
    return RunFolder([numbered[index] for index in sorted(numbered)], prompts, style)
