"""`stylealigned generate` (placeholder until the core lands)."""
