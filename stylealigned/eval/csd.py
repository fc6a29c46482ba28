"""CSD style similarity (Somepalli et al. 2024, "Measuring Style Similarity in Diffusion Models") from a local
checkpoint, run on a transformers CLIPVisionModel.

CSD is OpenAI CLIP's ViT-L/14 vision tower with CLIP's projection replaced by two learned heads; its style
descriptor is `normalize(ln_post(cls) @ last_layer_style)`. The released checkpoint (`torch.save` of a dict) keeps
the weights under "model_state_dict" (a bare state dict is read too; a leading "module." from DataParallel is
dropped). Key mapping, OpenAI `VisionTransformer` under "backbone." -> `CLIPVisionModel` (transformers 5 names):

    conv1.weight                                  -> embeddings.patch_embedding.weight
    class_embedding                               -> embeddings.class_embedding
    positional_embedding                          -> embeddings.position_embedding.weight
    ln_pre.{weight,bias}                          -> pre_layrnorm.{weight,bias}
    transformer.resblocks.N.ln_1.*                -> encoder.layers.N.layer_norm1.*
    transformer.resblocks.N.attn.in_proj_{weight,bias}  (q; k; v stacked) -> encoder.layers.N.self_attn.{q,k,v}_proj.*
    transformer.resblocks.N.attn.out_proj.*       -> encoder.layers.N.self_attn.out_proj.*
    transformer.resblocks.N.ln_2.*                -> encoder.layers.N.layer_norm2.*
    transformer.resblocks.N.mlp.c_fc.*            -> encoder.layers.N.mlp.fc1.*
    transformer.resblocks.N.mlp.c_proj.*          -> encoder.layers.N.mlp.fc2.*
    ln_post.{weight,bias}                         -> post_layernorm.{weight,bias}
    last_layer_style [width, dim]                 -> the style projection (features @ it)

"last_layer_content" and a leftover "backbone.proj" are not used. The architecture is read from the shapes (width,
patch, image size, depth, MLP width; heads = width / 64 as in CLIP), so ViT-L/14 gives 1024 wide, 24 layers, 16
heads at 224 px. Preprocessing is CSD's: shortest side to the image size (bicubic), center crop, CLIP mean and std.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from ..errors import UserError
from ..models import resolve_device
from .encoders import Encoder

HEAD_WIDTH = 64  # CLIP's attention head width: heads = width / 64
STYLE_HEAD = "last_layer_style"
BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
BLOCK_NAMES = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
TOP_NAMES = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
             "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
             "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
             "ln_post.bias": "post_layernorm.bias"}
FIX = "pass the released CSD checkpoint (a state dict with backbone.* and last_layer_style)"


class CSDModel(torch.nn.Module):
    """The CLIP vision tower and CSD's style projection: unit-length style descriptors of images."""

    def __init__(self, vision: CLIPVisionModel, style_projection: torch.Tensor):
        super().__init__()
        self.vision = vision
        self.style_projection = torch.nn.Parameter(style_projection, requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision(pixel_values=pixel_values).pooler_output  # post_layernorm(CLS), as ln_post in CLIP
        return torch.nn.functional.normalize(pooled.float() @ self.style_projection, dim=-1)


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict (under "model_state_dict" if present), without a "module." prefix."""
    if not path.is_file():
        raise UserError(f"no CSD checkpoint at {path}; {FIX}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling and format errors come in many types
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise UserError(f"{path} is not a readable CSD checkpoint ({detail}); {FIX}") from None
    state = state.get("model_state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; {FIX}")
    return {key.removeprefix("module."): value for key, value in state.items()}


def vision_config(backbone: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """The CLIPVisionConfig of a CLIP vision tower, read from its weights' shapes."""
    width, _, patch, _ = backbone["conv1.weight"].shape
    grid = round((len(backbone["positional_embedding"]) - 1) ** 0.5)
    layers = 1 + max(int(match[1]) for key in backbone if (match := BLOCK.match(key)))
    mlp = len(backbone["transformer.resblocks.0.mlp.c_fc.bias"])
    return CLIPVisionConfig(hidden_size=width, intermediate_size=mlp,
                            num_hidden_layers=layers, num_attention_heads=max(1, width // HEAD_WIDTH),
                            patch_size=patch, image_size=grid * patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def to_transformers(backbone: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP's vision tower weights renamed for CLIPVisionModel (see the module docstring's table)."""
    mapped = {}
    for key, value in backbone.items():
        if key in TOP_NAMES:
            mapped[TOP_NAMES[key]] = value
        elif match := BLOCK.match(key):
            layer, rest = f"encoder.layers.{match[1]}.", match[2]
            if rest.startswith("attn.in_proj_"):
                for name, part in zip("qkv", value.chunk(3)):
                    mapped[f"{layer}self_attn.{name}_proj.{rest.removeprefix('attn.in_proj_')}"] = part
            else:
                module, _, field = rest.rpartition(".")
                mapped[f"{layer}{BLOCK_NAMES.get(module, module)}.{field}"] = value
        elif key != "proj":
            mapped[key] = value  # unknown: load_state_dict names it
    return mapped


def build_csd(state: dict[str, torch.Tensor], path: Path) -> CSDModel:
    """A CSDModel from a CSD state dict; a state dict of another layout is a UserError."""
    backbone = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    if STYLE_HEAD not in state or not {"conv1.weight", "transformer.resblocks.0.mlp.c_fc.bias"} <= set(backbone):
        raise UserError(f"{path} is not a CSD checkpoint (no backbone.conv1.weight, backbone.transformer.resblocks.* "
                        f"or {STYLE_HEAD}); {FIX}")
    vision = CLIPVisionModel(vision_config(backbone))
    try:
        vision.load_state_dict(to_transformers(backbone), strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:160]
        raise UserError(f"{path} does not fit CSD's ViT layout ({detail}); {FIX}") from None
    projection = state[STYLE_HEAD]
    if projection.ndim != 2 or projection.shape[0] != vision.config.hidden_size:
        raise UserError(f"{path}: {STYLE_HEAD} has shape {tuple(projection.shape)}, expected "
                        f"[{vision.config.hidden_size}, dim]; {FIX}")
    return CSDModel(vision, projection.float())


@functools.lru_cache(maxsize=2)
def load_csd(path: str, device: torch.device = torch.device("cpu")) -> Encoder:
    """CSD from a local checkpoint file, in fp32 eval mode on `device`, with CSD's preprocessing."""
    checkpoint = Path(path).expanduser()
    model = build_csd(read_checkpoint(checkpoint), checkpoint)
    side = model.vision.config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return Encoder(model.to(device, torch.float32).eval(), processor, device)


@torch.inference_mode()
def csd_style_embeddings(encoder: Encoder, images: list[Image.Image]) -> torch.Tensor:
    """Unit-length CSD style descriptors."""
    return encoder.model(encoder.pixels(images))


def csd_style_similarity(images: list[Image.Image], path: str, device: str = "auto") -> float:
    """Mean CSD style cosine between the reference `images[0]` and each target."""
    embeddings = csd_style_embeddings(load_csd(str(path), resolve_device(device)), list(images))
    return (embeddings[1:] @ embeddings[0]).mean().item()
