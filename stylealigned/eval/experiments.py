"""The named experiments of `stylealigned eval --experiment NAME`: each a list of conditions run over the benchmark,
a summary section and a plot.

    ablations             the paper's configurations (`--configs`), plotted as the consistency-alignment trade-off
    set-size              sets of 4, 8, 12, 16 (`--set-sizes`, up to 64 with `--batch-size`), same references, seeds
    layer-sweep           shared_layers 0, 0.125, ..., 1 and the family's named layer groups, as a trade-off curve
    reference-choice      each of a style's 4 objects in turn as the reference: the spread of the metrics
    reference-quality     transfer from the style's reference degraded by blur, noise, JPEG, downscaling (3 levels)
    abstract-vs-concrete  without and with sharing, the summary split by the benchmark's style kind

A condition's sets use the style's objects, rotated so that `reference` comes first, and extended to `set_size`
with the next styles' objects (in benchmark order, no repeats): image i of every condition starts from seed + i, so
a set of 8 shares its reference and first 3 targets with the set of 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure

from ..config import StyleAlignedConfig
from ..errors import UserError
from .ablations import CONFIGS, parse_configs
from .benchmark import KINDS, BenchmarkStyle
from .degrade import DEGRADATIONS, LEVELS
from .report import METRICS, summarize, summary_table, tradeoff_figure

SET_SIZES = (4, 8, 12, 16)
MAX_SET_SIZE = 64
LAYER_FRACTIONS = tuple(step / 8 for step in range(9))
# Named layer groups per backbone family: (condition name, shared_layers) pairs; a substring or a name filter.
NO_GROUPS = "no named layer groups on this family (SD3: one stack of joint blocks); only the fractions ran"


@dataclass(frozen=True)
class Condition:
    """One arm of an experiment; `columns` go into its rows of results.csv."""

    name: str
    config: Callable[[], StyleAlignedConfig] = StyleAlignedConfig.text_to_image
    set_size: int = 4
    reference: int = 0
    degradation: tuple[str, int] | None = None
    from_source: bool = False  # transfer from the style's own reference image (reference-quality)
    columns: dict = field(default_factory=dict)

    @property
    def transfer(self) -> bool:
        """The ablations' transfer from the user's real reference image."""
        return self.name == "transfer"

    def objects(self, benchmark: list[BenchmarkStyle], index: int) -> list[str]:
        """The set's objects, its reference first (see the module docstring)."""
        own = list(benchmark[index].objects)
        pool = own[self.reference:] + own[:self.reference]
        for style in benchmark[index + 1:] + benchmark[:index]:
            pool += [name for name in style.objects if name not in pool]
        return pool[:self.set_size]


@dataclass(frozen=True)
class Experiment:
    """Its conditions for a backbone, the plot file, and what summary.md adds below the table."""

    name: str
    plot: str
    figure: Callable[[list[dict], dict], Figure]
    section: Callable[[list[dict]], list[str]] = lambda rows: []


def fraction_name(fraction: float) -> str:
    return f"layers-{fraction:.3f}"


def conditions(name: str, backbone, configs: str | None = None, has_reference: bool = False,
               set_sizes: list[int] | None = None) -> list[Condition]:
    """The conditions of experiment `name` on this backbone (None: no backbone check, for early CLI errors)."""
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name}; choose from {', '.join(EXPERIMENTS)}")
    if configs is not None and name != "ablations":
        raise UserError(f"--configs chooses the ablations' configurations; drop it for --experiment {name}")
    if set_sizes is not None and name != "set-size":
        raise UserError(f"--set-sizes is for --experiment set-size; drop it for --experiment {name}")
    if name == "ablations":
        return [Condition(config, CONFIGS[config]) for config in parse_configs(configs, has_reference, backbone)]
    if name == "set-size":
        return [Condition(f"size-{size}", set_size=size, columns={"set_size": size})
                for size in check_set_sizes(set_sizes or list(SET_SIZES))]
    if name == "layer-sweep":
        return layer_conditions(backbone)
    if name == "reference-choice":
        return [Condition(f"reference-{k}", reference=k, columns={"reference_object": k}) for k in range(4)]
    if name == "reference-quality":
        if backbone is not None and backbone.frame_axis is not None:
            raise UserError("reference-quality degrades still images; run it on an image model, not a video one")
        transfer = StyleAlignedConfig.transfer
        return [Condition("clean", transfer, from_source=True, columns={"degradation": "none", "level": 0})] + [
            Condition(f"{kind}-{level}", transfer, degradation=(kind, level), from_source=True,
                      columns={"degradation": kind, "level": level})
            for kind in DEGRADATIONS for level in LEVELS]
    return [Condition("no-share", CONFIGS["no-share"]), Condition("full", CONFIGS["full"])]


