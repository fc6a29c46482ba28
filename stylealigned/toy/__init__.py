"""A tiny built-in text-to-image model for trying stylealigned without downloading weights."""
