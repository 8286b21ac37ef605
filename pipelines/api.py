"""The Python API, mirroring the CLI: `peftlab.run(...)`, `peftlab.load(run_dir)`, `peftlab.bench(...)`."""

from __future__ import annotations

from collections.abc import Iterable
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
    if resume is not None:  # the run's own run.yaml decides; anything else given would be silently ignored
        given = {"pipeline": pipeline, "demo": demo or None, "method": method, "backbone": backbone, "data": data,
                 "out": out, "config": config, "overrides": overrides or None}
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise UserError(f"resume={str(resume)!r} continues the run as its run.yaml says and takes no other "
                            f"arguments (got {', '.join(named)}); drop them, or start a new run with them")
        return runner.resume(resume).resolve()
    overrides = _override_list(overrides)
    run_config = runner.build_config(pipeline, config_file=config, demo=demo, method=method, backbone=backbone,
                                     data=data, overrides=overrides)
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
    folds: str | None = None,
) -> Path:
    """Compare methods (x seeds) on one pipeline, like `peftlab bench`; returns the sweep
    directory, absolute (results.jsonl, table.md, table.csv, pareto.png). An existing
    `out` resumes. `overrides` as for `run`; `isolate=False` is `--in-process` (no
    per-cell peak memory); `folds` is `--folds` ("test=1,2,3": one run per value of the
    card's splits.test, averaged)."""
    from peftlab.pipelines import bench as sweep

    overrides = _override_list(overrides)
    return sweep.bench(pipeline, methods, seeds=seeds, demo=demo, backbone=backbone, data=data, out=out, full=full,
                       overrides=overrides, columns=columns, isolate=isolate, folds=folds).resolve()


def _override_list(overrides) -> list[str]:
    """`overrides` as the command line's `key=value` texts: a dict's values as YAML that
    reads back as the same values; a list as it is. A lone string is refused: it would be
    read one character at a time."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    if isinstance(overrides, str | bytes | set | frozenset) or not isinstance(overrides, Iterable):
        # a set has no order, and the later of two values for one key wins
        raise UserError(f"overrides={overrides!r}: give a dict ({{'train.max_steps': 20}}) or a list of key=value "
                        f"texts (['train.max_steps=20']), not a {type(overrides).__name__}")
    return list(overrides)


def _yaml_value(value) -> str:
    """A Python value as override text that reads back as the same value: JSON is YAML
    1.2, and a JSON string stays a string ("#tag", "007", "a: b")."""
    import json

    return json.dumps(value, default=str)  # default: a Path is its text
