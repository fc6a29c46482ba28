"""Cost of one shared self-attention call at SDXL's shapes against vanilla attention over the same batch.

    python benchmarks/attention.py --device cpu|cuda [--dtype fp32|fp16|bf16] [--repeats N] [--oracle-repeats N]
                                   [--only shared|bias] [--shape 64x64|32x32]

Batch: 2 guidance groups x (1 reference + 4 targets). Shapes: SDXL's self-attention layers at 1024x1024, i.e.
4096 tokens x 10 heads of 64 (64x64 latents) and 1024 tokens x 20 heads of 64 (32x32 latents). Timed per call:
  vanilla   F.scaled_dot_product_attention over the batch, no sharing (what diffusers runs);
  ours      stylealigned.attention.shared_attention with the default (text-to-image) config, and with the transfer
            preset, whose log 2 score shift reaches a fused kernel (`attend_with_reference`, table below);
  oracle    tests/oracle.py's loop-per-image implementation of the paper's equations (explicit logits).
The bound is the attention work itself: targets attend to twice the keys (their own + the reference's), the
references to their own only, so no implementation can go below (1 + 2 x 4) / 5 = 1.8x vanilla.

A second table times the ways the score shift can reach the kernel, for the targets' attention over their own + the
reference's keys, each from the same inputs: no bias (shift 0, the floor: one call over the keys side by side), the
broadcast mask row, the padded head channel, an explicit (queries x keys) mask, on the CPU the log-sum-exp merge of
two flash calls (`merged_attention`, also without the shift), and the one `attend_with_reference` chooses here;
with the SDPA kernel each one runs (torch._fused_sdp_choice) and its max error against the explicit softmax formula
in float64.
`--only bias` runs that table alone, `--only shared` the first; `--shape 32x32` one shape.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.oracle and benchmarks.common

from benchmarks.common import median_ms  # noqa: E402
from stylealigned.attention import (attend_with_reference, attention, bias_in_channel, channel_bias,  # noqa: E402
                                    merged_attention, merges, shared_attention)
from stylealigned.config import StyleAlignedConfig  # noqa: E402
from stylealigned.models import resolve_device, resolve_dtype  # noqa: E402
from tests.oracle import self_attention as oracle_attention  # noqa: E402

GROUPS, TARGETS, HEAD_DIM = 2, 4, 64
SHAPES = {"64x64 latents": (4096, 10), "32x32 latents": (1024, 20)}  # (tokens, heads)
CONFIGS = {"default": StyleAlignedConfig.text_to_image(), "transfer": StyleAlignedConfig.transfer()}


def extra_keys_bound(targets: int = TARGETS) -> float:
    """Lowest possible cost relative to vanilla: targets attend to 2x the keys, the reference to 1x."""
    return (1 + 2 * targets) / (1 + targets)


def qkv(tokens: int, heads: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Random (groups, images, heads, tokens, head_dim) queries, keys and values."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (GROUPS, 1 + TARGETS, heads, tokens, HEAD_DIM)
    return [torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3)]


def benchmark_shape(tokens: int, heads: int, args, device: torch.device, dtype: torch.dtype) -> dict[str, tuple]:
    """{variant: (median ms, max |ours - oracle| or None)} for one shape."""
    q, k, v = qkv(tokens, heads, device, dtype)
    flat = [x.flatten(0, 1) for x in (q, k, v)]  # (batch, heads, tokens, dim): the layout vanilla and oracle take
    outputs = {}

    def kept(name, compute):
        """A run that keeps its last output, so the check against the oracle costs no extra oracle call."""
        return lambda: outputs.__setitem__(name, compute())

    runs = {"vanilla SDPA": lambda: F.scaled_dot_product_attention(*flat)}
    runs |= {f"ours ({key})": kept(key, lambda c=config: shared_attention(q, k, v, c))
             for key, config in CONFIGS.items()}
    oracle_runs = {f"oracle ({key})": kept(f"oracle {key}", lambda c=config: oracle_attention(*flat, GROUPS, c))
                   for key, config in CONFIGS.items()}
    with torch.inference_mode():
        timings = median_ms(runs, args.repeats, device, warmup=args.warmup)
        timings |= median_ms(oracle_runs, args.oracle_repeats, device, warmup=args.oracle_warmup)
    errors = {f"ours ({key})": (outputs[key].float() - outputs[f"oracle {key}"].view_as(q).float()).abs().max().item()
              for key in CONFIGS}
    return {name: (ms, errors.get(name)) for name, ms in timings.items()}


def sdpa_kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                     scale: float | None = None) -> str:
    """The kernel torch's SDPA dispatcher picks for these inputs (flash, efficient, cudnn, math, ...)."""
    choice = torch._fused_sdp_choice(q, k, v, attn_mask=mask, scale=scale)
    return SDPBackend(choice).name.lower().removesuffix("_attention")


