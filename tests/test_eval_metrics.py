"""Metrics against a direct computation with the same tiny CLIP and ViT models, loaded back from their folders."""

from itertools import permutations

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

from stylealigned.errors import UserError
from stylealigned.eval import layout_copying, set_consistency, text_alignment
from stylealigned.eval.encoders import load_clip
from tests.eval_models import SIDE, tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)


def noise_image(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def near_copy(image: Image.Image, seed: int) -> Image.Image:
    jitter = np.random.default_rng(seed).integers(-4, 5, (image.height, image.width, 3))
    return Image.fromarray(np.clip(np.asarray(image, dtype=int) + jitter, 0, 255).astype(np.uint8))


IMAGES = [noise_image(seed) for seed in range(5)]
TEXTS = ["a fox", "a red house", "the boat in the tree", "a watercolor painting of a cat", "a dog"]


def test_text_alignment_equals_direct_clip_cosine(tiny_clip_path):
    processor, model = CLIPProcessor.from_pretrained(tiny_clip_path), CLIPModel.from_pretrained(tiny_clip_path)
    with torch.no_grad():
        output = model(**processor(text=TEXTS, images=IMAGES, return_tensors="pt", padding=True))
    image_embeds = torch.nn.functional.normalize(output.image_embeds, dim=-1)
    text_embeds = torch.nn.functional.normalize(output.text_embeds, dim=-1)
    expected = [float(image_embeds[i] @ text_embeds[i]) for i in range(len(IMAGES))]

    scores = text_alignment(IMAGES, TEXTS, model=tiny_clip_path, device="cpu", batch_size=2)

    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(np.round(scores, 4))) == len(scores)  # real, distinct numbers


def dino_cls(folder: str, images) -> torch.Tensor:
    processor, model = ViTImageProcessor.from_pretrained(folder), ViTModel.from_pretrained(folder)
    with torch.no_grad():
        cls = model(**processor(images=images, return_tensors="pt")).last_hidden_state[:, 0]
    return torch.nn.functional.normalize(cls, dim=-1)


@pytest.mark.parametrize("include_reference", [True, False])
def test_set_consistency_equals_mean_over_pairs(tiny_dino_path, include_reference):
    members = IMAGES if include_reference else IMAGES[1:]
    embeds = dino_cls(tiny_dino_path, members)
    pairs = list(permutations(range(len(members)), 2))
    expected = sum(float(embeds[i] @ embeds[j]) for i, j in pairs) / len(pairs)

    score = set_consistency(IMAGES, model=tiny_dino_path, include_reference=include_reference, device="cpu",
                            batch_size=2)

    assert score == pytest.approx(expected, abs=1e-5)


def test_identical_images_are_perfectly_consistent(tiny_dino_path):
    assert set_consistency([IMAGES[0]] * 4, model=tiny_dino_path, device="cpu") == pytest.approx(1.0, abs=1e-6)


def test_unrelated_images_score_lower_than_near_copies(tiny_dino_path):
    unrelated = set_consistency(IMAGES[:4], model=tiny_dino_path, device="cpu")
    copies = set_consistency([near_copy(IMAGES[0], seed) for seed in range(4)], model=tiny_dino_path, device="cpu")
    assert unrelated < copies < 1.0


def test_clip_preprocessing_is_resize_center_crop_normalise(tiny_clip_path):
    """The processor in use resizes the short side (bicubic), center-crops and normalises, as its config says."""
    image = noise_image(7, size=(48, 40))
    encoder = load_clip(tiny_clip_path, torch.device("cpu"))
    config = encoder.processor.image_processor
    resized = image.resize((round(48 * SIDE / 40), SIDE), Image.Resampling.BICUBIC)
    left = (resized.width - SIDE) // 2
    cropped = np.asarray(resized.crop((left, 0, left + SIDE, SIDE)), dtype=np.float32) / 255
    expected = (cropped - np.array(config.image_mean)) / np.array(config.image_std)

    pixels = encoder.pixels([image])[0].permute(1, 2, 0).numpy()

    assert pixels == pytest.approx(expected.astype(np.float32), abs=1e-4)


def test_set_consistency_needs_a_pair(tiny_dino_path):
    with pytest.raises(UserError, match="pairs"):
        set_consistency(IMAGES[:2], model=tiny_dino_path, include_reference=False, device="cpu")


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such model folder"):
        text_alignment(IMAGES[:1], TEXTS[:1], model=str(tmp_path / "missing"), device="cpu")


def test_folder_without_a_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not hold a saved model"):
        set_consistency(IMAGES, model=str(tmp_path), device="cpu")


def test_uncached_hub_model_offline_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local Hugging Face cache") as raised:
        set_consistency(IMAGES, model="stylealigned-tests/no-such-model", device="cpu")
    assert "\n" not in str(raised.value) and "hf download" in str(raised.value)


def _disc(centre: tuple[int, int], fill: str, background: str = "white") -> Image.Image:
    image = Image.new("RGB", (64, 64), background)
    x, y = centre
    ImageDraw.Draw(image).ellipse((x - 12, y - 12, x + 12, y + 12), fill=fill)
    return image


def test_layout_copying_is_the_mean_thumbnail_correlation_with_the_reference():
    """Per equation: each image to 16x16 luminance (box filter), centred, and the targets' Pearson correlations with
    the reference averaged."""
    images = [_disc((20, 20), "black"), _disc((20, 20), "red"), _disc((44, 40), "black")]

    def thumbnail(image):
        pixels = np.asarray(image.convert("L").resize((16, 16), Image.BOX), dtype=np.float64).ravel()
        return pixels - pixels.mean()

    reference = thumbnail(images[0])
    expected = np.mean([np.corrcoef(reference, thumbnail(target))[0, 1] for target in images[1:]])
    assert layout_copying(images) == pytest.approx(expected, abs=1e-12)


def test_layout_copying_sees_position_not_colour():
    reference = _disc((20, 20), "black")
    assert layout_copying([reference, _disc((20, 20), "blue", background="yellow")]) > 0.95
    assert layout_copying([reference, _disc((44, 44), "black")]) < 0.1
    assert layout_copying([reference]) is None
