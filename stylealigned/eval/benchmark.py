"""The evaluation benchmark: 100 style descriptions, each with 4 object prompts, written for this project.

A set renders the 4 objects of one style; each prompt is PROMPT_TEMPLATE filled in, e.g.
"a fox in the snow, watercolor painting, soft washes and visible paper texture". The first object is the reference.
Each style has a `kind`: "concrete" when it names a medium or technique (watercolor, linocut, film photograph,
surrealist painting), "abstract" when it names only a mood or an aesthetic ("dreamy", "futuristic", "cyberpunk
aesthetic", "solarpunk"); 15 of the 100 are abstract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BENCHMARK_FILE = Path(__file__).with_name("benchmark.json")
PROMPT_TEMPLATE = "{object}, {style}"
KINDS = ("concrete", "abstract")


@dataclass(frozen=True)
class BenchmarkStyle:
    """One style description, its kind (concrete medium or abstract mood) and the objects rendered in it (the first
    is the reference)."""

    style: str
    objects: tuple[str, ...]
    kind: str = "concrete"

    def prompts(self) -> list[str]:
        """The full prompt of every object, reference first."""
        return [PROMPT_TEMPLATE.format(object=name, style=self.style) for name in self.objects]


def load_benchmark(path: str | Path = BENCHMARK_FILE) -> list[BenchmarkStyle]:
    """The benchmark's styles, in file order."""
    entries = json.loads(Path(path).read_text(encoding="utf-8"))["styles"]
    return [BenchmarkStyle(entry["style"], tuple(entry["objects"]), entry["kind"]) for entry in entries]