def check_set_sizes(sizes: list[int]) -> list[int]:
    if not sizes or any(not 3 <= size <= MAX_SET_SIZE for size in sizes):
        raise UserError(f"--set-sizes must lie between 3 and {MAX_SET_SIZE} (the reference included), got {sizes}")
    return sorted(set(sizes))


def layer_conditions(backbone) -> list[Condition]:
    """The evenly spread fractions, then the family's named groups (with how many layers each shares)."""
    count = len(backbone.attention_layers()) if backbone is not None else 0
    fractions = [Condition(fraction_name(f), _sharing(f), columns={"shared_layers": f, "layers_shared": round(
        f * count)}) for f in LAYER_FRACTIONS]
    groups = [Condition(name, _sharing(layers), columns={"shared_layers": name, "layers_shared": _group_size(
        backbone, layers)}) for name, layers in (backbone.layer_groups() if backbone is not None else [])]
    return fractions + groups


def _sharing(layers) -> Callable[[], StyleAlignedConfig]:
    return lambda: StyleAlignedConfig.text_to_image(shared_layers=layers)


def _group_size(backbone, layers) -> int:
    names = backbone.attention_layers()
    return len([n for n in names if layers in n]) if isinstance(layers, str) else len(layers)


def layer_section(rows: list[dict]) -> list[str]:
    """How many attention layers each condition shares, or why there are no named groups."""
    shared = {row["config"]: row["layers_shared"] for row in rows}
    named = [name for name in shared if not name.startswith("layers-")]
    return ["Attention layers shared: " + ", ".join(f"{name} {count}" for name, count in shared.items()) + ".",
            *([] if named else ["", NO_GROUPS + "."])]


# summary sections and plots


def _metric_axes(figure: Figure, count: int):
    return figure.subplots(1, count, squeeze=False)[0]


def size_figure(rows: list[dict], summary: dict) -> Figure:
    """Each metric against the set size, mean ± std over sets."""
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    sizes = [int(name.removeprefix("size-")) for name in summary]
    for axes, metric in zip(_metric_axes(figure, 3), ["text_alignment", "set_consistency", "diversity"]):
        values = np.array([summary[name][metric] or (np.nan, np.nan) for name in summary])
        axes.errorbar(sizes, values[:, 0], yerr=values[:, 1], fmt="o-", capsize=3)
        axes.set_xscale("log", base=2)
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.set_xlabel("images per set (reference included)")
        axes.set_title(METRICS[metric])
    return figure


def layer_figure(rows: list[dict], summary: dict) -> Figure:
    """The consistency-alignment trade-off curve over the shared fraction, the named groups as separate points."""
    figure = Figure(figsize=(6.5, 4.8), layout="constrained")
    axes = figure.add_subplot()
    curve = [(name, summary[name]) for name in summary if name.startswith("layers-")]
    x = [entry["text_alignment"][0] for _, entry in curve]
    y = [entry["set_consistency"][0] for _, entry in curve]
    axes.plot(x, y, "o-", label="fraction of layers shared")
    for (name, _), x_value, y_value in zip(curve, x, y):
        axes.annotate(name.removeprefix("layers-"), (x_value, y_value), textcoords="offset points", xytext=(4, 4),
                      fontsize="small")
    for name, entry in summary.items():
        if not name.startswith("layers-"):
            axes.plot(entry["text_alignment"][0], entry["set_consistency"][0], "s", markersize=8, label=name)
    axes.set_xlabel("text alignment (CLIP)")
    axes.set_ylabel("set consistency (DINO)")
    axes.legend(fontsize="small")
    return figure


