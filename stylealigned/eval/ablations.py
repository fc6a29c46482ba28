"""The named configurations the runner compares: the plain model, the paper's method and its ablations."""

from __future__ import annotations

from ..config import StyleAlignedConfig
from ..errors import UserError

CONFIGS = {
    "no-share": StyleAlignedConfig.disabled,
    "full": StyleAlignedConfig.text_to_image,
    "no-adain": lambda: StyleAlignedConfig.text_to_image(adain_queries=False, adain_keys=False),
    "full-attention-share": lambda: StyleAlignedConfig.text_to_image(
        full_attention_share=True, adain_queries=False, adain_keys=False
    ),
    "shared-layers-0.5": lambda: StyleAlignedConfig.text_to_image(shared_layers=0.5),
    "shared-layers-0.25": lambda: StyleAlignedConfig.text_to_image(shared_layers=0.25),
    "transfer": StyleAlignedConfig.transfer,  # style from a real image, inverted; needs a reference
    # on request (--configs): the knobs a family may set otherwise, and sharing at the noisier steps only
    "adain-queries-and-keys": lambda: StyleAlignedConfig.text_to_image(adain_queries=True),
    "adain-keys-only": lambda: StyleAlignedConfig.text_to_image(adain_queries=False),
    "share-until-0.5": lambda: StyleAlignedConfig.text_to_image(share_until=0.5),
}
NEEDS_REFERENCE = ("transfer",)
ON_REQUEST = ("adain-queries-and-keys", "adain-keys-only", "share-until-0.5")  # only where --configs names them
DEFAULT_CONFIGS = [name for name in CONFIGS if name not in NEEDS_REFERENCE + ON_REQUEST]


def parse_configs(text: str | None, has_reference: bool, backbone=None) -> list[str]:
    """Names from a comma-separated list (None: every configuration that applies to the backbone's family);
    unknown names, or one the family cannot run, are a UserError."""
    if text is None:
        names = DEFAULT_CONFIGS + (list(NEEDS_REFERENCE) if has_reference else [])
        return [name for name in names if backbone is None or runs_on(backbone, name)]
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        given = ", ".join(unknown) or "(none given)"
        raise UserError(f"unknown configuration(s) {given}; choose from {', '.join(CONFIGS)}")
    if not has_reference and (needing := [name for name in names if name in NEEDS_REFERENCE]):
        raise UserError(f"{', '.join(needing)} needs a real reference; pass --reference-image and --reference-prompt")
    if backbone is not None and (refused := [name for name in names if not runs_on(backbone, name)]):
        raise UserError(f"{', '.join(refused)} cannot run on a {backbone.label}; leave it out of --configs")
    return names


def runs_on(backbone, name: str) -> bool:
    """Whether the named configuration means something on this backbone's family."""
    try:
        backbone.check_config(backbone.fit_preset(CONFIGS[name]()))
    except UserError:
        return False
    return True
