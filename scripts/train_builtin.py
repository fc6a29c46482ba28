"""Train the built-in toy text-to-image model and its ground-truth classifier on the synthetic world.

    python scripts/train_builtin.py --seed 0 --steps 12000 --resume

Stages, in order (choose with --stages), each checkpointed in --work every --save-every seconds:
  vae         AutoencoderKL 64x64x3 -> 16x16x4, trained on rendered images
  latents     render the UNet training set once and encode it with the frozen VAE
  unet        CLIP text encoder and UNet jointly: noise-prediction loss (min-SNR weighted), EMA, and
              classifier-free guidance dropout through empty captions
  classifier  the object/style CNN, on renders and VAE round trips with augmentations
Every UNet checkpoint also rewrites --out (a StableDiffusionPipeline folder holding the EMA weights), so the
shipped model is always the latest one. --resume continues from --work; when --work has no checkpoint (a fresh
clone), it warm-starts from the model already in --out (the EMA weights, with a new optimiser). Logs go to stdout.
Run in the background on one core: `nohup python scripts/train_builtin.py --resume > runs/train.log 2>&1 &`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel

from stylealigned.toy import world
from stylealigned.toy.classifier import ShapeStyleClassifier, to_tensor
from stylealigned.toy.vocab import word_level_tokenizer

ROOT = Path(__file__).resolve().parent.parent
VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=64, mid_block_add_attention=False)
UNET_CONFIG = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96),
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                   attention_head_dim=4, norm_num_groups=16)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def log(stage: str, **values) -> None:
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"{time.strftime('%H:%M:%S')} [{stage}] {text}", flush=True)


def save_atomic(state: dict, path: Path) -> None:
    """torch.save through a temporary file, so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def render_batch(seeds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] with object and style indices, one synthetic sample per seed."""
    samples = [world.sample(int(s)) for s in seeds]
    objects = torch.tensor([world.OBJECTS.index(s.object) for s in samples])
    styles = torch.tensor([world.STYLES.index(s.style) for s in samples])
    return to_tensor([s.image for s in samples]), objects, styles


def seeds_for(args, stage: int, step: int, batch: int) -> range:
    """Disjoint sample seeds per (stage, step), so a resumed run sees exactly the batches a straight run would."""
    start = ((args.seed * 8 + stage) * 10_000_000 + step) * batch
    return range(start, start + batch)


class Trainer:
    """Holds paths and options; one method per stage."""

    def __init__(self, args):
        self.args, self.work, self.out = args, Path(args.work), Path(args.out)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer = word_level_tokenizer(world.vocabulary(), self.work / "tokenizer")

    def checkpoint(self, name: str):
        path = self.work / f"{name}.pt"
        return torch.load(path, weights_only=False) if self.args.resume and path.exists() else None

    # -- vae ------------------------------------------------------------------------------------------------------
    def train_vae(self) -> None:
        vae = AutoencoderKL(**VAE_CONFIG)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=self.args.vae_lr)
        state, step = self.checkpoint("vae"), 0
        if state:
            vae.load_state_dict(state["vae"]), optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        elif self.args.resume and (self.out / "vae").exists():
            log("vae", note="warm start from --out")
            vae = AutoencoderKL.from_pretrained(self.out / "vae").float()
            step = self.args.vae_steps
        last_save, started = time.time(), time.time()
        while step < self.args.vae_steps:
            pixels, _, _ = render_batch(seeds_for(self.args, 0, step, self.args.vae_batch))
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            mse = F.mse_loss(reconstruction, pixels)
            loss = mse + F.l1_loss(reconstruction, pixels) + self.args.kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                log("vae", step=step, mse=mse.item(), loss=loss.item(), steps_per_s=50 / (time.time() - started))
                started = time.time()
            if time.time() - last_save > self.args.save_every or step == self.args.vae_steps:
                save_atomic({"vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                            self.work / "vae.pt")
                last_save = time.time()
        self.vae = vae.eval().requires_grad_(False)

    # -- latents --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self) -> None:
        path = self.work / "latents.pt"
        if path.exists() and torch.load(path)["count"] == self.args.images:
            self.data = torch.load(path)
            return
        latents, objects, styles = [], [], []
        for start in range(0, self.args.images, 256):
            seeds = range(10**9 + start, 10**9 + min(start + 256, self.args.images))
            pixels, o, s = render_batch([self.args.seed * 10**7 + seed for seed in seeds])
            latents.append(self.vae.encode(pixels).latent_dist.mean)
            objects.append(o), styles.append(s)
        latents = torch.cat(latents)
        self.data = {"latents": latents, "objects": torch.cat(objects), "styles": torch.cat(styles),
                     "scaling_factor": float(1 / latents.std()), "count": self.args.images}
        torch.save(self.data, path)
        log("latents", count=self.args.images, std=latents.std().item(), mean=latents.mean().item())

    # -- unet + text encoder --------------------------------------------------------------------------------------
    def new_text_encoder(self) -> CLIPTextModel:
        tok = self.tokenizer
        return CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                            **TEXT_CONFIG))

    def encode_text(self, text_encoder, captions) -> torch.Tensor:
        """Prompt embeddings exactly as StableDiffusionPipeline computes them."""
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return text_encoder(ids)[0]

    def train_unet(self) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        unet, text_encoder = UNet2DConditionModel(**UNET_CONFIG), self.new_text_encoder()
        state, step = self.checkpoint("unet"), 0
        if state is None and args.resume and (self.out / "unet").exists():
            log("unet", note="warm start from --out")
            unet = UNet2DConditionModel.from_pretrained(self.out / "unet").float()
            text_encoder = CLIPTextModel.from_pretrained(self.out / "text_encoder").float()
            step = json.loads((self.out / "training.json").read_text())["unet_steps"]
        models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
        ema = copy.deepcopy(models).requires_grad_(False)
        optimizer = torch.optim.AdamW(models.parameters(), lr=args.lr, weight_decay=1e-2)
        if state:
            models.load_state_dict(state["models"]), ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        noise_schedule = DDPMScheduler(**SCHEDULE)
        alphas = noise_schedule.alphas_cumprod
        latents, scale = self.data["latents"], self.data["scaling_factor"]
        objects, styles = self.data["objects"].tolist(), self.data["styles"].tolist()
        last_save, started, losses = time.time(), time.time(), []
        while step < args.steps:
            rng = np.random.default_rng(seeds_for(args, 2, step, 1).start)
            index = rng.integers(len(latents), size=args.batch)
            clean = latents[index] * scale
            captions = [world.caption(world.OBJECTS[objects[i]], world.STYLES[styles[i]], rng) for i in index]
            generator = torch.Generator().manual_seed(int(index[0]) + step)
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, len(alphas), (args.batch,), generator=generator)
            noisy = noise_schedule.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps, self.encode_text(text_encoder, captions)).sample
            snr = alphas[timesteps] / (1 - alphas[timesteps])
            weight = torch.clamp(snr, max=args.snr_gamma) / snr
            loss = (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
            optimizer.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for average, current in zip(ema.parameters(), models.parameters()):
                    average.lerp_(current, 1 - decay)
            losses.append(loss.item())
            if step % 50 == 0:
                log("unet", step=step, loss=float(np.mean(losses)), steps_per_s=50 / (time.time() - started))
                started, losses = time.time(), []
            if time.time() - last_save > args.save_every or step == args.steps:
                save_atomic({"models": models.state_dict(), "ema": ema.state_dict(),
                             "optimizer": optimizer.state_dict(), "step": step}, self.work / "unet.pt")
                self.export(ema["unet"], ema["text_encoder"], step)
                last_save = time.time()
                log("unet", step=step, note="checkpoint and export")

    def export(self, unet, text_encoder, step: int) -> None:
        """Write the StableDiffusionPipeline folder --out in fp16, replacing each component folder in one move."""
        vae, unet, text_encoder = (copy.deepcopy(m).half() for m in (self.vae, unet, text_encoder))
        vae.register_to_config(scaling_factor=self.data["scaling_factor"])
        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=self.tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        staging = self.work / "export"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps({"unet_steps": step, "seed": self.args.seed}))
        self.out.mkdir(parents=True, exist_ok=True)
        for entry in sorted(staging.iterdir()):
            target = self.out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)

    # -- classifier -----------------------------------------------------------------------------------------------
    def augment(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise, blur, colour jitter and small shifts, so the classifier also trusts generated images."""
        count = len(pixels)
        rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        pixels = pixels * (1 + 0.2 * (rand(count, 3, 1, 1) - 0.5)) + 0.2 * (rand(count, 3, 1, 1) - 0.5)
        blurred = F.avg_pool2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        mix = (rand(count, 1, 1, 1) < 0.4).float()
        pixels = mix * blurred + (1 - mix) * pixels
        pixels = pixels + torch.randn(pixels.shape, generator=generator) * 0.08 * rand(count, 1, 1, 1)
        dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=generator))
        return torch.roll(pixels, shifts=(dy, dx), dims=(2, 3)).clamp(-1.2, 1.2)

    def train_classifier(self) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        model = ShapeStyleClassifier()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        state, step = self.checkpoint("classifier"), 0
        if state:
            model.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        generator = torch.Generator().manual_seed(args.seed)
        last_save, started = time.time(), time.time()
        while step < args.classifier_steps:
            pixels, objects, styles = render_batch(seeds_for(args, 3, step, args.classifier_batch))
            half = len(pixels) // 2
            with torch.no_grad():
                pixels[:half] = self.vae.decode(self.vae.encode(pixels[:half]).latent_dist.mean).sample
            for group in optimizer.param_groups:
                group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / args.classifier_steps))
            object_logits, style_logits = model(self.augment(pixels, generator))
            loss = F.cross_entropy(object_logits, objects) + F.cross_entropy(style_logits, styles)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0:
                accuracy = ((object_logits.argmax(1) == objects).float().mean().item(),
                            (style_logits.argmax(1) == styles).float().mean().item())
                log("classifier", step=step, loss=loss.item(), object_acc=accuracy[0], style_acc=accuracy[1],
                    steps_per_s=50 / (time.time() - started))
                started = time.time()
            if time.time() - last_save > args.save_every or step == args.classifier_steps:
                save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                            self.work / "classifier.pt")
                last_save = time.time()
        model.save(self.out / "classifier")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12000, help="UNet training steps in total")
    parser.add_argument("--resume", action="store_true", help="continue from --work, or warm-start from --out")
    parser.add_argument("--out", default=str(ROOT / "stylealigned" / "builtin"), help="the shipped pipeline folder")
    parser.add_argument("--work", default=str(ROOT / "runs" / "builtin"), help="checkpoints and cached latents")
    parser.add_argument("--stages", default="vae,latents,unet,classifier")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.998)
    parser.add_argument("--snr-gamma", type=float, default=5.0)
    parser.add_argument("--images", type=int, default=20000, help="size of the encoded UNet training set")
    parser.add_argument("--vae-steps", type=int, default=2400)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--classifier-steps", type=int, default=1000)
    parser.add_argument("--classifier-batch", type=int, default=64)
    parser.add_argument("--save-every", type=float, default=300, help="seconds between checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    trainer = Trainer(args)
    stages = args.stages.split(",")
    trainer.train_vae()  # always: later stages need the VAE, and a finished VAE returns at once
    if "latents" in stages or "unet" in stages:
        trainer.encode_latents()
    if "unet" in stages:
        trainer.train_unet()
    if "classifier" in stages:
        trainer.train_classifier()


if __name__ == "__main__":
    main()
