"""`stylealigned eval` on sets of clips with and without sharing, on the tests' tiny random-weight models: the tiny
Wan 2.1 pipeline, CLIP and DINO (built into --models once), so the numbers show the measurement, not a trained
model's quality. Set consistency, text alignment and temporal consistency (DINO of neighbouring frames) per config.

    OMP_NUM_THREADS=1 python benchmarks/video_eval.py [--styles 8] [--frames 9] [--steps 10]   # ~3 min on a CPU

It runs `stylealigned eval --configs no-share,full --frames F ...` into --out (resumable: rerun the same command).
With real models, run that command itself: `stylealigned eval --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --configs
no-share,full --frames 33 --width 832 --height 480 --batch-size 1 --out runs/eval-video`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.*

from stylealigned.cli import main as cli  # noqa: E402
from tests.eval_models import build_clip, build_dino  # noqa: E402
from tests.wan_pipelines import WAN_HEIGHT, WAN_WIDTH, build_wan  # noqa: E402

BUILDERS = {"wan": build_wan, "clip": build_clip, "dino": build_dino}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--styles", type=int, default=8)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", type=Path, default=Path("runs/tiny-models"))
    parser.add_argument("--out", type=Path, default=Path("runs/eval-video-tiny"))
    args = parser.parse_args()
    for name, build in BUILDERS.items():
        if not (args.models / name).is_dir():
            (args.models / name).mkdir(parents=True)
            build(args.models / name)
    sys.argv = ["stylealigned", "eval", "--model", str(args.models / "wan"), "--configs", "no-share,full",
                "--styles", str(args.styles), "--frames", str(args.frames), "--steps", str(args.steps),
                "--width", str(WAN_WIDTH), "--height", str(WAN_HEIGHT), "--clip-model", str(args.models / "clip"),
                "--dino-model", str(args.models / "dino"), "--device", "cpu", "--out", str(args.out)]
    cli()


if __name__ == "__main__":
    main()
