"""The paper's two metrics on PIL images, text alignment (CLIP) and set consistency (DINO), the targets'
diversity (DINO), the other side of the paper's consistency trade-off, and layout copying (how much a target repeats
the reference's composition); for sets of clips, the same per frame and temporal consistency within each clip
(`score_clips`).

All run in batches on any device; `model` is a hub id or a local folder (see `encoders`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..models import resolve_device
from .encoders import (
    DEFAULT_CLIP, DEFAULT_DINO, clip_image_embeddings, clip_text_embeddings, dino_embeddings, load_clip, load_dino,
)


def _batched(embed, items: list, batch_size: int) -> torch.Tensor:
    return torch.cat([embed(items[start:start + batch_size]) for start in range(0, len(items), batch_size)])


def text_alignment(images: list[Image.Image], texts: list[str], model: str = DEFAULT_CLIP, device: str = "auto",
                   batch_size: int = 32) -> list[float]:
    """Per-image cosine between the CLIP embeddings of `images[i]` and `texts[i]`.

    The paper scores each image against the text of its object (e.g. "a bicycle"), not the style description.
    """
    if len(images) != len(texts):
        raise UserError(f"text alignment needs one text per image, got {len(images)} images and {len(texts)} texts")
    encoder = load_clip(model, resolve_device(device))
    image_embeds = _batched(lambda chunk: clip_image_embeddings(encoder, chunk), list(images), batch_size)
    text_embeds = _batched(lambda chunk: clip_text_embeddings(encoder, chunk), list(texts), batch_size)
    return (image_embeds * text_embeds).sum(dim=-1).tolist()


def mean_pairwise_cosine(embeddings: torch.Tensor) -> float:
    """Mean cosine over all pairs of distinct rows of unit-length `embeddings` [n, d] (self-pairs excluded)."""
    count = len(embeddings)
    similarity = embeddings @ embeddings.T
    return ((similarity.sum() - similarity.diagonal().sum()) / (count * (count - 1))).item()


def diversity(embeddings: torch.Tensor) -> float:
    """Mean pairwise distance, 1 - cosine, among unit-length `embeddings` [n, d]: 0 when all rows are equal."""
    return 1.0 - mean_pairwise_cosine(embeddings)


LAYOUT_SIDE = 16  # thumbnail side: coarse enough to blur away textures (stripes, dots, pixels), keep composition


def _thumbnail(image: Image.Image) -> np.ndarray:
    """The image's luminance at LAYOUT_SIDE x LAYOUT_SIDE, standardised (zero mean, unit norm)."""
    pixels = np.asarray(image.convert("L").resize((LAYOUT_SIDE, LAYOUT_SIDE), Image.BOX), dtype=np.float64)
    pixels = pixels - pixels.mean()
    return pixels / max(float(np.linalg.norm(pixels)), 1e-12)


def layout_copying(images: list[Image.Image]) -> float | None:
    """Mean over the targets of the correlation between a target's and the reference's (`images[0]`) coarse
    luminance: near 0 for unrelated compositions, 1 for the reference's layout repeated. Compare a shared set with
    an unshared one from the same seeds; None for a set without targets."""
    if len(images) < 2:
        return None
    reference = _thumbnail(images[0])
    return float(np.mean([(reference * _thumbnail(target)).sum() for target in images[1:]]))


def _dino(members: list[Image.Image], model: str, device: str, batch_size: int) -> torch.Tensor:
    if len(members) < 2:
        raise UserError(f"set consistency compares pairs of images; got {len(members)} image(s) to compare")
    encoder = load_dino(model, resolve_device(device))
    return _batched(lambda chunk: dino_embeddings(encoder, chunk), members, batch_size)


def set_consistency(images: list[Image.Image], model: str = DEFAULT_DINO, include_reference: bool = True,
                    device: str = "auto", batch_size: int = 32) -> float:
    """Mean pairwise cosine of the DINO CLS embeddings of a set; `images[0]` is the reference.

    With `include_reference=False` the reference is left out and only the targets are compared.
    """
    members = list(images) if include_reference else list(images)[1:]
    return mean_pairwise_cosine(_dino(members, model, device, batch_size))


def score_set(images: list[Image.Image], texts: list[str | None], clip_model: str = DEFAULT_CLIP,
              dino_model: str = DEFAULT_DINO, device: str = "auto") -> dict:
    """The metrics of one set (reference first): mean text alignment over the images that have a text (None skips
    one, e.g. an inverted real reference), set consistency with the reference included, the targets' diversity
    (1 - mean pairwise DINO cosine among the targets only; needs 2 targets, else None) and layout copying."""
    scored = [(image, text) for image, text in zip(images, texts, strict=True) if text is not None]
    per_image = text_alignment([image for image, _ in scored], [text for _, text in scored], clip_model, device)
    embeddings = _dino(list(images), dino_model, device, 32)
    return {
        "text_alignment": sum(per_image) / len(per_image),
        "set_consistency": mean_pairwise_cosine(embeddings),
        "set_consistency_includes_reference": True,
        "diversity": diversity(embeddings[1:]) if len(images) > 2 else None,
        "layout_copying": layout_copying(list(images)),
        "text_alignment_per_image": per_image,
    }


def score_clips(clips: list[list[Image.Image]], texts: list[str | None], clip_model: str = DEFAULT_CLIP,
                dino_model: str = DEFAULT_DINO, device: str = "auto") -> dict:
    """The metrics of a set of clips of one length (reference first): text alignment per clip (mean over its
    frames; None skips a clip), set consistency (for each frame index, the mean pairwise DINO cosine among the
    clips' frames at it; then the mean over frame indices), and temporal consistency (the mean DINO cosine of
    neighbouring frames within a clip; per clip, and their mean)."""
    if len({len(clip) for clip in clips}) != 1:
        raise UserError("a set of clips is scored frame by frame; give clips of one length")
    frames = len(clips[0])
    scored = [(clip, text) for clip, text in zip(clips, texts, strict=True) if text is not None]
    flat = text_alignment([frame for clip, _ in scored for frame in clip],
                          [text for clip, text in scored for _ in clip], clip_model, device)
    per_clip = [sum(flat[k * frames:(k + 1) * frames]) / frames for k in range(len(scored))]
    embeddings = _dino([frame for clip in clips for frame in clip], dino_model, device, 32).unflatten(
        0, (len(clips), frames))  # (clips, frames, d)
    consistency = sum(mean_pairwise_cosine(embeddings[:, f]) for f in range(frames)) / frames
    temporal = (embeddings[:, 1:] * embeddings[:, :-1]).sum(-1).mean(-1).tolist() if frames > 1 else None
    return {
        "text_alignment": sum(per_clip) / len(per_clip),
        "set_consistency": consistency,
        "set_consistency_includes_reference": True,
        "temporal_consistency": None if temporal is None else sum(temporal) / len(temporal),
        "temporal_consistency_per_clip": temporal,
        "text_alignment_per_image": per_clip,
    }
