"""Pipeline loading: folders, schedulers, checkpoint detection, devices, dtypes and the offline hub error."""

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DModel,
)
from safetensors.torch import save_file

from stylealigned import models
from stylealigned.errors import UserError
from stylealigned.models import SCHEDULERS, checkpoint_kind, load_pipeline, resolve_device, resolve_dtype, set_scheduler

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TEXT_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SDXL_TEXT_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


def test_folder_loads_sd_with_ddim(sd_pipe):
    assert isinstance(sd_pipe, StableDiffusionPipeline)
    assert isinstance(sd_pipe.scheduler, DDIMScheduler) and not sd_pipe.scheduler.config.clip_sample
    assert sd_pipe.unet.device.type == "cpu" and sd_pipe.unet.dtype == torch.float32


def test_folder_loads_sdxl_with_ddim(sdxl_pipe):
    assert isinstance(sdxl_pipe, StableDiffusionXLPipeline)
    assert isinstance(sdxl_pipe.scheduler, DDIMScheduler)
    assert sdxl_pipe.text_encoder_2.dtype == torch.float32


def test_dtype_is_applied(tiny_sd_path):
    pipe = load_pipeline(tiny_sd_path, device="cpu", dtype="bf16")
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


@pytest.mark.parametrize("name", [name for name in SCHEDULERS if name != "model"])
def test_scheduler_choice(tiny_sd_path, name):
    pipe = load_pipeline(tiny_sd_path, device="cpu", scheduler=name)
    assert type(pipe.scheduler) is (SCHEDULERS[name] or DDIMScheduler)  # auto: DDIM on UNets
    assert pipe.scheduler.config.beta_end == 0.012  # built from the model's own schedule


def test_model_scheduler_is_kept(sd_pipe):
    set_scheduler(sd_pipe, "euler")
    set_scheduler(sd_pipe, "model")
    assert isinstance(sd_pipe.scheduler, EulerDiscreteScheduler)


def test_unknown_scheduler_lists_choices(tiny_sd_path):
    with pytest.raises(UserError, match="unknown scheduler 'lms'.*ddim.*euler-a.*model"):
        load_pipeline(tiny_sd_path, device="cpu", scheduler="lms")


@pytest.mark.parametrize("model", ["./missing/model.safetensors", "/no/such/folder", "missing.ckpt", "a/b/c"])
def test_unknown_path(model):
    with pytest.raises(UserError, match="no such model file or folder"):
        load_pipeline(model, device="cpu")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(UserError, match="no model_index.json"):
        load_pipeline(str(tmp_path), device="cpu")


def test_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a .safetensors or .ckpt checkpoint"):
        load_pipeline(str(tmp_path / "notes.txt"), device="cpu")


def test_hub_id_offline_is_one_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as caught:
        load_pipeline("nobody/not-a-cached-model", device="cpu")
    message = str(caught.value)
    assert "\n" not in message
    assert "not in the local Hugging Face cache" in message and "hf download nobody/not-a-cached-model" in message


def test_single_file_offline_asks_for_config(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = tmp_path / "model.safetensors"
    save_file({UNET_KEY: torch.zeros(2, 4, 1, 1), SD1_TEXT_KEY: torch.zeros(1)}, path)
    with pytest.raises(UserError, match="config of model.safetensors is not in the local .* cache.*config="):
        load_pipeline(str(path), device="cpu")


def test_pipeline_without_conditional_unet_is_refused(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not support DDPMPipeline with a UNet2DModel; it supports Stable Diffusion"):
        load_pipeline(str(tmp_path), device="cpu")


def test_builtin(monkeypatch, tmp_path, tiny_sd_path):
    monkeypatch.setitem(models.BUILTIN_MODELS, "builtin", tmp_path / "absent")
    with pytest.raises(UserError, match="built-in model builtin is not installed"):
        load_pipeline("builtin", device="cpu")
    monkeypatch.setitem(models.BUILTIN_MODELS, "builtin", Path(tiny_sd_path))
    assert isinstance(load_pipeline("builtin", device="cpu"), StableDiffusionPipeline)



@pytest.mark.parametrize("text_key, kind", [(SD1_TEXT_KEY, "sd1"), (SD2_TEXT_KEY, "sd2"), (SDXL_TEXT_KEY, "sdxl")])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_checkpoint_kind(tmp_path, text_key, kind, suffix):
    tensors = {UNET_KEY: torch.zeros(1), text_key: torch.zeros(1)}
    path = tmp_path / f"model{suffix}"
    save_file(tensors, path) if suffix == ".safetensors" else torch.save({"state_dict": tensors}, path)
    assert checkpoint_kind(path)[0] == kind


@pytest.mark.parametrize("key, kind", [("double_blocks.0.img_attn.norm.key_norm.scale", "flux"),
                                       ("joint_blocks.0.context_block.adaLN_modulation.1.bias", "sd3")])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_transformer_checkpoint_kind(tmp_path, key, kind, prefix):
    save_file({prefix + key: torch.zeros(1)}, tmp_path / "model.safetensors")
    assert checkpoint_kind(tmp_path / "model.safetensors")[0] == kind


def test_checkpoint_without_unet_is_refused(tmp_path):
    save_file({"encoder.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(UserError, match="not a single-file checkpoint of a supported model"):
        checkpoint_kind(tmp_path / "vae.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_corrupt_checkpoint(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not a checkpoint" * 8)
    with pytest.raises(UserError, match="cannot read checkpoint"):
        checkpoint_kind(path)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="'cuda' is not available"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("float16", torch.float16), ("bf16", torch.bfloat16),
                                         ("bfloat16", torch.bfloat16), ("fp32", torch.float32),
                                         ("float32", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_resolve_dtype(name, dtype):
    assert resolve_dtype(name, torch.device("cpu")) == dtype


def test_resolve_dtype_defaults_and_errors():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    with pytest.raises(UserError, match="unknown dtype 'half'; choose one of fp16, float16, bf16"):
        resolve_dtype("half", torch.device("cpu"))
