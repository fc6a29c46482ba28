"""Per-step time and peak memory of style-aligned sets against vanilla diffusers generating the same images.

    python benchmarks/speed.py --device cpu  [--sizes 4,16] [--batch-size 4] [--steps 2] [--model sd15-lite]
    python benchmarks/speed.py --device cuda [--sizes 4,16,64] [--batch-size 4] [--steps 10]   # SDXL, 1024², fp16

A set of N images is 1 reference + N-1 targets; every method gets the same prompts and starting noise:
  vanilla       the plain pipeline, `batch_size` prompts per call (the memory budget of generate_set);
  apply         `stylealigned.apply`, all N images in one pipeline call;
  generate_set  `stylealigned.generate_set(..., batch_size=...)`: the reference once per step, targets in chunks.
All three produce latents decoded `batch_size` at a time by `stylealigned.sets.decode` (as generate_set does), so
the VAE costs the same everywhere and `apply` can reach 64 images at 1024² on one GPU.

Time: the UNet's forward calls per denoising step (GPU-synchronised), and the whole run (text encoding and decoding
included). Memory: the peak above what was allocated before the run: CUDA's allocator statistics on a GPU, live
tensor storages on CPU (benchmarks/common.py), so one process measures every run without them polluting each other.

Models have random weights, which cost the same as trained ones. `sdxl` (the GPU default): SDXL-base's UNet, VAE
and both text encoders at full size. `sd15-lite` (the CPU default): SD1.5's UNet with half the channels and one
layer per block; `sd15`: SD1.5's UNet at full size. Both SD1.5 variants use a small VAE and a one-layer text
encoder: the loop timed is the UNet's. On CPU, size 64 is left out by default: with sd15-lite it adds about
7 minutes per repeat on 2 cores (`--sizes 4,16,64 --repeats 1`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks.common

import stylealigned as sa  # noqa: E402
from benchmarks.common import (MIB, SD15_LITE, peak_memory, peak_memory_method, random_sd15, random_sdxl,  # noqa: E402
                               synchronize)
from stylealigned.models import resolve_device, resolve_dtype  # noqa: E402
from stylealigned.sets import decode, generate_set, initial_noise  # noqa: E402

STYLE = "in watercolor style"
SUBJECTS = "house cat dog tree car bird boat chair lamp flower mountain castle apple horse clock bridge".split()
MODELS = {  # name: (description, resolution)
    "sdxl": ("SDXL-base architecture: UNet, VAE, CLIP-L and bigG text encoders at full size", 1024),
    "sd15": ("SD1.5 UNet at full size; small VAE, one-layer text encoder", 256),
    "sd15-lite": ("SD1.5 UNet with half the channels (160-320-640-640) and one layer per block; small VAE, "
                  "one-layer text encoder", 256),
}
METHODS = ("vanilla", "apply", "generate_set")


def set_prompts(size: int) -> list[str]:
    """The reference prompt and size - 1 target prompts, all in one style."""
    return [f"a {SUBJECTS[i % len(SUBJECTS)]} {STYLE}" for i in range(size)]


def build(model: str, device: torch.device, dtype: torch.dtype):
    words = SUBJECTS + f"a {STYLE}".split()
    if model == "sdxl":
        pipe = random_sdxl(words, device)
    else:
        lite = SD15_LITE if model == "sd15-lite" else {}
        pipe = random_sd15(words, lite, device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_in_batches(pipe, latents: torch.Tensor, batch_size: int) -> list:
    return [image for part in latents.split(batch_size) for image in decode(pipe, part)]


def run_method(method: str, pipe, prompts: list[str], args) -> None:
    """Generate the set's images with one method (images are discarded)."""
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
                  width=args.resolution)
    if method == "generate_set":
        generate_set(pipe, prompts, seed=0, batch_size=args.batch_size, **kwargs)
        return
    noise = initial_noise(pipe, range(len(prompts)), 0, args.resolution, args.resolution)
    if method == "apply":
        with sa.apply(pipe):
            latents = pipe(prompts, latents=noise, output_type="latent", **kwargs).images
    else:
        latents = torch.cat([pipe(prompts[s:s + args.batch_size], latents=noise[s:s + args.batch_size],
                                  output_type="latent", **kwargs).images
                             for s in range(0, len(prompts), args.batch_size)])
    decode_in_batches(pipe, latents, args.batch_size)


