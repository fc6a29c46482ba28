"""The method's effect on the built-in model, judged by its classifier: style agreement, object accuracy, leakage.

    python benchmarks/effect.py --sets 100 --steps 20 --device cpu --out runs/effect

Each set's reference is "a {object} in {style} style" (random object, styles in balanced rounds), its 3 targets
"a {object}" of other objects (seeded RNG). Every set runs under each configuration with the same noise seeds; the
transfer configuration starts from the reference as the synthetic world draws it, DDIM-inverted. Per target: its
classified style is the reference's prompted (or drawn) style (style agreement), its object is the prompted one
(object accuracy), its object is the reference's (content leakage), and its classified style equals the reference
image's classified style (the agreement that counts where the model fails to draw the prompted style).
Intervals: 95% percentile bootstrap over sets (targets of one set share a reference, so sets are the independent
unit). On a shared CPU run it with OMP_NUM_THREADS=1: the model is tiny and more threads stall each other.

Resumable: every image is kept as OUT/images/CONFIG/SET-POSITION.png and a set already on disk is skipped when
the same command runs again. Sets run round by round (set k under every configuration before set k + 1); every
--report-every rounds, the sets present under all configurations are judged into OUT/effect.md, effect.json and
effect.png, so an interrupted run still reports all configurations on equal footing; OUT/records.json keeps every
set's verdicts, which benchmarks/effect_pool.py pools over runs on other seeds. --report-only judges them again
(with a newer classifier, say) without generating; --by-style adds every arm split by the reference's style,
--by-object split by each target's prompted object, with what the targets that missed it were classified as.
OUT/parameters.json records the arguments and every arm's resolved configuration (its knobs and the layers it
shares); a run into a folder whose record differs, after a default changed say, is refused rather than mixing sets
made two ways.

--experiment NAME runs one of `stylealigned eval`'s experiments on the built-in model instead of the ablations
(default --out runs/effect-NAME), each variant of a set on the same noise:
    set-size              sets of 4, 8, 12, 16 (--set-sizes; up to 64): the same reference and first targets, more
                          targets drawn (seeded) among the other objects
    layer-sweep           shared_layers 0, 0.125, ..., 1 and the down / mid / up blocks alone
    reference-choice      each of the set's 4 objects in turn as the styled reference, the others unstyled
    reference-quality     transfer from the drawn reference, clean or degraded (blur, noise, JPEG, downscale, 3 levels)
    abstract-vs-concrete  no sharing and the paper default, split by style kind; the toy world has no abstract
                          styles, so its palette-only styles (pastel, neon) stand in for them beside the pattern
                          styles (outline, striped, pixel, polka)
    positions             no sharing, reference keys at shifted positions, at the same positions (RoPE models)
    score-scale           shared_score_scale 1.0 (the default) and 1.1 (AlignedGen's lambda)
    score-shift           shared_score_shift 0 (the default), -1 and -2: the reference's logits lowered, its pull
                          on the targets' content (and style) weaker
    text-queries          text_sees_reference on (the default) and off: targets' text tokens attend to their own
                          tokens only (transformers)
    transfer-mode         transfer from the drawn reference: inverted, or forward-noised (`--inversion noise`)
    transfer-ablation     the transfer preset and each of its knobs turned back: shared norms, shift log 2, AdaIN
                          on the values
    adain-queries         the family's AdaIN (keys alone on FLUX-style transformers) and the paper's (queries and
                          keys)
    share-until           share_until 0 (every step, the default), 0.3, 0.5 and 0.7: sharing only at the noisier
                          steps
    adain-values          AdaIN of the values too, at every step and only where the noise level is 0.5 or more
                          (share_until 0.5)
    prompted              a control, nothing shared: each target's prompt names the reference's style in words
    transfer-adain        transfer from the drawn reference with the family's AdaIN and with the paper's (queries
                          and keys)
    guided                no sharing, the paper default and the `guided` preset (only the prompt's call of true CFG
                          shares; models whose pipeline names that call, as builtin-flux)
--arm NAME:KNOB=VALUE[,KNOB=VALUE...] (repeatable) adds a text-to-image arm of your own beside the experiment's,
on the same sets and noise: `--arm late:share_until=0.3`, `--arm few:shared_layers=a.attn+b.attn` (layer names
joined by +; a fraction or a name filter as the CLI takes them), `--arm no-adain:adain_keys=false`.
Diversity: mean pairwise distance (1 - cosine) among a set's targets in the classifier's pooled features.
Layout copying: intersection over union of a target's and its reference's silhouettes (the classifier's
foreground, thresholded); the unshared sets give the overlap two independent images have by chance.
--model builtin-flux runs the same on the built-in transformer; each configuration is fitted to the model's
family (a preset's norm sharing is dropped where the family has no such norms; the rest is refused).
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylealigned.apply import layers_to_share
from stylealigned.backbones import backbone_for
from stylealigned.config import KNOBS, StyleAlignedConfig, knob_type
from stylealigned.demo import GUIDANCE, TARGETS, ToySet, draw_reference, generate, judge, load_judge, random_sets
from stylealigned.eval.ablations import CONFIGS, runs_on
from stylealigned.eval.degrade import DEGRADATIONS, LEVELS, degrade
from stylealigned.eval.experiments import LAYER_FRACTIONS, MAX_SET_SIZE, SET_SIZES, fraction_name
from stylealigned.eval.metrics import diversity
from stylealigned.errors import UserError
from stylealigned.io import save_png, write_json_atomic
from stylealigned.models import load_pipeline
from stylealigned.toy.classifier import foreground, to_tensor
from stylealigned.toy.world import OBJECTS

CONFIGURATIONS = ["no-share", "full", "no-adain", "full-attention-share", "shared-layers-0.5", "transfer"]
METRICS = {"style_agrees": "style agreement", "object_right": "object accuracy", "leaks": "content leakage",
           "seen_agrees": "agreement with reference as classified", "layout": "layout copying (silhouette IoU)"}
SILHOUETTE = 0.5  # foreground distance (summed over channels, pixels in [-1, 1]) above which a pixel is the object
BOOTSTRAP = 2000
SCORE_SHIFTS = (-1.0, -2.0)
EXPERIMENTS = ("ablations", "set-size", "layer-sweep", "reference-choice", "reference-quality", "abstract-vs-concrete",
               "positions", "score-scale", "score-shift", "text-queries", "transfer-mode", "transfer-ablation",
               "adain-queries", "share-until", "adain-values", "prompted", "transfer-adain", "guided")
SHARE_UNTIL = (0.3, 0.5, 0.7)
PALETTE_STYLES = ("pastel", "neon")  # colour only: the toy's stand-in for abstract styles


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment: its configuration, how it reshapes the set, and what the reference is drawn as."""

    name: str
    config: Callable[[], StyleAlignedConfig]
    targets: int = TARGETS
    reference: int = 0  # which object of the set is the styled reference (reference-choice)
    drawn: bool = False  # transfer from the world's drawing of the reference
    degradation: tuple[str, int] | None = None
    inversion: str = "ddim"  # how the drawn reference becomes a trajectory (inversion.MODES)
    prompted: bool = False  # the targets' prompts name the reference's style

    def toy_set(self, toy_set: ToySet, index: int, seed: int) -> ToySet:
        """The set this variant renders: rotated so object `reference` leads, extended to `targets` targets."""
        objects = [toy_set.object, *toy_set.targets]
        objects = objects[self.reference:] + objects[:self.reference]
        others = [name for name in OBJECTS if name != objects[0]]
        extra = np.random.default_rng([seed, index]).choice(others, size=MAX_SET_SIZE - 1 - len(toy_set.targets))
        targets = (objects[1:] + [str(name) for name in extra])[:self.targets]
        return ToySet(objects[0], toy_set.style, tuple(targets), styled_targets=self.prompted)

    def reference_drawing(self, toy_set: ToySet, seed: int) -> Image.Image | None:
        if not self.drawn:
            return None
        drawing = draw_reference(toy_set, seed)
        return degrade(drawing, *self.degradation, seed=seed) if self.degradation else drawing


