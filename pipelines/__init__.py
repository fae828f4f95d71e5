"""regraft pipelines."""
