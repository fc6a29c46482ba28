"""Tiny random CLIP and DINO-style ViT models with their processors, saved to folders for the eval tests."""

import pytest
import torch
from transformers import (
    CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, ViTConfig, ViTImageProcessor, ViTModel,
)

from stylealigned.toy.vocab import word_level_tokenizer

WORDS = "a an the fox cat dog house tree boat in of painting watercolor photo red blue".split()
SIDE = 32  # the models' input side; test images are larger so that resizing and cropping matter
LAYERS = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def build_clip(folder) -> None:
    tokenizer = word_level_tokenizer(WORDS, folder / "tokenizer")
    text = dict(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                **LAYERS)
    vision = dict(image_size=SIDE, patch_size=8, **LAYERS)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)


def build_dino(folder) -> None:
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=SIDE, patch_size=8, **LAYERS), add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": SIDE, "width": SIDE}).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-clip")
    build_clip(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_dino_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny-dino")
    build_dino(folder)
    return str(folder)
