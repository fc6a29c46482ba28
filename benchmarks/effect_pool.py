"""Pool effect.py runs made on different seeds into one estimate per arm.

    python benchmarks/effect_pool.py runs/flux56k/heldout-* > runs/flux56k/pooled.md

One held-out seed of 100 sets measures a rate to about ±0.04; several seeds pooled measure it to the precision of
all their sets. For each arm: the rate over every set of every run, with its 95% percentile-bootstrap interval
(resampling sets across runs, as effect.py does within one), then each run's own style agreement, object accuracy
and content leakage, one row per seed. The runs must agree on everything but their seed and number of sets (the
model's training, steps, guidance, experiment, every arm's resolved configuration) and each needs the records.json
that effect.py writes with its report (for a run made before it did: `python benchmarks/effect.py ... --out RUN
--report-only`, the run's own arguments). Prints markdown; it reads no images, so it takes seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from effect import summarise, table

PER_RUN = {"style_agrees": "style", "object_right": "objects", "leaks": "leakage"}


def read_run(run: Path) -> tuple[dict, dict]:
    """A run's parameters.json and records.json, or a one-line refusal naming what is missing and the fix."""
    files = {name: run / f"{name}.json" for name in ("parameters", "records")}
    if not files["parameters"].is_file():
        raise SystemExit(f"error: {run} is not an effect.py run (no parameters.json); give effect.py's --out folders")
    if not files["records"].is_file():
        raise SystemExit(f"error: {run} has no records.json; write it with effect.py's --report-only and the run's "
                         f"own arguments (--out {run})")
    parameters, records = (json.loads(path.read_text()) for path in files.values())
    if not records["records"]:
        raise SystemExit(f"error: {run} has no judged sets yet; let effect.py finish a round there first")
    return parameters, records


def setup(parameters: dict, records: dict) -> dict:
    """What must match for runs to pool: their parameters but the seed, with the model known by its training
    (training.json) rather than its folder's name, so that copies of one model pool."""
    return {"trained": records["trained"], **{key: value for key, value in parameters.items()
                                               if key not in ("seed", "model")}}


def pool(runs: list[Path]) -> str:
    """The pooled report (markdown) of `runs`: refuses runs of different setups or of one seed twice."""
    if len(runs) < 2:
        raise SystemExit("error: give two or more effect.py runs to pool")
    first, seeds, pooled, per_run = None, [], [], []
    for run in runs:
        parameters, records = read_run(run)
        mine = setup(parameters, records)
        if first is None:
            first = (run, mine, records["about"])
        elif mine != first[1]:
            differ = sorted(key for key in mine.keys() | first[1].keys() if mine.get(key) != first[1].get(key))
            raise SystemExit(f"error: {run} and {first[0]} were made differently ({', '.join(differ)}); pool runs "
                             "that differ only in their seed")
        if parameters["seed"] in seeds:
            raise SystemExit(f"error: seed {parameters['seed']} is given twice ({run}); pool each seed once")
        seeds.append(parameters["seed"])
        pooled += [{**record, "set": (parameters["seed"], record["set"])} for record in records["records"]]
        per_run.append((parameters["seed"], summarise(records["records"])))
    arms = list(dict.fromkeys(record["config"] for record in pooled))
    header = (f"{first[2]} Pooled over {len(runs)} runs (seeds {', '.join(map(str, seeds))}); intervals "
              "resample sets across runs.")
    rows = ["| seed | sets | " + " | ".join(f"{arm}: {' / '.join(PER_RUN.values())}" for arm in arms) + " |",
            "|---|---:|" + "---|" * len(arms)]
    for seed, summary in per_run:
        sets = max(row["sets"] for row in summary.values())
        rows.append(f"| {seed} | {sets} | " + " | ".join(
            " / ".join(f"{summary[arm][key][0]:.3f}" for key in PER_RUN) if arm in summary else "-" for arm in arms)
            + " |")
    return table(summarise(pooled), header) + "\nEach run alone:\n\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="effect.py --out folders, one per seed")
    print(pool(parser.parse_args().runs), end="")


if __name__ == "__main__":
    main()
