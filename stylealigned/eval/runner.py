"""Generate and score every benchmark set under each named configuration; resumable, split across processes.

Layout of the output folder:
    eval.json                      the settings; a rerun with other settings is refused
    reference.safetensors          the inverted real reference (transfer only; its prompt must match on reruns)
    sets/<config>/<NNN>/           one set: NN-<slug>.png images (reference first) and scores.json (its row)
    results.csv, summary.md, tradeoff.png

A set is finished when its scores.json exists (written last); a rerun skips finished sets. Set i of every
configuration uses seed `seed + SET_SEED_STRIDE * i`, so configurations are compared on the same initial noise.
Under `accelerate launch` each process generates its share of the unfinished sets; the main process writes the
reports once all are done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from tqdm.auto import tqdm

from ..backbones import backbone_for
from ..errors import UserError
from ..inversion import Trajectory, invert
from ..io import image_filename, load_image, save_png, write_json_atomic
from ..sets import generate_set
from .ablations import CONFIGS
from .benchmark import PROMPT_TEMPLATE, BenchmarkStyle, load_benchmark
from .encoders import DEFAULT_CLIP, DEFAULT_DINO
from .metrics import score_set
from .report import write_reports

SET_SEED_STRIDE = 100  # larger than any set, so sets never share a seed
OUTPUTS = {"eval.json", "reference.safetensors", "sets", "results.csv", "summary.md", "tradeoff.png"}


@dataclass(frozen=True)
class SetTask:
    """One set to generate: a configuration and a benchmark style."""

    config: str
    style_index: int

    def folder(self, out: Path) -> Path:
        return out / "sets" / self.config / f"{self.style_index:03d}"


@dataclass(frozen=True)
class Evaluation:
    """Where and how sets are generated and scored; see `evaluate`."""

    out: Path
    seed: int = 0
    reference: Trajectory | None = None
    reference_style: str | None = None
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    pipeline_kwargs: dict = field(default_factory=dict)

    def settings(self, pipe) -> dict:
        """Everything that changes the numbers, as recorded in eval.json."""
        return {"model": pipe.name_or_path, "dtype": str(pipe.dtype), "scheduler": type(pipe.scheduler).__name__,
                "seed": self.seed, "clip_model": self.clip_model, "dino_model": self.dino_model,
                "reference_prompt": self.reference.prompt if self.reference else None,
                "reference_style": self.reference_style, **self.pipeline_kwargs}

    def finished_row(self, task: SetTask) -> dict | None:
        """The set's row when it has been generated and scored, else None."""
        path = task.folder(self.out) / "scores.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def run_set(self, pipe, task: SetTask, style: BenchmarkStyle) -> dict:
        """Generate one set, save its images, score it on the pipeline's device and write its row."""
        config = backbone_for(pipe).fit_preset(CONFIGS[task.config]())
        transfer = task.config == "transfer"
        set_style = self.reference_style if transfer else style.style
        prompts = [PROMPT_TEMPLATE.format(object=name, style=set_style) for name in style.objects]
        set_seed = self.seed + SET_SEED_STRIDE * task.style_index
        images = generate_set(pipe, prompts, config, reference=self.reference if transfer else None, seed=set_seed,
                              **self.pipeline_kwargs)
        # With a real reference, image 0 is its reconstruction: it stays in the set but has no object text.
        texts = ([None] if transfer else []) + list(style.objects)
        all_prompts = ([self.reference.prompt] if transfer else []) + prompts
        folder = task.folder(self.out)
        folder.mkdir(parents=True, exist_ok=True)
        for index, (image, prompt) in enumerate(zip(images, all_prompts, strict=True)):
            save_png(image, folder / image_filename(index, prompt),
                     {"prompt": prompt, "seed": set_seed + index, "config": config.to_dict()})
        scores = score_set(images, texts, self.clip_model, self.dino_model, str(pipe.device))
        row = {"config": task.config, "style_index": task.style_index, "style": set_style, "seed": set_seed,
               **scores, "folder": str(folder.relative_to(self.out)), "prompts": all_prompts, "texts": texts}
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


def evaluate(pipe, out: str | Path, configs: list[str], styles: int = 100, seed: int = 0,
             reference: Trajectory | None = None, reference_style: str | None = None,
             clip_model: str = DEFAULT_CLIP, dino_model: str = DEFAULT_DINO, **pipeline_kwargs) -> list[dict]:
    """Generate, score and report the first `styles` benchmark sets under each configuration in `configs`.

    `reference`, `reference_style`: the inverted real image and the style text of the `transfer` sets' prompts.
    Metrics run on the pipeline's device. Returns the rows of results.csv (on every process).
    """
    benchmark = load_benchmark()
    if not 1 <= styles <= len(benchmark):
        raise UserError(f"--styles must be between 1 and {len(benchmark)}, got {styles}")
    if "transfer" in configs and (reference is None or not reference_style):
        raise UserError("the transfer configuration needs a reference trajectory and its style text")
    evaluation = Evaluation(Path(out), seed, reference, reference_style, clip_model, dino_model, pipeline_kwargs)
    settings = evaluation.settings(pipe)
    state = PartialState()
    check_out_folder(evaluation.out)
    check_settings(evaluation.out, settings)
    evaluation.out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        write_json_atomic(evaluation.out / "eval.json", settings)
    tasks = [SetTask(config, index) for config in configs for index in range(styles)]
    pending = [task for task in tasks if evaluation.finished_row(task) is None]
    with state.split_between_processes(pending) as mine:
        for task in tqdm(mine, desc="sets", disable=not state.is_local_main_process):
            evaluation.run_set(pipe, task, benchmark[task.style_index])
    state.wait_for_everyone()
    rows = [evaluation.finished_row(task) for task in tasks]
    if state.is_main_process:
        write_reports(evaluation.out, rows, settings)
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
