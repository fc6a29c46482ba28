"""Generate and score every benchmark set under each condition of an experiment; resumable, split across processes.

Layout of the output folder:
    eval.json                      the settings; a rerun with other settings is refused
    reference.safetensors          the inverted real reference (transfer only; its prompt must match on reruns)
    references/<NNN>.png           reference-quality: each style's clean reference, drawn without sharing
    sets/<condition>/<NNN>/        one set: NN-<slug>.png images (on a video model NN-<slug>.mp4 clips; reference
                                   first) and scores.json (its row)
    results.csv, summary.md, and the experiment's plot (tradeoff.png for the ablations)

A set is finished when its scores.json exists (written last); a rerun skips finished sets. Set i of every
condition uses seed `seed + SET_SEED_STRIDE * i`, so configurations are compared on the same initial noise.
Under `accelerate launch` each process generates its share of the unfinished sets; the main process writes the
reports once all are done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from ..backbones import backbone_for
from ..config import StyleAlignedConfig
from ..errors import UserError
from ..inversion import Trajectory, invert
from ..io import image_filename, load_image, save_png, save_video, write_json_atomic
from ..sets import generate_set
from .benchmark import PROMPT_TEMPLATE, load_benchmark
from .csd import csd_style_similarity
from .degrade import degrade
from .encoders import DEFAULT_CLIP, DEFAULT_DINO
from .experiments import EXPERIMENTS, MAX_SET_SIZE, PLOTS, Condition, conditions
from .metrics import score_clips, score_set
from .report import write_reports
from .run_folder import read_rgb

SET_SEED_STRIDE = 100  # larger than any set, so sets never share a seed
assert SET_SEED_STRIDE > MAX_SET_SIZE
VIDEO_FPS = 16  # the saved clips' frame rate, for viewing: clips are scored as generated
OUTPUTS = {"eval.json", "reference.safetensors", "references", "sets", "results.csv", "summary.md", *PLOTS}


@dataclass(frozen=True)
class SetTask:
    """One set to generate: a condition (by name) and a benchmark style."""

    config: str
    style_index: int

    def folder(self, out: Path) -> Path:
        return out / "sets" / self.config / f"{self.style_index:03d}"


@dataclass(frozen=True)
class Evaluation:
    """Where and how sets are generated and scored; see `evaluate`."""

    out: Path
    conditions: dict[str, Condition]
    seed: int = 0
    reference: Trajectory | None = None
    reference_style: str | None = None
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    csd_model: str | None = None
    batch_size: int | None = None
    pipeline_kwargs: dict = field(default_factory=dict)

    def settings(self, pipe, experiment: str, set_sizes: list[int] | None) -> dict:
        """Everything that changes the numbers, as recorded in eval.json (the batch size does not)."""
        extra = ({"experiment": experiment} if experiment != "ablations" else {}) | (
            {"set_sizes": set_sizes} if set_sizes else {}) | ({"csd_model": self.csd_model} if self.csd_model else {})
        return {"model": pipe.name_or_path, "dtype": str(pipe.dtype), "scheduler": type(pipe.scheduler).__name__,
                "seed": self.seed, "clip_model": self.clip_model, "dino_model": self.dino_model,
                "reference_prompt": self.reference.prompt if self.reference else None,
                "reference_style": self.reference_style, **extra, **self.pipeline_kwargs}

    def finished_row(self, task: SetTask) -> dict | None:
        """The set's row when it has been generated and scored, else None."""
        path = task.folder(self.out) / "scores.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def source(self, pipe, index: int, prompt: str, seed: int) -> Image.Image:
        """Style `index`'s clean reference for reference-quality: drawn once without sharing, kept on disk."""
        path = self.out / "references" / f"{index:03d}.png"
        if not path.is_file():
            [image] = generate_set(pipe, [prompt], StyleAlignedConfig.disabled(), seed=seed, **self.pipeline_kwargs)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_png(image, path, {"prompt": prompt, "seed": seed})
        return read_rgb(path)

    def make_set(self, pipe, condition: Condition, config: StyleAlignedConfig, objects: list[str],
                 prompts: list[str], seed: int, index: int) -> tuple[list, list, list[str], list[str | None]]:
        """Generate one set: the images to save, the images to score, the prompts of the saved images and the
        object text of each scored image (None for a real reference, inverted: it has no object to align with)."""
        run = dict(seed=seed, batch_size=self.batch_size, **self.pipeline_kwargs)
        if condition.transfer:
            images = generate_set(pipe, prompts, config, reference=self.reference, **run)
            return images, images, [self.reference.prompt] + prompts, [None] + objects
        if not condition.from_source:
            images = generate_set(pipe, prompts, config, **run)
            return images, images, prompts, objects
        source = self.source(pipe, index, prompts[0], seed)
        shown = degrade(source, *condition.degradation, seed=seed) if condition.degradation else source
        trajectory = invert(pipe, shown, prompts[0], self.pipeline_kwargs["num_inference_steps"])
        targets = generate_set(pipe, prompts[1:], config, reference=trajectory, indices=range(1, len(prompts)), **run)
        return [shown, *targets], [source, *targets], prompts, [None] + objects[1:]

    def run_set(self, pipe, task: SetTask, benchmark: list) -> dict:
        """Generate one set, save its images, score it on the pipeline's device and write its row."""
        condition, style = self.conditions[task.config], benchmark[task.style_index]
        set_style = self.reference_style if condition.transfer else style.style
        objects = condition.objects(benchmark, task.style_index)
        prompts = [PROMPT_TEMPLATE.format(object=name, style=set_style) for name in objects]
        set_seed = self.seed + SET_SEED_STRIDE * task.style_index
        config = backbone_for(pipe).fit_preset(condition.config())
        saved, scored, all_prompts, texts = self.make_set(pipe, condition, config, objects, prompts, set_seed,
                                                          task.style_index)
        folder = task.folder(self.out)
        folder.mkdir(parents=True, exist_ok=True)
        clips = isinstance(saved[0], list)  # a video model's set: clips of PIL frames
        for index, (image, prompt) in enumerate(zip(saved, all_prompts, strict=True)):
            path = folder / image_filename(index, prompt)
            if clips:
                save_video(image, path.with_suffix(".mp4"), VIDEO_FPS)
            else:
                save_png(image, path, {"prompt": prompt, "seed": set_seed + index, "config": config.to_dict()})
        scores = (score_clips if clips else score_set)(scored, texts, self.clip_model, self.dino_model,
                                                        str(pipe.device))
        if self.csd_model:
            scores["csd_style_similarity"] = csd_style_similarity(scored, self.csd_model, str(pipe.device))
        row = {"config": task.config, "style_index": task.style_index, "style": set_style, "kind": style.kind,
               "seed": set_seed, **scores, **condition.columns, "folder": str(folder.relative_to(self.out)),
               "prompts": all_prompts, "texts": texts}
        write_json_atomic(folder / "scores.json", row)
        return row


