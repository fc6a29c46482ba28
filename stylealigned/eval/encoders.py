"""CLIP and DINO image/text encoders for the metrics, each used with the model's own processor.

Models load through transformers from a hub id or a local folder, once per (model, device). Preprocessing is the
processor's: for openai/clip-vit-large-patch14, resize the shortest side to 224 (bicubic), center-crop 224x224,
scale to [0, 1] and normalise with CLIP's mean and std; for facebook/dino-vitb8, resize to 224x224 and normalise
with ImageNet's mean and std. Without torchvision, transformers uses the processors' PIL backend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ViTModel,
)

from ..errors import UserError
from ..models import HUB_ID, hub_call

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_DINO = "facebook/dino-vitb8"


@dataclass(frozen=True)
class Encoder:
    """A model in eval mode, in fp32 on `device`, and the processor that prepares its inputs."""

    model: torch.nn.Module
    processor: object
    device: torch.device

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """The processor's pixel_values for RGB versions of `images`, on the model's device."""
        rgb = [image.convert("RGB") for image in images]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"].to(self.device)


def _load(name: str, device: torch.device, kind: str, load_model, load_processor) -> Encoder:
    """Load a model of transformers type `kind` and its processor from a local folder or a hub id; failures (a
    model of another type included, checked before its weights load) become one-line UserErrors."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            _check_kind(name, AutoConfig.from_pretrained(path), kind)
            model, processor = load_model(path), load_processor(path)
        except (OSError, ValueError) as error:
            raise UserError(f"{path} does not hold a saved model and its processor: {error}".splitlines()[0]) from None
    elif HUB_ID.match(name):
        fix = f"download it once with network (`hf download {name}`) or pass a local folder that holds it"
        _check_kind(name, hub_call(name, fix, lambda: AutoConfig.from_pretrained(name)), kind)
        model, processor = hub_call(name, fix, lambda: (load_model(name), load_processor(name)))
    else:
        raise UserError(f"no such model folder: {name}; pass a local model folder or a hub id (owner/name)")
    return Encoder(model.to(device, torch.float32).eval(), processor, device)


def _check_kind(name: str, config, kind: str) -> None:
    if config.model_type != kind:
        role = {"clip": "CLIP (--clip-model)", "vit": "DINO ViT (--dino-model)"}[kind]
        raise UserError(f"{name} holds a {config.model_type} model, not a {role} one; pass a {role.split()[0]} "
                        "model there")


@functools.lru_cache(maxsize=4)
def load_clip(name: str = DEFAULT_CLIP, device: torch.device = torch.device("cpu")) -> Encoder:
    """A CLIPModel with its CLIPProcessor (tokenizer + image processor)."""
    return _load(name, device, "clip", CLIPModel.from_pretrained, CLIPProcessor.from_pretrained)


@functools.lru_cache(maxsize=4)
def load_dino(name: str = DEFAULT_DINO, device: torch.device = torch.device("cpu")) -> Encoder:
    """A ViTModel without its pooler (DINO uses the CLS token) with its image processor."""
    return _load(name, device, "vit", functools.partial(ViTModel.from_pretrained, add_pooling_layer=False),
                 AutoImageProcessor.from_pretrained)


@torch.inference_mode()
def clip_image_embeddings(encoder: Encoder, images: list[Image.Image]) -> torch.Tensor:
    """Unit-length CLIP image embeddings (vision tower's pooled output through the visual projection)."""
    pooled = encoder.model.vision_model(pixel_values=encoder.pixels(images)).pooler_output
    return torch.nn.functional.normalize(encoder.model.visual_projection(pooled).float(), dim=-1)


@torch.inference_mode()
def clip_text_embeddings(encoder: Encoder, texts: list[str]) -> torch.Tensor:
    """Unit-length CLIP text embeddings; texts longer than the model's context are truncated."""
    tokens = encoder.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(encoder.device)
    pooled = encoder.model.text_model(**tokens).pooler_output
    return torch.nn.functional.normalize(encoder.model.text_projection(pooled).float(), dim=-1)


@torch.inference_mode()
def dino_embeddings(encoder: Encoder, images: list[Image.Image]) -> torch.Tensor:
    """Unit-length DINO embeddings: the CLS token of the last hidden state."""
    cls = encoder.model(pixel_values=encoder.pixels(images)).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(cls.float(), dim=-1)