def variants(experiment: str, set_sizes: list[int], backbone) -> list[Variant]:
    """The arms of `experiment` on a built-in model, those its family can run (layer groups are the family's)."""
    full, transfer = CONFIGS["full"], CONFIGS["transfer"]
    if experiment == "set-size":
        return [Variant(f"size-{size}", full, targets=size - 1) for size in set_sizes]
    if experiment == "layer-sweep":
        return [Variant(fraction_name(f), _sharing(f)) for f in LAYER_FRACTIONS] + [
            Variant(name, _sharing(layers)) for name, layers in backbone.layer_groups()]
    if experiment == "reference-choice":
        return [Variant(f"reference-{k}", full, reference=k) for k in range(TARGETS + 1)]
    if experiment == "reference-quality":
        return [Variant("clean", transfer, drawn=True)] + [
            Variant(f"{kind}-{level}", transfer, drawn=True, degradation=(kind, level))
            for kind in DEGRADATIONS for level in LEVELS]
    if experiment == "abstract-vs-concrete":
        return [Variant("no-share", CONFIGS["no-share"]), Variant("full", full)]
    if experiment == "positions":
        return [Variant("no-share", CONFIGS["no-share"]), Variant("full", full),
                Variant("same-positions", _text_to_image_with(reference_positions="same"))]
    if experiment == "guided":
        return [Variant("no-share", CONFIGS["no-share"]), Variant("full", full),
                Variant("guided", StyleAlignedConfig.guided)]
    if experiment == "score-scale":
        return [Variant("full", full),
                Variant("scale-1.1", _text_to_image_with(shared_score_scale=1.1))]
    if experiment == "score-shift":
        return [Variant("full", full)] + [Variant(f"shift{shift:g}", _text_to_image_with(shared_score_shift=shift))
                                          for shift in SCORE_SHIFTS]
    if experiment == "text-queries":
        return [Variant("full", full), Variant("text-off", _text_to_image_with(text_sees_reference=False))]
    if experiment == "transfer-mode":
        return [Variant("inverted", transfer, drawn=True), Variant("noised", transfer, drawn=True, inversion="noise")]
    if experiment == "adain-queries":
        return [Variant("full", full), Variant("adain-queries-and-keys", _text_to_image_with(adain_queries=True))]
    if experiment == "share-until":
        return [Variant("full", full)] + [Variant(f"until-{level:g}", _text_to_image_with(share_until=level))
                                          for level in SHARE_UNTIL]
    if experiment == "transfer-adain":
        return [Variant("transfer", transfer, drawn=True),
                Variant("transfer-adain-queries-and-keys", _transfer_with({"adain_queries": True}), drawn=True)]
    if experiment == "adain-values":
        return [Variant("full", full), Variant("adain-values", _text_to_image_with(adain_values=True)),
                Variant("adain-values-until-0.5", _text_to_image_with(adain_values=True, share_until=0.5))]
    if experiment == "prompted":
        return [Variant("no-share", CONFIGS["no-share"]), Variant("prompted", CONFIGS["no-share"], prompted=True)]
    if experiment == "transfer-ablation":
        arms = {"transfer": {}, "no-shared-norms": {"share_group_norm": False, "share_layer_norm": False},
                "no-shift": {"shared_score_shift": 0.0}, "adain-values": {"adain_values": True},
                "text-to-image": None}
        return [Variant(name, full if changes is None else _transfer_with(changes), drawn=True)
                for name, changes in arms.items()]
    return [Variant(name, CONFIGS[name], drawn=name == "transfer") for name in CONFIGURATIONS
            if runs_on(backbone, name)]


