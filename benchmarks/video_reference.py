"""What a still-image reference does to the first and last frames of target clips: the tiny random-weight Wan
pipeline of the tests (Wan 2.1 layout), so the numbers show how the mechanism acts, not how a trained model looks.

    OMP_NUM_THREADS=1 python benchmarks/video_reference.py [--sets 8] [--frames 17] [--steps 10]   # ~1 min, CPU

Each set: a smooth two-colour image (its colours drawn per set) inverted as a one-frame clip leads 3 target clips,
as `generate_set` runs it (the reference slot pinned to its trajectory and run as one frame; its keys at frame 0),
shared (the transfer preset, fitted to Wan) and not shared (`StyleAlignedConfig.disabled()`), from the same noise.
Measured on the final latents, per target and latent frame: the style distance to the reference, the L2 distance
of the frame's per-channel means and standard deviations (over its tokens) to those of the reference's latent, the
statistics AdaIN matches; and how far sharing moved the frame (mean |shared - not shared|). Printed: their means
over sets and targets at the first latent frame and at the last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.*

import stylealigned as sa  # noqa: E402
from stylealigned.backbones import backbone_for  # noqa: E402
from stylealigned.sets import pin_reference  # noqa: E402
from tests.wan_pipelines import WAN_HEIGHT, WAN_WIDTH, build_wan, load_wan  # noqa: E402

TARGETS = ["a dog", "a house", "a car"]


def reference_image(rng: np.random.Generator) -> Image.Image:
    """A horizontal blend of two random colours, the clips' size."""
    left, right = rng.uniform(0, 255, (2, 3))
    ramp = np.linspace(0, 1, WAN_WIDTH)[None, :, None]
    return Image.fromarray(np.broadcast_to(left + ramp * (right - left), (WAN_HEIGHT, WAN_WIDTH, 3)).astype("uint8"))


def final_latents(pipe, config, trajectory, seed: int, settings: dict) -> torch.Tensor:
    """The set's final latents (clips, channels, frames, rows, columns), reference first, as generate_set makes
    them with a still reference."""
    backbone = backbone_for(pipe)
    backbone.read_settings(settings)
    start = backbone.initial_noise(range(1 + len(TARGETS)), seed, WAN_HEIGHT, WAN_WIDTH)
    start[0] = trajectory.latents[0]
    with sa.apply(pipe, config) as handle:
        handle.still_reference = True
        return pipe(prompt=[trajectory.prompt] + TARGETS, latents=start, output_type="latent",
                    callback_on_step_end=pin_reference(trajectory, 0), **settings).frames


def statistics(latents: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std over each frame's tokens: (..., channels, frames, rows, columns) -> (..., frames,
    2 x channels)."""
    flat = latents.flatten(-2)
    return torch.cat([flat.mean(-1), flat.std(-1)], dim=-2).transpose(-1, -2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=8)
    parser.add_argument("--frames", type=int, default=17, help="4k + 1 (the tiny VAE: 4x in time)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        build_wan(Path(folder))
        pipe = load_wan(folder)
    configs = {"shared": backbone_for(pipe).fit_preset(sa.StyleAlignedConfig.transfer()),
               "not shared": sa.StyleAlignedConfig.disabled()}
    settings = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=WAN_HEIGHT, width=WAN_WIDTH,
                    num_frames=args.frames, max_sequence_length=16)
    rng = np.random.default_rng(0)
    distance, moved = {name: [] for name in configs}, []
    for index in range(args.sets):
        trajectory = sa.invert(pipe, reference_image(rng), "a painting", num_inference_steps=args.steps,
                               guidance_scale=2.0, max_sequence_length=16)
        reference = statistics(trajectory.latents[-1])[0]  # its one frame
        clips = {name: final_latents(pipe, config, trajectory, 10 * index, settings)[1:]
                 for name, config in configs.items()}
        for name, targets in clips.items():
            distance[name].append((statistics(targets) - reference).norm(dim=-1))  # (targets, frames)
        moved.append((clips["shared"] - clips["not shared"]).abs().mean((1, 3, 4)))
    frames = clips["shared"].shape[2]
    print(f"tiny random-weight Wan 2.1 pipeline, {args.sets} sets x {len(TARGETS)} targets, {args.frames} frames "
          f"({frames} latent frames), {args.steps} steps; latent frame 0 is pixel frame 0, the last latent frame the "
          "last 4 pixel frames")
    print("| | first latent frame | last latent frame | last / first |\n|---|---:|---:|---:|")
    rows = {f"style distance to the still, {name}": torch.cat(values) for name, values in distance.items()}
    rows["moved by sharing, mean abs"] = torch.cat(moved)
    for name, values in rows.items():
        first, last = values.mean(0)[[0, -1]].tolist()
        print(f"| {name} | {first:.4f} | {last:.4f} | {last / first:.2f} |")


if __name__ == "__main__":
    main()
