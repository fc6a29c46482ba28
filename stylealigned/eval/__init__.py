"""Evaluation: the paper's metrics (text alignment, set consistency), the targets' diversity, layout copying, CSD
style similarity, a 100-style benchmark, and a runner for the ablations and the named experiments."""

from .benchmark import BenchmarkStyle, load_benchmark
from .csd import csd_style_similarity
from .encoders import DEFAULT_CLIP, DEFAULT_DINO
from .experiments import EXPERIMENTS
from .metrics import diversity, layout_copying, set_consistency, text_alignment
from .runner import evaluate

__all__ = [
    "DEFAULT_CLIP", "DEFAULT_DINO", "EXPERIMENTS", "BenchmarkStyle", "csd_style_similarity", "diversity", "evaluate",
    "layout_copying", "load_benchmark", "set_consistency", "text_alignment",
]