def all_variants(experiments: list[str], set_sizes: list[int], backbone) -> list[Variant]:
    """The arms of several experiments run on the same sets, each arm once (by name)."""
    arms = {}
    for experiment in experiments:
        arms |= {variant.name: variant for variant in variants(experiment, set_sizes, backbone)
                 if variant.name not in arms}
    return list(arms.values())


def custom_arm(text: str) -> Variant:
    """A `--arm NAME:KNOB=VALUE,...` text-to-image arm; a ValueError names what is wrong with it."""
    name, _, knobs = (part.strip() for part in text.partition(":"))
    if not name or not knobs:
        raise ValueError(f"--arm {text!r} is not NAME:KNOB=VALUE[,KNOB=VALUE...]")
    changes = {}
    for item in knobs.split(","):
        knob, _, value = (part.strip() for part in item.partition("="))
        if knob not in KNOBS:
            raise ValueError(f"--arm {name}: unknown knob {knob!r}; choose from {', '.join(KNOBS)}")
        changes[knob] = knob_value(knob, value)
    StyleAlignedConfig.text_to_image(**changes)  # validated now, not after hours of other arms
    return Variant(name, _text_to_image_with(**changes))


def knob_value(knob: str, text: str):
    """A knob's value from its text: true/false, a number, layer names joined by +, or the text itself."""
    kind = knob_type(knob)
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--arm: {knob} takes true or false, got {text!r}")
        return text.lower() == "true"
    if kind == "float" or knob == "shared_layers":
        try:
            return float(text)
        except ValueError:
            if kind == "float":
                raise ValueError(f"--arm: {knob} takes a number, got {text!r}") from None
    return tuple(text.split("+")) if knob == "shared_layers" and "+" in text else text


