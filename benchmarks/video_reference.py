"""What a still-image reference does to the first and last frames of target clips: the tiny random-weight Wan
pipeline of the tests (Wan 2.1 layout), so the numbers show how the mechanism acts, not how a trained model looks.

    OMP_NUM_THREADS=1 python benchmarks/video_reference.py [--sets 8] [--frames 9] [--steps 10]   # ~1 min on a CPU

Each set: a smooth two-colour image (its colours drawn per set) inverted as a one-frame clip leads 3 target clips,
shared (the transfer preset, fitted to Wan) and not shared (`StyleAlignedConfig.disabled()`, the reference slot
still pinned), from the same noise. Per target frame, the style distance to the reference image: the L2 distance
of the frame's per-channel (RGB, 0..1) means and standard deviations to the reference's, the statistics AdaIN
matches. Printed: its mean over sets and targets at the first frame and at the last, shared and not, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for tests.*

import stylealigned as sa  # noqa: E402
from stylealigned.backbones import backbone_for  # noqa: E402
from tests.wan_pipelines import WAN_HEIGHT, WAN_WIDTH, build_wan, load_wan  # noqa: E402

TARGETS = ["a dog", "a house", "a car"]


def reference_image(rng: np.random.Generator) -> Image.Image:
    """A horizontal blend of two random colours, the clips' size."""
    left, right = rng.uniform(0, 255, (2, 3))
    ramp = np.linspace(0, 1, WAN_WIDTH)[None, :, None]
    pixels = np.broadcast_to(left + ramp * (right - left), (WAN_HEIGHT, WAN_WIDTH, 3))
    return Image.fromarray(pixels.astype("uint8"))


def statistics(image: Image.Image) -> np.ndarray:
    """Per-channel mean and std of an RGB image in 0..1."""
    pixels = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255
    return np.concatenate([pixels.mean(0), pixels.std(0)])


def distances(clips: list[list[Image.Image]], reference: Image.Image) -> np.ndarray:
    """(targets, frames) style distances of the target clips' frames to the reference image."""
    target = statistics(reference)
    return np.array([[np.linalg.norm(statistics(frame) - target) for frame in clip] for clip in clips])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=8)
    parser.add_argument("--frames", type=int, default=9, help="4k + 1 (the tiny VAE: 4x in time)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        build_wan(Path(folder))
        pipe = load_wan(folder)
    shared = backbone_for(pipe).fit_preset(sa.StyleAlignedConfig.transfer())
    settings = dict(num_inference_steps=args.steps, guidance_scale=5.0, height=WAN_HEIGHT, width=WAN_WIDTH,
                    num_frames=args.frames, max_sequence_length=16)
    rng = np.random.default_rng(0)
    found = {"shared": [], "not shared": []}
    for index in range(args.sets):
        image = reference_image(rng)
        trajectory = sa.invert(pipe, image, "a painting", num_inference_steps=args.steps, guidance_scale=2.0,
                               max_sequence_length=16)
        for name, config in (("shared", shared), ("not shared", sa.StyleAlignedConfig.disabled())):
            clips = sa.generate_set(pipe, TARGETS, config, reference=trajectory, seed=10 * index, **settings)
            found[name].append(distances(clips[1:], image))
    print(f"tiny random-weight Wan 2.1 pipeline, {args.sets} sets x {len(TARGETS)} targets, {args.frames} frames, "
          f"{args.steps} steps: style distance to the still reference (RGB mean+std, L2), lower is closer")
    print("| | first frame | last frame | last / first |\n|---|---|---|---|")
    for name, values in found.items():
        per_frame = np.concatenate(values).mean(0)
        print(f"| {name} | {per_frame[0]:.4f} | {per_frame[-1]:.4f} | {per_frame[-1] / per_frame[0]:.2f} |")
    print("shared / not shared: first frame {:.2f}, last frame {:.2f}".format(
        *(np.concatenate(found["shared"]).mean(0)[[0, -1]] / np.concatenate(found["not shared"]).mean(0)[[0, -1]])))


if __name__ == "__main__":
    main()
