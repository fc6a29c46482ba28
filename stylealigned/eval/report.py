"""The runner's outputs: results.csv (one row per set), summary.md (mean ± std per configuration), a plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..io import write_atomic

COLUMNS = ["config", "style_index", "style", "kind", "seed", "text_alignment", "set_consistency",
           "set_consistency_includes_reference", "diversity", "folder"]
# An experiment's own columns, written when its rows have them.
EXTRA_COLUMNS = ["layout_copying", "temporal_consistency", "csd_style_similarity", "set_size", "shared_layers",
                 "layers_shared", "reference_object", "degradation", "level"]
METRICS = {"text_alignment": "text alignment", "set_consistency": "set consistency", "diversity": "diversity",
           "layout_copying": "layout copying",
           "temporal_consistency": "temporal consistency", "csd_style_similarity": "CSD style similarity"}
# The paper's Table 1, full method on SDXL over its 100 styles x 4 objects.
PAPER_FULL = {"text_alignment": (0.287, 0.03), "set_consistency": (0.51, 0.14)}


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    return (float(np.mean(values)), float(np.std(values))) if values else None


def summarize(rows: list[dict], group=lambda row: row["config"]) -> dict[str, dict]:
    """Per group (default: configuration), in first-seen order: number of sets, and (mean, std over sets) of each
    metric (None where no row has it)."""
    summary = {}
    for name in dict.fromkeys(group(row) for row in rows):
        mine = [row for row in rows if group(row) == name]
        summary[name] = {"sets": len(mine)} | {
            metric: _mean_std([row[metric] for row in mine if row.get(metric) is not None]) for metric in METRICS}
    return summary


def results_csv(rows: list[dict]) -> str:
    columns = COLUMNS + [column for column in EXTRA_COLUMNS if any(column in row for row in rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value: tuple[float, float] | None) -> str:
    return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def summary_table(summary: dict[str, dict], first: str = "configuration", paper: bool = False) -> list[str]:
    """Markdown rows: sets and mean ± std of each metric that some group has, optionally the paper's row last."""
    metrics = [metric for metric in METRICS if metric in PAPER_FULL or any(e[metric] for e in summary.values())]
    lines = [f"| {first} | sets | " + " | ".join(METRICS[metric] for metric in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for name, entry in summary.items():
        lines.append(f"| {name} | {entry['sets']} | " + " | ".join(_cell(entry[metric]) for metric in metrics) + " |")
    if paper:
        cells = [f"{PAPER_FULL[m][0]} ± {PAPER_FULL[m][1]}" if m in PAPER_FULL else "–" for m in metrics]
        lines.append("| paper: full (SDXL, Hertz et al. 2023) | 100 | " + " | ".join(cells) + " |")
    return lines


def summary_markdown(summary: dict[str, dict], settings: dict, section: list[str] = ()) -> str:
    """The paper-style table, our configurations first and the paper's full method last, then `section`."""
    csd = any(entry["csd_style_similarity"] for entry in summary.values())
    clips = any(entry["temporal_consistency"] for entry in summary.values())
    lines = [
        "# StyleAligned evaluation", "",
        *(f"- {key}: `{value}`" for key, value in settings.items()), "",
        "Text alignment: CLIP cosine between each image and its object prompt (no style text), mean over the set.",
        "Set consistency: mean pairwise DINO cosine within a set, reference included.",
        "Diversity: mean pairwise DINO distance (1 - cosine) among the targets only, reference excluded.",
        *(["Sets of clips: both per frame (text alignment over every frame; set consistency among the clips' frames "
           "at each index). Temporal consistency: mean DINO cosine of neighbouring frames within a clip, mean over "
           "the set's clips."] if clips else []),
        *(["CSD style similarity: mean cosine of CSD style descriptors (Somepalli et al. 2024) between the "
           f"reference and each target, from `{settings.get('csd_model')}`."] if csd else []),
        "± is the std over sets.", "",
        *summary_table(summary, paper=True), *(["", *section] if section else []),
    ]
    return "\n".join(lines) + "\n"


def tradeoff_figure(summary: dict[str, dict]) -> Figure:
    """Set consistency against text alignment, one point with std error bars per configuration, plus the paper's."""
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for config, entry in [*summary.items(), ("paper: full (SDXL)", PAPER_FULL)]:
        (x, x_std), (y, y_std) = entry["text_alignment"], entry["set_consistency"]
        marker = "*" if config.startswith("paper") else "o"
        axes.errorbar(x, y, xerr=x_std, yerr=y_std, fmt=marker, capsize=3, markersize=8, label=config)
    axes.set_xlabel("text alignment (CLIP)")
    axes.set_ylabel("set consistency (DINO)")
    axes.legend(fontsize="small")
    return figure


def write_reports(out: Path, rows: list[dict], settings: dict, plot: str = "tradeoff.png", figure=None,
                  section: list[str] = ()) -> None:
    """Write results.csv, summary.md (with the experiment's `section`) and the plot `plot`, drawn by
    `figure(rows, summary)` (default: the trade-off of every configuration), into `out`, each atomically."""
    summary = summarize(rows)
    drawn = figure(rows, summary) if figure else tradeoff_figure(summary)
    write_atomic(out / "results.csv", lambda file: file.write(results_csv(rows).encode()))
    write_atomic(out / "summary.md", lambda file: file.write(summary_markdown(summary, settings, section).encode()))
    write_atomic(out / plot, lambda file: drawn.savefig(file, format="png", dpi=120))