def _transfer_with(changes: dict) -> Callable[[], StyleAlignedConfig]:
    return lambda: StyleAlignedConfig.transfer(**changes)


def _text_to_image_with(**changes) -> Callable[[], StyleAlignedConfig]:
    return lambda: StyleAlignedConfig.text_to_image(**changes)


def _sharing(layers) -> Callable[[], StyleAlignedConfig]:
    return _text_to_image_with(shared_layers=layers)


def seed_of(args, index: int) -> int:
    """Set `index`'s first noise seed; sets are spaced by the largest set so they never share noise."""
    return args.seed + index * max([TARGETS + 1, *args.set_sizes])


def set_files(out: Path, name: str, index: int, targets: int = TARGETS) -> list[Path]:
    """Where set `index` under variant `name` is kept: the reference (0) and the targets."""
    return [out / "images" / name / f"{index:03d}-{position}.png" for position in range(targets + 1)]


def generate_round(pipe, toy_set: ToySet, index: int, args) -> None:
    """Set `index` under every variant not yet on disk (PNGs are written atomically: present = complete). A variant
    that resolves to the same setup as one before it (two fractions selecting the same layers, say) takes its
    images instead of generating them again."""
    seed, backbone, made = seed_of(args, index), backbone_for(pipe), {}
    for variant in args.variants:
        files = set_files(args.out, variant.name, index, variant.targets)
        twin = made.setdefault(args.setups[variant.name], files)
        if all(file.exists() for file in files):
            continue
        shown = variant.toy_set(toy_set, index, args.seed)
        if twin is not files and all(file.exists() for file in twin):
            images = [read_image(file) for file in twin]
        else:
            config = backbone.fit_preset(variant.config())
            images = generate(pipe, shown, config, seed, args.steps, drawn=variant.reference_drawing(shown, seed),
                              inversion=variant.inversion, guidance=args.guidance)
            images = [images[0], *images[1]]
        files[0].parent.mkdir(parents=True, exist_ok=True)
        for position, (file, image) in enumerate(zip(files, images)):
            save_png(image, file, {"config": variant.name, "set": index, "position": position, "seed": seed + position,
                                   "prompt": ([shown.reference_prompt] + shown.target_prompts)[position]})


def read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def silhouette(image: Image.Image) -> np.ndarray:
    """Where the object is: the classifier's foreground view of the image, thresholded."""
    return foreground(to_tensor([image]))[0, 0].numpy() > SILHOUETTE


def layout_copying(reference: Image.Image, target: Image.Image) -> float:
    """Intersection over union of the two images' silhouettes."""
    a, b = silhouette(reference), silhouette(target)
    return float((a & b).sum() / max((a | b).sum(), 1))


@torch.no_grad()
def content_diversity(images: list[Image.Image], classifier) -> float:
    """1 - mean pairwise cosine of the classifier's pooled features of `images` (the targets)."""
    pixels = to_tensor(images)
    features = classifier.features(torch.cat([pixels, foreground(pixels)], dim=1))
    return diversity(torch.nn.functional.normalize(features, dim=-1))


