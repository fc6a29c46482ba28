"""Cost of one shared self-attention call at SDXL's shapes against vanilla attention over the same batch.

    python benchmarks/attention.py --device cpu|cuda [--dtype fp32|fp16|bf16] [--repeats N] [--oracle-repeats N]

Batch: 2 guidance groups x (1 reference + 4 targets). Shapes: SDXL's self-attention layers at 1024x1024, i.e.
4096 tokens x 10 heads of 64 (64x64 latents) and 1024 tokens x 20 heads of 64 (32x32 latents). Timed per call:
  vanilla   F.scaled_dot_product_attention over the batch, no sharing (what diffusers runs);
  ours      stylealigned.attention.shared_attention with the default (text-to-image) config, and with the transfer
            preset, whose log 2 score shift goes into the fused kernel as an additive bias;
  oracle    tests/oracle.py's loop-per-image implementation of the paper's equations (explicit logits).
The bound is the attention work itself: targets attend to twice the keys (their own + the reference's), the
references to their own only, so no implementation can go below (1 + 2 x 4) / 5 = 1.8x vanilla.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.oracle and benchmarks.common

from benchmarks.common import median_ms  # noqa: E402
from stylealigned.attention import shared_attention  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: fp16 on a GPU, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (default: 20 GPU, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 GPU, 1 CPU)")
    parser.add_argument("--oracle-repeats", type=int, default=None,
                        help="timed oracle calls (default: --repeats on a GPU, 1 on CPU where it is slow)")
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
