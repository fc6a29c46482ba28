"""Train the built-in toy text-to-image models and their ground-truth classifier on the synthetic world.

    python scripts/train_builtin.py --seed 0 --steps 12000 --resume
    python scripts/train_builtin.py --resume --stages flux --flux-steps 6000

Stages, in order (choose with --stages), each checkpointed in --work every --save-every seconds:
  vae         AutoencoderKL 64x64x3 -> 16x16x4, trained on rendered images
  latents     render the UNet training set once and encode it with the frozen VAE
  unet        CLIP text encoder and UNet jointly: noise-prediction loss (min-SNR weighted), EMA, and
              classifier-free guidance dropout through empty captions
  classifier  the object/style CNN, on renders and VAE round trips with augmentations
  flux        builtin-flux: a small FluxTransformer2DModel and its T5 encoder jointly, flow matching on the same
              latents, beside the frozen VAE and CLIP text encoder of --out (FLUX's pooled text)
Every UNet checkpoint also rewrites --out (a StableDiffusionPipeline folder holding the EMA weights), and every
FLUX checkpoint --flux-out (a FluxPipeline folder), so the shipped models are always the latest ones. --resume
continues from --work; when --work has no checkpoint (a fresh clone), it warm-starts from the model already in --out
or --flux-out (the EMA weights, with a new optimiser, at the step its training.json names); an empty --flux-out
trains builtin-flux from scratch, and --flux-single-layers N (a multiple of the warm start's) deepens it, each
single-stream block followed by copies whose output gate is closed (the same model until training opens them).
The learning rate warms up over --warmup steps, stays at --lr, and with
--anneal N falls linearly to 0 over the run's last N steps. Logs go to stdout.
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
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from stylealigned.toy import world
from stylealigned.toy.classifier import ShapeStyleClassifier, to_tensor
from stylealigned.toy.vocab import t5_tokenizer, word_level_tokenizer

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
# builtin-flux: FLUX.1's block layout at toy scale. 64x64 images are 16x16x4 latents, packed 2x2 into 64 tokens;
# RoPE axes (t, h, w) split the 32 channels of a head.
FLUX_CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                   num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=TEXT_CONFIG["hidden_size"],
                   guidance_embeds=False, axes_dims_rope=(8, 12, 12))
T5_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=16, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
T5_LENGTH = 12  # the T5 tokenizer's model_max_length: captions are at most 5 words and </s>
FLOW_SCHEDULE = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
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

    def has_checkpoint(self, name: str) -> bool:
        """Whether --resume continues stage `name` from its checkpoint in --work."""
        return self.args.resume and (self.work / f"{name}.pt").exists()

    def checkpoint(self, name: str):
        return torch.load(self.work / f"{name}.pt", weights_only=False) if self.has_checkpoint(name) else None

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

    def batch(self, step: int) -> tuple[torch.Tensor, list[str], torch.Generator]:
        """Step `step`'s clean latents (scaled, shifted), their sampled captions and a generator for its noise."""
        rng = np.random.default_rng(seeds_for(self.args, 2, step, 1).start)
        index = rng.integers(len(self.data["latents"]), size=self.args.batch)
        clean = (self.data["latents"][index] - self.data.get("shift", 0.0)) * self.data["scaling_factor"]
        objects, styles = self.data["objects"], self.data["styles"]
        captions = [world.caption(world.OBJECTS[objects[i]], world.STYLES[styles[i]], rng) for i in index]
        return clean, captions, torch.Generator().manual_seed(int(index[0]) + step)

    def fit(self, stage: str, models: torch.nn.ModuleDict, loss_at, export, warm_step: int = 0) -> None:
        """AdamW with warmup and clipping, an EMA copy, logs every 50 steps, and every --save-every seconds a
        checkpoint in --work plus `export(ema, step)`; resumes from the stage's checkpoint."""
        args = self.args
        ema = copy.deepcopy(models).requires_grad_(False)
        trainable = [p for p in models.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-2)
        state, step = self.checkpoint(stage), warm_step
        if state:
            models.load_state_dict(state["models"]), ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            step = state["step"]
        total = args.steps if stage == "unet" else args.flux_steps
        last_save, started, losses = time.time(), time.time(), []
        while step < total:
            loss = loss_at(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup, (total - step) / args.anneal)
            optimizer.step()
            step += 1
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for average, current in zip(ema.parameters(), models.parameters()):
                    average.lerp_(current, 1 - decay)
            losses.append(loss.item())
            if step % 50 == 0:
                log(stage, step=step, loss=float(np.mean(losses)), steps_per_s=50 / (time.time() - started))
                started, losses = time.time(), []
            if time.time() - last_save > args.save_every or step == total:
                save_atomic({"models": models.state_dict(), "ema": ema.state_dict(),
                             "optimizer": optimizer.state_dict(), "step": step}, self.work / f"{stage}.pt")
                export(ema, step)
                last_save = time.time()
                log(stage, step=step, note="checkpoint and export")

    def train_unet(self) -> None:
        args = self.args
        torch.manual_seed(args.seed)
        unet, text_encoder, step = UNet2DConditionModel(**UNET_CONFIG), self.new_text_encoder(), 0
        if args.resume and not self.has_checkpoint("unet") and (self.out / "unet").exists():
            log("unet", note="warm start from --out")
            unet = UNet2DConditionModel.from_pretrained(self.out / "unet").float()
            text_encoder = CLIPTextModel.from_pretrained(self.out / "text_encoder").float()
            step = json.loads((self.out / "training.json").read_text())["unet_steps"]
        noise_schedule = DDPMScheduler(**SCHEDULE)
        alphas = noise_schedule.alphas_cumprod

        def loss_at(step: int) -> torch.Tensor:
            clean, captions, generator = self.batch(step)
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, len(alphas), (args.batch,), generator=generator)
            noisy = noise_schedule.add_noise(clean, noise, timesteps)
            prediction = unet(noisy, timesteps, self.encode_text(text_encoder, captions)).sample
            snr = alphas[timesteps] / (1 - alphas[timesteps])
            weight = torch.clamp(snr, max=args.snr_gamma) / snr
            return (weight * F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))).mean()

        models = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
        self.fit("unet", models, loss_at, lambda ema, step: self.export(ema["unet"], ema["text_encoder"], step), step)

    # -- builtin-flux ---------------------------------------------------------------------------------------------
    def flux_pipeline(self, transformer, text_encoder_2) -> FluxPipeline:
        """The FluxPipeline builtin-flux ships: this transformer and T5 with the frozen VAE and CLIP of --out."""
        vae = AutoencoderKL.from_pretrained(self.out / "vae").float()
        vae.register_to_config(scaling_factor=self.data["scaling_factor"], shift_factor=self.data["shift"])
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULE), vae=vae,
                            text_encoder=CLIPTextModel.from_pretrained(self.out / "text_encoder").float(),
                            tokenizer=self.tokenizer, text_encoder_2=text_encoder_2,
                            tokenizer_2=t5_tokenizer(world.vocabulary(), model_max_length=T5_LENGTH),
                            transformer=transformer)

    def train_flux(self) -> None:
        """Flow matching (velocity noise - clean at logit-normal sigmas) with text through the pipeline's own
        encode_prompt, so training sees exactly the embeddings sampling will."""
        args = self.args
        torch.manual_seed(args.seed)
        self.data["shift"] = float(self.data["latents"].mean())
        tokenizer_2 = t5_tokenizer(world.vocabulary(), model_max_length=T5_LENGTH)
        shipped, step = Path(args.flux_out), 0
        if args.resume and (shipped / "transformer").exists():
            # --flux-out's architecture, and its weights unless --work has a checkpoint (fit loads that over them)
            transformer = FluxTransformer2DModel.from_pretrained(shipped / "transformer").float()
            text_encoder_2 = T5EncoderModel.from_pretrained(shipped / "text_encoder_2").float()
            have, resuming = transformer.config.num_single_layers, self.has_checkpoint("flux")
            transformer = deepened(transformer, args.flux_single_layers or have)
            if resuming and transformer.config.num_single_layers != have:
                raise SystemExit(f"--flux-single-layers {args.flux_single_layers} deepens the model in --flux-out, but "
                                 f"--work holds a checkpoint of its {have}-block form: give a new --work")
            if not resuming:
                log("flux", note="warm start from --flux-out")
                step = json.loads((shipped / "training.json").read_text())["flux_steps"]
        else:
            transformer = FluxTransformer2DModel(**FLUX_CONFIG | {
                "num_single_layers": args.flux_single_layers or FLUX_CONFIG["num_single_layers"]})
            text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), **T5_CONFIG))
        pipe = self.flux_pipeline(transformer, text_encoder_2)
        pipe.text_encoder.requires_grad_(False)
        side = self.data["latents"].shape[-1]
        image_ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, "cpu", torch.float32)

        def loss_at(step: int) -> torch.Tensor:
            clean, captions, generator = self.batch(step)
            noise = torch.randn(clean.shape, generator=generator)
            sigmas = torch.sigmoid(torch.randn(args.batch, generator=generator))[:, None, None, None]
            noisy = pipe._pack_latents((1 - sigmas) * clean + sigmas * noise, *clean.shape)
            embeds, pooled, text_ids = pipe.encode_prompt(captions, None, device="cpu",
                                                          max_sequence_length=T5_LENGTH)
            velocity = pipe.transformer(hidden_states=noisy, timestep=sigmas.flatten(), pooled_projections=pooled,
                                        encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
                                        return_dict=False)[0]
            return F.mse_loss(velocity, pipe._pack_latents(noise - clean, *clean.shape))

        models = torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder_2": pipe.text_encoder_2})
        self.fit("flux", models, loss_at, self.export_flux, step)

    def export_flux(self, ema: torch.nn.ModuleDict, step: int) -> None:
        """Write the FluxPipeline folder --flux-out (fp16 weights) in one move per component."""
        pipe = self.flux_pipeline(*(copy.deepcopy(ema[name]) for name in ("transformer", "text_encoder_2")))
        side = self.data["latents"].shape[-1] * pipe.vae_scale_factor  # the default size it samples at, in pixels
        self.publish(pipe.to(torch.float16), Path(self.args.flux_out),
                     {"flux_steps": step, "seed": self.args.seed, "side": side})

    def export(self, unet, text_encoder, step: int) -> None:
        """Write the StableDiffusionPipeline folder --out in fp16, replacing each component folder in one move."""
        vae, unet, text_encoder = (copy.deepcopy(m).half() for m in (self.vae, unet, text_encoder))
        vae.register_to_config(scaling_factor=self.data["scaling_factor"])
        scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=self.tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        self.publish(pipe, self.out, {"unet_steps": step, "seed": self.args.seed})

    def publish(self, pipe, out: Path, training: dict) -> None:
        """Save `pipe` with training.json into `out`, replacing each component folder in one move."""
        staging = self.work / "export"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps(training))
        out.mkdir(parents=True, exist_ok=True)
        for entry in sorted(staging.iterdir()):
            target = out / entry.name
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


