"""Per-step denoiser time and peak memory of style-aligned sets against vanilla diffusers and against the floor.

    OMP_NUM_THREADS=1 python benchmarks/speed.py --model flux --device cpu --repeats 3    # ~3 min on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/speed.py --model sd3 --device cpu --repeats 3     # ~3 min
    OMP_NUM_THREADS=1 python benchmarks/speed.py --model flux2 --device cpu --repeats 3   # FLUX.2 blocks, 24 heads, 1+2
    OMP_NUM_THREADS=1 python benchmarks/speed.py --model qwen --device cpu --repeats 3    # Qwen-Image, 3 of 60 blocks
    OMP_NUM_THREADS=1 python benchmarks/speed.py --model zimage --device cpu --repeats 3  # Z-Image, 1+1+2 of 2+2+30
    python benchmarks/speed.py --device cpu  [--model sd15-lite|sd15] [--sizes 4,16] [--batch-size 4] [--steps 2]
    python benchmarks/speed.py --device cuda --model flux   # FLUX.1-dev at full depth (19+38), 1024², bf16, 4 steps
    python benchmarks/speed.py --device cuda --model sd3    # SD3.5-medium at full depth (24), 1024², bf16, 4 steps
    OMP_NUM_THREADS=1 python benchmarks/speed.py --model wan --device cpu --repeats 3     # 5-frame 128² clips
    python benchmarks/speed.py --device cuda --model wan    # Wan 2.1-1.3B at full depth (30), 480², 81 frames, bf16
    python benchmarks/speed.py --device cuda [--model sdxl] [--sizes 4,16,64] [--steps 10]   # SDXL, 1024², fp16
    python benchmarks/speed.py --panorama [benchmarks/panorama.py's options]   # panoramas: ours vs release vs plain
    OMP_NUM_THREADS=2 python benchmarks/speed.py --report [--device cuda]   # writes docs/performance.md (`report`)

A set of N images is 1 reference + N-1 targets; every method gets the same prompts and starting noise:
  vanilla        the plain pipeline, `batch_size` prompts per call (the memory budget of generate_set);
  floor          the plain model plus only the work sharing cannot avoid: in the layers StyleAligned shares by
                 default, targets also attend to the reference's image tokens (benchmarks/floor.py); no AdaIN,
                 no bookkeeping. In one batch (apply's layout) and in chunks (generate_set's: the reference once
                 per step, its keys and values kept, targets `batch_size` at a time);
  apply          `stylealigned.apply`, all N images in one pipeline call (the text-to-image preset, the defaults);
  transfer       the same with the transfer preset (score shift log 2; on UNets shared GroupNorm statistics too);
  generate_set   `stylealigned.generate_set(..., batch_size=...)`: the reference once per step, targets in chunks.
Latents are decoded `batch_size` at a time by the model's backbone (`backbone_for(pipe).decode`, as generate_set
does), so the VAE costs the same everywhere. StyleAligned is judged against its floor in the same layout: the target
is ours within 3 % of the floor.

Time: the denoiser's (UNet's or transformer's) forward calls per denoising step, GPU-synchronised, medians of
`--repeats` runs with the methods taking turns (each repeat is a round in which every method runs once); a time's
ratio to vanilla or to the floor is the median over rounds of the ratio within each round, so load drifting between
rounds cancels; also the whole run (text encoding and decoding included). Memory: the peak above what was allocated
before the run, in one extra untimed 1-step run per method and size that also warms up (every step peaks alike),
in all and within the denoiser's forward calls (without the text encoding and the decoding around them):
CUDA's allocator statistics on a GPU, live tensor storages on CPU (benchmarks/common.py), so one process measures
every run without them polluting each other or the timings. Freed CPU memory is kept in the process for every
method, as the CLI does (`stylealigned.keep_freed_memory`; benchmarks/allocator.py times it).

Models have random weights, which cost the same as trained ones. `sdxl` (the GPU default): SDXL-base's UNet, VAE and
both text encoders at full size. `sd15-lite` (the CPU default): SD1.5's UNet with half the channels and one layer per
block; `sd15`: SD1.5's UNet at full size; both with a small VAE and a one-layer text encoder. `flux`: FLUX.1-dev's
transformer blocks (24 heads of 128, 4096-wide T5 and 768-wide pooled CLIP inputs, RoPE axes 16/56/56, guidance
embedding) at `--depth` double,single blocks (default 1,2 on CPU, 19,38 on a GPU). `sd3`: SD3.5-medium's joint
blocks (24 heads of 64, caption projection 1536, pooled 2048, qk RMS norm, the first 13/24 with dual attention,
384² position embeddings) at `--depth` blocks (3 on CPU, 24 on a GPU). `wan`: Wan 2.1-T2V-1.3B's blocks (12 heads
of 128, ffn 8960, 4096-wide UMT5 input, 3D RoPE) at `--depth` blocks (1 on CPU, 30 on a GPU), clips of `--frames`
frames (5 on CPU, 81 on a GPU); a set of N images is then N clips. `qwen`: Qwen-Image's double-stream blocks (24
heads of 128, complex RoPE, true CFG in two calls per step) at `--depth` blocks (3 on CPU, 60 on a GPU: its default
shares half of them). `zimage`: Z-Image's blocks (30 heads of 128, CFG batched in one call) at `--depth`
refiners,layers (1 noise and 1 caption refiner and 2 joint layers on CPU; 2,30 on a GPU). FLUX, SD3 and Wan get small
random CLIP/T5 encoders of the real output widths, FLUX.2, Qwen-Image and Z-Image small Qwen encoders (their text
input layers narrowed to match), and all a small VAE with the real latent channels: the loop timed is the
transformer's. On CPU, T5 and Qwen prompts are `--max-sequence-length` 32 tokens (512 on a GPU, 256 for SD3).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks.* and tests.*

import stylealigned as sa  # noqa: E402
from benchmarks.common import (MIB, SD15_LITE, peak_memory, peak_memory_method, random_flux,  # noqa: E402
                               random_flux2, random_qwen, random_sd3, random_sd15, random_sdxl, random_wan,
                               random_zimage, synchronize)
from benchmarks.floor import check, floor  # noqa: E402
from stylealigned.apply import layers_to_share  # noqa: E402
from stylealigned.backbones import backbone_for  # noqa: E402
from stylealigned.config import StyleAlignedConfig  # noqa: E402
from stylealigned.cpu_memory import freed_memory_kept  # noqa: E402
from stylealigned.models import resolve_device, resolve_dtype  # noqa: E402

STYLE = "in watercolor style"
SUBJECTS = "house cat dog tree car bird boat chair lamp flower mountain castle apple horse clock bridge".split()
COLOURS = "red blue green golden".split()


@dataclass(frozen=True)
class Model:
    description: str
    resolution: tuple[int, int]             # default image side: (CPU, GPU)
    guidance: float
    depth: tuple[str, str] | None = None    # default --depth (CPU, GPU); None: not adjustable
    text_tokens: tuple[int, int] | None = None  # default --max-sequence-length (CPU, GPU); None: CLIP only
    gpu_dtype: str = "fp16"


MODELS = {
    "sdxl": Model("SDXL-base architecture: UNet, VAE, CLIP-L and bigG text encoders at full size", (1024, 1024), 7.5),
    "sd15": Model("SD1.5 UNet at full size; small VAE, one-layer text encoder", (256, 256), 7.5),
    "sd15-lite": Model("SD1.5 UNet with half the channels (160-320-640-640) and one layer per block; small VAE, "
                       "one-layer text encoder", (256, 256), 7.5),
    "flux": Model("FLUX.1-dev transformer blocks (24 heads x 128); small VAE (16 latent channels), small CLIP-L/T5 "
                  "encoders", (256, 1024), 3.5, depth=("1,2", "19,38"), text_tokens=(32, 512), gpu_dtype="bf16"),
    "sd3": Model("SD3.5-medium transformer blocks (24 heads x 64, dual attention in the first 13/24); small VAE "
                 "(16 latent channels), small CLIP-L/bigG/T5 encoders", (256, 1024), 4.5, depth=("3", "24"),
                 text_tokens=(32, 256), gpu_dtype="bf16"),
    "flux2": Model("FLUX.2 transformer blocks (heads of 128: 24 on CPU, FLUX.1's width; 48 on a GPU, FLUX.2 [dev]'s), "
                   "klein's CFG in two calls; small VAE (32 latent channels), small Qwen3 encoder", (256, 1024), 4.0,
                   depth=("1,2", "8,48"), text_tokens=(32, 512), gpu_dtype="bf16"),
    "qwen": Model("Qwen-Image transformer blocks (24 heads x 128), true CFG in two calls; small video VAE (16 latent "
                  "channels), small Qwen2.5-VL encoder", (256, 1024), 4.0, depth=("3", "60"), text_tokens=(32, 512),
                  gpu_dtype="bf16"),
    "zimage": Model("Z-Image transformer blocks (30 heads x 128; noise and caption refiners, then joint layers), CFG "
                    "batched in one call; small VAE (16 latent channels), small Qwen3 encoder", (256, 1024), 5.0,
                    depth=("1,2", "2,30"), text_tokens=(32, 512), gpu_dtype="bf16"),
    "wan": Model("Wan 2.1-T2V-1.3B transformer blocks (12 heads x 128); small video VAE (16 latent channels), small "
                 "UMT5 encoder", (128, 480), 5.0, depth=("1", "30"), text_tokens=(32, 512), gpu_dtype="bf16"),
}
FRAMES = (5, 81)  # wan's default --frames (CPU, GPU)
PAIRED_DEPTH = ("flux", "flux2", "zimage")  # --depth is two numbers: double,single blocks; zimage refiners,layers
METHODS = ("vanilla", "floor", "apply", "transfer", "floor_chunked", "generate_set")
FLOOR_OF = {"apply": "floor", "transfer": "floor", "generate_set": "floor_chunked"}
PRESETS = {"apply": StyleAlignedConfig.text_to_image(), "transfer": StyleAlignedConfig.transfer()}
TARGET = 0.03  # ours may cost this much more than the floor in the same layout


def set_prompts(size: int) -> list[str]:
    """The reference prompt and size - 1 target prompts, all in one style, distinct up to 64 (so no two share
    their text embeddings, as in a real set)."""
    return [f"a {COLOURS[i // len(SUBJECTS) % len(COLOURS)]} {SUBJECTS[i % len(SUBJECTS)]} {STYLE}"
            for i in range(size)]


def build(args, device: torch.device, dtype: torch.dtype):
    words = SUBJECTS + f"a {STYLE}".split()
    if args.model == "sdxl":
        pipe = random_sdxl(words, device)
    elif args.model == "flux":
        double, single = (int(d) for d in args.depth.split(","))
        pipe = random_flux(words, device, double, single)
    elif args.model == "sd3":
        pipe = random_sd3(words, device, int(args.depth))
    elif args.model == "flux2":
        double, single = (int(d) for d in args.depth.split(","))
        pipe = random_flux2(words, device, double, single, heads=48 if device.type == "cuda" else 24)
    elif args.model == "wan":
        pipe = random_wan(words, device, int(args.depth))
    elif args.model == "qwen":
        pipe = random_qwen(words, device, int(args.depth))
    elif args.model == "zimage":
        refiners, layers = (int(d) for d in args.depth.split(","))
        pipe = random_zimage(words, device, refiners, layers)
    else:
        pipe = random_sd15(words, SD15_LITE if args.model == "sd15-lite" else {}, device)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(args) -> dict:
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.resolution,
                  width=args.resolution)
    if args.max_sequence_length:
        kwargs["max_sequence_length"] = args.max_sequence_length
    if args.frames:
        kwargs["num_frames"] = args.frames
    return kwargs


def run_method(method: str, pipe, prompts: list[str], args) -> None:
    """Generate the set's images with one method (images are discarded)."""
    kwargs = pipeline_kwargs(args)
    if method == "generate_set":
        sa.generate_set(pipe, prompts, seed=0, batch_size=args.batch_size, **kwargs)
        return
    backbone = backbone_for(pipe)
    backbone.read_settings(kwargs)
    kwargs = backbone.pipeline_inputs(kwargs)  # as generate_set calls the pipeline (Qwen-Image: true CFG)
    noise = backbone.start_latents(backbone.initial_noise(range(len(prompts)), 0, args.resolution, args.resolution),
                                   args.resolution, args.resolution)
    if method == "vanilla":  # the output's first field: images, or a video pipeline's frames
        latents = torch.cat([pipe(prompt=prompts[s:s + args.batch_size], latents=noise[s:s + args.batch_size],
                                  output_type="latent", **kwargs)[0]
                             for s in range(0, len(prompts), args.batch_size)])
    else:
        layout = (sa.apply(pipe, backbone.fit_preset(PRESETS[method])) if method in PRESETS
                  else floor(pipe, args.batch_size if method == "floor_chunked" else None))
        with layout:
            latents = pipe(prompt=prompts, latents=noise, output_type="latent", **kwargs)[0]
    for part in latents.split(args.batch_size):
        backbone.decode(part, args.resolution, args.resolution)


