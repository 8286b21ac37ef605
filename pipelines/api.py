"""The Python API, mirroring the CLI: `peftlab.run(...)`, `peftlab.load(run_dir)`, `peftlab.bench(...)`."""

from __future__ import annotations

from pathlib import Path

from peftlab.pipelines import runner
from peftlab.pipelines.multi_adapter import MultiAdapter
from peftlab.pipelines.predictor import Predictor, load
from peftlab.shared.errors import UserError

__all__ = ["run", "load", "bench", "Predictor", "MultiAdapter", "UserError"]


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
    """Train and evaluate a pipeline; returns the run directory (absolute). Its metrics are
    in `run_dir / "metrics.json"`; `peftlab.load(run_dir)` evaluates and predicts with it.

    `overrides` takes {"train.max_steps": 20} (values as given: "007" stays a string; a
    dict such as {"train": {"epochs": 1}} merges into the section) or the command line's
    ["train.max_steps=20"] (values read as YAML). Mistakes raise `peftlab.UserError`.
    """
    if resume is not None:
        return runner.resume(resume)
    if isinstance(overrides, dict):
        overrides = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    run_config = runner.build_config(pipeline, config_file=config, demo=demo, method=method, backbone=backbone,
                                     data=data, overrides=overrides or [])
    return runner.run(run_config, out=out).resolve()


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
    directory (results.jsonl, table.md, table.csv, pareto.png). An existing `out` resumes.
    `overrides` as for `run`."""
    from peftlab.pipelines import bench as sweep

    if isinstance(overrides, dict):
        overrides = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    return sweep.bench(pipeline, methods, seeds=seeds, demo=demo, backbone=backbone, data=data, out=out, full=full,
                       overrides=overrides or [], columns=columns, isolate=isolate)


def _yaml_value(value) -> str:
    """A Python value as override text that reads back as the same value: JSON is YAML
    1.2, and a JSON string stays a string ("#tag", "007", "a: b")."""
    import json

    return json.dumps(value, default=str)  # default: a Path is its text
