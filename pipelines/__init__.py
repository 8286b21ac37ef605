"""Pipelines: recipes (YAML), the runner, and the `peftlab` command line."""
