"""regraft tasks."""