def _is_ours(path: Path) -> bool:
    """One of our outputs, or the temporary file of an interrupted atomic write."""
    return path.name in OUTPUTS or (path.name.startswith(".") and path.suffix == ".tmp")


def check_out_folder(out: Path) -> None:
    """Refuse an output folder that is a file or holds anything but this evaluation's outputs."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is a file; choose another --out")
    if out.is_dir() and (foreign := [path.name for path in out.iterdir() if not _is_ours(path)]):
        raise UserError(f"{out} holds files that are not this evaluation's ({foreign[0]}); choose another --out")


def check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix runs: an existing eval.json must hold the same settings."""
    record = out / "eval.json"
    recorded = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    if recorded is not None and recorded != json.loads(json.dumps(settings, default=str)):
        raise UserError(f"{out} holds an evaluation made with other settings (see {record}); choose another --out")


def evaluate(pipe, out: str | Path, configs: list[str] | None = None, styles: int = 100, seed: int = 0,
             reference: Trajectory | None = None, reference_style: str | None = None,
             clip_model: str = DEFAULT_CLIP, dino_model: str = DEFAULT_DINO, experiment: str = "ablations",
             set_sizes: list[int] | None = None, csd_model: str | None = None, batch_size: int | None = None,
             **pipeline_kwargs) -> list[dict]:
    """Generate, score and report the first `styles` benchmark sets under each condition of `experiment`.

    `configs`: the ablations' configuration names (None: all that apply); `set_sizes`: set-size's sizes.
    `reference`, `reference_style`: the inverted real image and the style text of the `transfer` sets' prompts.
    `csd_model`: a CSD checkpoint file, adding CSD style similarity. `batch_size`: targets per denoiser call.
    Metrics run on the pipeline's device. Returns the rows of results.csv (on every process).
    """
    benchmark = load_benchmark()
    if not 1 <= styles <= len(benchmark):
        raise UserError(f"--styles must be between 1 and {len(benchmark)}, got {styles}")
    if configs is not None and "transfer" in configs and (reference is None or not reference_style):
        raise UserError("the transfer configuration needs a reference trajectory and its style text")
    chosen = conditions(experiment, backbone_for(pipe), None if configs is None else ",".join(configs),
                        reference is not None, set_sizes)
    evaluation = Evaluation(Path(out), {condition.name: condition for condition in chosen}, seed, reference,
                            reference_style, clip_model, dino_model, csd_model, batch_size, pipeline_kwargs)
    settings = evaluation.settings(pipe, experiment, set_sizes)
    state = PartialState()
    check_out_folder(evaluation.out)
    check_settings(evaluation.out, settings)
    evaluation.out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        write_json_atomic(evaluation.out / "eval.json", settings)
    tasks = [SetTask(condition.name, index) for condition in chosen for index in range(styles)]
    pending = [task for task in tasks if evaluation.finished_row(task) is None]
    with state.split_between_processes(pending) as mine:
        for task in tqdm(mine, desc="sets", disable=not state.is_local_main_process):
            evaluation.run_set(pipe, task, benchmark)
    state.wait_for_everyone()
    rows = [evaluation.finished_row(task) for task in tasks]
    if state.is_main_process:
        spec = EXPERIMENTS[experiment]
        write_reports(evaluation.out, rows, settings, spec.plot, spec.figure, spec.section(rows))
    return rows


def reference_trajectory(pipe, out: str | Path, image_path: str | Path, prompt: str, num_inference_steps: int,
                         width: int, height: int) -> Trajectory:
    """Invert the real reference once (main process) into out/reference.safetensors; every process loads it."""
    out = Path(out)
    check_out_folder(out)
    path = out / "reference.safetensors"
    state = PartialState()
    if state.is_main_process and not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        invert(pipe, load_image(image_path, width, height), prompt, num_inference_steps).save(path)
    state.wait_for_everyone()
    trajectory = Trajectory.load(path)
    if trajectory.prompt != prompt:
        raise UserError(f"{path} was inverted with the prompt {trajectory.prompt!r}; choose another --out")
    trajectory.check_compatible(pipe, num_inference_steps, width, height)
    return trajectory
