"""Cost of DDIM inversion against generating one image with the same steps and guidance (vanilla diffusers call).

    python benchmarks/inversion.py --device cpu [--model sd15-lite|sd15|tiny|FOLDER] [--steps 50] [--guidance 7.5]

The built-in models have random weights, which time the same as trained ones, and a one-layer text encoder (run
once per call by both): `sd15` is SD1.5's UNet and VAE at full size, `sd15-lite` (the default, as in
benchmarks/speed.py) halves the UNet channels and keeps one layer per block, with the small stand-in VAE, so a CPU
finishes in minutes, and `tiny` is a smoke test. Anything else is loaded with `stylealigned.load_pipeline`. Runs
alternate generation and inversion and print medians and the ratio.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks.common

from benchmarks.common import SD15_LITE, SD15_VAE, SMALL_VAE, median_ms, random_sd15  # noqa: E402
from stylealigned.inversion import invert  # noqa: E402
from stylealigned.models import load_pipeline, resolve_device, resolve_dtype  # noqa: E402

PROMPT = "a watercolor painting of a house with a red car"
# name: (UNet changes to SD1.5's, VAE config, description)
RANDOM_MODELS = {
    "sd15": ({}, SD15_VAE, "SD1.5 UNet and VAE at full size, one-layer text encoder"),
    "sd15-lite": (SD15_LITE, SMALL_VAE,
                  "SD1.5 UNet with half the channels (160-320-640-640) and one layer per block; small VAE, "
                  "one-layer text encoder"),
    "tiny": (dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1), SMALL_VAE,
             "SD1.5 UNet layout at a tenth of the channels (smoke test); small VAE, one-layer text encoder"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    parser.add_argument("--model", default="sd15-lite", help=f"{', '.join(RANDOM_MODELS)} or a folder / hub id")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=256, help="image width and height in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(None, device)
    if args.model in RANDOM_MODELS:
        unet_changes, vae, description = RANDOM_MODELS[args.model]
        pipe = random_sd15(PROMPT.split(), unet_changes, device, vae=vae)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        description = f"random weights, {description}"
    else:
        pipe, description = load_pipeline(args.model, device=device, dtype=dtype), args.model
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=args.size, width=args.size)

    def generate(steps=args.steps):
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=args.guidance, **size).images[0]

    image = generate(steps=1)  # warm-up; its image is the one inverted
    invert(pipe, image, PROMPT, num_inference_steps=1, guidance_scale=args.guidance)
    medians = median_ms(
        {
            "generate one image": generate,
            "DDIM inversion": lambda: invert(pipe, image, PROMPT, args.steps, guidance_scale=args.guidance),
        },
        args.repeats,
        device,
        warmup=0,
    )
    print(f"model: {args.model} ({description})")
    print(f"{args.size}x{args.size}, DDIM {args.steps} steps, guidance {args.guidance}, {device} {dtype}, "
          f"{torch.get_num_threads()} CPU threads, medians of {args.repeats}")
    for name, ms in medians.items():
        print(f"  {name:<20} {ms / 1000:8.3f} s")
    print(f"  ratio inversion / generation: {medians['DDIM inversion'] / medians['generate one image']:.3f}")


if __name__ == "__main__":
    main()
