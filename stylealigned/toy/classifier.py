"""A small CNN that tells the object and the style of a 64x64 image of the synthetic world (the ground-truth judge)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .world import OBJECTS, SIZE, STYLES

CLASSIFIER_FOLDER = Path(__file__).resolve().parent.parent / "builtin" / "classifier"


def foreground(pixels: torch.Tensor) -> torch.Tensor:
    """Distance of each pixel from the background colour (the median of the border), summed over channels.

    A style-independent view of where the object is, which makes the object far quicker to learn.
    """
    border = torch.cat([pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, :, 0], pixels[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    return (pixels - background).abs().sum(dim=1, keepdim=True)


class ShapeStyleClassifier(nn.Module):
    """Four strided conv stages over RGB and the foreground, global pooling, one head each for object and style."""

    def __init__(self, objects=OBJECTS, styles=STYLES, width: int = 32):
        super().__init__()
        self.objects, self.styles, self.width = tuple(objects), tuple(styles), width
        layers, channels = [], 4
        for out_channels in (width, width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(channels, out_channels, 3, stride=2, padding=1), nn.BatchNorm2d(out_channels),
                       nn.ReLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                       nn.ReLU()]
            channels = out_channels
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.object_head = nn.Linear(channels, len(self.objects))
        self.style_head = nn.Linear(channels, len(self.styles))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Object and style logits for images in [-1, 1], shape [B, 3, 64, 64]."""
        features = self.features(torch.cat([pixels, foreground(pixels)], dim=1))
        return self.object_head(features), self.style_head(features)

    def config(self) -> dict:
        return {"objects": list(self.objects), "styles": list(self.styles), "width": self.width}

    def save(self, folder) -> None:
        """Write `model.safetensors` and `config.json` into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(self.config(), indent=2))


def load_classifier(folder=CLASSIFIER_FOLDER) -> ShapeStyleClassifier:
    """The trained classifier from `folder` (by default the one shipped with the built-in model), in eval mode."""
    folder = Path(folder)
    model = ShapeStyleClassifier(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor [B, 3, 64, 64] in [-1, 1] (resized to 64x64 if needed)."""
    arrays = [np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def classify(images: list[Image.Image], model: ShapeStyleClassifier | None = None) -> tuple[list[str], list[str]]:
    """The predicted object and style name of each image."""
    model = model or load_classifier()
    object_logits, style_logits = model(to_tensor(images))
    return ([model.objects[i] for i in object_logits.argmax(1).tolist()],
            [model.styles[i] for i in style_logits.argmax(1).tolist()])