def judge_sets(out: Path, toy_sets: list[ToySet], classifier, chosen: list[Variant], seed: int) -> list[dict]:
    """Every set on disk under all variants, judged: the reference's own style, each target's verdicts and the
    targets' diversity."""
    records = []
    for index, toy_set in enumerate(toy_sets):
        files = {variant: set_files(out, variant.name, index, variant.targets) for variant in chosen}
        if not all(file.exists() for paths in files.values() for file in paths):
            continue
        for variant, paths in files.items():
            shown = variant.toy_set(toy_set, index, seed)
            images = [read_image(file) for file in paths]
            reference, targets = judge(shown, images[:1], classifier)[0], judge(shown, images[1:], classifier)
            for verdict, target in zip(targets, images[1:]):
                verdict["seen_agrees"] = verdict["style"] == reference["style"]
                verdict["layout"] = layout_copying(images[0], target)
            kind = "palette" if toy_set.style in PALETTE_STYLES else "pattern"
            records.append({"config": variant.name, "set": index, "kind": kind, "style": toy_set.style,
                            "verdicts": targets,
                            "reference_style_right": reference["style_agrees"],
                            "diversity": content_diversity(images[1:], classifier)})
    return records


def interval(per_set: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """The pooled rate over sets and its 95% percentile-bootstrap interval (resampling whole sets)."""
    picks = rng.integers(len(per_set), size=(BOOTSTRAP, len(per_set)))
    rates = per_set[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return per_set.sum() / counts.sum(), low, high


def summarise(records: list[dict], group=lambda record: record["config"]) -> dict:
    """Per group (default: variant, in first-seen order): sets, each metric's rate and the mean diversity with
    their intervals, and the references' own style rate."""
    rng = np.random.default_rng(0)
    summary = {}
    for name in dict.fromkeys(group(r) for r in records):
        mine = [r for r in records if group(r) == name]
        counts = np.array([len(r["verdicts"]) for r in mine])
        summary[name] = {"sets": len(mine), **{
            key: interval(np.array([sum(v[key] for v in r["verdicts"]) for r in mine]), counts, rng)
            for key in METRICS}}
        summary[name]["diversity"] = interval(np.array([r["diversity"] for r in mine]), np.ones(len(mine)), rng)
        summary[name]["reference_style"] = float(np.mean([r["reference_style_right"] for r in mine]))
    return summary


def table(summary: dict, header: str) -> str:
    """The markdown report: one row per variant, rate [95% interval] per metric, then the diversity."""
    lines = [header, "", "| configuration | sets | " + " | ".join(METRICS.values()) + " | diversity | reference "
             "shows its style |", "|---|---:|" + "---|" * (len(METRICS) + 1) + "---:|"]
    for name, row in summary.items():
        cells = [f"{rate:.2f} [{low:.2f}, {high:.2f}]" for rate, low, high in (row[key] for key in METRICS)]
        lines.append(f"| {name} | {row['sets']} | " + " | ".join(cells) + f" | {_with_interval(row['diversity'])} | "
                     f"{row['reference_style']:.2f} |")
    return "\n".join(lines) + "\n"


def spread(records: list[dict]) -> list[str]:
    """reference-choice: per set, the range of each rate over the reference choices, averaged over sets."""
    lines = ["Spread over the choice of reference (per set: max - min over the 4 choices; mean over sets, largest):"]
    for key, label in [*METRICS.items(), ("diversity", "diversity")]:
        ranges = []
        for index in dict.fromkeys(r["set"] for r in records):
            rates = [_rate_of(r, key) for r in records if r["set"] == index]
            ranges.append(max(rates) - min(rates))
        lines.append(f"- {label}: mean range {np.mean(ranges):.3f}, largest {max(ranges):.3f}")
    return lines


def split_by_object(records: list[dict]) -> list[dict]:
    """Each set's record once per object its targets were prompted for, holding only those targets' verdicts."""
    return [{**record, "object": name, "verdicts": [v for v in record["verdicts"] if v["prompted"] == name]}
            for record in records for name in dict.fromkeys(v["prompted"] for v in record["verdicts"])]


def drawn_instead(records: list[dict]) -> list[str]:
    """Per arm and prompted object, what the classifier saw in the targets that missed it, most often first."""
    arms, missed = list(dict.fromkeys(record["config"] for record in records)), {}
    for record in records:
        for verdict in record["verdicts"]:
            if not verdict["object_right"]:
                missed.setdefault((record["config"], verdict["prompted"]), Counter())[verdict["object"]] += 1
    return [f"- {arm}, {prompted}: " + ", ".join(f"{found} {count}" for found, count in seen.most_common())
            for (arm, prompted), seen in sorted(missed.items(), key=lambda item: (arms.index(item[0][0]), item[0][1]))]


def _rate_of(record: dict, key: str) -> float:
    return record["diversity"] if key == "diversity" else float(np.mean([v[key] for v in record["verdicts"]]))


def checks(summary: dict) -> list[str]:
    """The issue's targets for the effect, each with the measured numbers and whether it is met."""
    if not {"no-share", "full", "full-attention-share"} <= set(summary):
        return []
    plain, full, everything = (summary[name] for name in ("no-share", "full", "full-attention-share"))
    drop = plain["object_right"][0] - full["object_right"][0]
    found = [(f"style agreement: paper default {full['style_agrees'][0]:.2f} (target >= 0.6) vs no sharing "
              f"{plain['style_agrees'][0]:.2f} (target <= 0.3)",
              full["style_agrees"][0] >= 0.6 and plain["style_agrees"][0] <= 0.3),
             (f"object accuracy lower with the paper default by {drop:.2f} (target <= 0.1)", drop <= 0.1),
             (f"content leakage: full attention share {_with_interval(everything['leaks'])} vs paper default "
              f"{_with_interval(full['leaks'])} (target: more; overlapping intervals mean no clear difference)",
              everything["leaks"][0] > full["leaks"][0])]
    return [f"- {text}: {'met' if met else 'NOT met'}" for text, met in found]


def _with_interval(measured: tuple[float, float, float]) -> str:
    rate, low, high = measured
    return f"{rate:.3f} [{low:.3f}, {high:.3f}]"


def plot(summary: dict, path: Path) -> None:
    """Grouped bars per metric, one bar per configuration, with the intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(summary)
    for number, (name, row) in enumerate(summary.items()):
        rates = np.array([row[key] for key in METRICS])
        positions = np.arange(len(METRICS)) + (number - (len(summary) - 1) / 2) * width
        axis.bar(positions, rates[:, 0], width, yerr=[rates[:, 0] - rates[:, 1], rates[:, 2] - rates[:, 0]],
                 capsize=2, label=f"{name} ({row['sets']} sets)")
    axis.set_xticks(np.arange(len(METRICS)), [textwrap.fill(label, 22) for label in METRICS.values()])
    axis.set_ylim(0, 1)
    axis.set_ylabel("fraction of targets (95% interval)")
    axis.set_title("StyleAligned on the built-in model, judged by its classifier")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


LABELS = METRICS | {"diversity": "diversity among targets (1 - cosine, classifier features)"}


def plot_against(summary: dict, path: Path, x: str, y: str, title: str, joined: list[str]) -> None:
    """Metric `y` against metric `x`, a point per arm with 95% intervals both ways; the arms `joined` (a sweep, in
    order) drawn as one line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for names, style in ((joined, "o-"), ([name for name in summary if name not in joined], "s")):
        rows = [summary[name] for name in names]
        if not rows:
            continue
        xs, ys = (np.array([row[key] for row in rows]) for key in (x, y))
        axis.errorbar(xs[:, 0], ys[:, 0], xerr=[xs[:, 0] - xs[:, 1], xs[:, 2] - xs[:, 0]],
                      yerr=[ys[:, 0] - ys[:, 1], ys[:, 2] - ys[:, 0]], fmt=style, capsize=2)
        for name, px, py in zip(names, xs[:, 0], ys[:, 0]):
            axis.annotate(name.removeprefix("layers-"), (px, py), textcoords="offset points", xytext=(5, 4),
                          fontsize=8)
    axis.set_xlabel(LABELS[x])
    axis.set_ylabel(LABELS[y])
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(out: Path, toy_sets: list[ToySet], header: str, args) -> str:
    """Judge what is on disk with the shipped classifier; write effect.md, effect.json, records.json (every set's
    verdicts, for effect_pool.py) and effect.png (and, for
    the layer sweep, tradeoff.png: style against diversity; for the AdaIN and share_until experiments,
    frontier.png: objects against style)."""
    records = judge_sets(out, toy_sets, load_judge(), args.variants, args.seed)
    summary = summarise(records)
    extra = checks(summary)
    if "reference-choice" in args.experiment and records:
        extra = spread(records)
    if "abstract-vs-concrete" in args.experiment and records:
        by_kind = summarise(records, lambda record: f"{record['config']}, {record['kind']}")
        extra = ["Split by style kind (palette-only styles pastel, neon stand in for abstract ones):", "",
                 table(by_kind, "").strip()]
        summary |= {"by_kind": by_kind}
    if args.by_style and records:
        by_style = summarise(sorted(records, key=lambda record: record["style"]),
                             lambda record: f"{record['config']}, {record['style']}")
        extra += ["", "Split by the reference's style:", "", table(by_style, "").strip()]
    if args.by_object and records:
        by_object = summarise(sorted(split_by_object(records), key=lambda record: record["object"]),
                              lambda record: f"{record['config']}, {record['object']}")
        extra += ["", "Split by the object each target was prompted for (diversity and the reference's style: of the "
                  "sets holding it):", "", table(by_object, "").strip(), "",
                  "What the targets that missed their object were classified as:", *drawn_instead(records)]
    text = "\n".join([table({k: v for k, v in summary.items() if k != "by_kind"}, header), *extra]) + "\n"
    (out / "effect.md").write_text(text)
    write_json_atomic(out / "effect.json", summary)
    write_json_atomic(out / "records.json", {"about": header, "trained": args.trained, "records": records})
    plot(summary.get("by_kind", summary), out / "effect.png")
    if "layer-sweep" in args.experiment and records:
        plot_against(summary, out / "tradeoff.png", "diversity", "style_agrees",
                     "Shared layers: consistency against diversity", [n for n in summary if n.startswith("layers-")])
    if {"adain-queries", "share-until", "adain-values"} & set(args.experiment) and records:
        plot_against(summary, out / "frontier.png", "style_agrees", "object_right",
                     "What each knob trades: the targets' objects against the reference's style",
                     [n for n in summary if n == "full" or n.startswith(("until-", "adain-values"))])
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="ablations",
                        help=f"what to compare: one or several (comma-separated, run on the same sets) of "
                             f"{', '.join(EXPERIMENTS)}")
    parser.add_argument("--set-sizes", default=",".join(map(str, SET_SIZES)),
                        help=f"set-size only: images per set, comma-separated, 3..{MAX_SET_SIZE}")
    parser.add_argument("--sets", type=int, default=100, help="sets per configuration")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0, help="set composition and noise seeds")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--model", default="builtin", help="'builtin', 'builtin-flux' or a copy of either's folder")
    parser.add_argument("--out", type=Path, help="default runs/effect (ablations) or runs/effect-EXPERIMENT")
    parser.add_argument("--report-only", action="store_true", help="judge the sets on disk again; generate none")
    parser.add_argument("--by-style", action="store_true", help="also split every arm by the reference's style")
    parser.add_argument("--by-object", action="store_true",
                        help="also split every arm by the object each target was prompted for, and say what the "
                             "targets that missed it were classified as")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME:KNOB=VALUE,...",
                        help="a text-to-image arm of your own beside the experiment's (repeatable)")
    parser.add_argument("--report-every", type=int, default=10, help="rounds between interim reports")
    args = parser.parse_args()
    args.experiment = list(dict.fromkeys(name.strip() for name in args.experiment.split(",")))
    if unknown := [name for name in args.experiment if name not in EXPERIMENTS]:
        parser.error(f"unknown --experiment {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    sizes = sorted({int(size) for size in args.set_sizes.split(",")}) if "set-size" in args.experiment else []
    if any(not 3 <= size <= MAX_SET_SIZE for size in sizes):
        parser.error(f"--set-sizes must lie in 3..{MAX_SET_SIZE}, got {args.set_sizes}")
    args.set_sizes = sizes
    try:
        args.arm = [custom_arm(text) for text in args.arm]
    except ValueError as error:
        parser.error(str(error))
    name = "effect" if args.experiment == ["ablations"] else "effect-" + "+".join(args.experiment)
    args.out = args.out or Path("runs") / (name if args.model == "builtin" else f"{name}-{Path(args.model).name}")
    return args


def arm_record(backbone, variant: Variant) -> dict:
    """What an arm generates with, resolved: its fitted configuration and the layers it shares, so that resuming
    after a default changed refuses instead of mixing sets made under two defaults."""
    config = backbone.fit_preset(variant.config())
    return {"config": config.to_dict(), "layers": layers_to_share(backbone, config), "targets": variant.targets,
            "reference": variant.reference, "drawn": variant.drawn, "degradation": variant.degradation,
            "inversion": variant.inversion, "prompted": variant.prompted}


def setup_of(record: dict) -> str:
    """What decides an arm's images, from its `arm_record`: the layers it shares but not how they were asked for."""
    record = {**record, "config": {key: value for key, value in record["config"].items() if key != "shared_layers"}}
    return json.dumps(record, sort_keys=True)


def trained(pipe) -> str:
    """How long the model was trained, from its training.json."""
    training = Path(pipe.name_or_path) / "training.json"
    steps = json.loads(training.read_text()) if training.exists() else {}
    return ", ".join(f"{value} {key.replace('_steps', '').upper()} training steps" for key, value in steps.items()
                     if key.endswith("_steps")) or "training unknown"


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parameters = {"steps": args.steps, "seed": args.seed, "model": args.model, "guidance": args.guidance}
    if args.experiment != ["ablations"]:
        parameters |= {"experiment": ",".join(args.experiment), "set_sizes": args.set_sizes}
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    backbone = backbone_for(pipe)
    args.variants = all_variants(args.experiment, args.set_sizes, backbone)
    names = [variant.name for variant in args.variants + args.arm]
    if taken := sorted({name for name in names if names.count(name) > 1}):
        raise SystemExit(f"error: --arm {', '.join(taken)}: that name is taken by another arm; rename it")
    args.variants += args.arm
    try:
        parameters["arms"] = {variant.name: arm_record(backbone, variant) for variant in args.variants}
    except ValueError as error:  # an --arm's layer names that this model does not have
        raise SystemExit(f"error: {error}; give --arm's shared_layers as this model's layer names") from None
    args.setups = {name: setup_of(record) for name, record in parameters["arms"].items()}
    record = args.out / "parameters.json"
    if not args.report_only:
        if record.exists() and json.loads(record.read_text()) != json.loads(json.dumps(parameters)):
            raise SystemExit(f"error: {args.out} holds a run with other parameters or other resolved configurations "
                             f"(a changed default, say; {record}); choose another --out")
        write_json_atomic(record, parameters)
    args.trained = trained(pipe)
    header = (f"{args.model}: {args.trained}, experiment {', '.join(args.experiment)}; {args.steps} sampling "
              f"steps, guidance {args.guidance:g}; rate [95% bootstrap interval over sets].")
    toy_sets = random_sets(args.sets, args.seed)
    for index, toy_set in enumerate([] if args.report_only else toy_sets):
        started = time.perf_counter()
        generate_round(pipe, toy_set, index, args)
        print(f"set {index + 1}/{args.sets} under {len(args.variants)} variants: "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        if (index + 1) % args.report_every == 0:
            try:
                report(args.out, toy_sets, header, args)
            except UserError as error:  # the classifier may be installed while the run goes on
                print(f"no interim report: {error}", flush=True)
    print(report(args.out, toy_sets, header, args))


if __name__ == "__main__":
    main()
