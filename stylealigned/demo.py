"""Style-aligned sets on the built-in model, judged by its shape/style classifier.

A toy set's reference names an object and a style ("a star in neon style"); its targets name only other objects
("a circle"), so any style they show comes from the reference. The demo (`stylealigned demo`) and the effect
benchmark (`benchmarks/effect.py`) both generate such sets with or without sharing, or from a drawn and inverted
reference, and score each target: does its style agree with the reference's, is its object the prompted one,
or did it take the reference's object (content leakage)?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .backbones import backbone_for
from .config import StyleAlignedConfig
from .errors import UserError
from .inversion import invert
from .io import make_grid
from .sets import generate_set
from .toy.world import OBJECTS, SIZE, STYLES, render, styled_caption, unstyled_caption

TARGETS = 3  # targets per set: sets of 4 with the reference
GUIDANCE = 5.0  # classifier-free guidance scale the built-in model samples well at
INVERSION_GUIDANCE = 1.0  # DDIM inversion without guidance: the most faithful reconstruction
CELL = 128  # pixels per image in the demo grid


@dataclass(frozen=True)
class ToySet:
    """A reference object drawn in a style, and the objects of the targets (never the reference's); with
    `styled_targets` the targets' prompts name the reference's style too (a control: the style asked for in words)."""

    object: str
    style: str
    targets: tuple[str, ...]
    styled_targets: bool = False

    @property
    def reference_prompt(self) -> str:
        return styled_caption(self.object, self.style)

    @property
    def target_prompts(self) -> list[str]:
        caption = (lambda target: styled_caption(target, self.style)) if self.styled_targets else unstyled_caption
        return [caption(target) for target in self.targets]


def random_sets(count: int, seed: int, targets: int = TARGETS) -> list[ToySet]:
    """`count` sets from a seeded RNG: styles in shuffled rounds (balanced), objects uniform, targets distinct.

    Set k is the same whatever `count` is, so a longer run extends a shorter one.
    """
    rng = np.random.default_rng(seed)
    sets, styles = [], []
    for _ in range(count):
        styles = styles or list(rng.permutation(STYLES))
        reference = str(rng.choice(OBJECTS))
        others = rng.choice([o for o in OBJECTS if o != reference], size=targets, replace=False)
        sets.append(ToySet(reference, str(styles.pop()), tuple(str(o) for o in others)))
    return sets


def draw_reference(toy_set: ToySet, seed: int) -> Image.Image:
    """The reference as the synthetic world draws it (the 'real image' a transfer starts from)."""
    return render(toy_set.object, toy_set.style, np.random.default_rng(seed))


def generate(pipe, toy_set: ToySet, config: StyleAlignedConfig, seed: int, steps: int,
             drawn: Image.Image | None = None, on_image=None, inversion: str = "ddim",
             guidance: float = GUIDANCE) -> tuple[Image.Image, list[Image.Image]]:
    """The reference and the targets of one set: generated from its prompt, or, given `drawn`, inverted from it
    (`inversion`: how, one of `inversion.MODES`), sampled at classifier-free guidance `guidance`.

    Image i of the set starts from noise seeded `seed + i`, so two configurations with one seed differ only by
    what they share. With `drawn`, the reference returned is the drawing itself. Images are the toy world's size
    whatever the folder's pipeline defaults to (a copy of builtin-flux loads at FLUX's 1024).
    """
    settings = {"num_inference_steps": steps, "guidance_scale": guidance, "height": SIZE, "width": SIZE}
    if drawn is None:
        images = generate_set(pipe, [toy_set.reference_prompt, *toy_set.target_prompts], config, seed=seed,
                              on_image=on_image, **settings)
        return images[0], images[1:]
    trajectory = invert(pipe, drawn, toy_set.reference_prompt, steps, guidance_scale=INVERSION_GUIDANCE,
                        mode=inversion, seed=seed)
    targets = generate_set(pipe, toy_set.target_prompts, config, reference=trajectory, seed=seed,
                           indices=range(1, len(toy_set.targets) + 1), on_image=on_image, **settings)
    return drawn, targets


def judge(toy_set: ToySet, targets: list[Image.Image], classifier) -> list[dict]:
    """Per target: the prompted object, the classifier's object and style, and whether it agrees, is right, or
    leaks."""
    from .toy.classifier import classify

    objects, styles = classify(targets, classifier)
    return [{"prompted": prompted, "object": found, "style": style, "style_agrees": style == toy_set.style,
             "object_right": found == prompted, "leaks": found == toy_set.object}
            for prompted, found, style in zip(toy_set.targets, objects, styles)]


def load_judge():
    """The classifier shipped with the built-in model; a missing one is a UserError."""
    from .toy.classifier import CLASSIFIER_FOLDER, load_classifier

    if not (CLASSIFIER_FOLDER / "model.safetensors").is_file():
        raise UserError("the built-in classifier is not installed; reinstall stylealigned")
    return load_classifier(CLASSIFIER_FOLDER)


@dataclass
class DemoResult:
    """What `run_demo` made: the labelled grid, demo.json's numbers and the transfer row's agreement."""

    grid: Image.Image
    summary: dict
    transfer_agreement: float
    transfer_set: ToySet


def run_demo(pipe, classifier, count: int, steps: int, seed: int, on_image=None) -> DemoResult:
    """`count` sets without and with sharing (same seeds), one transfer from a drawing, judged and tiled.

    Grid rows: each set without sharing, then with it (`shared_config`); the last row is the drawing and the
    transferred targets.
    """
    *toy_sets, transfer_set = random_sets(count + 1, seed)
    rows, labels, row_labels = [], [], []
    verdicts = {"shared": [], "unshared": []}
    shared = shared_config(pipe)
    for number, toy_set in enumerate(toy_sets, start=1):
        for name, config in (("unshared", StyleAlignedConfig.disabled()), ("shared", shared)):
            reference, targets = generate(pipe, toy_set, config, seed + number * (TARGETS + 1), steps,
                                          on_image=on_image)
            found = judge(toy_set, targets, classifier)
            verdicts[name] += found
            rows += [reference, *targets]
            labels += [toy_set.reference_prompt] + [_label(t, v) for t, v in zip(toy_set.target_prompts, found)]
            row_labels.append(f"set {number}: {'shared' if name == 'shared' else 'not shared'}")
    transfer = backbone_for(pipe).fit_preset(StyleAlignedConfig.transfer())  # no shared norms on transformers
    drawn, targets = generate(pipe, transfer_set, transfer, seed, steps,
                              drawn=draw_reference(transfer_set, seed), on_image=on_image)
    found = judge(transfer_set, targets, classifier)
    rows += [drawn, *targets]
    labels += [f"drawn: {transfer_set.style}"] + [_label(t, v) for t, v in zip(transfer_set.target_prompts, found)]
    row_labels.append("transfer")
    grid = make_grid([image.resize((CELL, CELL), Image.Resampling.NEAREST) for image in rows], columns=TARGETS + 1,
                     labels=labels, row_labels=row_labels)
    summary = {"sets": count,
               "style_agreement": {name: _rate(v, "style_agrees") for name, v in verdicts.items()},
               "object_accuracy": {name: _rate(v, "object_right") for name, v in verdicts.items()}}
    return DemoResult(grid, summary, _rate(found, "style_agrees"), transfer_set)


def shared_config(pipe) -> StyleAlignedConfig:
    """The shared rows' setting: the `guided` preset where the model guides with true CFG in a named call of its own
    (builtin-flux; measured best there, docs/findings.md section 6), else the paper's text-to-image setting."""
    return StyleAlignedConfig.guided() if backbone_for(pipe).names_unconditional_call else StyleAlignedConfig()


def _label(prompt: str, verdict: dict) -> str:
    """A target's caption in the grid: its prompt and the style the classifier sees."""
    return f"{prompt} ({verdict['style']})"


def _rate(verdicts: list[dict], key: str) -> float:
    return sum(v[key] for v in verdicts) / len(verdicts)
