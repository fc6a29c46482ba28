"""ControlNet-guided sets on tiny SD1, SDXL and FLUX.1 ControlNet pipelines: a set equals each target run alone with
its own control image, chunks equal one batch, an uncontrolled reference is the plain pipeline's image, removal is
exact; the forms control images come in, loading ControlNets, and depth maps."""

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, FluxControlNetModel
from PIL import Image, ImageOps
from safetensors.torch import save_file
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil, pipeline

import stylealigned as sa
from stylealigned import sets
from stylealigned.apply import HOOK
from stylealigned.backbones import backbone_for
from stylealigned.control import control_inputs, depth_maps, guided
from stylealigned.errors import UserError
from stylealigned.inversion import invert
from stylealigned.prompts import tagged_prompts
from stylealigned.models import load_controlnet, load_pipeline, with_controlnet, with_image_input
from tests.conftest import loaded
from tests.dit_pipelines import PROMPT_KWARGS
from tests.tolerance import assert_rounding_close, denoising_depth

PROMPTS = ["a cat in watercolor style", "a dog", "a house", "a tree"]
SEED, SIZE = 7, 32
FAMILIES = ["sd", "sdxl", "flux"]
# FLUX.1-dev embeds its guidance: one row per image; the UNets batch classifier-free guidance: two groups
GUIDANCE = {"sd": dict(guidance_scale=5.0), "sdxl": dict(guidance_scale=5.0),
            "flux": dict(guidance_scale=3.5, **PROMPT_KWARGS)}
GROUPS = {"sd": 2, "sdxl": 2, "flux": 1}
CONTROL_ARGUMENT = {"sd": "image", "sdxl": "image", "flux": "control_image"}


def settings(family: str) -> dict:
    return dict(num_inference_steps=3, height=SIZE, width=SIZE, **GUIDANCE[family])


def randomized(controlnet):
    """A ControlNet starts with zero output layers, adding nothing; random ones make the control images matter."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    return controlnet.eval()


def build_controlnet(family: str, base_path: str):
    if family == "flux":  # one double- and one single-stream block for the transformer's two of each
        torch.manual_seed(0)
        return randomized(FluxControlNetModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6)))
    return randomized(ControlNetModel.from_unet(loaded(base_path).unet, conditioning_embedding_out_channels=(8, 16)))


@pytest.fixture(scope="session")
def controlnet_path(request, tmp_path_factory):
    """`controlnet_path(family)`: a tiny random ControlNet for that family's tiny pipeline, saved once."""
    built = {}

    def path(family: str) -> str:
        if family not in built:
            folder = tmp_path_factory.mktemp(f"controlnet-{family}")
            build_controlnet(family, request.getfixturevalue(f"tiny_{family}_path")).save_pretrained(folder)
            built[family] = str(folder)
        return built[family]

    return path


@pytest.fixture(scope="session")
def tiny_depth_path(tmp_path_factory) -> str:
    """A tiny random DPT depth-estimation model with its image processor, saved as a user's folder would be."""
    folder = tmp_path_factory.mktemp("tiny-depth")
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                       image_size=SIZE, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16)
    DPTForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    return str(folder)