def choice_spread(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """Per metric, over styles: the mean range (max - min over the reference choices), mean std, largest range."""
    spread = {}
    for metric in ["text_alignment", "set_consistency", "diversity"]:
        by_style = {}
        for row in rows:
            if row.get(metric) is not None:
                by_style.setdefault(row["style_index"], []).append(row[metric])
        values = [np.array(v) for v in by_style.values() if len(v) > 1]
        if values:
            ranges = [v.max() - v.min() for v in values]
            spread[metric] = (float(np.mean(ranges)), float(np.mean([v.std() for v in values])), float(max(ranges)))
    return spread


def choice_section(rows: list[dict]) -> list[str]:
    lines = ["## Spread over the choice of reference", "",
             "Per style, each of its 4 objects in turn is the reference; the spread is taken over those 4 sets.", "",
             "| metric | mean range over styles | mean std over styles | largest range |", "|---|---:|---:|---:|"]
    return lines + [f"| {METRICS[metric]} | {r:.3f} | {s:.3f} | {m:.3f} |"
                    for metric, (r, s, m) in choice_spread(rows).items()]


def choice_figure(rows: list[dict], summary: dict) -> Figure:
    """Per style, the metric of each reference choice: the vertical spread is what the choice changes."""
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for axes, metric in zip(_metric_axes(figure, 2), ["text_alignment", "set_consistency"]):
        for name in summary:
            mine = [row for row in rows if row["config"] == name]
            axes.plot([row["style_index"] for row in mine], [row[metric] for row in mine], "o", label=name, alpha=0.7)
        axes.set_xlabel("benchmark style")
        axes.set_title(METRICS[metric])
    axes.legend(fontsize="small")
    return figure


def quality_section(rows: list[dict]) -> list[str]:
    return ["Each style's reference is its first object drawn by the model without sharing; the transfer inverts it "
            "(clean, or degraded) and draws the other 3 objects. Consistency and CSD compare the targets with the "
            "clean reference; the degraded image is saved as image 00 of each set."]


def quality_figure(rows: list[dict], summary: dict) -> Figure:
    """Each metric against the degradation level (0: clean), one line per degradation."""
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    for axes, metric in zip(_metric_axes(figure, 3), ["text_alignment", "set_consistency", "diversity"]):
        clean = summary["clean"][metric] if "clean" in summary else None
        for kind in DEGRADATIONS:
            points = [(0, clean)] + [(level, summary.get(f"{kind}-{level}", {}).get(metric)) for level in LEVELS]
            points = [(level, value) for level, value in points if value is not None]
            axes.errorbar([p[0] for p in points], [p[1][0] for p in points], yerr=[p[1][1] for p in points],
                          fmt="o-", capsize=3, label=kind)
        axes.set_xticks([0, *LEVELS], ["clean", *map(str, LEVELS)])
        axes.set_xlabel("degradation level")
        axes.set_title(METRICS[metric])
    axes.legend(fontsize="small")
    return figure


def _by_kind(row: dict) -> str:
    return f"{row['config']}, {row['kind']}"


def kind_section(rows: list[dict]) -> list[str]:
    counts = {kind: len({row["style_index"] for row in rows if row["kind"] == kind}) for kind in KINDS}
    return ["## Split by style kind", "",
            f"Concrete: a medium or technique ({counts['concrete']} styles); abstract: a mood or aesthetic only "
            f"({counts['abstract']} styles).", "", *summary_table(summarize(rows, _by_kind), "configuration, kind")]


def kind_figure(rows: list[dict], summary: dict) -> Figure:
    return tradeoff_figure(summarize(rows, _by_kind))


EXPERIMENTS = {
    "ablations": Experiment("ablations", "tradeoff.png", lambda rows, summary: tradeoff_figure(summary)),
    "set-size": Experiment("set-size", "set-size.png", size_figure),
    "layer-sweep": Experiment("layer-sweep", "layer-sweep.png", layer_figure, layer_section),
    "reference-choice": Experiment("reference-choice", "reference-choice.png", choice_figure, choice_section),
    "reference-quality": Experiment("reference-quality", "reference-quality.png", quality_figure, quality_section),
    "abstract-vs-concrete": Experiment("abstract-vs-concrete", "abstract-vs-concrete.png", kind_figure, kind_section),
}
PLOTS = {experiment.plot for experiment in EXPERIMENTS.values()}
