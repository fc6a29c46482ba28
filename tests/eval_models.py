"""Tiny random CLIP and DINO-style ViT models with their processors, saved to folders, and a tiny random CSD
checkpoint in the released layout, for the eval tests."""

from collections import OrderedDict

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


class QuickGELU(torch.nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class OpenAIBlock(torch.nn.Module):
    """A residual attention block with OpenAI CLIP's parameter names (nn.MultiheadAttention keeps in_proj_*)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(OrderedDict(
            c_fc=torch.nn.Linear(width, 2 * width), gelu=QuickGELU(), c_proj=torch.nn.Linear(2 * width, width)))

    def forward(self, x):
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIVisionTower(torch.nn.Module):
    """OpenAI CLIP's VisionTransformer without `proj`, as CSD keeps it: the oracle for the CSD loader's mapping."""

    def __init__(self, width=128, layers=2, patch=8, side=SIDE):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = torch.nn.Parameter(torch.randn(width))
        self.positional_embedding = torch.nn.Parameter(torch.randn((side // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.transformer = torch.nn.Module()
        self.transformer.resblocks = torch.nn.ModuleList(OpenAIBlock(width, width // 64) for _ in range(layers))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0])


def build_csd_checkpoint(path, style_dim=16):
    """A random CSD checkpoint in the released layout (model_state_dict, DataParallel's "module." prefix); returns
    the backbone and the style projection that wrote it."""
    torch.manual_seed(0)
    tower = OpenAIVisionTower()
    with torch.no_grad():
        for parameter in tower.parameters():  # norms and biases too, so a swapped mapping shows
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    width = tower.conv1.out_channels
    style, content = torch.randn(width, style_dim), torch.randn(width, style_dim)
    state = {f"module.backbone.{key}": value for key, value in tower.state_dict().items()}
    state |= {"module.last_layer_style": style, "module.last_layer_content": content}
    torch.save({"epoch": 1, "model_state_dict": state}, path)
    return tower.eval(), style


@pytest.fixture(scope="session")
def tiny_csd_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-csd") / "checkpoint.pth"
    build_csd_checkpoint(path)
    return str(path)
