"""Panoramas: one window is a set of reference + one target, the reference runs once per step, the windows in
bounded batches, without sharing it is diffusers' MultiDiffusion, circular windows close the seam; the CLI."""

import json

import pytest
import torch
from diffusers import StableDiffusionPanoramaPipeline

import stylealigned as sa
from stylealigned import panorama, sets
from stylealigned.apply import applied
from stylealigned.backbones import backbone_for
from stylealigned.errors import UserError
from tests.test_cli import cli
from tests.tolerance import assert_rounding_close, denoising_depth

SETTINGS = dict(num_inference_steps=3, guidance_scale=5.0)
REFERENCE, PROMPT = "a cat in watercolor style", "a house by a tree"


@pytest.mark.parametrize("pipe_name", ["sd_pipe", "sdxl_pipe"])
def test_one_window_equals_a_set_of_reference_and_one_target(request, pipe_name, decoded):
    pipe = request.getfixturevalue(pipe_name)
    panorama.generate_panorama(pipe, PROMPT, reference_prompt=REFERENCE, width=32, seed=7, **SETTINGS)
    image, reference = decoded
    decoded.clear()
    sets.generate_set(pipe, [REFERENCE, PROMPT], seed=7, height=32, width=32, **SETTINGS)
    (both,) = decoded
    assert_rounding_close(image[0], both[1], denoising_depth(pipe, 3))
    assert_rounding_close(reference[0], both[0], denoising_depth(pipe, 3))


def test_the_reference_runs_once_per_step_and_windows_in_batches(sd_pipe):
    """7 windows (80 px wide, 32 px windows, stride 8 px) in batches of 3: per step one reference call and three
    window calls, each of both guidance halves."""
    calls = []

    def count(module, args, kwargs):
        calls.append((applied(sd_pipe).state.mode, args[0].shape[0]))

    plan = panorama.plan_panorama(sd_pipe, width=80, stride=8)
    assert len(plan.windows) == 7
    hook = sd_pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        panorama.generate_panorama(sd_pipe, PROMPT, width=80, stride=8, view_batch_size=3, **SETTINGS)
    finally:
        hook.remove()
    assert calls == [("record", 2), ("replay", 6), ("replay", 6), ("replay", 2)] * 3


@pytest.mark.parametrize("pipe_name", ["sd_pipe", "sdxl_pipe"])
def test_window_batches_do_not_change_the_panorama(request, pipe_name, decoded):
    pipe = request.getfixturevalue(pipe_name)
    for view_batch_size in (1, 7):
        panorama.generate_panorama(pipe, PROMPT, reference_prompt=REFERENCE, width=80, stride=8, circular=True,
                                   view_batch_size=view_batch_size, **SETTINGS)
    one_at_a_time, _, all_at_once, _ = decoded
    assert_rounding_close(one_at_a_time, all_at_once, denoising_depth(pipe, 3))


def diffusers_multidiffusion(pipe, prompt: str, latents: torch.Tensor, circular: bool) -> torch.Tensor:
    """diffusers' StableDiffusionPanoramaPipeline on the same components, its windows 16 latents with stride 4."""
    plain = StableDiffusionPanoramaPipeline(**pipe.components)
    plain.set_progress_bar_config(disable=True)
    # get_views divides pixels by 8; this VAE downsamples by 2, so it is handed 4x the pixels
    plain.get_views = lambda height, width, circular_padding=False: StableDiffusionPanoramaPipeline.get_views(
        plain, 4 * height, 4 * width, window_size=16, stride=4, circular_padding=circular_padding)
    return plain(prompt, height=32, width=80, latents=latents, circular_padding=circular, view_batch_size=2,
                 output_type="latent", **SETTINGS).images


@pytest.mark.parametrize("circular", [False, True])
def test_without_sharing_it_is_diffusers_multidiffusion(sd_pipe, decoded, circular):
    panorama.generate_panorama(sd_pipe, PROMPT, sa.StyleAlignedConfig.disabled(), width=80, stride=8, seed=7,
                               circular=circular, view_batch_size=3, **SETTINGS)
    ours = decoded[0][..., 8:-8] if circular else decoded[0]  # a circular panorama is decoded with wrapped edges
    noise = backbone_for(sd_pipe).initial_noise([1], 7, 32, 80)  # the panorama's own noise: position 1
    expected = diffusers_multidiffusion(sd_pipe, PROMPT, noise, circular)
    assert_rounding_close(ours, expected, denoising_depth(sd_pipe, 3))