def bias_methods(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref_k: torch.Tensor, ref_v: torch.Tensor,
                 shift: float) -> dict:
    """{method: (run, kernel name)} for targets' (G, T, H, N, D) queries over their own keys and their group's
    shared ones (G, H, N, D), `shift` added toward those; every run starts from these inputs (concatenating keys where
    it needs them, as the model would) and returns (G x T, H, N, D)."""
    def joined(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, ref[:, None].expand_as(x)], dim=-2).flatten(0, 1)

    flat = q.flatten(0, 1)
    keys, values = joined(k, ref_k), joined(v, ref_v)  # for the kernel names only
    bias = torch.zeros(keys.shape[-2], device=q.device, dtype=q.dtype)
    bias[k.shape[-2]:] = shift
    row = bias.view(1, 1, 1, -1)
    full = row.expand(flat.shape[0], 1, flat.shape[-2], -1).contiguous()
    dim, pad = q.shape[-1], 8 - q.shape[-1] % 8
    padded = [F.pad(x, (0, pad)) for x in (flat, keys, values)]
    methods = {
        "no bias (floor)": (lambda: attention(flat, joined(k, ref_k), joined(v, ref_v)),
                            sdpa_kernel_name(flat, keys, values)),
        "mask row": (lambda: attention(flat, joined(k, ref_k), joined(v, ref_v), row),
                     sdpa_kernel_name(flat, keys, values, row)),
        "head channel": (lambda: bias_in_channel(flat, joined(k, ref_k), joined(v, ref_v), bias),
                         sdpa_kernel_name(*padded, scale=dim**-0.5)),
        "full mask": (lambda: attention(flat, joined(k, ref_k), joined(v, ref_v), full),
                      sdpa_kernel_name(flat, keys, values, full)),
    }
    if q.device.type == "cpu":  # the log-sum-exps come from the CPU's flash kernel (text-to-image runs it unshifted)
        methods["merge, no shift"] = (lambda: merged_attention(q, k, v, ref_k, ref_v).flatten(0, 1), "flash")
        methods["log-sum-exp merge"] = (lambda: merged_attention(q, k, v, ref_k, ref_v, shift).flatten(0, 1),
                                        "flash")
    chosen = "log-sum-exp merge" if merges(q) else "head channel" if channel_bias(q) else "mask row"
    methods[f"chosen: {chosen}"] = (
        lambda: attend_with_reference(q, k, v, ref_k, ref_v, score_shift=shift).flatten(0, 1), methods[chosen][1])
    return methods


def explicit_biased(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v in float64, the formula the methods must equal."""
    q, keys, values, bias = (x.double() for x in (q, keys, values, bias))
    return torch.softmax(q @ keys.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1) @ values


def print_bias_methods(label: str, tokens: int, heads: int, args, device: torch.device, dtype: torch.dtype) -> None:
    """Time each key-bias method at one shape (a log 2 shift toward the reference's keys) and print the table."""
    q, k, v = qkv(tokens, heads, device, dtype)
    methods = bias_methods(q[:, 1:], k[:, 1:], v[:, 1:], k[:, 0], v[:, 0], math.log(2))
    outputs = {}
    runs = {name: (lambda n=name, run=run: outputs.__setitem__(n, run())) for name, (run, _) in methods.items()}
    with torch.inference_mode():
        timings = median_ms(runs, args.repeats, device, warmup=args.warmup)
        keys, values = (torch.cat([x[0, 1], x[0, 0]], dim=-2)[None] for x in (k, v))  # the first target's
        bias = torch.zeros(2 * tokens, device=device, dtype=dtype)
        bias[tokens:] = math.log(2)
        check = explicit_biased(q[0, 1:2, :, :256], keys, values, bias)
    floor = timings["no bias (floor)"]
    print(f"\n{label}: key-bias methods, {GROUPS * TARGETS} targets x {heads} heads, {tokens} queries over "
          f"{2 * tokens} keys")
    print(f"  {'method':<26} {'ms':>10} {'x floor':>8} {'kernel':>10} {'max |err| vs formula':>21}")
    for name, ms in timings.items():
        err = "" if "no " in name else \
            f"{(outputs[name][:1, :, :256].double() - check).abs().max().item():.1e}"
        print(f"  {name:<26} {ms:10.1f} {ms / floor:8.2f} {methods[name][1]:>10} {err:>21}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on a GPU, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default: 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 GPU, 1 CPU)")
    parser.add_argument("--oracle-repeats", type=int, default=None,
                        help="timed oracle calls (default: --repeats on a GPU, 1 on CPU where it is slow)")
    parser.add_argument("--only", choices=("shared", "bias"), default=None,
                        help="run one table: shared attention vs vanilla, or the key-bias methods")
    parser.add_argument("--shape", choices=[label.split()[0] for label in SHAPES], default=None,
                        help="one shape only (default: both)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    gpu = device.type != "cpu"
    args.repeats = args.repeats or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.oracle_repeats = args.oracle_repeats or (args.repeats if gpu else 1)
    args.oracle_warmup = args.warmup if gpu else 0

    threads = "" if gpu else f", {torch.get_num_threads()} threads"
    print(f"shared self-attention per call, batch {GROUPS} x (1 + {TARGETS}), head dim {HEAD_DIM}, {device} {dtype}"
          f"{threads}; torch {torch.__version__}")
    print(f"medians of {args.repeats} calls after {args.warmup} warm-up (oracle: {args.oracle_repeats} after "
          f"{args.oracle_warmup}); extra-keys bound = {extra_keys_bound():.2f}x vanilla")
    for label, (tokens, heads) in SHAPES.items():
        if args.shape and not label.startswith(args.shape):
            continue
        if args.only != "shared":
            print_bias_methods(label, tokens, heads, args, device, dtype)
        if args.only == "bias":
            continue
        results = benchmark_shape(tokens, heads, args, device, dtype)
        vanilla = results["vanilla SDPA"][0]
        print(f"\n{label}: {tokens} tokens, {heads} heads")
        print(f"  {'variant':<18} {'ms':>10} {'x vanilla':>10} {'x bound':>8} {'max |err| vs oracle':>20}")
        for name, (ms, error) in results.items():
            bound = "" if ms == vanilla else f"{ms / vanilla / extra_keys_bound():.2f}"
            err = "" if error is None else f"{error:.1e}"
            print(f"  {name:<18} {ms:10.1f} {ms / vanilla:10.2f} {bound:>8} {err:>20}")


if __name__ == "__main__":
    main()
