"""Per-step time and peak memory of a style-aligned panorama against the release's scheme and plain MultiDiffusion.

    OMP_NUM_THREADS=1 python benchmarks/panorama.py --device cpu     # SD1.5-lite, 256 px windows, 512x256, ~3 min
    python benchmarks/speed.py --panorama --device cpu               # the same, through speed.py
    python benchmarks/speed.py --panorama --device cpu --one-call    # targets' attention in one call (an ablation)
    python benchmarks/panorama.py --device cuda                      # SD1.5 at full size, 512 px windows, 2048x512
    python benchmarks/panorama.py --device cuda --model sdxl         # SDXL, 1024 px windows, 4096x1024, fp16

Three ways to run the same panorama (same windows, noise, prompts and scheduler), timed in one run, taking turns:
  multidiffusion  plain MultiDiffusion without sharing: the windows `--view-batch-size` at a time, no reference;
  release         the paper's release: each window batch runs together with the reference ([reference, windows]
                  in each guidance half, StyleAligned in one batch), so the reference is recomputed per batch;
  ours            `stylealigned.generate_panorama`'s loop: the reference once per step (its keys, values and
                  statistics recorded), then the window batches replayed against it.
Time: the whole denoising loop (every denoiser call and scheduler step, no text encoding or decoding) per step,
medians of `--repeats`; memory: the peak of one untimed 1-step run per method (also the warm-up), as speed.py
measures it. The release's and our panoramas are compared too (the same computation: the difference is rounding).
Models have random weights, which cost the same as trained ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks.* and tests.*

from benchmarks.common import (MIB, SD15_LITE, median_ms, peak_memory, peak_memory_method, random_sd15,  # noqa: E402
                               random_sdxl)
from stylealigned import attention  # noqa: E402
from stylealigned.apply import apply  # noqa: E402
from stylealigned.backbones import Conditioning, backbone_for  # noqa: E402
from stylealigned.config import StyleAlignedConfig  # noqa: E402
from stylealigned.models import resolve_device, resolve_dtype  # noqa: E402
from stylealigned.panorama import (averaged, batch_sizes, denoise, plan_panorama, repeated,  # noqa: E402
                                   shared_outputs)
from stylealigned.processors import BATCH  # noqa: E402

PROMPT, REFERENCE = "a village by a lake in watercolor style", "a house in watercolor style"
METHODS = ("multidiffusion", "release", "ours")
DEFAULTS = {  # model: (window, width) in pixels on (CPU, GPU)
    "sd15-lite": ((256, 512), (512, 2048)), "sd15": ((256, 512), (512, 2048)), "sdxl": ((1024, 4096), (1024, 4096)),
}


def build(model: str, device: torch.device, dtype: torch.dtype):
    words = sorted(set(f"{PROMPT} {REFERENCE}".split()))
    pipe = random_sdxl(words, device) if model == "sdxl" else random_sd15(
        words, SD15_LITE if model == "sd15-lite" else {}, device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_reference(conditioning: Conditioning, reference: Conditioning, count: int) -> Conditioning:
    """Conditioning of [reference, `count` windows] in each guidance group (the release's layout)."""

    def join(ours, theirs):
        if isinstance(ours, dict):
            return {key: join(ours[key], theirs[key]) for key in ours}
        groups = ours.shape[0]
        windows = ours.repeat_interleave(count, dim=0).unflatten(0, (groups, count))
        return torch.cat([theirs.unflatten(0, (groups, 1)), windows], dim=1).flatten(0, 1)

    return Conditioning(join(conditioning.inputs, reference.inputs), conditioning.guided)


def release_outputs(handle, conditioning, reference_conditioning, guidance_scale, plan, view_batch_size):
    """Per step: every window batch denoised together with the reference; its prediction from the last batch."""
    backbone, groups = handle.backbone, 2 if conditioning.guided else 1
    batches = {count: with_reference(conditioning, reference_conditioning, count)
               for count in batch_sizes(plan, view_batch_size)}
    coverage = plan.count.to(backbone.pipe._execution_device)

    def outputs(reference, latents, t):
        last = {}

        def predict(crops):
            out = backbone.predict(torch.cat([reference, crops]), t, batches[len(crops)], guidance_scale)
            last["reference"] = out[:1]
            return out[1:]

        with handle.layout(BATCH, groups):
            out = averaged(predict, latents, plan, view_batch_size, coverage)
        return last["reference"], out

    return outputs


def plain_outputs(backbone, conditioning, guidance_scale, plan, view_batch_size):
    """Plain MultiDiffusion: the windows alone, nothing shared."""
    batches = {count: repeated(conditioning, count) for count in batch_sizes(plan, view_batch_size)}
    coverage = plan.count.to(backbone.pipe._execution_device)
    return lambda reference, latents, t: (None, averaged(
        lambda crops: backbone.predict(crops, t, batches[len(crops)], guidance_scale), latents, plan, view_batch_size,
        coverage))


@torch.no_grad()
def run(method: str, pipe, plan, conditionings: tuple[Conditioning, Conditioning], args) -> torch.Tensor:
    """The panorama's final latents by one method, from the (panorama, reference) prompts' conditioning."""
    backbone = backbone_for(pipe)
    conditioning, reference_conditioning = conditionings
    latents = backbone.initial_noise([1], 0, plan.height, plan.width)
    if method == "multidiffusion":
        outputs = plain_outputs(backbone, conditioning, args.guidance, plan, args.view_batch_size)
        return denoise(backbone, plan, latents, None, args.steps, outputs)[0]
    reference = backbone.initial_noise([0], 0, plan.window, plan.window)
    make = release_outputs if method == "release" else shared_outputs
    with apply(pipe, StyleAlignedConfig()) as handle:
        outputs = make(handle, conditioning, reference_conditioning, args.guidance, plan, args.view_batch_size)
        return denoise(backbone, plan, latents, reference, args.steps, outputs)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on a GPU)")
    parser.add_argument("--model", choices=DEFAULTS, default=None, help="default: sd15-lite on CPU, sd15 on a GPU")
    parser.add_argument("--window", type=int, default=None, help="window (and reference) side in pixels")
    parser.add_argument("--width", type=int, default=None, help="panorama width in pixels (height: one window)")
    parser.add_argument("--stride", type=int, default=None, help="pixels between windows (default: window / 8)")
    parser.add_argument("--view-batch-size", type=int, default=4, help="windows per denoiser call")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 1 CPU, 5 GPU)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (default: 3 CPU, 3 GPU)")
    parser.add_argument("--one-call", action="store_true",
                        help="an ablation: targets attend in one call over their own and the reference's keys side "
                             "by side, never as the CPU's merge of two flash calls (attention.merged_attention)")
    args = parser.parse_args(argv)
    if args.one_call:
        attention.merges = lambda *tensors: False  # attend_with_reference then takes its one-call path
    device = resolve_device(args.device)
    gpu = device.type != "cpu"
    args.model = args.model or ("sd15" if gpu else "sd15-lite")
    window, width = DEFAULTS[args.model][gpu]
    args.window, args.width = args.window or window, args.width or width
    args.steps, args.repeats = args.steps or (5 if gpu else 1), args.repeats or 3
    dtype = resolve_dtype(args.dtype or ("fp16" if gpu else None), device)

    pipe = build(args.model, device, dtype)
    plan = plan_panorama(pipe, args.width, args.window, args.window, args.stride)
    windows = len(plan.windows)
    with torch.no_grad():
        conditionings = tuple(backbone_for(pipe).conditioning(prompt, args.guidance, plan.window, plan.window)
                              for prompt in (PROMPT, REFERENCE))
    batches = -(-windows // args.view_batch_size)
    print(f"model: {args.model}, random weights; {plan.width}x{plan.height} panorama, {windows} windows of "
          f"{plan.window}² (stride {plan.stride}), {batches} window batches of up to {args.view_batch_size}; "
          f"{args.steps} DDIM steps, guidance {args.guidance}; {device} {dtype}, {torch.get_num_threads()} threads; "
          f"medians of {args.repeats}; images per step: multidiffusion {windows}, release {windows + batches}, "
          f"ours {windows + 1} (each twice, for guidance){'; targets attend in one call' if args.one_call else ''}")
    peaks = {}
    for method in METHODS:  # the warm-up, which also measures peak memory
        with peak_memory(device) as peak:
            run(method, pipe, plan, conditionings, argparse.Namespace(**vars(args) | dict(steps=1)))
        peaks[method] = peak.bytes
    runs = {method: (lambda m=method: run(m, pipe, plan, conditionings, args)) for method in METHODS}
    times = median_ms(runs, args.repeats, device, warmup=0)
    release, ours = (run(method, pipe, plan, conditionings, args) for method in ("release", "ours"))
    difference = (release - ours).abs().max().item()
    base = times["multidiffusion"]
    print(f"peak memory: {peak_memory_method(device)}\n")
    print("| method | s/step | x multidiffusion | x release | peak MiB | x multidiffusion |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in METHODS:
        print(f"| {method} | {times[method] / 1000 / args.steps:.3f} | {times[method] / base:.3f} "
              f"| {times[method] / times['release']:.3f} | {peaks[method] / MIB:.1f} "
              f"| {peaks[method] / peaks['multidiffusion']:.3f} |")
    print(f"\nrelease vs ours, max |latent difference| after {args.steps} steps: {difference:.2e}")


if __name__ == "__main__":
    main()