class ForwardClock:
    """Seconds some modules spend in their forward calls, through forward hooks.

    On a GPU either synchronised at each call's ends (`events=False`: for the denoiser, once per step) or timed by
    CUDA events (for the attention layers, so the GPU's queue is not drained inside a step); perf_counter on CPU.
    """

    def __init__(self, modules: list[torch.nn.Module], device: torch.device, events: bool = False):
        self.device, self.events = device, events and device.type == "cuda"
        self._spans: list[tuple] = []
        self._hooks = [hook for module in modules for hook in (module.register_forward_pre_hook(self._start),
                                                              module.register_forward_hook(self._stop))]

    def _now(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        synchronize(self.device)
        return time.perf_counter()

    def _start(self, module, args) -> None:
        self._started = self._now()

    def _stop(self, module, args, output) -> None:
        self._spans.append((self._started, self._now()))

    @property
    def seconds(self) -> float:
        if self.events:
            synchronize(self.device)
            return sum(start.elapsed_time(end) for start, end in self._spans) / 1000
        return sum(end - start for start, end in self._spans)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


@dataclass
class Measurement:
    denoiser_runs: list[float]   # each repeat's denoiser seconds (all steps of the run), in repeat order
    attention_runs: list[float]  # the same for the shared attention layers' forward calls
    total_seconds: float         # median over repeats of the whole run
    peak_bytes: int
    denoiser_peak_bytes: int  # the peak within the denoiser's forward calls

    @property
    def denoiser_seconds(self) -> float:
        return statistics.median(self.denoiser_runs)

    @property
    def attention_seconds(self) -> float:
        return statistics.median(self.attention_runs)

    @property
    def spread(self) -> float:
        """(max - min) / median of the denoiser seconds over repeats."""
        return (max(self.denoiser_runs) - min(self.denoiser_runs)) / self.denoiser_seconds


def paired_ratio(ours: list[float], base: list[float]) -> float:
    """The median over repeats of ours / base within each repeat: both were timed in the same round, so a load
    drift between rounds, which moves both, cancels."""
    return statistics.median(a / b for a, b in zip(ours, base, strict=True))


@torch.no_grad()
def timed(method: str, pipe, prompts: list[str], args, device: torch.device) -> tuple[float, float, float]:
    """(denoiser seconds, shared attention layers' seconds, whole-run seconds) of one run."""
    backbone = backbone_for(pipe)
    modules = dict(backbone.denoiser.named_modules())
    clock = ForwardClock([backbone.denoiser], device)
    layers = ForwardClock([modules[name] for name in layers_to_share(backbone, StyleAlignedConfig())], device,
                          events=True)
    try:
        synchronize(device)
        start = time.perf_counter()
        run_method(method, pipe, prompts, args)
        synchronize(device)
        return clock.seconds, layers.seconds, time.perf_counter() - start
    finally:
        clock.remove()
        layers.remove()


@torch.no_grad()
def peak_bytes(method: str, pipe, prompts: list[str], args, device: torch.device) -> tuple[int, int]:
    """Peak memory of a 1-step run (every step peaks alike), in all and within the denoiser's calls; the run also
    warms this method up at this size."""
    with peak_memory(device, list(backbone_for(pipe).denoisers().values())) as peak:
        run_method(method, pipe, prompts, argparse.Namespace(**vars(args) | dict(steps=1)))
    return peak.bytes, peak.within_bytes


def benchmark(pipe, args, device: torch.device, methods=METHODS) -> dict[tuple[int, str], Measurement]:
    """Medians over repeats for every (size, method), methods taking turns (each repeat starting one method later)
    so load drifts hit all alike and none always runs right after the same one."""
    results = {}
    for size in args.sizes:
        prompts = set_prompts(size)
        peaks = {method: peak_bytes(method, pipe, prompts, args, device) for method in methods}
        runs = {method: [] for method in methods}
        for repeat in range(args.repeats):
            start = repeat % len(methods)
            for method in methods[start:] + methods[:start]:
                runs[method].append(timed(method, pipe, prompts, args, device))
        for method, times in runs.items():
            denoiser, attention, total = (list(column) for column in zip(*times))
            results[size, method] = Measurement(denoiser, attention, statistics.median(total), *peaks[method])
    return results


def labels(args) -> dict[str, str]:
    bs = args.batch_size
    return dict(vanilla=f"vanilla (bs {bs})", floor="floor, one batch", apply="apply, one batch",
                transfer="apply transfer, one batch", floor_chunked=f"floor, chunked (bs {bs})",
                generate_set=f"generate_set (bs {bs})")


def ratio(value: float, base: float | None) -> str:
    return f"{value / base:.3f}" if base else ""


def time_ratio(ours: list[float], base: list[float] | None) -> str:
    return f"{paired_ratio(ours, base):.3f}" if base else ""


def report(results: dict[tuple[int, str], Measurement], args, methods=METHODS) -> list[str]:
    """The measurements as markdown lines: the table, ours against the floor, peak memory against set size."""
    names, lines = labels(args), []
    lines += ["| set | method | denoiser s/step | ms/image/step | spread | x vanilla | x floor | shared attn ms/step "
              "| x vanilla | x floor | total s | peak MiB | x vanilla | x floor | denoiser peak MiB | x vanilla |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    floors = {method: bound for method, bound in FLOOR_OF.items() if method in methods and bound in methods}
    for size in args.sizes:
        base = results[size, "vanilla"]
        for method in methods:
            m = results[size, method]
            bound = results[size, floors[method]] if method in floors else None
            step = m.denoiser_seconds / args.steps
            lines.append(f"| {size} | {names[method]} | {step:.3f} | {1000 * step / size:.1f} | {100 * m.spread:.1f} % "
                         f"| {time_ratio(m.denoiser_runs, base.denoiser_runs)} "
                         f"| {time_ratio(m.denoiser_runs, bound and bound.denoiser_runs)} "
                         f"| {1000 * m.attention_seconds / args.steps:.1f} "
                         f"| {time_ratio(m.attention_runs, base.attention_runs)} "
                         f"| {time_ratio(m.attention_runs, bound and bound.attention_runs)} | {m.total_seconds:.2f} "
                         f"| {m.peak_bytes / MIB:.1f} | {ratio(m.peak_bytes, base.peak_bytes)} "
                         f"| {ratio(m.peak_bytes, bound and bound.peak_bytes)} "
                         f"| {m.denoiser_peak_bytes / MIB:.1f} "
                         f"| {ratio(m.denoiser_peak_bytes, base.denoiser_peak_bytes)} |")
    lines += ["", f"ours against the floor in the same layout (target: within {TARGET:.0%}):", ""]
    for size in args.sizes:
        for method, bound in floors.items():
            ours, lowest = results[size, method], results[size, bound]
            time_over = paired_ratio(ours.denoiser_runs, lowest.denoiser_runs) - 1
            attention_over = paired_ratio(ours.attention_runs, lowest.attention_runs) - 1
            memory_over = ours.peak_bytes / lowest.peak_bytes - 1
            denoiser_over = ours.denoiser_peak_bytes / lowest.denoiser_peak_bytes - 1
            verdict = f"within {TARGET:.0%}" if time_over <= TARGET else f"MORE than {TARGET:.0%} over"
            lines.append(f"- set {size}, {names[method]}: denoiser time {100 * time_over:+.1f} % ({verdict}; shared "
                         f"attention layers {100 * attention_over:+.1f} %), peak memory {100 * memory_over:+.1f} % "
                         f"(within the denoiser {100 * denoiser_over:+.1f} %)")
    if len(args.sizes) > 1:
        smallest = args.sizes[0]
        lines += ["", f"peak memory (MiB) vs set size, and x the {smallest}-image set:", "",
                  "| method | " + " | ".join(str(size) for size in args.sizes) + " |",
                  "|---|" + "---:|" * len(args.sizes)]
        for method in methods:
            peaks = [results[size, method].peak_bytes for size in args.sizes]
            lines.append(f"| {names[method]} | " + " | ".join(f"{peak / MIB:.1f} ({peak / peaks[0]:.2f}x)"
                                                             for peak in peaks) + " |")
    return lines


def describe(pipe, args, device: torch.device, dtype: torch.dtype) -> str:
    """What was measured: model, layout, device, versions."""
    backbone = backbone_for(pipe)
    params = sum(p.numel() for p in backbone.denoiser.parameters()) / 1e6
    layers = backbone.attention_layers()
    shared = layers_to_share(backbone, StyleAlignedConfig())
    depth = f" at depth {args.depth}" if args.depth else ""
    threads = "" if device.type != "cpu" else f", {torch.get_num_threads()} threads, freed memory " + (
        "kept (stylealigned.keep_freed_memory)" if freed_memory_kept() else "not kept")
    text = f", prompts of max_sequence_length {args.max_sequence_length}" if args.max_sequence_length else ""
    return (f"model: {args.model}{depth}, random weights: {MODELS[args.model].description}; "
            f"{type(backbone.denoiser).__name__} {params:.0f}M parameters; StyleAligned shares {len(shared)} of its "
            f"{len(layers)} attention layers (its default), the floor the same ones.\n"
            f"{args.resolution}x{args.resolution}, {args.steps} {type(pipe.scheduler).__name__} steps, guidance "
            f"{args.guidance}{text}, batch_size {args.batch_size}, {device} {dtype}{threads}, torch {torch.__version__}"
            f"; medians of {args.repeats} after a 1-step warm-up that measures peak memory.")


def legend(device: torch.device) -> str:
    return (f"peak memory: {peak_memory_method(device)}, above the loaded model; denoiser s/step: its forward calls "
            "only, median over repeats; x vanilla, x floor of times: the median over repeats of the ratio within each "
            "repeat; spread: (max - min) / median of the denoiser's over repeats; shared attn: the forward calls of "
            "the attention layers StyleAligned shares; total: the whole run")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None,
                        help="fp32, fp16 or bf16 (default: fp32 on CPU; on a GPU bf16 for transformers, else fp16)")
    parser.add_argument("--model", choices=MODELS, default=None, help="default: sdxl on a GPU, sd15-lite on CPU")
    parser.add_argument("--depth", default=None,
                        help="flux, flux2: double,single blocks (default 1,2 CPU; 19,38 and 8,48 GPU); sd3: blocks (3 "
                             "CPU, 24 GPU); wan: blocks (1 CPU, 30 GPU); qwen: blocks (3 CPU, 60 GPU); zimage: "
                             "refiners,layers (1,2 CPU, 2,30 GPU)")
    parser.add_argument("--frames", type=int, default=None, help="wan: frames per clip (default 5 CPU, 81 GPU)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: 256 on CPU; 1024 for sdxl, and for the transformers on a "
                             "GPU, 480 for wan)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated set sizes (default: 4,16,64 GPU, 4,16 CPU; transformers 4,16 GPU, 4 CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per call for vanilla, targets per chunk for generate_set (default 4; transformers "
                             "on CPU: 2, so a 4-image set runs in chunks)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: 10 GPU, 4 for transformers; 2 CPU, 1 for transformers)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="default: 7.5 UNets, 3.5 flux, 4.5 sd3, 4 flux2 and qwen, 5 zimage and wan")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="T5 / Qwen prompt tokens, transformers (default: 32 CPU; 512 on a GPU, 256 sd3)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of each (size, method), medians printed (default: 1 GPU, 3 CPU, being noisy)")
    parser.add_argument("--check", action="store_true",
                        help="first check that the floor computes StyleAligned's attention with AdaIN off")
    return parser


def parsed(argv: list[str]) -> tuple[argparse.Namespace, torch.device, torch.dtype]:
    """The options with every default filled in for the model and device, the device and the dtype."""
    options = parser()
    args = options.parse_args(argv)
    device = resolve_device(args.device)
    gpu = device.type != "cpu"
    args.model = args.model or ("sdxl" if gpu else "sd15-lite")
    model = MODELS[args.model]
    dit = model.depth is not None
    if args.depth and not dit:
        options.error(f"--depth applies to the transformers, not {args.model}")
    if args.depth and not re.fullmatch(r"\d+,\d+" if args.model in PAIRED_DEPTH else r"\d+", args.depth):
        options.error("--depth is double,single blocks for flux and flux2 (e.g. 1,2), refiners,layers for zimage "
                      "(e.g. 1,2) and a block count for sd3, wan and qwen (e.g. 3)")
    if args.frames and args.model != "wan":
        options.error(f"--frames applies to wan, not {args.model}")
    args.frames = args.frames or (FRAMES[gpu] if args.model == "wan" else None)
    dtype = resolve_dtype(args.dtype or (model.gpu_dtype if gpu else None), device)
    args.depth = args.depth or (model.depth[gpu] if dit else None)
    args.max_sequence_length = args.max_sequence_length or (model.text_tokens[gpu] if dit else None)
    args.resolution = args.resolution or model.resolution[gpu]
    default_sizes = ("4,16" if dit else "4,16,64") if gpu else ("4" if dit else "4,16")
    args.sizes = [int(s) for s in (args.sizes or default_sizes).split(",")]
    args.batch_size = args.batch_size or (2 if dit and not gpu else 4)
    args.steps = args.steps or ((4 if dit else 10) if gpu else (1 if dit else 2))
    args.guidance = model.guidance if args.guidance is None else args.guidance
    args.repeats = args.repeats or (1 if gpu else 3)
    return args, device, dtype


def main() -> None:
    sa.keep_freed_memory()  # as the CLI does; every method alike (benchmarks/allocator.py: what it saves)
    if sys.argv[1:2] == ["--panorama"]:  # panoramas have their own measurement and options
        from benchmarks.panorama import main as panorama
        return panorama(sys.argv[2:])
    if sys.argv[1:2] == ["--report"]:  # every table of docs/performance.md, in one run
        from benchmarks.report import main as performance_report
        return performance_report(sys.argv[2:])
    args, device, dtype = parsed(sys.argv[1:])
    pipe = build(args, device, dtype)
    print(describe(pipe, args, device, dtype))
    if args.check:
        differences = check(pipe, set_prompts(args.sizes[0]), args.batch_size, **pipeline_kwargs(args))
        print("floor vs StyleAligned without AdaIN, max |latent difference|: "
              + ", ".join(f"{layout} {value:.2e}" for layout, value in differences.items()))
    results = benchmark(pipe, args, device)
    print(legend(device))
    print("\n" + "\n".join(report(results, args)))


if __name__ == "__main__":
    main()
