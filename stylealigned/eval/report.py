"""The runner's outputs: results.csv (one row per set), summary.md (mean ± std per configuration), tradeoff.png."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..io import write_atomic

COLUMNS = ["config", "style_index", "style", "seed", "text_alignment", "set_consistency",
           "set_consistency_includes_reference", "folder"]
# The paper's Table 1, full method on SDXL over its 100 styles x 4 objects.
PAPER_FULL = {"text_alignment": (0.287, 0.03), "set_consistency": (0.51, 0.14)}


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per configuration, in first-seen order: number of sets, and (mean, std over sets) of both metrics."""
    summary = {}
    for config in dict.fromkeys(row["config"] for row in rows):
        mine = [row for row in rows if row["config"] == config]
        summary[config] = {"sets": len(mine)} | {
            metric: (float(np.mean([row[metric] for row in mine])), float(np.std([row[metric] for row in mine])))
            for metric in PAPER_FULL
        }
    return summary


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary_markdown(summary: dict[str, dict], settings: dict) -> str:
    """The paper-style table, our configurations first and the paper's full method last."""
    lines = [
        "# StyleAligned evaluation", "",
        *(f"- {key}: `{value}`" for key, value in settings.items()), "",
        "Text alignment: CLIP cosine between each image and its object prompt (no style text), mean over the set.",
        "Set consistency: mean pairwise DINO cosine within a set, reference included. ± is the std over sets.", "",
        "| configuration | sets | text alignment | set consistency |",
        "|---|---:|---:|---:|",
    ]
    for config, entry in summary.items():
        cells = [f"{entry[metric][0]:.3f} ± {entry[metric][1]:.3f}" for metric in PAPER_FULL]
        lines.append(f"| {config} | {entry['sets']} | {cells[0]} | {cells[1]} |")
    paper = [f"{mean} ± {std}" for mean, std in PAPER_FULL.values()]
    lines.append(f"| paper: full (SDXL, Hertz et al. 2023) | 100 | {paper[0]} | {paper[1]} |")
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


def write_reports(out: Path, rows: list[dict], settings: dict) -> None:
    """Write results.csv, summary.md and tradeoff.png into `out`, each atomically."""
    summary = summarize(rows)
    write_atomic(out / "results.csv", lambda file: file.write(results_csv(rows).encode()))
    write_atomic(out / "summary.md", lambda file: file.write(summary_markdown(summary, settings).encode()))
    write_atomic(out / "tradeoff.png", lambda file: tradeoff_figure(summary).savefig(file, format="png", dpi=120))