class ForwardClock:
    """Seconds a module spends in its forward calls (synchronised on a GPU), through forward hooks."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.seconds, self.device = 0.0, device
        self._hooks = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, module, args) -> None:
        synchronize(self.device)
        self._started = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._started

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclass
class Measurement:
    unet_seconds: float
    total_seconds: float
    peak_bytes: int


def measure(method: str, pipe, prompts: list[str], args, device: torch.device) -> Measurement:
    clock = ForwardClock(pipe.unet, device)
    try:
        with peak_memory(device) as peak:
            start = time.perf_counter()
            run_method(method, pipe, prompts, args)
            synchronize(device)
            total = time.perf_counter() - start
    finally:
        clock.remove()
    return Measurement(clock.seconds, total, peak.bytes)


def benchmark(pipe, args, device: torch.device) -> dict[tuple[int, str], Measurement]:
    """Medians over repeats for every (size, method), methods taking turns so load drifts hit all alike."""
    warmup = argparse.Namespace(**vars(args) | dict(steps=1))
    for method in METHODS:
        measure(method, pipe, set_prompts(args.batch_size + 2), warmup, device)
    results = {}
    for size in args.sizes:
        runs = {method: [] for method in METHODS}
        for _ in range(args.repeats):
            for method in METHODS:
                runs[method].append(measure(method, pipe, set_prompts(size), args, device))
        for method, measurements in runs.items():
            results[size, method] = Measurement(
                statistics.median(m.unet_seconds for m in measurements),
                statistics.median(m.total_seconds for m in measurements),
                max(m.peak_bytes for m in measurements),
            )
    return results


def report(results: dict[tuple[int, str], Measurement], args) -> None:
    labels = dict(vanilla=f"vanilla (bs {args.batch_size})", apply="apply, one batch",
                  generate_set=f"generate_set (bs {args.batch_size})")
    print(f"\n{'set':>4}  {'method':<20} {'UNet s/step':>11} {'ms/image/step':>13} {'x vanilla':>9} "
          f"{'total s':>8} {'x vanilla':>9} {'peak MiB':>9} {'x vanilla':>9}")
    for size in args.sizes:
        base = results[size, "vanilla"]
        for method in METHODS:
            m = results[size, method]
            step = m.unet_seconds / args.steps
            print(f"{size:>4}  {labels[method]:<20} {step:11.3f} {1000 * step / size:13.1f} "
                  f"{m.unet_seconds / base.unet_seconds:9.2f} {m.total_seconds:8.2f} "
                  f"{m.total_seconds / base.total_seconds:9.2f} {m.peak_bytes / MIB:9.1f} "
                  f"{m.peak_bytes / base.peak_bytes:9.2f}")
    smallest = args.sizes[0]
    print(f"\npeak memory (MiB) vs set size, and x the {smallest}-image set")
    print(f"  {'method':<20} " + " ".join(f"{size:>16}" for size in args.sizes))
    for method in METHODS:
        peaks = [results[size, method].peak_bytes for size in args.sizes]
        cells = [f"{peak / MIB:8.1f} ({peak / peaks[0]:4.2f}x)" for peak in peaks]
        print(f"  {labels[method]:<20} " + " ".join(f"{cell:>16}" for cell in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on a GPU, fp32 on CPU)")
    parser.add_argument("--model", choices=MODELS, default=None, help="default: sdxl on a GPU, sd15-lite on CPU")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--sizes", default=None, help="comma-separated set sizes (default: 4,16,64 GPU; 4,16 CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per call for vanilla and generate_set")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 10 GPU, 2 CPU)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs of each (size, method), medians printed (default: 1 GPU, 3 CPU, being noisy)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    gpu = device.type != "cpu"
    args.model = args.model or ("sdxl" if gpu else "sd15-lite")
    description, default_resolution = MODELS[args.model]
    args.resolution = args.resolution or default_resolution
    args.sizes = [int(s) for s in (args.sizes or ("4,16,64" if gpu else "4,16")).split(",")]
    args.steps = args.steps or (10 if gpu else 2)
    args.repeats = args.repeats or (1 if gpu else 3)

    pipe = build(args.model, device, dtype)
    unet_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    threads = "" if gpu else f", {torch.get_num_threads()} threads"
    print(f"model: {args.model}, random weights: {description}; UNet {unet_params:.0f}M parameters")
    print(f"{args.resolution}x{args.resolution}, DDIM {args.steps} steps, guidance {args.guidance}, batch_size "
          f"{args.batch_size}, {device} {dtype}{threads}, torch {torch.__version__}; medians of {args.repeats} "
          f"after a 1-step warm-up")
    results = benchmark(pipe, args, device)
    print(f"peak memory: {peak_memory_method(device)}, above the loaded model; UNet s/step: its forward calls "
          "only; total: the whole run")
    report(results, args)


if __name__ == "__main__":
    main()
