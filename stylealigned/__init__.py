"""StyleAligned: style-aligned image sets with shared attention for diffusers pipelines."""

from .apply import StyleAlignedHandle, apply
from .config import StyleAlignedConfig
from .errors import UserError

__all__ = ["StyleAlignedConfig", "StyleAlignedHandle", "UserError", "apply"]
__version__ = "0.1.0"
