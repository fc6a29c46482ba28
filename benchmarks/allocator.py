"""What keeping freed CPU memory saves (`stylealigned.keep_freed_memory`, which the CLI calls): one denoising step
of SD1.5's UNet (full size, random weights, fp32) for vanilla diffusers and `apply`, with glibc's allocator as it
comes and with freed memory kept, each in its own process, the processes taking turns; medians.

    OMP_NUM_THREADS=2 python benchmarks/allocator.py [--resolution 256] [--size 4] [--repeats 3]   # ~6 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks.*

import stylealigned as sa  # noqa: E402
from stylealigned.cpu_memory import OPT_OUT  # noqa: E402

METHODS = ("vanilla", "apply")
MODES = {"glibc as it comes": "0", "freed memory kept": "1"}


def child(resolution: int, size: int) -> dict:
    """In this process (allocator already chosen): per method, the denoiser's seconds and the minor page faults of
    one timed step after a warm-up, and the process's peak resident memory."""
    from benchmarks.speed import build, parsed, peak_bytes, set_prompts, timed

    sa.keep_freed_memory()
    args, device, dtype = parsed(["--model", "sd15", "--device", "cpu", "--resolution", str(resolution), "--sizes",
                                  str(size), "--batch-size", str(size), "--steps", "1"])
    pipe, prompts, result = build(args, device, dtype), set_prompts(size), {}
    for method in METHODS:
        peak_bytes(method, pipe, prompts, args, device)  # warm-up
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = timed(method, pipe, prompts, args, device)[0]
        result[method] = (seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def main(argv: list[str]) -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--resolution", type=int, default=256)
    options.add_argument("--size", type=int, default=4, help="images in the set, all in one batch")
    options.add_argument("--repeats", type=int, default=3, help="processes per allocator setting")
    options.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = options.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.resolution, args.size)))
        return
    runs = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in list(MODES)[repeat % 2:] + list(MODES)[:repeat % 2]:
            command = [sys.executable, __file__, "--child", "--resolution", str(args.resolution), "--size",
                       str(args.size)]
            out = subprocess.run(command, env=os.environ | {OPT_OUT: MODES[mode]}, capture_output=True, text=True,
                                 check=True).stdout
            runs[mode].append(json.loads(out.splitlines()[-1]))
    print(f"SD1.5 UNet, {args.resolution}², {args.size} images in one batch, one step, medians of {args.repeats} "
          f"processes, {os.environ.get('OMP_NUM_THREADS', 'all')} threads\n")
    print("| allocator | " + " | ".join(f"{m} s/step | x as it comes | {m} minor faults" for m in METHODS)
          + " | peak resident GiB |")
    print("|---|" + "---:|---:|---:|" * len(METHODS) + "---:|")
    base = {m: statistics.median(run[m][0] for run in runs["glibc as it comes"]) for m in METHODS}
    for mode, results in runs.items():
        cells = []
        for method in METHODS:
            seconds = statistics.median(run[method][0] for run in results)
            faults = statistics.median(run[method][1] for run in results)
            cells.append(f"{seconds:.3f} | {seconds / base[method]:.3f} | {faults:,.0f}")
        rss = statistics.median(run["rss"] for run in results) / 2**30
        print(f"| {mode} | " + " | ".join(cells) + f" | {rss:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