def deepened(transformer: FluxTransformer2DModel, single_layers: int) -> FluxTransformer2DModel:
    """`transformer` with `single_layers` single-stream blocks: each of its own followed by copies whose output gate
    is zero, so the deeper model computes exactly what it did until training opens the gates."""
    have = transformer.config.num_single_layers
    if single_layers == have:
        return transformer
    if single_layers % have:  # fewer too
        raise SystemExit(f"--flux-single-layers {single_layers}: the model has {have} single-stream blocks; "
                         f"give a multiple of {have}")
    deeper = FluxTransformer2DModel(**{**transformer.config, "num_single_layers": single_layers})
    state, copies = transformer.state_dict(), single_layers // have
    for name, value in list(state.items()):
        if name.startswith("single_transformer_blocks."):
            _, index, rest = name.split(".", 2)
            for copy_index in range(copies):
                state[f"single_transformer_blocks.{int(index) * copies + copy_index}.{rest}"] = (
                    gate_closed(rest, value) if copy_index else value)
    deeper.load_state_dict(state)
    return deeper


def gate_closed(name: str, value: torch.Tensor) -> torch.Tensor:
    """A single-stream block's parameter `name` with its output gate (the last third of the norm's projection) 0."""
    if not name.startswith("norm.linear."):
        return value
    value = value.clone()
    value[2 * len(value) // 3:] = 0
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12000, help="UNet training steps in total")
    parser.add_argument("--resume", action="store_true", help="continue from --work, or warm-start from --out")
    parser.add_argument("--out", default=str(ROOT / "stylealigned" / "builtin"), help="the shipped pipeline folder")
    parser.add_argument("--work", default=str(ROOT / "runs" / "builtin"), help="checkpoints and cached latents")
    parser.add_argument("--stages", default="vae,latents,unet,classifier", help="add flux for builtin-flux")
    parser.add_argument("--flux-out", default=str(ROOT / "stylealigned" / "builtin_flux"),
                        help="the shipped builtin-flux folder")
    parser.add_argument("--flux-steps", type=int, default=6000, help="builtin-flux training steps in total")
    parser.add_argument("--flux-single-layers", type=int,
                        help="builtin-flux's single-stream blocks (default: the warm start's, 4 for a new model); "
                             "a multiple of the warm start's deepens it")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=7e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--anneal", type=int, default=1,
                        help="decay the learning rate linearly to 0 over the last N steps")
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
    if {"latents", "unet", "flux"} & set(stages):
        trainer.encode_latents()
    if "unet" in stages:
        trainer.train_unet()
    if "flux" in stages:
        trainer.train_flux()
    if "classifier" in stages:
        trainer.train_classifier()


if __name__ == "__main__":
    main()
