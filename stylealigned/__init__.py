"""StyleAligned: style-aligned image sets with shared attention for diffusers pipelines."""

from .apply import StyleAlignedHandle, apply
from .config import StyleAlignedConfig
from .errors import UserError
from .inversion import Trajectory, invert
from .models import load_pipeline
from .sets import generate_set

__all__ = ["StyleAlignedConfig", "StyleAlignedHandle", "Trajectory", "UserError", "apply", "generate_set", "invert",
           "load_pipeline"]
__version__ = "0.1.0"
