"""StyleAlignedConfig: every knob of the method, validated on construction, with the paper's presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

REFERENCE_POSITIONS = ("shifted", "same")


@dataclass(frozen=True)
class StyleAlignedConfig:
    """How a set shares the style of its reference image.

    Defaults are the paper's SDXL text-to-image setting.

    Args:
        share_attention: targets' self-attention also attends to the reference's keys and values.
        adain_queries: AdaIN-normalise each image's queries to the reference's per-token statistics.
        adain_keys: the same for keys.
        adain_values: the same for values (off in the paper: it washes out content).
        full_attention_share: ablation: every image attends to all images of its guidance half, no AdaIN,
            no reference weighting.
        share_group_norm: GroupNorm statistics computed jointly over each image and its reference.
        share_layer_norm: the same for LayerNorm; LayerNorm statistics are per token, so this changes nothing
            and is kept for parity with the paper's code.
        shared_score_scale: multiplies the reference keys that targets see (> 1 sharpens attention to them).
        shared_score_shift: added to every image's logits toward the reference tokens; log(k) equals
            attending to k copies of the reference.
        shared_layers: which attention layers share, counted in network order: a fraction in [0, 1] spread
            evenly (1.0 = all), a list of layer names, or a substring that selects layers by name; None = the
            model family's default (all layers on UNets and SD3, FLUX's single-stream blocks).
        reference_positions: on RoPE transformers (FLUX), where targets see the shared reference keys: "shifted"
            (beside the image, moved by the latent width, so targets do not copy its layout) or "same".
    """

    share_attention: bool = True
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    full_attention_share: bool = False
    share_group_norm: bool = False
    share_layer_norm: bool = False
    shared_score_scale: float = 1.0
    shared_score_shift: float = 0.0
    shared_layers: float | str | tuple[str, ...] | None = field(default=None)
    reference_positions: str = "shifted"

    def __post_init__(self) -> None:
        for name in ("share_attention", "adain_queries", "adain_keys", "adain_values", "full_attention_share",
                     "share_group_norm", "share_layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("shared_score_scale", "shared_score_shift"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.shared_score_scale <= 0:
            raise ValueError(f"shared_score_scale must be > 0, got {self.shared_score_scale}")
        layers = self.shared_layers
        if isinstance(layers, list):
            object.__setattr__(self, "shared_layers", layers := tuple(layers))
        if isinstance(layers, bool) or not isinstance(layers, (int, float, str, tuple, type(None))):
            raise ValueError(f"shared_layers must be a fraction, a layer-name filter or a list of names, got {layers!r}")
        if isinstance(layers, (int, float)) and not 0.0 <= layers <= 1.0:
            raise ValueError(f"shared_layers must be a fraction in [0, 1], got {layers}")
        if isinstance(layers, tuple) and not all(isinstance(name, str) and name for name in layers):
            raise ValueError("shared_layers as a list must hold layer names (non-empty strings)")
        if self.reference_positions not in REFERENCE_POSITIONS:
            raise ValueError(f"reference_positions must be one of {', '.join(REFERENCE_POSITIONS)}, "
                             f"got {self.reference_positions!r}")

    @classmethod
    def text_to_image(cls, **changes) -> StyleAlignedConfig:
        """The paper's SDXL text-to-image setting (the defaults)."""
        return cls(**changes)

    @classmethod
    def transfer(cls, **changes) -> StyleAlignedConfig:
        """The paper's setting for style from a real (inverted) image: shared norms, shift log 2."""
        return cls(**{"share_group_norm": True, "share_layer_norm": True, "shared_score_shift": math.log(2),
                      **changes})

    @classmethod
    def disabled(cls) -> StyleAlignedConfig:
        """No sharing at all: the plain model (the paper's baseline)."""
        return cls(share_attention=False, adain_queries=False, adain_keys=False)

    @property
    def is_disabled(self) -> bool:
        """True when the config changes nothing in the model."""
        return not (self.share_attention or self.adain_queries or self.adain_keys or self.adain_values
                    or self.full_attention_share or self.share_group_norm)

    def replace(self, **changes) -> StyleAlignedConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every knob."""
        data = dataclasses.asdict(self)
        if isinstance(self.shared_layers, tuple):
            data["shared_layers"] = list(self.shared_layers)
        return data
