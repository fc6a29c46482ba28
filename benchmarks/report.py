"""`benchmarks/speed.py --report`: every table of docs/performance.md in one run, with plots of time per image.

    OMP_NUM_THREADS=2 python benchmarks/speed.py --report [--device cpu|cuda] [--repeats N] [--quick]

On a CPU: SD1.5's UNet at full size (random weights, fp32). One denoising step at 256² and 512² with sets of
B = 2, 4, 8 images in one batch (UNet batch 2 x B under classifier-free guidance): vanilla diffusers, the floor
(benchmarks/floor.py), `apply` with the text-to-image and the transfer presets; then `generate_set` with batch
size 4 against vanilla (4 prompts per call) and the chunked floor, at 16 and 64 images, 256², per image and step.
On a GPU: the same steps for SDXL at 1024² in fp16 and FLUX.1-dev at full depth, 1024², bf16, and the sets on
SDXL. Methods take turns within each repeat (medians); see benchmarks/speed.py for what each column means.

Each device's section of docs/performance.md is rewritten and the other device's kept, so a CPU run and a GPU run
fill one file. `--quick` runs every table on tiny settings (SD1.5-lite, 64², few images) to check the command.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import torch

from benchmarks.speed import Measurement, benchmark, build, describe, legend, parsed, report

DOCS = Path(__file__).resolve().parents[1] / "docs"
STEP_METHODS = ("vanilla", "floor", "apply", "transfer")
SET_METHODS = ("vanilla", "floor_chunked", "generate_set")
Results = dict[tuple[int, str], Measurement]


@dataclass(frozen=True)
class Section:
    """One table: `model` at `resolution` taking one step per set size in one batch (`sets`: each size a whole
    set through generate_set in chunks of `batch_size`), medians of `repeats` timed runs per method."""

    title: str
    model: str
    resolution: int
    sizes: tuple[int, ...]
    sets: bool = False
    batch_size: int = 4
    steps: int = 1
    repeats: int = 1


PLANS = {
    "cpu": [Section("One denoising step, SD1.5 UNet", "sd15", 256, (2, 4, 8), repeats=5),
            Section("One denoising step, SD1.5 UNet", "sd15", 512, (2, 4, 8), repeats=5),
            Section("Large sets: generate_set, SD1.5 UNet", "sd15", 256, (16, 64), sets=True)],
    "cuda": [Section("One denoising step, SDXL UNet, fp16", "sdxl", 1024, (2, 4, 8)),
             Section("One denoising step, FLUX.1-dev transformer (19 + 38 blocks), bf16", "flux", 1024, (2, 4, 8)),
             Section("Large sets: generate_set, SDXL UNet, fp16", "sdxl", 1024, (16, 64), sets=True, steps=4)],
}
QUICK = {"cpu": [Section("One denoising step, SD1.5-lite UNet (quick check)", "sd15-lite", 64, (2, 3), repeats=2),
                 Section("Large sets: generate_set, SD1.5-lite UNet (quick check)", "sd15-lite", 64, (6, 10),
                         sets=True)]}
QUICK["cuda"] = QUICK["cpu"]


def measure(section: Section, device: str, repeats: int | None) -> tuple[Results, argparse.Namespace, str]:
    """The section's measurements (`repeats`, if given, instead of the section's), the options they ran with, and
    what was measured."""
    results: Results = {}
    pipe = None
    for size in section.sizes:
        batch = section.batch_size if section.sets else size  # one batch: vanilla also takes the B images at once
        argv = ["--model", section.model, "--device", device, "--resolution", str(section.resolution), "--sizes",
                str(size), "--batch-size", str(batch), "--steps", str(section.steps), "--repeats",
                str(repeats or section.repeats)]
        args, torch_device, dtype = parsed(argv)
        pipe = pipe or build(args, torch_device, dtype)
        results |= benchmark(pipe, args, torch_device, SET_METHODS if section.sets else STEP_METHODS)
        print(f"  {section.model} {section.resolution}² {size} images: done", flush=True)
    args.sizes = list(section.sizes)
    if not section.sets:
        args.batch_size = "B"  # the table's "bs" label: the set's own size
    what = describe(pipe, args, torch_device, dtype).replace("batch_size B", "each set in one batch")
    return results, args, what


def machine(device: torch.device) -> str:
    """The device and the versions measured with."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text()) if cpuinfo.exists() else None
        name = f"{found.group(1) if found else platform.processor() or 'CPU'}, torch threads {torch.get_num_threads()}"
    return (f"{name}; torch {torch.__version__}, diffusers {diffusers.__version__}, Python "
            f"{platform.python_version()}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def plot(tables: list[tuple[Section, Results, argparse.Namespace]], path: Path) -> None:
    """Time per image and step against the number of images, one panel per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(4.5 * len(tables), 3.6), squeeze=False)
    for ax, (section, results, args) in zip(axes[0], tables):
        for method in SET_METHODS if section.sets else STEP_METHODS:
            ms = [1000 * results[size, method].denoiser_seconds / args.steps / size for size in section.sizes]
            ax.plot(section.sizes, ms, marker="o", label=method)
        chunks = f" (sets, chunks of {section.batch_size})" if section.sets else ""
        ax.set_title(f"{section.model}, {section.resolution}²{chunks}", fontsize=9)
        ax.set_xlabel("images in the set")
        ax.set_ylabel("ms per image per step")
        ax.set_xticks(section.sizes)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section_text(device: torch.device, plan: list[Section], repeats: int | None, folder: Path) -> str:
    """Markdown for one device: what ran where, the tables and the plot."""
    started = time.perf_counter()
    tables, lines = [], []
    for section in plan:
        print(f"{section.title}, {section.resolution}²", flush=True)
        results, args, what = measure(section, str(device), repeats)
        tables.append((section, results, args))
        methods = SET_METHODS if section.sets else STEP_METHODS
        lines += [f"### {section.title}, {section.resolution}²", "", what, "", *report(results, args, methods), ""]
    image = f"performance-{device.type}.png"
    plot(tables, folder / image)
    minutes = (time.perf_counter() - started) / 60
    return "\n".join([f"Measured on {machine(device)}, in {minutes:.1f} minutes.", "", legend(device) + ".", "",
                      *lines, f"![time per image and step against set size]({image})", ""])


def no_gpu_text() -> str:
    return ("No GPU was lent to the run that wrote this file, so nothing here is measured yet. On a machine with "
            "one, `python benchmarks/speed.py --report --device cuda` fills this section (SDXL at 1024² in fp16 and "
            "FLUX.1-dev in bf16: one step with sets of 2, 4 and 8 images, and generate_set at 16 and 64 images) and "
            "keeps the CPU's. The GPU code paths (fp16 / bf16 kernels, the key bias as a head channel) are tested "
            "on the CPU.\n")


HEADER = """# Performance

Written by `benchmarks/speed.py --report` (benchmarks/report.py): one section per device, each from one run in
which the methods take turns, so that the ratios to vanilla diffusers and to the *floor* (the plain model plus only
the reference keys targets must attend to, `benchmarks/floor.py`) come from the same conditions. StyleAligned's
target is the floor within 3 %. Models have random weights, which cost the same as trained ones.
"""


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace the `key` section of the markdown file (kept between markers), keeping the other sections."""
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- section {key} -->\n## {title}\n\n{body}<!-- /section {key} -->\n"
    pattern = re.compile(rf"<!-- section {key} -->.*?<!-- /section {key} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str]) -> None:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    options.add_argument("--repeats", type=int, default=None,
                         help="timed runs per method, for every table (default: 5 for CPU steps, else 1)")
    options.add_argument("--quick", action="store_true", help="tiny settings, to check the command in a few minutes")
    options.add_argument("--out", type=Path, default=DOCS / "performance.md")
    args = options.parse_args(argv)
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    plans = QUICK if args.quick else PLANS
    started = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    body = section_text(device, plans[kind], args.repeats, args.out.parent)
    write_section(args.out, kind, "GPU" if kind == "cuda" else "CPU", body)
    if kind == "cpu" and "<!-- section cuda -->" not in args.out.read_text():
        write_section(args.out, "cuda", "GPU", no_gpu_text())
    print(f"wrote {args.out} in {(time.perf_counter() - started) / 60:.1f} minutes")
