"""regraft flows."""
