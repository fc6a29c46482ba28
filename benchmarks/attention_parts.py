"""Which part of a transformer's shared attention costs the targets their objects: arms no knob of the package makes.

  streams  the targets' text queries and image queries see the reference apart, each with its own logit shift
           toward it (-inf: not at all, 0: as the method has it): the style through the words alone, or the image
           queries' share of the reference weakened
  heads    only some heads of each shared layer share (the AdaIN of their keys and the reference's tokens); the
           other heads attend as the plain model's

Each arm is the FLUX default (docs/findings.md, section 6) with a `PartConfig`: the package's `align_targets` is
wrapped here so that a PartConfig's split applies, and the package is otherwise unchanged. Every run uses
benchmarks/effect.py's sets, noise, judge and report, so its arms compare with effect.py's on the same `--seed`:

    python benchmarks/attention_parts.py --model builtin-flux --experiment streams,heads --sets 100 --seed 500
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import effect
from stylealigned import attention, processors
from stylealigned.config import KNOBS, StyleAlignedConfig

STREAMS = {"text-stream-only": (0.0, -math.inf), "text-stream-only-text+1": (1.0, -math.inf),
           "image-queries-1": (0.0, -1.0), "image-queries-2": (0.0, -2.0)}  # name: (text shift, image shift)
HEAD_SETS = ((0,), (1,), (2,), (3,), (1, 2, 3), (0, 2, 3), (0, 1, 3), (0, 1, 2))


@dataclass(frozen=True)
class PartConfig(StyleAlignedConfig):
    """The FLUX default with its shared attention split: by query stream (`text_shift`, `image_shift`: added to
    those queries' logits toward the reference, -inf for none) or by head (`heads` share, the others do not)."""

    text_shift: float = 0.0
    image_shift: float = 0.0
    heads: tuple[int, ...] | None = None


def split_align_targets(q, k, v, ref, config, image=attention.ALL, rotate=None, mask=None, overwrite=False,
                        kernel=None):
    """`attention.align_targets`, with a PartConfig's split: each part computed as the package computes it."""
    if not isinstance(config, PartConfig):
        return package_align_targets(q, k, v, ref, config, image, rotate, mask, overwrite, kernel)

    def part(shift: float = config.shared_score_shift, plain: bool = False):
        changes = dict(share_attention=False) if plain or shift == -math.inf else dict(shared_score_shift=shift)
        as_package = StyleAlignedConfig(**{name: getattr(config, name) for name in KNOBS} | changes)
        seen = replace(ref, query_stats=None, key_stats=None, value_stats=None) if plain else ref
        return package_align_targets(q.clone(), k.clone(), v.clone(), seen, as_package, image, rotate, mask, False,
                                     kernel)

    if config.heads is not None:
        out, own = part(), part(plain=True)
        others = [head for head in range(q.shape[2]) if head not in config.heads]
        out[:, :, others] = own[:, :, others]
        return out
    out = part(config.text_shift)
    out[..., image, :] = part(config.image_shift)[..., image, :]
    return out


def variants(experiment: str, set_sizes: list[int], backbone) -> list[effect.Variant]:
    """The arms of `experiment`, with the unshared sets and the FLUX default beside them."""
    arms = {"no-share": StyleAlignedConfig.disabled(), "full": StyleAlignedConfig.text_to_image()}
    if experiment == "streams":
        arms |= {name: PartConfig(text_shift=text, image_shift=image) for name, (text, image) in STREAMS.items()}
    if experiment == "heads":
        arms |= {"heads-" + "".join(map(str, heads)): PartConfig(heads=heads) for heads in HEAD_SETS}
    return [effect.Variant(name, lambda config=config: config) for name, config in arms.items()]


def patches() -> list[tuple[object, str, object]]:
    """(module, name, value): what running this script sets, in the package and in effect.py."""
    return [(attention, "align_targets", split_align_targets), (processors, "align_targets", split_align_targets),
            (effect, "EXPERIMENTS", ("streams", "heads")), (effect, "variants", variants)]


package_align_targets = attention.align_targets

if __name__ == "__main__":
    for module, name, value in patches():
        setattr(module, name, value)
    effect.main()
