"""The CLI's promises under hostile input (issue 13): bad input stops before anything is written, `--overwrite`
deletes only our own files, `--resume` completes the identical set, and every failure is one line with exit 2."""

import errno
import inspect
import json
import os
import shutil
import time
import typing
from pathlib import Path

import pytest
from PIL import Image, ImageFont

from stylealigned.backbones.base import Backbone
from stylealigned.cli import common, demo, evaluate, generate, transfer, ui
from stylealigned.inversion import Trajectory
from stylealigned.io import make_grid
from tests.eval_models import tiny_clip_path, tiny_dino_path  # noqa: F401 (fixtures)
from tests.test_cli import FAST, cli
from tests.test_control import controlnet_path  # noqa: F401 (fixture)
from tests.test_transfer_cli import painting  # noqa: F401 (fixture)


def snapshot(folder):
    """Every file under `folder` with its bytes: what "untouched" compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, *args, expected=""):
    """Run the CLI, which must refuse with exit 2 and one last line, "error: ...", and no traceback."""
    code, stdout, err = cli(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and err.rstrip().endswith(errors[0]), (code, err)  # after progress bars
    assert "Traceback" not in stdout + err and expected in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def earlier(tiny_sd_path, tmp_path, capsys):
    """A folder holding an earlier set beside files the user made."""
    out = tmp_path / "out"
    assert cli(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST)[0] == 0
    for name in ("01-mum.png", "2023-06-01-beach.png", "notes.txt"):
        (out / name).write_bytes(b"the user's " + name.encode())
    return out


# 1. --overwrite deletes only what our run.json lists

def test_overwrite_deletes_only_the_files_our_run_json_lists(tiny_sd_path, earlier, capsys):
    theirs = {name: data for name, data in snapshot(earlier).items() if data.startswith(b"the user's")}
    assert cli(capsys, "generate", "a circle", "--model", tiny_sd_path, "--out", earlier, "--overwrite", *FAST)[0] == 0
    after = snapshot(earlier)
    assert sorted(after) == sorted([*theirs, "00-a-circle.png", "grid.png", "run.json"])
    assert all(after[name] == data for name, data in theirs.items())
    assert json.loads(after["run.json"])["files"] == ["00-a-circle.png", "grid.png"]


def test_overwrite_never_replaces_a_file_it_did_not_write(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00-a-circle.png").write_bytes(b"mine")
    (out / "01-mum.png").write_bytes(b"mine too")
    before = snapshot(out)
    refused(capsys, "generate", "a circle", "--model", tiny_sd_path, "--out", out, "--overwrite", *FAST,
            expected="00-a-circle.png was not written by stylealigned")
    assert snapshot(out) == before


# 2. and the late checks: everything is validated before the folder is touched

LATE = {
    "batch size 0": (["--batch-size", "0"], "--batch-size"),
    "steps 1000": (["--steps", "1000"], "--steps 1000 is too many"),
    "steps 1001": (["--steps", "1001"], "--steps"),
    "seed 2**64": (["--seed", str(2**64)], "--seed"),
    "huge shift": (["--shared-score-shift", "1e308"], "shared_score_shift"),
    "huge width": (["--width", "100000"], "--width"),
    "inf guidance": (["--guidance", "inf"], "--guidance"),
    "nan guidance": (["--guidance", "nan"], "--guidance"),
    "no such layer": (["--shared-layers", "no_such_block"], "matches no attention layer; the layers are down_blocks"),
    "full share in batches": (["a dog", "--full-attention-share", "--batch-size", "1"], "cannot run in batches"),
    "missing model": (["--model", "./no/such/model"], "no such model"),
    "empty prompt": (["  "], "prompt argument is empty"),
}


@pytest.mark.parametrize("case", LATE, ids=list(LATE))
def test_bad_input_leaves_the_earlier_set_untouched(tiny_sd_path, earlier, capsys, case):
    args, expected = LATE[case]
    before = snapshot(earlier)
    refused(capsys, "generate", "a tree", "--model", tiny_sd_path, *FAST, *args, "--out", earlier, "--overwrite",
            expected=expected)
    assert snapshot(earlier) == before


def transfer_args(tiny_sd_path, out, *extra):
    return ["transfer", "a dog", "--model", tiny_sd_path, "--out", out, *FAST, *extra]


def test_transfer_checks_offset_trajectory_and_save_path_before_writing(tiny_sd_path, tmp_path, capsys, painting):
    out, saved = tmp_path / "out", tmp_path / "ref.safetensors"
    reference = ["--reference", painting, "--reference-prompt", "a red tree"]
    assert cli(capsys, *transfer_args(tiny_sd_path, out, *reference, "--save-trajectory", saved))[0] == 0
    trajectory = Trajectory.load(saved)
    trajectory.latents = trajectory.latents[..., :-2]  # a latent size its metadata (32x32) contradicts
    trajectory.save(tmp_path / "cropped.safetensors")
    before = snapshot(tmp_path)
    cases = [(["--offset", "3", *reference], "--offset must be below --steps"),
             (["--trajectory", tmp_path / "cropped.safetensors"], "latent of this model is"),
             (["--trajectory", tmp_path], "is a folder"),
             (["--save-trajectory", tmp_path, *reference], "is a folder"),
             (["--save-trajectory", tmp_path / "missing" / "t.safetensors", *reference], "does not exist")]
    for args, expected in cases:
        refused(capsys, *transfer_args(tiny_sd_path, out, *args), "--overwrite", expected=expected)
        assert snapshot(tmp_path) == before


# 3. a resume that differs in prompts, style or reference is refused, naming what differs

def test_resume_refuses_other_prompts_style_or_reference(tiny_sd_path, tmp_path, capsys, painting):
    out = tmp_path / "out"
    args = ["generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST]
    assert cli(capsys, *args)[0] == 0
    before = snapshot(out)
    refused(capsys, *args[:1], "a lion", *args[2:], "--resume", expected="(prompts)")
    refused(capsys, *args, "--style", "ink", "--resume", expected="(prompts, style)")
    assert snapshot(out) == before

    other = tmp_path / "other"
    reference = ["--reference", painting, "--reference-prompt", "a red tree"]
    assert cli(capsys, *transfer_args(tiny_sd_path, other, *reference))[0] == 0
    before = snapshot(other)
    refused(capsys, *transfer_args(tiny_sd_path, other, "--reference", painting, "--reference-prompt", "a blue tree",
                                   "--resume"), expected="(prompts)")
    Image.open(painting).rotate(90).save(painting)  # another image at the same path
    refused(capsys, *transfer_args(tiny_sd_path, other, *reference, "--resume"), expected="(reference_sha256)")
    assert snapshot(other) == before


# 4. resume is bit-identical, whichever images are missing

@pytest.mark.parametrize("batch", ["1", "2"])
def test_resume_reproduces_missing_images_byte_identically(tiny_sd_path, tmp_path, capsys, monkeypatch, batch):
    prompts = [f"a thing number {i}" for i in range(20)]
    args = ["generate", *prompts, "--model", tiny_sd_path, *FAST, "--batch-size", batch]
    waves, real_noise = [], Backbone.initial_noise
    monkeypatch.setattr(Backbone, "initial_noise", lambda self, positions, *a: waves.append(tuple(positions))
                        or real_noise(self, positions, *a))
    assert cli(capsys, *args, "--out", tmp_path / "full")[0] == 0
    full_waves, waves[:] = list(waves), []
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for name in sorted(snapshot(tmp_path / "cut"))[:-2:6] + ["grid.png"]:  # images 0, 6, 12 and 18
        (tmp_path / "cut" / name).unlink()
    assert cli(capsys, *args, "--out", tmp_path / "cut", "--resume")[0] == 0
    assert set(waves) <= set(full_waves)  # the same batches as the full run, whatever is missing
    full, resumed = snapshot(tmp_path / "full"), snapshot(tmp_path / "cut")
    assert sorted(full) == sorted(resumed)
    for name in full:
        if name != "run.json":
            assert full[name] == resumed[name], name


# tracebacks instead of one line

def test_score_on_a_folder_whose_image_is_not_an_image(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"prompts": ["x", "y"], "style": None}))
    (tmp_path / "00-x.png").write_bytes(b"not a png")
    (tmp_path / "01-y.png").write_bytes(b"not a png")
    before = snapshot(tmp_path)
    refused(capsys, "score", tmp_path, "--device", "cpu", expected="00-x.png")
    assert snapshot(tmp_path) == before


def test_full_disk_names_the_file_and_keeps_finished_images(tiny_sd_path, tmp_path, capsys, monkeypatch):
    out, saves, real_save = tmp_path / "out", [], Image.Image.save

    def fill_up(image, file, *args, **kwargs):
        saves.append(file)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, file, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fill_up)
    line = refused(capsys, "generate", "a cat", "a dog", "a house", "--model", tiny_sd_path, "--out", out, *FAST,
                   "--batch-size", "1", expected="No space left on device")
    assert "01-a-dog.png" in line and "finished images are kept" in line and "--resume" in line
    assert sorted(snapshot(out)) == ["00-a-cat.png", "run.json"]


def test_prompts_file_size_is_capped(tiny_sd_path, tmp_path, capsys):
    refused(capsys, "generate", "--prompts-file", "/dev/zero", "--model", tiny_sd_path, "--out", tmp_path / "o",
            *FAST, expected="over 10 MB")
    assert not (tmp_path / "o").exists()


def test_ui_refuses_a_bad_port_and_a_bad_host(tiny_sd_path, capsys):
    refused(capsys, "ui", "--port", "99999", "--model", tiny_sd_path, expected="--port must lie in 0..65535")
    line = refused(capsys, "ui", "--host", "bad.host.invalid", "--port", "0", "--model", tiny_sd_path,
                   "--device", "cpu", expected="--host bad.host.invalid")
    assert "--port" not in line


# smaller

def test_a_long_caption_is_cut_fast_with_an_ellipsis():
    font, start = ImageFont.load_default(), time.perf_counter()
    grid = make_grid([Image.new("RGB", (64, 64))] * 2, columns=2, labels=["x" * 10_000, "short"])
    assert time.perf_counter() - start < 2 and grid.size == (128, 64 + font.getbbox("Ag")[3] + 6)
    from stylealigned.io import _fit
    fitted = _fit("a circle " * 1000, font, 58)
    assert fitted.endswith("…") and font.getlength(fitted) <= 58 < font.getlength(fitted[:-1] + "x…")


def test_outputs_honour_the_umask(tiny_sd_path, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        assert cli(capsys, "generate", "a cat", "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST)[0] == 0
    finally:
        os.umask(previous)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "o").iterdir()} == {oct(0o640)}


# every numeric option of every command refuses every bad value in one line, before it writes anything

ZERO_IS_VALID = {"seed", "offset", "guidance", "inversion_guidance", "shared_score_shift", "port", "share_until"}
NEGATIVE_IS_VALID = {"shared_score_shift"}
COMMANDS = {  # command: (its function, the arguments it needs besides the bad option)
    "generate": (generate.generate, ["a cat", "--model", "{model}", "--out", "{out}"]),
    "transfer": (transfer.transfer, ["a dog", "--reference", "{painting}", "--reference-prompt", "a tree",
                                     "--model", "{model}", "--out", "{out}"]),
    "ui": (ui.ui, ["--model", "{model}"]),
    "demo": (demo.demo, ["--out", "{out}"]),
    "eval": (evaluate.evaluate_command, ["--model", "{model}", "--out", "{out}"]),
}


def numeric_options(command) -> list[str]:
    """The options of a command that take an int or a float, from its signature."""
    names = []
    for name, parameter in inspect.signature(command, eval_str=True).parameters.items():
        kind = parameter.annotation
        if typing.get_origin(kind) is typing.Annotated:
            kind = typing.get_args(kind)[0]
        if {int, float} & ({kind} | set(typing.get_args(kind))):
            names.append(name)
    return names


def bad_values(option: str) -> list[str]:
    values = ["-1e-9" if option == "guidance" else "-1", "1" + "0" * 30, "nan", "inf", "-inf", "abc"]
    return (["0"] if option not in ZERO_IS_VALID else []) + [v for v in values
                                                              if option not in NEGATIVE_IS_VALID or v[0] != "-"]


CASES = [(command, option, value) for command, (function, _) in COMMANDS.items()
         for option in numeric_options(function) for value in bad_values(option)]


def test_every_numeric_option_has_a_limit():
    options = {option for _, option, _ in CASES}
    assert options <= set(common.LIMITS) and {"seed", "steps", "port", "offset", "shared_score_scale"} <= options


@pytest.mark.parametrize("command, option, value", CASES, ids=[f"{c}-{o}-{v[:6]}" for c, o, v in CASES])
def test_bad_numbers_are_one_line_and_write_nothing(tiny_sd_path, tmp_path, capsys, painting, command, option, value):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's")
    before = snapshot(tmp_path)
    args = [a.format(model=tiny_sd_path, out=out, painting=painting) for a in COMMANDS[command][1]]
    line = refused(capsys, command, *args, "--device", "cpu", f"--{option.replace('_', '-')}", value)
    assert option in line or option.replace("_", "-") in line, line
    assert snapshot(tmp_path) == before


# issue 25: nothing lost, round two

def test_save_trajectory_never_replaces_a_file_stylealigned_did_not_write(tiny_sd_path, tmp_path, capsys, painting):
    victim = tmp_path / "victim.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(victim)
    before = snapshot(tmp_path)
    reference = ["--reference", painting, "--reference-prompt", "a red tree", "--save-trajectory", victim]
    refused(capsys, *transfer_args(tiny_sd_path, tmp_path / "t1", *reference), "--overwrite",
            expected="victim.png is a file stylealigned did not write")
    assert snapshot(tmp_path) == before


def test_a_strength_without_denoising_steps_is_refused_before_the_earlier_set_is_touched(tiny_sd_path, earlier,
                                                                                          capsys, painting):
    before = snapshot(earlier)
    for strength, steps in (("0.1", "3"), ("0.01", "50")):
        refused(capsys, "generate", "a tree", "--model", tiny_sd_path, *FAST, "--steps", steps, "--init-image",
                painting, "--strength", strength, "--out", earlier, "--overwrite",
                expected=f"--strength {strength} leaves no denoising step of {steps}")
        assert snapshot(earlier) == before


def test_a_failure_after_the_checks_puts_the_earlier_set_back(tiny_sd_path, earlier, capsys, monkeypatch):
    import stylealigned.sets

    def broken(*args, **kwargs):
        raise RuntimeError("the size of tensor a (0) must match")

    before = snapshot(earlier)
    monkeypatch.setattr(stylealigned.sets, "generate_set", broken)
    with pytest.raises(RuntimeError, match="tensor a"):
        cli(capsys, "generate", "a tree", "--model", tiny_sd_path, *FAST, "--out", earlier, "--overwrite")
    assert snapshot(earlier) == before and not (earlier / ".stylealigned-earlier").exists()


def test_resume_refuses_a_foreign_file_at_one_of_the_set_names(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "a cat", "a square", "--model", tiny_sd_path, "--out", out, *FAST]
    assert cli(capsys, *args)[0] == 0
    Image.new("RGB", (32, 32), (9, 9, 9)).save(out / "01-a-square.png")  # the user's own PNG, no metadata
    before = snapshot(out)
    refused(capsys, *args, "--resume", expected="01-a-square.png is not the file this run wrote")
    assert snapshot(out) == before


def test_resume_refuses_one_of_our_images_edited_in_place(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "a cat", "a square", "--model", tiny_sd_path, "--out", out, *FAST]
    assert cli(capsys, *args)[0] == 0
    edited = Image.open(out / "01-a-square.png")
    edited.load()
    edited.putpixel((0, 0), (255, 0, 0))
    edited.save(out / "01-a-square.png", pnginfo=_same_text(edited))  # our metadata kept, other pixels
    before = snapshot(out)
    refused(capsys, *args, "--resume", expected="01-a-square.png is not the file this run wrote")
    assert snapshot(out) == before


def _same_text(image):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in image.text.items():
        info.add_text(key, value)
    return info


def test_resume_keeps_images_another_process_wrote(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "a cat", "a square", "a tree", "--model", tiny_sd_path, "--out", out, *FAST]
    assert cli(capsys, *args)[0] == 0
    record = json.loads((out / "run.json").read_text())
    del record["sha256"]["01-a-square.png"]  # as when another process wrote it and the run was cut
    (out / "run.json").write_text(json.dumps(record))
    (out / "02-a-tree.png").unlink()
    before = snapshot(out)
    assert cli(capsys, *args, "--resume")[0] == 0
    after = snapshot(out)
    assert after["01-a-square.png"] == before["01-a-square.png"] and "02-a-tree.png" in after


def test_overwrite_refuses_a_listed_name_that_is_now_a_folder(tiny_sd_path, earlier, capsys):
    (earlier / "01-a-dog.png").unlink()
    (earlier / "01-a-dog.png").mkdir()
    (earlier / "01-a-dog.png" / "keep.txt").write_text("the user's")
    before = snapshot(earlier)
    refused(capsys, "generate", "a tree", "--model", tiny_sd_path, *FAST, "--out", earlier, "--overwrite",
            expected="01-a-dog.png was not written by stylealigned")
    assert snapshot(earlier) == before and (earlier / "00-a-cat.png").exists()


@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_our_temporary_files_left_by_a_kill_are_cleaned(tiny_sd_path, tmp_path, capsys, flag):
    out = tmp_path / "out"
    args = ["generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST]
    assert cli(capsys, *args)[0] == 0
    (out / "01-a-dog.png").unlink()
    (out / ".01-a-dog.png.k3j_x9ab.tmp").write_bytes(b"half a png")  # what a SIGKILL mid-write leaves
    (out / ".notes.txt.abcdefgh.tmp").write_bytes(b"not ours")
    assert cli(capsys, *args, flag)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [".notes.txt.abcdefgh.tmp", "00-a-cat.png", "01-a-dog.png",
                                                    "grid.png", "run.json"]


# 6. any attention processor: nn.Module ones too, and removal restores the very objects

def test_processors_that_are_modules_are_shared_and_restored(sd_pipe):
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    import stylealigned as sa
    from tests.test_apply import PROMPTS, latents

    class ModuleProcessor(torch.nn.Module, AttnProcessor2_0):  # as released handlers and adapters leave them
        def forward(self, *args, **kwargs):
            return AttnProcessor2_0.__call__(self, *args, **kwargs)

    with sa.apply(sd_pipe):
        expected = latents(sd_pipe, PROMPTS)  # with the stock processors
    sd_pipe.unet.set_attn_processor(ModuleProcessor())
    originals = dict(sd_pipe.unet.attn_processors)
    names = [name for name, _ in sd_pipe.unet.named_modules()]
    stock = latents(sd_pipe, PROMPTS)
    with sa.apply(sd_pipe):
        shared = latents(sd_pipe, PROMPTS)
    assert torch.equal(shared, expected)
    assert all(sd_pipe.unet.attn_processors[name] is own for name, own in originals.items())
    assert [name for name, _ in sd_pipe.unet.named_modules()] == names
    assert torch.equal(latents(sd_pipe, PROMPTS), stock)


# 10. the web app's --out is checked before the server starts

def test_ui_refuses_an_out_that_is_a_file(tiny_sd_path, tmp_path, capsys):
    (tmp_path / "file").write_text("the user's")
    refused(capsys, "ui", "--out", tmp_path / "file", "--port", "0", "--model", tiny_sd_path, "--device", "cpu",
            expected="--out")
    assert (tmp_path / "file").read_text() == "the user's"


# 12. a ControlNet folder that cannot load, or that does not fit, is refused before anything is written

def test_a_broken_or_misfit_controlnet_is_one_line_before_writing(tiny_sd_path, controlnet_path, earlier, tmp_path,
                                                                  capsys, painting):
    from diffusers import ControlNetModel

    from tests.conftest import loaded

    source = Path(controlnet_path("sd"))
    config_only, truncated, misfit = (tmp_path / name for name in ("config-only", "truncated", "misfit"))
    config_only.mkdir()
    shutil.copy(source / "config.json", config_only)
    shutil.copytree(source, truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    ControlNetModel.from_unet(loaded(tiny_sd_path).unet, conditioning_embedding_out_channels=(8, 16, 32)
                              ).save_pretrained(misfit)  # control images scaled by 4, the latents by 2
    before = snapshot(earlier)
    for folder, expected in ((config_only, "weights are missing or damaged"),
                             (truncated, "weights are missing or damaged"),
                             (misfit, "conditioning_embedding_out_channels")):
        refused(capsys, "generate", "a tree", "a car", "--model", tiny_sd_path, *FAST, "--controlnet", folder,
                "--control-image", painting, "--out", earlier, "--overwrite", expected=expected)
        assert snapshot(earlier) == before


# 13. score with the CLIP and DINO models swapped: one line, no load report

@pytest.mark.parametrize("swapped", ["dino", "both"])
def test_score_with_a_model_of_the_wrong_kind_is_one_line(tmp_path, capsys, tiny_clip_path, tiny_dino_path, swapped):
    from tests.test_eval_score import write_run

    write_run(tmp_path / "run")
    before = snapshot(tmp_path)
    clip, dino = (tiny_dino_path, tiny_clip_path) if swapped == "both" else (tiny_clip_path, tiny_clip_path)
    line = refused(capsys, "score", tmp_path / "run", "--clip-model", clip, "--dino-model", dino, "--device", "cpu",
                   expected="model, not a")
    assert ("--clip-model" if swapped == "both" else "--dino-model") in line
    assert snapshot(tmp_path) == before


# 16. a hub id that cannot be reached fails at once, in one line, for every kind of model

def test_an_unreachable_hub_is_one_line_without_retries(tiny_sd_path, controlnet_path, tiny_dino_path, tmp_path,
                                                        capsys, monkeypatch, painting):
    import socket

    import huggingface_hub.constants as hub

    from tests.test_eval_score import write_run

    lookups, real_getaddrinfo = [], socket.getaddrinfo

    def no_such_host(host, *args, **kwargs):  # offline: the hub's name does not resolve (nothing is sent)
        if host == "hub.invalid":
            lookups.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    monkeypatch.setattr(hub, "ENDPOINT", "http://hub.invalid")
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", "http://hub.invalid/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    write_run(tmp_path / "run")
    generate = ["generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST]
    for args in ([*generate, "--controlnet", "nobody/controlnet", "--control-image", painting],
                 [*generate, "--controlnet", controlnet_path("sd"), "--depth-from", painting, "--depth-model",
                  "nobody/depth"],
                 ["score", tmp_path / "run", "--clip-model", "nobody/clip", "--dino-model", tiny_dino_path]):
        code, _, err = cli(capsys, *args)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "not in the local Hugging Face cache" in errors[0], err
        assert "Retry" not in err and len(lookups) <= 1, lookups  # one probe, no retries (hub calls log them)
        lookups.clear()


# 14. numbers that overflow, scales that blacken, empty reference prompts, sizes silently merged: refused

PANORAMA = ["panorama", "a village", "--width", "64", "--steps", "2", "--device", "cpu"]
SILENT = {
    "huge weights": (["generate", "a house", "--reference-prompt", "a cat", "--reference-prompt", "a dog",
                      "--reference-weight", "1e308", "--reference-weight", "1e308", *FAST],
                     "--reference-weight must lie in 0..1000000, got 1e+308"),
    "nan lora": (["generate", "a cat", "--lora", "{lora}:nan", *FAST], "the scale must lie in -100..100"),
    "inf lora": (["generate", "a cat", "--lora", "{lora}:inf", *FAST], "the scale must lie in -100..100"),
    "huge lora": (["generate", "a cat", "--lora", "{lora}:-1e30", *FAST], "the scale must lie in -100..100"),
    "empty reference prompt": (["generate", "a cat", "--reference-prompt", " ", *FAST], "--reference-prompt is empty"),
    "stride 0": ([*PANORAMA, "--stride", "0"], "--stride must lie in 8.."),
    "window 0": ([*PANORAMA, "--window", "0"], "--window must lie in 8.."),
    "set sizes twice": (["eval", "--experiment", "set-size", "--set-sizes", "4,4", *FAST], "names a size twice"),
    "set sizes empty": (["eval", "--experiment", "set-size", "--set-sizes", ",", *FAST], "comma-separated"),
}


@pytest.mark.parametrize("case", SILENT, ids=list(SILENT))
def test_values_once_silently_changed_are_refused(tiny_sd_path, tmp_path, capsys, case):
    args, expected = SILENT[case]
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"never read: the scale is checked first")
    out = tmp_path / "out"
    refused(capsys, *[str(a).format(lora=lora) for a in args], "--model", tiny_sd_path, "--out", out,
            expected=expected)
    assert not out.exists()


# 15. an overwritten set leaves no scores of the set before

def test_overwrite_deletes_the_scores_of_the_earlier_set(tiny_sd_path, tmp_path, capsys, tiny_clip_path,
                                                         tiny_dino_path):
    out = tmp_path / "out"
    assert cli(capsys, "generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST)[0] == 0
    assert cli(capsys, "score", out, "--clip-model", tiny_clip_path, "--dino-model", tiny_dino_path,
               "--device", "cpu")[0] == 0
    assert json.loads((out / "run.json").read_text())["files"][-1] == "scores.json"
    assert cli(capsys, "generate", "a tree", "--model", tiny_sd_path, "--out", out, "--overwrite", *FAST)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["00-a-tree.png", "grid.png", "run.json"]


def test_a_resume_that_changes_the_set_drops_its_scores(tiny_sd_path, tmp_path, capsys, tiny_clip_path,
                                                        tiny_dino_path):
    """A resume with nothing to do keeps scores.json (and run.json's listing of it); one that regenerates an image
    deletes the scores of the set before."""
    out = tmp_path / "out"
    generate = ("generate", "a cat", "a dog", "--model", tiny_sd_path, "--out", out, *FAST)
    assert cli(capsys, *generate)[0] == 0
    assert cli(capsys, "score", out, "--clip-model", tiny_clip_path, "--dino-model", tiny_dino_path,
               "--device", "cpu")[0] == 0
    scores = (out / "scores.json").read_bytes()
    assert cli(capsys, *generate, "--resume")[0] == 0
    assert (out / "scores.json").read_bytes() == scores
    assert "scores.json" in json.loads((out / "run.json").read_text())["files"]
    (out / "01-a-dog.png").unlink()
    assert cli(capsys, *generate, "--resume")[0] == 0
    assert (out / "01-a-dog.png").exists() and not (out / "scores.json").exists()
    assert "scores.json" not in json.loads((out / "run.json").read_text())["files"]


# 16. messages that say what happened and what to do

@pytest.mark.parametrize("code, strerror, fix", [
    (errno.ENOENT, "No such file or directory", "was removed or renamed meanwhile"),
    (errno.EISDIR, "Is a directory", "move the folder"),
    (errno.EPERM, "Operation not permitted", "allow writing to"),
    (errno.ENOSPC, "No space left on device", "free some space"),
])
def test_a_failed_write_says_why_and_what_to_do(tiny_sd_path, tmp_path, capsys, monkeypatch, code, strerror, fix):
    def fail(image, file, *args, **kwargs):
        raise OSError(code, strerror)

    monkeypatch.setattr(Image.Image, "save", fail)
    line = refused(capsys, "generate", "a cat", "--model", tiny_sd_path, "--out", tmp_path / "o", *FAST,
                   expected=strerror)
    assert fix in line and ("free some space" in line) == (code == errno.ENOSPC), line


def test_a_panorama_into_a_used_folder_does_not_suggest_resume(tiny_sd_path, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text("{}")
    line = refused(capsys, *PANORAMA, "--model", tiny_sd_path, "--out", tmp_path / "o", expected="--overwrite")
    assert "--resume" not in line


def test_an_interrupted_transfer_that_saves_its_trajectory_resumes(tiny_sd_path, tmp_path, capsys, monkeypatch,
                                                                   painting):
    saved, real_save = tmp_path / "t.safetensors", common.RunFolder.save
    args = transfer_args(tiny_sd_path, tmp_path / "o", "a house", "--reference", painting, "--reference-prompt",
                         "a red tree", "--save-trajectory", saved, "--batch-size", "1")

    def save_then_stop(folder, position, image):
        real_save(folder, position, image)
        raise KeyboardInterrupt

    monkeypatch.setattr(common.RunFolder, "save", save_then_stop)
    assert cli(capsys, *args)[0] == 130 and saved.exists()
    monkeypatch.undo()
    assert cli(capsys, *args, "--resume")[0] == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["complete"]


# 17. chunks against one batch: the bound the README states, kept

def test_a_chunked_set_is_within_one_level_of_one_batch_as_the_docs_say(tiny_sd_path, tmp_path, capsys):
    import numpy as np

    from tests.test_cli import pixels

    root = Path(__file__).parents[1]
    docs = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    assert any("equals one batch up to float rounding" in p.read_text() and "one level of 255" in p.read_text()
               for p in docs if p.exists())
    prompts = ["a cat", "a dog", "a house", "a tree", "a car"]
    for name, batch in (("whole", []), ("chunked", ["--batch-size", "1"])):
        assert cli(capsys, "generate", *prompts, "--model", tiny_sd_path, "--out", tmp_path / name, *FAST,
                   *batch)[0] == 0
    whole, chunked = pixels(tmp_path / "whole"), pixels(tmp_path / "chunked")
    assert sorted(whole) == sorted(chunked)
    for name in whole:
        assert np.abs(whole[name].astype(int) - chunked[name].astype(int)).max() <= 1, name


def test_a_failed_demo_puts_the_earlier_one_back(tmp_path, capsys, monkeypatch):
    import stylealigned.demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "grid.png").write_bytes(b"an earlier demo's grid")
    (out / "demo.json").write_text("{}")
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stylealigned.demo, "load_judge", broken)
    assert cli(capsys, "demo", "--out", out, "--overwrite", "--device", "cpu")[0] == 130
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == ["demo.json", "grid.png"]
