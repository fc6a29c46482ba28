"""Cost of DDIM inversion against generating one image with the same steps and guidance (vanilla diffusers call).

    python benchmarks/inversion.py --device cpu [--model sd15-lite|sd15|tiny|FOLDER] [--steps 50] [--guidance 7.5]

The built-in models have random weights, which time the same as trained ones: `sd15` is SD1.5's architecture
(UNet, VAE and CLIP ViT-L text encoder config values below), `sd15-lite` (the default) halves the UNet and VAE
channels and keeps one layer per block so a CPU finishes in minutes, and `tiny` is a smoke test. Anything else is
loaded with `stylealigned.load_pipeline`. Runs alternate generation and inversion and print medians and the ratio.
"""

import argparse
import statistics
import tempfile
import time

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from stylealigned.inversion import invert
from stylealigned.models import load_pipeline, resolve_device, resolve_dtype
from stylealigned.toy.vocab import word_level_tokenizer

PROMPT = "a watercolor painting of a house with a red car"

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
SD15_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=0, eos_token_id=1,
    pad_token_id=1,
)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)
# name: (UNet channel divisor, UNet layers per block, VAE channel divisor, description)
RANDOM_MODELS = {
    "sd15": (1, 2, 1, "SD1.5 architecture, full size"),
    "sd15-lite": (2, 1, 2, "SD1.5 architecture with half the UNet/VAE channels and one UNet layer per block"),
    "tiny": (10, 1, 4, "SD1.5 layout at a tenth of the UNet channels (smoke test)"),
}


def random_sd15(unet_divisor: int, layers_per_block: int, vae_divisor: int) -> StableDiffusionPipeline:
    """A random-weight StableDiffusionPipeline shaped like SD1.5, optionally slimmed."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET | dict(
        layers_per_block=layers_per_block,
        block_out_channels=tuple(c // unet_divisor for c in SD15_UNET["block_out_channels"]),
    ))
    vae = AutoencoderKL(**SD15_VAE | dict(
        block_out_channels=tuple(c // vae_divisor for c in SD15_VAE["block_out_channels"]),
    ))
    tokenizer = word_level_tokenizer(PROMPT.split(), tempfile.mkdtemp(prefix="benchmark-tokenizer-"))
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **SD15_TEXT))
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def median_seconds(runs: dict, repeats: int, device: torch.device) -> dict:
    """Median wall time of each callable, running them in turn `repeats` times so load drifts hit all alike."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


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
        *shape, description = RANDOM_MODELS[args.model]
        pipe = random_sd15(*shape).to(device, dtype)
        description = f"random weights, {description}"
    else:
        pipe, description = load_pipeline(args.model, device=device, dtype=dtype), args.model
    pipe.set_progress_bar_config(disable=True)
    size = dict(height=args.size, width=args.size)

    def generate(steps=args.steps):
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=args.guidance, **size).images[0]

    image = generate(steps=1)  # warm-up; its image is the one inverted
    invert(pipe, image, PROMPT, num_inference_steps=1, guidance_scale=args.guidance)
    medians = median_seconds(
        {
            "generate one image": generate,
            "DDIM inversion": lambda: invert(pipe, image, PROMPT, args.steps, guidance_scale=args.guidance),
        },
        args.repeats,
        device,
    )
    print(f"model: {args.model} ({description})")
    print(f"{args.size}x{args.size}, DDIM {args.steps} steps, guidance {args.guidance}, {device} {dtype}, "
          f"{torch.get_num_threads()} CPU threads, medians of {args.repeats}")
    for name, seconds in medians.items():
        print(f"  {name:<20} {seconds:8.3f} s")
    print(f"  ratio inversion / generation: {medians['DDIM inversion'] / medians['generate one image']:.3f}")


if __name__ == "__main__":
    main()
