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
effect.png, so an interrupted run still reports all configurations on equal footing. --report-only judges them
again (with a newer classifier, say) without generating.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stylealigned.demo import GUIDANCE, TARGETS, ToySet, draw_reference, generate, judge, load_judge, random_sets
from stylealigned.eval.ablations import CONFIGS
from stylealigned.errors import UserError
from stylealigned.io import save_png, write_json_atomic
from stylealigned.models import load_pipeline

CONFIGURATIONS = ["no-share", "full", "no-adain", "full-attention-share", "shared-layers-0.5", "transfer"]
METRICS = {"style_agrees": "style agreement", "object_right": "object accuracy", "leaks": "content leakage",
           "seen_agrees": "agreement with reference as classified"}
BOOTSTRAP = 2000


def set_files(out: Path, name: str, index: int) -> list[Path]:
    """Where set `index` under configuration `name` is kept: the reference (0) and the targets."""
    return [out / "images" / name / f"{index:03d}-{position}.png" for position in range(TARGETS + 1)]


def generate_round(pipe, toy_set: ToySet, index: int, args) -> None:
    """Set `index` under every configuration not yet on disk (PNGs are written atomically: present = complete)."""
    seed = args.seed + index * (TARGETS + 1)
    for name in CONFIGURATIONS:
        files = set_files(args.out, name, index)
        if all(file.exists() for file in files):
            continue
        drawn = draw_reference(toy_set, seed) if name == "transfer" else None
        reference, targets = generate(pipe, toy_set, CONFIGS[name](), seed, args.steps, drawn=drawn)
        files[0].parent.mkdir(parents=True, exist_ok=True)
        for position, (file, image) in enumerate(zip(files, [reference, *targets])):
            save_png(image, file, {"config": name, "set": index, "position": position, "seed": seed + position,
                                   "prompt": ([toy_set.reference_prompt] + toy_set.target_prompts)[position]})


def read_image(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def judge_sets(out: Path, toy_sets: list[ToySet], classifier) -> list[dict]:
    """Every set on disk under all configurations, judged: the reference's own style and each target's verdicts."""
    records = []
    for index, toy_set in enumerate(toy_sets):
        files = {name: set_files(out, name, index) for name in CONFIGURATIONS}
        if not all(file.exists() for paths in files.values() for file in paths):
            continue
        for name, paths in files.items():
            images = [read_image(file) for file in paths]
            reference, targets = judge(toy_set, images[:1], classifier)[0], judge(toy_set, images[1:], classifier)
            for verdict in targets:
                verdict["seen_agrees"] = verdict["style"] == reference["style"]
            records.append({"config": name, "set": index, "reference_style_right": reference["style_agrees"],
                            "verdicts": targets})
    return records


def interval(per_set: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """The pooled rate over sets and its 95% percentile-bootstrap interval (resampling whole sets)."""
    picks = rng.integers(len(per_set), size=(BOOTSTRAP, len(per_set)))
    rates = per_set[picks].sum(1) / counts[picks].sum(1)
    low, high = np.percentile(rates, [2.5, 97.5])
    return per_set.sum() / counts.sum(), low, high


def summarise(records: list[dict]) -> dict:
    """Per configuration: sets, and each metric's rate with its interval (plus the references' own style rate)."""
    rng = np.random.default_rng(0)
    summary = {}
    for name in CONFIGURATIONS:
        mine = [r for r in records if r["config"] == name]
        if not mine:
            continue
        counts = np.array([len(r["verdicts"]) for r in mine])
        summary[name] = {"sets": len(mine), **{
            key: interval(np.array([sum(v[key] for v in r["verdicts"]) for r in mine]), counts, rng)
            for key in METRICS}}
        summary[name]["reference_style"] = float(np.mean([r["reference_style_right"] for r in mine]))
    return summary


def table(summary: dict, header: str) -> str:
    """The markdown report: one row per configuration, rate [95% interval] per metric."""
    lines = [header, "", "| configuration | sets | " + " | ".join(METRICS.values()) + " | reference shows its style |",
             "|---|---:|" + "---|" * len(METRICS) + "---:|"]
    for name, row in summary.items():
        cells = [f"{rate:.2f} [{low:.2f}, {high:.2f}]" for rate, low, high in (row[key] for key in METRICS)]
        lines.append(f"| {name} | {row['sets']} | " + " | ".join(cells) + f" | {row['reference_style']:.2f} |")
    return "\n".join(lines) + "\n"


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


def report(out: Path, toy_sets: list[ToySet], header: str) -> str:
    """Judge what is on disk with the shipped classifier; write effect.md, effect.json and effect.png."""
    summary = summarise(judge_sets(out, toy_sets, load_judge()))
    text = "\n".join([table(summary, header), *checks(summary)]) + "\n"
    (out / "effect.md").write_text(text)
    write_json_atomic(out / "effect.json", summary)
    plot(summary, out / "effect.png")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=100, help="sets per configuration")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0, help="set composition and noise seeds")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--model", default="builtin", help="'builtin' or a copy of its folder")
    parser.add_argument("--out", type=Path, default=Path("runs/effect"))
    parser.add_argument("--report-only", action="store_true", help="judge the sets on disk again; generate none")
    parser.add_argument("--report-every", type=int, default=10, help="rounds between interim reports")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    parameters = {"steps": args.steps, "seed": args.seed, "model": args.model}
    record = args.out / "parameters.json"
    if record.exists() and json.loads(record.read_text()) != parameters:
        parser.error(f"{args.out} holds a run with other parameters ({record}); choose another --out")
    write_json_atomic(record, parameters)
    pipe = load_pipeline(args.model, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    training = Path(pipe.name_or_path) / "training.json"
    trained = json.loads(training.read_text()).get("unet_steps", "?") if training.exists() else "?"
    header = (f"Built-in model after {trained} UNet training steps; {args.steps} DDIM steps, guidance {GUIDANCE:g}, "
              f"{TARGETS} targets per set; rate [95% bootstrap interval over sets].")
    toy_sets = random_sets(args.sets, args.seed)
    for index, toy_set in enumerate([] if args.report_only else toy_sets):
        started = time.perf_counter()
        generate_round(pipe, toy_set, index, args)
        print(f"set {index + 1}/{args.sets} under {len(CONFIGURATIONS)} configurations: "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        if (index + 1) % args.report_every == 0:
            try:
                report(args.out, toy_sets, header)
            except UserError as error:  # the classifier may be installed while the run goes on
                print(f"no interim report: {error}", flush=True)
    print(report(args.out, toy_sets, header))


if __name__ == "__main__":
    main()
