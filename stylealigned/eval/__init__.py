"""Evaluation: the paper's metrics (text alignment, set consistency), a 100-style benchmark, an ablation runner."""

from .benchmark import BenchmarkStyle, load_benchmark
from .encoders import DEFAULT_CLIP, DEFAULT_DINO
from .metrics import set_consistency, text_alignment
from .runner import evaluate

__all__ = [
    "DEFAULT_CLIP", "DEFAULT_DINO", "BenchmarkStyle", "evaluate", "load_benchmark", "set_consistency",
    "text_alignment",
]