def control_pipe(request, family: str):
    pipe = load_pipeline(request.getfixturevalue(f"tiny_{family}_path"), device="cpu", dtype=torch.float32,
                         controlnet=request.getfixturevalue("controlnet_path")(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def controls(count: int, seed: int = 0, size: int = SIZE) -> list[Image.Image]:
    """Random RGB control images of the generation size (so fitting them changes nothing)."""
    state = np.random.RandomState(seed)
    return [Image.fromarray(state.randint(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def set_latents(pipe, prompts=PROMPTS, **kwargs) -> dict[int, torch.Tensor]:
    found = {}
    sets.generate_set(pipe, prompts, seed=SEED, on_image=lambda i, image: found.setdefault(i, image.info["latent"]),
                      **settings(backbone_family(pipe)) | kwargs)
    return found


def backbone_family(pipe) -> str:
    family = backbone_for(pipe).family
    return "sdxl" if family == "unet" and hasattr(pipe, "text_encoder_2") else "sd" if family == "unet" else family


def zeroing(groups: int):
    """A plain torch forward hook: row 0 of each guidance group (the reference) of all the ControlNet returns is 0."""

    def zero(value):
        if isinstance(value, torch.Tensor):
            value = value.clone()
            value[::value.shape[0] // groups] = 0
            return value
        return value if value is None else type(value)(zero(item) for item in value)

    return lambda module, args, kwargs, output: zero(output)


def alone(pipe, target: int, reference_image, image, **extra) -> torch.Tensor:
    """Target `target`'s latent from diffusers' own call on [reference, target] (their set positions' noise and
    generators) with sa.apply; with no reference image, the ControlNet's output for the reference is zeroed."""
    family = backbone_family(pipe)
    positions = [0, target]
    groups = 1 if extra.get("guess_mode") else GROUPS[family]  # guess mode: the ControlNet sees the cond half
    hook = (pipe.controlnet.register_forward_hook(zeroing(groups), with_kwargs=True)
            if reference_image is None else None)
    try:
        with sa.apply(pipe):
            return pipe([PROMPTS[0], PROMPTS[target]], output_type="latent",
                        latents=backbone_for(pipe).initial_noise(positions, SEED, SIZE, SIZE),
                        generator=[torch.Generator("cpu").manual_seed(SEED + p) for p in positions],
                        **{CONTROL_ARGUMENT[family]: [reference_image or Image.new("RGB", (SIZE, SIZE)), image]},
                        **settings(family), **extra).images[1]
    finally:
        if hook is not None:
            hook.remove()


def leftovers(module) -> list[str]:
    return [name or "<root>" for name, sub in module.named_modules()
            if hasattr(sub, "_diffusers_hook") or "forward" in vars(sub)]


# the set's images


CASES = [(family, {}, controlled) for family in FAMILIES for controlled in (False, True)]
CASES.append(("sd", {"guess_mode": True}, False))


@pytest.mark.parametrize("family, extra, reference_controlled", CASES, ids=[
    f"{family}{'-guess-mode' if extra else ''}-{'controlled' if controlled else 'uncontrolled'}-reference"
    for family, extra, controlled in CASES])
def test_a_set_equals_each_target_run_alone_with_its_control_image(request, decoded, family, extra,
                                                                   reference_controlled):
    pipe = control_pipe(request, family)
    images = controls(4)
    ours = set_latents(pipe, control_images=images if reference_controlled else images[1:], **extra)
    for target in (1, 2, 3):
        expected = alone(pipe, target, images[0] if reference_controlled else None, images[target], **extra)
        assert_rounding_close(ours[target], expected, denoising_depth(pipe, 3))
    if not reference_controlled:  # each target follows its own control image, and only that
        swapped = set_latents(pipe, control_images=[images[3], images[2], images[1]], **extra)
        changes = [float((swapped[i] - ours[i]).abs().max()) for i in (1, 2, 3)]
        assert changes[0] > 1e-2 and changes[1] < 1e-4 and changes[2] > 1e-2, changes


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_and_waves_equal_one_batch(request, decoded, family):
    pipe = control_pipe(request, family)
    prompts = PROMPTS + ["a car"]
    first = pipe.controlnet.x_embedder if family == "flux" else pipe.controlnet.conv_in
    rows = []
    for given in (controls(4, seed=1), controls(1, seed=2)[0]):  # one per target; one for all
        whole = set_latents(pipe, prompts, control_images=given)
        spy = first.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        chunked = set_latents(pipe, prompts, control_images=given, batch_size=1, wave_size=2)
        spy.remove()
        assert max(rows) == GROUPS[family]  # the ControlNet too runs one image per guidance group at a time
        assert sorted(chunked) == sorted(whole) == list(range(5))
        for i in range(5):
            assert_rounding_close(chunked[i], whole[i], denoising_depth(pipe, 3))


@pytest.mark.parametrize("family, extra", [("sd", {}), ("sd", {"guess_mode": True}), ("sdxl", {}), ("flux", {})],
                         ids=["sd", "sd-guess-mode", "sdxl", "flux"])
def test_an_uncontrolled_reference_is_the_plain_pipelines_image(request, decoded, family, extra):
    pipe, plain = control_pipe(request, family), request.getfixturevalue(f"{family}_pipe")
    ours = set_latents(pipe, control_images=controls(3), **extra)
    expected = plain(PROMPTS[:1], latents=backbone_for(plain).initial_noise([0], SEED, SIZE, SIZE),
                     output_type="latent", **settings(family)).images[0]
    assert_rounding_close(ours[0], expected, denoising_depth(pipe, 3))
    controlled = set_latents(pipe, control_images=controls(4), **extra)
    assert float((controlled[0] - expected).abs().max()) > 1e-2  # a reference given a control image follows it


def test_a_real_image_reference_stays_uncontrolled_and_chunks_match(request, decoded, sd_pipe):
    pipe = control_pipe(request, "sd")
    trajectory = invert(pipe, controls(1, seed=5)[0], "a house", num_inference_steps=3, guidance_scale=2.0)
    targets = PROMPTS[1:]
    whole = set_latents(pipe, targets, reference=trajectory, control_images=controls(3))
    chunked = set_latents(pipe, targets, reference=trajectory, control_images=controls(3), batch_size=1)
    for i in range(4):
        assert_rounding_close(chunked[i], whole[i], denoising_depth(pipe, 3))
    plain = set_latents(sd_pipe, targets, reference=trajectory)
    assert_rounding_close(whole[0], plain[0], denoising_depth(pipe, 3))
    assert float((whole[1] - plain[1]).abs().max()) > 1e-2


def test_several_references_all_go_uncontrolled(request, decoded, sd_pipe):
    pipe = control_pipe(request, "sd")
    leads = [PROMPTS[0], "a bird in oil style"]
    ours = set_latents(pipe, PROMPTS[1:], references=leads, control_images=controls(3), batch_size=1)
    expected = sd_pipe(leads, latents=backbone_for(sd_pipe).initial_noise([0, 1], SEED, SIZE, SIZE),
                       output_type="latent", **settings("sd")).images
    assert_rounding_close(torch.stack([ours[0], ours[1]]), expected, denoising_depth(pipe, 3))


def test_an_image_to_image_controlnet_set(request, decoded, sd_pipe):
    """With init images (the ControlNet img2img pipeline), control images are its `control_image`."""
    pipe, plain = with_image_input(control_pipe(request, "sd")), with_image_input(sd_pipe)
    init = dict(image=controls(1, seed=6)[0], strength=0.8)
    whole = set_latents(pipe, control_images=controls(3), **init)
    chunked = set_latents(pipe, control_images=controls(3), batch_size=1, **init)
    for i in range(4):
        assert_rounding_close(chunked[i], whole[i], denoising_depth(pipe, 3))
    assert_rounding_close(whole[0], set_latents(plain, PROMPTS[:1], **init)[0], denoising_depth(pipe, 3))
    assert float((whole[1] - set_latents(plain, PROMPTS[:2], **init)[1]).abs().max()) > 1e-2


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_removal_restores_the_pipeline_bit_for_bit(request, family):
    pipe = control_pipe(request, family)
    family_settings = settings(family)
    images = controls(2)

    def direct():  # FLUX samples the control images' VAE latents: with these generators
        return pipe(PROMPTS[:2], output_type="latent", **{CONTROL_ARGUMENT[family]: images}, **family_settings,
                    latents=backbone_for(pipe).initial_noise([0, 1], SEED, SIZE, SIZE),
                    generator=[torch.Generator().manual_seed(p) for p in (0, 1)]).images

    before, weights = direct(), {k: v.clone() for k, v in pipe.controlnet.state_dict().items()}
    sets.generate_set(pipe, PROMPTS[:3], control_images=images, batch_size=1, **family_settings)

    def boom(*args):
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        sets.generate_set(pipe, PROMPTS[:3], control_images=images, callback_on_step_end=boom, **family_settings)
    assert leftovers(pipe.controlnet) == [] and leftovers(backbone_for(pipe).denoiser) == []
    assert all(torch.equal(weights[k], v) for k, v in pipe.controlnet.state_dict().items())
    assert torch.equal(direct(), before)


def interceptions(pipe) -> dict[str, list[str]]:
    """Where anything of ours could sit: the pipeline's instance attributes, and each component's (denoiser,
    ControlNet, text encoders, VAE) modules with a hook registry or a forward of their own."""
    return {"pipeline": sorted(vars(pipe)), **{name: leftovers(part) for name, part in pipe.components.items()
                                               if isinstance(part, torch.nn.Module)}}


def test_one_undo_takes_every_interception_off(request):
    """A set's hooks (denoiser, attention, ControlNet) and method patches (prompt tags) run through one handle, and
    its `remove()` takes them all off, even from inside the blocks that put them on; a set leaves nothing behind."""
    pipe = control_pipe(request, "sd")
    pipe(PROMPTS[:1], image=controls(1)[0], output_type="latent", **settings("sd"))  # the call's own attributes
    before, during = interceptions(pipe), []

    def look(pipe, step, timestep, tensors):
        during.append(interceptions(pipe))
        return {}

    sets.generate_set(pipe, PROMPTS[:3], control_images=controls(1)[0], batch_size=1, callback_on_step_end=look,
                      **settings("sd"))
    assert interceptions(pipe) == before and len(during) == settings("sd")["num_inference_steps"]
    with sa.apply(pipe) as handle, handle.chunked(1, 1), guided(handle, [0]), tagged_prompts(handle):
        inside = interceptions(pipe)
        handle.remove()
        assert interceptions(pipe) == before
    assert interceptions(pipe) == before
    assert "encode_prompt" in inside["pipeline"] and inside["controlnet"] == ["<root>"] and inside["unet"]
    assert during[0] == inside  # the set's calls ran with all of them on


# control images, ControlNets, depth maps


def test_the_forms_control_images_come_in(request, tmp_path):
    pipe = control_pipe(request, "sd")
    one, *more = controls(4)
    big = Image.fromarray(np.random.RandomState(3).randint(0, 256, (40, 48, 3), dtype=np.uint8))
    big.save(tmp_path / "big.png")
    for given, expected, zeroed in [(one, [one] * 3, True), (more, more, True), ([None] + more, more, True),
                                    ([one] + more, [one] + more, False)]:
        inputs, uncontrolled = control_inputs(pipe, given, 4, SIZE, SIZE)
        listed = inputs["image"]
        assert len(listed) == 4 and all(image.size == (SIZE, SIZE) and image.mode == "RGB" for image in listed)
        assert [np.asarray(image).tolist() for image in listed[4 - len(expected):]] == [
            np.asarray(image).tolist() for image in expected]
        with sa.apply(pipe) as handle, guided(handle, uncontrolled):  # the ControlNet's hook, through the handle
            assert pipe.controlnet._diffusers_hook.hooks[HOOK].slots == ([0] if zeroed else [])
        assert leftovers(pipe.controlnet) == []
    fitted = control_inputs(pipe, tmp_path / "big.png", 3, 16, 24)[0]["image"]
    assert fitted[1] is fitted[2] and fitted[1].size == (24, 16)  # loaded once, center-cropped to width x height
    assert np.asarray(fitted[0]).max() == 0  # the reference's placeholder


@pytest.mark.parametrize("given, message", [
    ([None, None, None], "every target needs a control image"),
    (controls(2), "give one image for all targets, one per target (3)"),
    (controls(5), "or one per image, references first (4)"),
    (7, "holds int"),
    ("missing.png", "no such image file"),
    ([object()] * 3, "must be a file path or a PIL image"),
])
def test_bad_control_images_are_one_line(request, given, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        control_inputs(control_pipe(request, "sd"), given, 4, SIZE, SIZE)


def test_control_images_need_one_controlnet(request, sd_pipe):
    with pytest.raises(UserError, match="need a ControlNet pipeline"):
        sets.generate_set(sd_pipe, PROMPTS[:2], control_images=controls(1)[0], **settings("sd"))
    pipe = control_pipe(request, "sd")
    several = type(pipe).from_pipe(pipe, controlnet=[pipe.controlnet, pipe.controlnet])
    with pytest.raises(UserError, match="one ControlNet at a time"):
        control_inputs(several, controls(1)[0], 2, SIZE, SIZE)


def test_loading_a_controlnet_checks_that_it_fits(controlnet_path, tiny_sd_path, sd_pipe, sdxl_pipe, sd3_pipe,
                                                 flux_pipe, monkeypatch, tmp_path):
    pipe = with_controlnet(sd_pipe, controlnet_path("sd"))
    assert type(pipe).__name__ == "StableDiffusionControlNetPipeline" and pipe.unet is sd_pipe.unet
    assert type(with_controlnet(flux_pipe, controlnet_path("flux"))).__name__ == "FluxControlNetPipeline"
    refusals = [(sdxl_pipe, controlnet_path("sd"), "does not fit this UNet"),
                (sd_pipe, controlnet_path("flux"), "names FluxControlNetModel"),
                (sd_pipe, tiny_sd_path, "names no model"),
                (sd3_pipe, controlnet_path("sd"), "run on SD 1.x/2.x, SDXL and FLUX.1"),
                (sd_pipe, "no/such/folder", "no such ControlNet")]
    for base, controlnet, message in refusals:
        with pytest.raises(UserError, match=message):
            load_controlnet(controlnet, base)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="nobody/controlnet is not in the local Hugging Face cache"):
        load_controlnet("nobody/controlnet", sd_pipe)
    single = tmp_path / "controlnet.safetensors"
    save_file(ControlNetModel.from_pretrained(controlnet_path("sd")).state_dict(), single)
    with pytest.raises(UserError, match="the config of controlnet.safetensors is not in the local Hugging Face"):
        load_controlnet(str(single), sd_pipe)


def test_depth_maps_are_three_channel_images_of_the_generation_size(tiny_depth_path, tmp_path):
    photo = Image.fromarray(np.random.RandomState(4).randint(0, 256, (48, 40, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    maps = depth_maps([tmp_path / "photo.png", photo.crop((4, 8, 36, 40))], SIZE, SIZE, model=tiny_depth_path)
    fitted = ImageOps.fit(photo, (SIZE, SIZE), Image.Resampling.LANCZOS)  # center crop, as every input image
    expected = pipeline("depth-estimation", model=tiny_depth_path)(fitted)["depth"]
    for depth in maps:
        pixels = np.asarray(depth)
        assert depth.mode == "RGB" and depth.size == (SIZE, SIZE) and pixels.max() == 255 and pixels.min() == 0
        assert (pixels == pixels[..., :1]).all()
    assert np.array_equal(np.asarray(maps[0])[..., 0], np.asarray(expected))


def test_an_unavailable_depth_model_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = [("nobody/depth", "the depth model nobody/depth is not in the local Hugging Face cache"),
             (str(tmp_path), "is not a transformers depth-estimation model folder"),
             (str(tmp_path / "none"), "no such depth model folder")]
    for model, message in cases:
        with pytest.raises(UserError, match=message):
            depth_maps([controls(1)[0]], SIZE, SIZE, model=model)
