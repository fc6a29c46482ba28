"""Two references of different styles, mixed with weights (w, 1 - w), on the built-in model: the share of targets
its classifier sees in the first reference's style should rise with w.

    OMP_NUM_THREADS=1 python benchmarks/multi_reference.py --sets 60 --steps 20 --out runs/multi-reference

Set k: two reference prompts "a {object} in {style} style" with two different styles and objects (styles in
balanced rounds of ordered pairs), and targets "a {object}" naming every other object (seeded RNG). Each set runs
at every weight with the same noise seeds (image i from seed + i, the references at positions 0 and 1), so the
weights are all that differs. Per weight: the share of targets classified in the first style, and in the second,
with 95% percentile-bootstrap intervals over sets (a set's targets share their references). Writes OUT/records.json
(resumable: sets already judged are skipped), OUT/multi-reference.md and .json, and the plot (default
docs/multi-reference.png).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from stylealigned.demo import GUIDANCE, load_judge
from stylealigned.io import write_json_atomic
from stylealigned.models import load_pipeline
from stylealigned.sets import generate_set
from stylealigned.toy.classifier import classify
from stylealigned.toy.world import OBJECTS, STYLES, styled_caption, unstyled_caption

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHARES = {"first": "first style", "second": "second style"}
BOOTSTRAP = 2000


def random_pairs(count: int, seed: int) -> list[dict]:
    """`count` sets: ordered style pairs in shuffled rounds (each pair as often), two reference objects, and the
    remaining objects as targets. Set k is the same whatever `count` is."""
    rng = np.random.default_rng(seed)
    pairs, found = [], []
    for _ in range(count):
        pairs = pairs or [tuple(STYLES[i] for i in pair) for pair in
                          rng.permutation(list(itertools.permutations(range(len(STYLES)), 2)))]
        first, second = (str(o) for o in rng.choice(OBJECTS, size=2, replace=False))
        found.append({"styles": list(pairs.pop()), "objects": [first, second],
                      "targets": [o for o in OBJECTS if o not in (first, second)]})
    return found


def run_set(pipe, classifier, toy: dict, seed: int, steps: int) -> dict:
    """The set at every weight: per weight, how many targets show the first style and the second."""
    references = [styled_caption(o, s) for o, s in zip(toy["objects"], toy["styles"])]
    targets = [unstyled_caption(o) for o in toy["targets"]]
    record = {"references": references, "by_weight": {}}
    for w in WEIGHTS:
        images = generate_set(pipe, targets, references=references, weights=[w, 1 - w], seed=seed,
                              num_inference_steps=steps, guidance_scale=GUIDANCE)
        styles = classify(images, classifier)[1]
        record["by_weight"][str(w)] = {"first": styles[2:].count(toy["styles"][0]),
                                       "second": styles[2:].count(toy["styles"][1]), "targets": len(targets),
                                       "references_right": [s == t for s, t in zip(styles[:2], toy["styles"])]}
    return record


def summarise(records: list[dict]) -> dict:
    """Per weight: the pooled share of targets in each style, with its interval (resampling whole sets)."""
    rng = np.random.default_rng(0)
    picks = rng.integers(len(records), size=(BOOTSTRAP, len(records)))
    summary = {}
    for w in WEIGHTS:
        rows = [record["by_weight"][str(w)] for record in records]
        counts = np.array([row["targets"] for row in rows])
        summary[str(w)] = {}
        for key in SHARES:
            hits = np.array([row[key] for row in rows])
            low, high = np.percentile(hits[picks].sum(1) / counts[picks].sum(1), [2.5, 97.5])
            summary[str(w)][key] = (hits.sum() / counts.sum(), low, high)
    return summary


def table(summary: dict, header: str) -> str:
    lines = [header, "", "| w (first reference) | " + " | ".join(f"targets in {v}" for v in SHARES.values()) + " |",
             "|---:|" + "---|" * len(SHARES)]
    for w, row in summary.items():
        lines.append(f"| {w} | " + " | ".join(f"{r:.2f} [{lo:.2f}, {hi:.2f}]" for r, lo, hi in row.values()) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, sets: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    weights = [float(w) for w in summary]
    for key, label in SHARES.items():
        rates = np.array([summary[w][key] for w in summary])
        axis.errorbar(weights, rates[:, 0], yerr=[rates[:, 0] - rates[:, 1], rates[:, 2] - rates[:, 0]],
                      marker="o", capsize=3, label=f"targets in the {label}")
    axis.set_xticks(weights)
    axis.set_ylim(0, 1)
    axis.set_xlabel("weight w of the first reference (the second: 1 - w)")
    axis.set_ylabel("fraction of targets (95% interval)")
    axis.set_title(f"Two references on the built-in model ({sets} sets)")
    axis.legend(loc="upper center")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=60, help="sets (each run at every weight)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0, help="set composition and noise seeds")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--out", type=Path, default=Path("runs/multi-reference"))
    parser.add_argument("--plot", type=Path, default=Path("docs/multi-reference.png"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "records.json"
    parameters = {"steps": args.steps, "seed": args.seed}
    stored = json.loads(saved.read_text()) if saved.exists() else {"parameters": parameters, "records": []}
    if stored["parameters"] != parameters:
        parser.error(f"{args.out} holds a run with other parameters; choose another --out")
    records = stored["records"]
    pipe = load_pipeline("builtin", device=args.device)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_judge()
    toys = random_pairs(args.sets, args.seed)
    for index in range(len(records), args.sets):
        started = time.perf_counter()
        records.append(run_set(pipe, classifier, toys[index], args.seed + index * (len(OBJECTS) + 1), args.steps))
        write_json_atomic(saved, stored)
        print(f"set {index + 1}/{args.sets}: {time.perf_counter() - started:.0f} s", flush=True)
    records = records[:args.sets]
    summary = summarise(records)
    references_right = np.mean([r for record in records for row in record["by_weight"].values()
                                for r in row["references_right"]])
    header = (f"Two references on the built-in model: {len(records)} sets of 2 references + "
              f"{len(OBJECTS) - 2} targets, {args.steps} DDIM steps, guidance {GUIDANCE:g}; the references show "
              f"their prompted style in {references_right:.2f} of cases; rate [95% bootstrap interval over sets].")
    text = table(summary, header)
    (args.out / "multi-reference.md").write_text(text)
    write_json_atomic(args.out / "multi-reference.json", summary)
    plot(summary, len(records), args.plot)
    print(text)


if __name__ == "__main__":
    main()
