"""The Python API, mirroring the CLI: `peftlab.run(...)`, `peftlab.load(run_dir)`, `peftlab.bench(...)`."""

from __future__ import annotations

from pathlib import Path

from peftlab.pipelines import runner
from peftlab.pipelines.predictor import Predictor, load

__all__ = ["run", "load", "bench", "Predictor"]


def run(
    pipeline: str | None = None,
    *,
    demo: bool = False,
    method: str | None = None,
    backbone: str | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    config: str | None = None,
    overrides: dict | list[str] | None = None,
    resume: str | Path | None = None,
) -> Path:
    """Train and evaluate a pipeline; returns the run directory.

    `overrides` takes {"train.max_steps": 20} or ["train.max_steps=20"].
    """
    if resume is not None:
        return runner.resume(resume)
    if isinstance(overrides, dict):
        overrides = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    run_config = runner.build_config(pipeline, config_file=config, demo=demo, method=method, backbone=backbone,
                                     data=data, overrides=overrides or [])
    return runner.run(run_config, out=out)


def bench(
    pipeline: str,
    methods: list[str] | str,
    *,
    seeds: int = 1,
    demo: bool = False,
    backbone: str | None = None,
    data: str | None = None,
    out: str | Path | None = None,
    full: bool = True,
    overrides: dict | list[str] | None = None,
    columns: list[str] | None = None,
    isolate: bool = True,
) -> Path:
    """Compare methods (x seeds) on one pipeline, like `peftlab bench`; returns the sweep
    directory (results.jsonl, table.md, table.csv, pareto.png). An existing `out` resumes."""
    from peftlab.pipelines import bench as sweep

    if isinstance(overrides, dict):
        overrides = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    return sweep.bench(pipeline, methods, seeds=seeds, demo=demo, backbone=backbone, data=data, out=out, full=full,
                       overrides=overrides or [], columns=columns, isolate=isolate)


def _yaml_value(value) -> str:
    import json

    return json.dumps(value) if not isinstance(value, str) else value
