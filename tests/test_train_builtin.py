"""scripts/train_builtin.py's builtin-flux stage: `--resume` in a clone without checkpoints goes on from the shipped
weights (it does not train a new model over them); an empty --flux-out trains from scratch; --flux-single-layers
deepens the warm start without changing what it computes."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "stylealigned" / "builtin_flux"
WEIGHTS = Path("transformer") / "diffusion_pytorch_model.safetensors"


def train(monkeypatch, work: Path, flux_out: Path, steps: int, starts_at: int, *options: str) -> None:
    """Train builtin-flux into `flux_out` up to step `steps`, checking first that training starts at `starts_at` (so
    that a wrong start fails at once instead of training for hours)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import train_builtin

    fit = getattr(train_builtin.Trainer.fit, "unchecked", train_builtin.Trainer.fit)

    def checked_fit(self, stage, models, loss_at, export, warm_step=0):
        assert (stage, warm_step) == ("flux", starts_at)
        fit(self, stage, models, loss_at, export, warm_step)

    checked_fit.unchecked = fit  # a second call checks its own start, not the first one's
    monkeypatch.setattr(train_builtin.Trainer, "fit", checked_fit)
    monkeypatch.setattr(sys, "argv", ["train_builtin.py", "--resume", "--stages", "flux", "--work", str(work),
                                      "--flux-out", str(flux_out), "--flux-steps", str(steps), "--batch", "2",
                                      "--images", "16", *options])
    threads = torch.get_num_threads()
    try:
        train_builtin.main()  # sets torch's threads (--threads 1)
    finally:
        torch.set_num_threads(threads)


def distance(folder: Path) -> float:
    """How far `folder`'s transformer weights lie from the shipped ones, relative to the shipped ones' size (over the
    parameters both have: a new model has fewer single-stream blocks than the shipped, deepened one)."""
    ours, shipped = load_file(folder / WEIGHTS), load_file(SHIPPED / WEIGHTS)
    both = [name for name in shipped if name in ours]
    apart = sum(float((ours[name].float() - shipped[name].float()).square().sum()) for name in both)
    return (apart / sum(float(shipped[name].float().square().sum()) for name in both)) ** 0.5


def test_resume_without_a_checkpoint_goes_on_from_the_shipped_model(tmp_path, monkeypatch):
    shipped_steps = json.loads((SHIPPED / "training.json").read_text())["flux_steps"]
    flux_out = tmp_path / "builtin_flux"
    shutil.copytree(SHIPPED, flux_out)
    train(monkeypatch, tmp_path / "work", flux_out, shipped_steps + 2, starts_at=shipped_steps)
    assert json.loads((flux_out / "training.json").read_text())["flux_steps"] == shipped_steps + 2
    assert 0 < distance(flux_out) < 1e-2  # two warm-up steps on from the shipped weights, not a new model
    train(monkeypatch, tmp_path / "work", flux_out, shipped_steps + 3, starts_at=0)  # fit resumes from --work's
    assert json.loads((flux_out / "training.json").read_text())["flux_steps"] == shipped_steps + 3  # checkpoint


def test_an_empty_flux_out_trains_from_scratch(tmp_path, monkeypatch):
    flux_out = tmp_path / "fresh"
    train(monkeypatch, tmp_path / "work", flux_out, 1, starts_at=0)
    assert json.loads((flux_out / "training.json").read_text())["flux_steps"] == 1
    assert distance(flux_out) > 0.5  # a new initialisation, unrelated to the shipped weights


def test_a_deepened_transformer_computes_what_it_did(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from train_builtin import deepened

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    deeper = deepened(model, 6)
    assert deeper.config.num_single_layers == 6 and deepened(model, 2) is model
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(3.0), indexing="ij"))
    inputs = dict(hidden_states=torch.randn(2, 9, 4), encoder_hidden_states=torch.randn(2, 5, 16),
                  pooled_projections=torch.randn(2, 8), timestep=torch.tensor([0.3, 0.9]),
                  img_ids=image_ids.flatten(1).T, txt_ids=torch.zeros(5, 3), return_dict=False)
    with torch.no_grad():
        assert torch.equal(deeper(**inputs)[0], model(**inputs)[0])  # each copy adds exactly 0 until trained
    with pytest.raises(SystemExit, match="give a multiple of 2"):
        deepened(model, 3)


def test_resume_deepens_the_shipped_model(tmp_path, monkeypatch):
    shipped_steps = json.loads((SHIPPED / "training.json").read_text())["flux_steps"]
    have = json.loads((SHIPPED / "transformer" / "config.json").read_text())["num_single_layers"]
    flux_out = tmp_path / "builtin_flux"
    shutil.copytree(SHIPPED, flux_out)
    train(monkeypatch, tmp_path / "work", flux_out, shipped_steps + 1, shipped_steps,
          "--flux-single-layers", str(2 * have))
    assert json.loads((flux_out / "transformer" / "config.json").read_text())["num_single_layers"] == 2 * have
    assert json.loads((flux_out / "training.json").read_text())["flux_steps"] == shipped_steps + 1
    with pytest.raises(SystemExit, match="give a new --work"):  # its checkpoint is of the shallower model
        train(monkeypatch, tmp_path / "work", flux_out, shipped_steps + 2, shipped_steps,
              "--flux-single-layers", str(4 * have))