def test_the_reference_shapes_the_panorama_only_when_shared(sd_pipe, decoded):
    for config in (sa.StyleAlignedConfig(), sa.StyleAlignedConfig.disabled()):
        for reference in (REFERENCE, "a red car"):
            panorama.generate_panorama(sd_pipe, PROMPT, config, reference_prompt=reference, width=64, **SETTINGS)
    shared_a, _, shared_b, _, plain_a, _, plain_b, _ = decoded
    assert (shared_a - shared_b).abs().max() > 1e-3
    torch.testing.assert_close(plain_a, plain_b, atol=0, rtol=0)


def test_circular_windows_wrap_across_the_seam(sd_pipe):
    plan = panorama.plan_panorama(sd_pipe, width=80, stride=8, circular=True)
    assert plan.windows == [(0, left) for left in range(0, 40, 4)]  # one window every 4 of the 40 latent columns
    latents = torch.arange(40.0).expand(1, 1, 16, 40)
    last = plan.extended(latents)[..., 36:36 + 16]  # the last window runs over the seam
    assert last[0, 0, 0].tolist() == [36, 37, 38, 39] + list(range(12))
    assert torch.equal(plan.count, torch.full((1, 1, 16, 40), 4.0))  # every column in 4 windows, the seam too
    straight = panorama.plan_panorama(sd_pipe, width=80, stride=8).count
    assert straight[0, 0, 0, 0] == 1 and straight[0, 0, 0, 20] == 4


@pytest.mark.parametrize("bad, match", [
    (dict(width=36), "multiple of 8"),
    (dict(width=16), "smaller than its 32-pixel window"),
    (dict(stride=40), "larger than the 32-pixel window"),
    (dict(view_batch_size=0), "view_batch_size must be at least 1"),
    (dict(config=sa.StyleAlignedConfig(full_attention_share=True)), "full_attention_share"),
])
def test_bad_input_is_one_line(sd_pipe, bad, match):
    with pytest.raises(UserError, match=match) as error:
        panorama.generate_panorama(sd_pipe, PROMPT, **SETTINGS, **bad)
    assert "\n" not in str(error.value)


def test_transformer_pipelines_are_refused(flux_pipe):
    with pytest.raises(UserError, match="panoramas need a UNet pipeline .* not FluxPipeline"):
        panorama.generate_panorama(flux_pipe, PROMPT, **SETTINGS)


def test_cli_writes_the_reference_the_panorama_and_the_record(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "pano"
    args = ["panorama", "a village", "--style", "watercolor style", "--model", tiny_sd_path, "--out", out,
            "--width", "64", "--stride", "16", "--steps", "2", "--device", "cpu", "--circular"]
    code, stdout, stderr = cli(capsys, *args)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["00-a-village-watercolor-style.png",
                                                      "01-a-village-watercolor-style.png", "run.json"]
    record = json.loads((out / "run.json").read_text())
    assert record["complete"] and record["files"] == ["00-a-village-watercolor-style.png",
                                                      "01-a-village-watercolor-style.png"]
    assert {key: record["parameters"][key] for key in ("width", "height", "window", "stride", "circular")} == dict(
        width=64, height=32, window=32, stride=16, circular=True)
    code, _, stderr = cli(capsys, *args)
    assert code == 2 and "--overwrite" in stderr
    assert cli(capsys, *args, "--overwrite")[0] == 0


@pytest.mark.parametrize("extra", [["--width", "16"], ["--width", "36"], ["--view-batch-size", "0"]])
def test_cli_bad_input_exits_2_without_a_folder(tiny_sd_path, tmp_path, capsys, extra):
    out = tmp_path / "pano"
    code, _, stderr = cli(capsys, "panorama", "a village", "--model", tiny_sd_path, "--out", out, "--device", "cpu",
                          *extra)
    assert code == 2 and stderr.splitlines()[-1].startswith("error: ")  # after the loading progress bars
    assert not out.exists()


def test_cli_refuses_transformers_without_a_folder(tiny_flux_path, tmp_path, capsys):
    out = tmp_path / "pano"
    code, _, stderr = cli(capsys, "panorama", "a village", "--model", tiny_flux_path, "--out", out, "--device", "cpu")
    assert code == 2 and "UNet pipeline" in stderr and not out.exists()
