"""StyleAligned: style-aligned image sets with shared attention for diffusers pipelines."""

import logging

# transformers 5 warns on every import that its CLIP image processor falls back to PIL without torchvision; we never
# use torchvision, so that one message is noise. Every other transformers message still shows.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda record: "requires torchvision" not in record.getMessage())

from .apply import StyleAlignedHandle, apply
from .config import StyleAlignedConfig
from .cpu_memory import keep_freed_memory
from .errors import UserError
from .inversion import Trajectory, invert
from .models import load_pipeline
from .panorama import generate_panorama
from .sets import generate_set

__all__ = ["StyleAlignedConfig", "StyleAlignedHandle", "Trajectory", "UserError", "apply", "generate_panorama",
           "generate_set", "invert", "keep_freed_memory", "load_pipeline"]
__version__ = "0.1.0"
