"""StyleAlignedConfig: every knob of the method, validated on construction, with the paper's presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

REFERENCE_POSITIONS = ("shifted", "same")


@dataclass(frozen=True)
class StyleAlignedConfig:
    """How a set shares the style of its reference image.

    Defaults are the paper's SDXL text-to-image setting. The knobs in `FAMILY_KNOBS` default to None: the model
    family's value (`Backbone.resolve`; the README's families table), the paper's (`PAPER_VALUES`) on UNets and
    wherever no family is known.

    Args:
        share_attention: targets' self-attention also attends to the reference's keys and values.
        adain_queries: AdaIN-normalise each image's queries to the reference's per-token statistics; None = the
            family's (on, as in the paper, but off on FLUX-style transformers, where it leaked the reference's content).
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
            model family's default (the README's families table).
        reference_positions: on RoPE transformers (FLUX), where targets see the shared reference keys: "shifted"
            (beside the image, moved by the latent width, so targets do not copy its layout) or "same".
        text_sees_reference: on transformers, targets' text-token queries attend to the reference's image tokens too
            (the method as published); False keeps them on their own tokens (an ablation).
        share_until: targets share (attention, AdaIN, norms) only at steps whose noise level (1 = pure noise, 0 = the
            clean image: a flow model's sigma, a UNet's timestep over its training timesteps) is at or above this;
            below it they denoise as the plain model. 0 = every step (the paper); 0.5 = the noisier half. The
            choice is made in Python per denoiser call: under torch.compile each call breaks the graph there.
        share_unconditional: targets share in the unconditional (negative-prompt) prediction of classifier-free
            guidance too, as in the paper; False keeps that prediction the plain model's, so guidance pushes the
            targets toward the reference's style as well as their prompts. Only where the pipeline names that
            prediction's denoiser call (FLUX with true CFG, FLUX.2 klein, Qwen-Image, Wan).
    """

    share_attention: bool = field(default=True, metadata={
        "help": "Targets also attend to the reference's keys and values."})
    adain_queries: bool | None = field(default=None, metadata={
        "help": "AdaIN-normalise targets' queries to the reference's token statistics; default: the family's."})
    adain_keys: bool = field(default=True, metadata={"help": "The same for keys."})
    adain_values: bool = field(default=False, metadata={"help": "The same for values (off in the paper)."})
    full_attention_share: bool = field(default=False, metadata={
        "help": "Ablation: every image attends to all images of its group, no AdaIN (UNets)."})
    share_group_norm: bool = field(default=False, metadata={
        "help": "GroupNorm statistics joint over each image and its reference (UNets)."})
    share_layer_norm: bool = field(default=False, metadata={
        "help": "LayerNorm likewise; changes nothing (per-token statistics), kept for parity (UNets)."})
    shared_score_scale: float = field(default=1.0, metadata={
        "help": "Multiplies the reference keys targets see (> 1 sharpens attention to them)."})
    shared_score_shift: float = field(default=0.0, metadata={
        "help": "Added to logits toward the reference; log(k) = k copies of it."})
    shared_layers: float | str | tuple[str, ...] | None = field(default=None, metadata={
        "help": "Fraction of attention layers that share (0..1), or a layer-name filter; default: the family's."})
    reference_positions: str = field(default="shifted", metadata={
        "help": "FLUX: shared reference keys at positions shifted beside the image, or the same positions."})
    text_sees_reference: bool = field(default=True, metadata={
        "help": "Transformers: targets' text tokens also attend to the reference's image tokens."})
    share_until: float = field(default=0.0, metadata={
        "help": "Share only at steps whose noise level (1 = pure noise, 0 = clean) is at or above this; "
                "0 = every step."})
    share_unconditional: bool = field(default=True, metadata={
        "help": "Targets share in the unconditional prediction too; off, guidance also pushes toward the "
                "reference's style (pipelines that run it in a call of its own)."})

    def __post_init__(self) -> None:
        for name in knobs_of_type("bool"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name in FAMILY_KNOBS):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        for name in knobs_of_type("float"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= self.share_until <= 1.0:
            raise ValueError(f"share_until must be a noise level in [0, 1] (0 = every step), got {self.share_until}")
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
        """For style from a real (inverted) image: the shared score shift log 2. The paper's setting also shares
        the norms (`share_group_norm=True, share_layer_norm=True`); on the built-in UNet that costs the targets
        their objects (accuracy 0.68 against 0.96 without, style agreement 0.64 against 0.71; docs/findings.md),
        so it is off here."""
        return cls(**{"shared_score_shift": math.log(2), **changes})

    @classmethod
    def guided(cls, **changes) -> StyleAlignedConfig:
        """For pipelines that guide with true CFG in a call of its own (FLUX with true CFG as builtin-flux,
        FLUX.2-klein, Qwen-Image, Wan): only the prompt's call shares (`share_unconditional=False`), so guidance
        itself pushes the targets toward the reference's style; the noisier half of the steps (`share_until=0.5`)
        and the family's guided layers (`Backbone.guided_shared_layers`), with AdaIN of the values too, then carry
        more of it than the paper's setting at as many of the targets' own objects (builtin-flux at guidance 5:
        docs/findings.md, section 6)."""
        return cls(**{"share_unconditional": False, "share_until": 0.5, "adain_values": True, **changes})

    @classmethod
    def disabled(cls) -> StyleAlignedConfig:
        """No sharing at all: the plain model (the paper's baseline)."""
        return cls(share_attention=False, adain_queries=False, adain_keys=False)

    @property
    def is_disabled(self) -> bool:
        """True when the config changes nothing in the model."""
        return not (self.share_attention or self.adain_queries is not False or self.adain_keys or self.adain_values
                    or self.full_attention_share or self.share_group_norm)

    def resolved(self, **family) -> StyleAlignedConfig:
        """A copy with the knobs left to the family (None) set: to `family`'s values where given, else the paper's."""
        values = PAPER_VALUES | family
        return self.replace(**{name: values[name] for name in FAMILY_KNOBS if getattr(self, name) is None})

    def replace(self, **changes) -> StyleAlignedConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every knob."""
        data = dataclasses.asdict(self)
        if isinstance(self.shared_layers, tuple):
            data["shared_layers"] = list(self.shared_layers)
        return data


KNOBS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(StyleAlignedConfig))
PAPER_VALUES = {"adain_queries": True}  # the paper's values of the knobs left to the family
FAMILY_KNOBS = tuple(PAPER_VALUES)  # None: the family's value (shared_layers likewise, resolved to layer names)


def knob_type(name: str) -> str:
    """A knob's declared type without the None a family knob may take: "bool", "float", ..."""
    declared = next(f.type for f in dataclasses.fields(StyleAlignedConfig) if f.name == name)
    return declared.removesuffix(" | None") if name in FAMILY_KNOBS else declared


def knobs_of_type(kind: str) -> tuple[str, ...]:
    """The knobs declared with this type ("bool", "float", ...): the one list CLI, UI and run.json derive from."""
    return tuple(name for name in KNOBS if knob_type(name) == kind)


def knob_help(name: str) -> str:
    """One line saying what a knob does."""
    return next(f.metadata["help"] for f in dataclasses.fields(StyleAlignedConfig) if f.name == name)
