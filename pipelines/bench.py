"""`peftlab bench`: several PEFT methods on the same data, backbone and budget, compared.

A sweep is a grid of cells, one per method x seed (`train.seed` = base seed + k, full
fine-tuning first as the reference row). Each cell is an ordinary run directory written
by the runner, `OUT/runs/<method>-seed<seed>/`, so every cell can be evaluated, reused
or repeated like any run. The sweep writes into OUT:

    bench.json     the sweep's settings; a re-run into OUT must use the same ones
    results.jsonl  one line per cell: finished (metrics, params, cost), failed (the
                   one-line error) or skipped (the method does not fit the backbone)
    table.md/.csv  one row per method: mean +/- std over seeds of every scalar metric
    pareto.png     primary metric against trainable %, the Pareto front marked
    logs/          each cell's stderr

By default each cell runs in a fresh Python process (`python -m peftlab.pipelines.bench`,
which is `peftlab run` plus a report of the process's own peak memory): a crash of one
cell cannot end the sweep, and peak memory is the cell's own. In one process the
peak resident memory is monotone, so it would report the largest cell so far; and
`ru_maxrss` of a child even inherits its parent's high-water mark across fork/exec on
Linux, so the child reports `VmHWM`, the high-water mark of its own program image.
`isolate=False` runs cells in the calling process (no per-cell import cost, used by
the tests), with peak memory left out rather than reported wrongly.

Resumable: a cell whose run directory has metrics.json is finished and skipped; an
unfinished one (a killed sweep) is resumed from its checkpoint, or restarted if it
never got as far as its run.yaml; failed cells are tried again.
"""

from __future__ import annotations

import contextlib
import csv
import io as text_io
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from peftlab.pipelines import config as cfg
from peftlab.pipelines import runner
from peftlab.shared import io
from peftlab.shared.errors import UserError

REFERENCE = "full"
SETTINGS_FILE = "bench.json"
RESULTS_FILE = "results.jsonl"
PEAK_FILE = "bench_cell.json"
"""Written into a finished cell's run directory: the cell process's own peak memory."""
PEAK_LINE_KEY = "cell_peak_rss_mb"
NON_METRIC_SECTIONS = ("train", "params", "history")


@dataclass
class Cell:
    method: str
    seed: int
    config: cfg.RunConfig
    method_argument: str | None
    """`peftlab run --method`, None for the recipe's own method with its options."""
    overrides: list[str]
    """The key=value list that, with the sweep's settings, builds `config`."""

    @property
    def name(self) -> str:
        return f"{self.method}-seed{self.seed}"


@dataclass
class Sweep:
    pipeline: str
    out: Path
    cells: list[Cell]
    skipped: dict[str, str]
    """method -> why it does not fit the backbone."""
    methods: list[str]
    seeds: list[int]
    settings: dict[str, Any]
    primary_metric: str
    higher_is_better: bool


# --------------------------------------------------------------------------- planning


def bench(
    pipeline: str,
    methods: list[str] | str,
    *,
    seeds: int = 1,
    demo: bool = False,
    data: str | None = None,
    backbone: str | None = None,
    out: str | Path | None = None,
    full: bool = True,
    overrides: list[str] | tuple[str, ...] = (),
    columns: list[str] | str | None = None,
    isolate: bool = True,
) -> Path:
    """Run (or resume) the sweep and write its results, table and plot; returns OUT."""
    sweep = plan(pipeline, methods, seeds=seeds, demo=demo, data=data, backbone=backbone, out=out,
                 full=full, overrides=overrides)
    columns = _split_names(columns) if isinstance(columns, str) else columns
    _claim_out_dir(sweep)
    runner.log(f"bench {pipeline}: {len(sweep.methods)} methods x {len(sweep.seeds)} seeds -> {sweep.out} "
               f"(re-run with --out {sweep.out} to resume)")
    for method, reason in sweep.skipped.items():
        runner.log(f"skipped {method}: {reason}")
    rows = run_cells(sweep, isolate=isolate)
    write_reports(sweep, rows, columns)
    return sweep.out


def plan(pipeline, methods, *, seeds, demo, data, backbone, out, full, overrides) -> Sweep:
    """Every cell's config, validated before anything is trained or written."""
    from peftlab.shared.methods.registry import build_options, get_method
    from peftlab.shared.metrics import get_metric
    from peftlab.shared.tasks import get_task

    names = _split_names(methods) if isinstance(methods, str) else list(methods or [])
    if not names:
        raise UserError("--methods: name at least one method, e.g. --methods lora,bitfit (see `peftlab list methods`)")
    if seeds < 1:
        raise UserError(f"--seeds: {seeds} is not a number of seeds; pass 1 or more")
    overrides = list(overrides)
    if any(item.partition("=")[0] in ("method", "method.name") for item in overrides):
        raise UserError("method.name: a sweep sets the method per cell; list methods with --methods")
    if full and REFERENCE not in names:
        names.insert(0, REFERENCE)
    names = list(dict.fromkeys(names))  # a method named twice runs once

    base = runner.build_config(pipeline, demo=demo, backbone=backbone, data=data, overrides=overrides)
    task = get_task(base.task_name)
    # the data, read once up front: a card or file error stops the sweep with exit 2
    # before anything is written, not as the same error recorded in every cell
    card = runner.load_card(base.data.card, task)
    runner.log_notes(runner.read_dataset(base, task, cfg.build_task_options(task, base.task_options), card), training=True)
    specs = {name: get_method(name) for name in names}
    seed_values = [base.train.seed + k for k in range(seeds)]
    cells = []
    for name in names:
        # The recipe's own method keeps the recipe's options (e.g. LoReFT's positions); any
        # other starts from its defaults, as `peftlab run --method` does.
        method_argument = None if name == base.method_name else name
        for seed in seed_values:
            cell_overrides = [*overrides, f"train.seed={seed}"]
            config = runner.build_config(pipeline, demo=demo, method=method_argument, backbone=backbone, data=data,
                                         overrides=cell_overrides)
            build_options(specs[name], config.method_options)
            cells.append(Cell(name, seed, config, method_argument, cell_overrides))
    skipped = _methods_that_do_not_fit(base, task, [specs[name] for name in names])
    cells = [cell for cell in cells if cell.method not in skipped]
    primary = base.eval.primary_metric or task.primary_metric
    settings = {"pipeline": pipeline, "demo": demo, "data": data, "backbone": backbone, "overrides": overrides}
    out_dir = Path(out) if out is not None else _default_out_dir(pipeline)
    return Sweep(pipeline, out_dir, cells, skipped, names, seed_values, settings, primary,
                 get_metric(primary).higher_is_better)


def _split_names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _methods_that_do_not_fit(config: cfg.RunConfig, task, specs) -> dict[str, str]:
    """Architecture-specific methods (`applies_to`) checked on the backbone, built once.

    Only when such a method is asked for: building the backbone costs a model load in
    this process, which is still cheaper than a cell process per seed failing late.
    """
    specific = [spec for spec in specs if spec.applies_to is not None]
    if not specific:
        return {}
    options = cfg.build_task_options(task, config.task_options)
    card = runner.load_card(config.data.card, task)
    labels = runner.read_dataset(config, task, options, card).labels
    backbone = task.build_model(config.backbone.name, labels, options).backbone
    return {spec.name: f"method {spec.name!r} does not fit the {type(backbone).__name__} backbone ({spec.description})"
            for spec in specific if not spec.fits(backbone)}


def _default_out_dir(pipeline: str) -> Path:
    base = Path("bench") / pipeline / datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, suffix = base, 1
    while candidate.exists():  # a sweep started in the same second keeps its own folder
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    return candidate


def _claim_out_dir(sweep: Sweep) -> None:
    """A new OUT gets bench.json; an existing one must hold a sweep with the same settings."""
    settings_file = sweep.out / SETTINGS_FILE
    if settings_file.is_file():
        previous = io.read_json(settings_file)
        if previous != sweep.settings:
            changed = sorted(k for k in sweep.settings if previous.get(k) != sweep.settings[k])
            raise UserError(f"{sweep.out}: this bench directory was run with other settings ({', '.join(changed)}); "
                            f"choose another --out, or repeat them to resume it")
    elif sweep.out.exists() and any(sweep.out.iterdir()):
        raise UserError(f"{sweep.out} exists and is not a bench directory (no {SETTINGS_FILE}); choose another --out")
    else:
        io.write_json(settings_file, sweep.settings)


# --------------------------------------------------------------------------- running


def run_cells(sweep: Sweep, isolate: bool = True) -> list[dict]:
    """Run every unfinished cell; returns one results row per cell, in plan order."""
    from tqdm.auto import tqdm

    rows: dict[str, dict] = {}
    pending = []
    for cell in sweep.cells:
        run_dir = _run_dir(sweep, cell)
        if (run_dir / "metrics.json").is_file():
            rows[cell.name] = finished_row(cell, run_dir, sweep.out)
        else:
            pending.append(cell)
    if len(pending) < len(sweep.cells):
        runner.log(f"{len(sweep.cells) - len(pending)} of {len(sweep.cells)} cells already finished; skipping them")

    def save() -> None:
        io.write_jsonl(sweep.out / RESULTS_FILE, _ordered_rows(sweep, rows))

    save()
    progress = tqdm(total=len(pending), desc="bench", unit="cell", file=sys.stderr, dynamic_ncols=True)
    try:
        for cell in pending:
            progress.set_postfix_str(f"{cell.method} seed {cell.seed}", refresh=True)
            started = time.perf_counter()
            rows[cell.name] = run_cell(sweep, cell, isolate)
            row = rows[cell.name]
            progress.write(f"{cell.name}: {_cell_summary(row, sweep.primary_metric)} "
                           f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            save()
            progress.update(1)
    except KeyboardInterrupt:
        progress.close()
        runner.log(f"interrupted; the same `peftlab bench` command with --out {sweep.out} resumes the sweep")
        raise
    finally:
        progress.close()
    return _ordered_rows(sweep, rows)


def _run_dir(sweep: Sweep, cell: Cell) -> Path:
    return sweep.out / "runs" / cell.name


def _log_file(sweep: Sweep, cell: Cell) -> Path:
    return sweep.out / "logs" / f"{cell.name}.log"


def _ordered_rows(sweep: Sweep, rows: dict[str, dict]) -> list[dict]:
    ordered = []
    for method in sweep.methods:
        for seed in sweep.seeds:
            if method in sweep.skipped:
                ordered.append({"method": method, "seed": seed, "cell": f"{method}-seed{seed}", "status": "skipped",
                                "error": sweep.skipped[method]})
            elif f"{method}-seed{seed}" in rows:
                ordered.append(rows[f"{method}-seed{seed}"])
    return ordered


def run_cell(sweep: Sweep, cell: Cell, isolate: bool) -> dict:
    """Train one cell (resuming what a killed sweep left); returns its results row."""
    run_dir = _run_dir(sweep, cell)
    resume = (run_dir / "run.yaml").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # killed before its run.yaml: nothing there to resume
    log_file = _log_file(sweep, cell)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if isolate:
        error, peak = _run_cell_in_subprocess(sweep, cell, run_dir, resume, log_file)
    else:
        error, peak = _run_cell_in_process(cell, run_dir, resume, log_file), None
    if error is not None:
        return {"method": cell.method, "seed": cell.seed, "cell": cell.name, "status": "failed", "error": error,
                "log": str(log_file.relative_to(sweep.out))}
    if peak is not None:
        io.write_json(run_dir / PEAK_FILE, {"peak_rss_mb": peak, "what": "VmHWM of the cell's own process"})
    return finished_row(cell, run_dir, sweep.out)


def _run_cell_in_process(cell: Cell, run_dir: Path, resume: bool, log_file: Path) -> str | None:
    with open(log_file, "w", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        try:
            if resume:
                runner.resume(run_dir)
            else:
                runner.run(cell.config, out=run_dir)
        except Exception as error:  # the sweep records any failure of a cell and goes on
            return one_line_error(error)
    return None


def _run_cell_in_subprocess(sweep: Sweep, cell: Cell, run_dir: Path, resume: bool, log_file: Path):
    if resume:
        arguments = ["--resume", str(run_dir)]
    else:
        settings = sweep.settings
        arguments = [sweep.pipeline, "--out", str(run_dir), *cell.overrides]
        arguments += ["--method", cell.method_argument] if cell.method_argument else []
        arguments += ["--demo"] if settings["demo"] else []
        for option in ("data", "backbone"):
            if settings[option]:
                arguments += [f"--{option}", settings[option]]
    command = [sys.executable, "-m", "peftlab.pipelines.bench", *arguments]
    with open(log_file, "w", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
    if completed.returncode != 0:
        return _error_from_log(log_file, completed.returncode), None
    peak = None
    for line in reversed(completed.stdout.splitlines()):
        if PEAK_LINE_KEY in line:
            peak = json.loads(line)[PEAK_LINE_KEY]
            break
    return None, peak


def one_line_error(error: BaseException) -> str:
    if isinstance(error, UserError):
        return str(error)
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def _error_from_log(log_file: Path, returncode: int) -> str:
    """The CLI's `error: ...` line, else the exception line ending a traceback, else how
    the process ended."""
    lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ").strip()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if tracebacks:
        after = [line for line in lines[tracebacks[-1] + 1:] if line.strip() and not line[0].isspace()]
        if after:
            return after[-1].strip()
    if returncode < 0:
        return f"the cell process was killed by signal {-returncode} (out of memory?)"
    return f"the cell process exited with code {returncode}"


def finished_row(cell: Cell, run_dir: Path, out: Path) -> dict:
    """A finished cell's results line, read back from its run directory."""
    results = io.read_json(run_dir / "metrics.json")
    meta = io.read_json(run_dir / "meta.json")
    splits = [name for name, value in results.items() if name not in NON_METRIC_SECTIONS and isinstance(value, dict)]
    split = "test" if "test" in splits else splits[-1]
    train = results.get("train", {})
    peak_file = run_dir / PEAK_FILE
    params = results.get("params") or meta["params"]
    return {
        "method": cell.method, "seed": cell.seed, "cell": cell.name, "status": "finished",
        "run_dir": str(run_dir.relative_to(out)),
        "primary_metric": meta["primary_metric"],
        "split": split,
        "metrics": scalar_metrics(results[split]),
        "params": {key: params[key] for key in ("trainable", "total", "percent")},
        "adapter_bytes": folder_bytes(run_dir / runner.ADAPTER),
        "train_seconds": train.get("seconds"),
        "samples_per_s": train.get("samples_per_s"),
        "peak_rss_mb": io.read_json(peak_file)["peak_rss_mb"] if peak_file.is_file() else None,
        "peak_gpu_mb": train.get("peak_gpu_mb"),
    }


def scalar_metrics(split_results: dict) -> dict[str, float | None]:
    """The split's numbers (a task may add its own, e.g. `acc/boolq`); nested reports
    such as per-group metrics stay in the run's metrics.json."""
    return {name: value for name, value in split_results.items()
            if value is None or (isinstance(value, int | float) and not isinstance(value, bool))}


def folder_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def _cell_summary(row: dict, primary: str) -> str:
    if row["status"] != "finished":
        return f"{row['status']}: {row['error']}"
    value = row["metrics"].get(primary)
    return f"{primary} {_fmt_metric(value)}"




# --------------------------------------------------------------------------- reporting


@dataclass
class MethodSummary:
    method: str
    cells: int
    finished: int
    errors: list[str] = field(default_factory=list)
    status: str = "finished"
    trainable: int | None = None
    percent: float | None = None
    adapter_bytes: int | None = None
    metrics: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    """name -> (mean, sample std or None with one value) over the finished seeds."""
    train_seconds: float | None = None
    samples_per_s: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std from a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(rows: list[dict]) -> list[MethodSummary]:
    """One summary per method, in the rows' order."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summaries = []
    for method, method_rows in by_method.items():
        done = [row for row in method_rows if row["status"] == "finished"]
        summary = MethodSummary(method, len(method_rows), len(done),
                                errors=list(dict.fromkeys(row["error"] for row in method_rows if row.get("error"))))
        summaries.append(summary)
        if not done:
            summary.status = method_rows[0]["status"]
            continue
        summary.trainable = done[0]["params"]["trainable"]
        summary.percent = done[0]["params"]["percent"]
        summary.adapter_bytes = done[0]["adapter_bytes"]
        names = list(dict.fromkeys(name for row in done for name in row["metrics"]))
        for name in names:
            values = [row["metrics"][name] for row in done if row["metrics"].get(name) is not None]
            if values:
                summary.metrics[name] = mean_std(values)
        summary.train_seconds = _mean_of(done, "train_seconds")
        summary.samples_per_s = _mean_of(done, "samples_per_s")
        summary.peak_rss_mb = _max_of(done, "peak_rss_mb")
        summary.peak_gpu_mb = _max_of(done, "peak_gpu_mb")
    return summaries


def _mean_of(rows, key):
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.fmean(values) if values else None


def _max_of(rows, key):
    values = [row[key] for row in rows if row.get(key) is not None]
    return max(values) if values else None


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates: fewer (or as many) trainable
    parameters (x) and a better (or equal) metric (y), strictly better in one of them."""
    def better_or_equal(a, b):
        return a >= b if higher_is_better else a <= b

    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            xj <= x and better_or_equal(yj, y) and (xj < x or yj != y)
            for j, (xj, yj) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def metric_columns(summaries: list[MethodSummary], primary: str, requested: list[str] | None = None) -> list[str]:
    """The primary metric, then every other scalar metric in the order the runs report
    them; or exactly the requested ones."""
    reported = list(dict.fromkeys([primary, *(name for s in summaries for name in s.metrics)]))
    if not requested:
        return [name for name in reported if any(name in s.metrics for s in summaries)] or [primary]
    unknown = [name for name in requested if name not in reported]
    if unknown:
        raise UserError(f"--columns: no run reports {unknown[0]!r}; the runs report {', '.join(reported)}")
    return list(requested)


def write_reports(sweep: Sweep, rows: list[dict], columns: list[str] | None = None) -> None:
    summaries = order_reference_first(summarise(rows))
    names = metric_columns(summaries, sweep.primary_metric, columns)
    split = next((row["split"] for row in rows if row["status"] == "finished"), "test")
    io.write_text(sweep.out / "table.md", table_markdown(sweep, summaries, names, split))
    io.write_text(sweep.out / "table.csv", table_csv(summaries, names, sweep.primary_metric))
    plot_pareto(sweep.out / "pareto.png", summaries, sweep.primary_metric, sweep.higher_is_better,
                title=f"{sweep.pipeline}: {sweep.primary_metric} ({split}) vs trainable parameters")
    counts = {status: sum(row["status"] == status for row in rows) for status in ("finished", "failed", "skipped")}
    runner.log(", ".join(f"{n} {status}" for status, n in counts.items()) + f" cells; table: {sweep.out / 'table.md'}")


def order_reference_first(summaries: list[MethodSummary]) -> list[MethodSummary]:
    return sorted(summaries, key=lambda s: s.method != REFERENCE)  # stable: the others keep their order


def _delta(summary: MethodSummary, reference: MethodSummary | None, metric: str) -> float | None:
    if reference is None or summary is reference or metric not in summary.metrics or metric not in reference.metrics:
        return None
    return summary.metrics[metric][0] - reference.metrics[metric][0]


def _reference(summaries) -> MethodSummary | None:
    return next((s for s in summaries if s.method == REFERENCE and s.finished), None)


def table_markdown(sweep: Sweep, summaries: list[MethodSummary], names: list[str], split: str) -> str:
    primary = sweep.primary_metric
    reference = _reference(summaries)
    has_gpu = any(s.peak_gpu_mb is not None for s in summaries)
    header = ["method", "seeds", "trainable params", "% trainable", "adapter size"]
    for name in names:
        header.append(name)
        if name == primary and reference is not None:
            header.append(f"Δ {primary} vs full")
    header += ["train s", "samples/s", "peak RSS MB"] + (["peak GPU MB"] if has_gpu else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        if not s.finished:
            continue
        cells = [f"{s.method} (reference)" if s is reference else s.method, f"{s.finished}/{s.cells}",
                 f"{s.trainable:,}", f"{s.percent:.4g}", _fmt_bytes(s.adapter_bytes)]
        for name in names:
            cells.append(_fmt_mean_std(s.metrics.get(name)))
            if name == primary and reference is not None:
                delta = _delta(s, reference, primary)
                cells.append("—" if delta is None else f"{delta:+.4f}")
        cells += [_fmt_number(s.train_seconds, ".1f"), _fmt_number(s.samples_per_s, ".1f"),
                  _fmt_number(s.peak_rss_mb, ".0f")] + ([_fmt_number(s.peak_gpu_mb, ".0f")] if has_gpu else [])
        lines.append("| " + " | ".join(cells) + " |")
    direction = "higher is better" if sweep.higher_is_better else "lower is better"
    settings = sweep.settings
    backbone = settings["backbone"] or ("the demo backbone" if settings["demo"] else "the recipe's backbone")
    data = settings["data"] or ("the demo card" if settings["demo"] else "the recipe's card")
    seeds = ", ".join(str(seed) for seed in sweep.seeds)
    text = [
        f"# peftlab bench: {sweep.pipeline}",
        "",
        f"Backbone: {backbone}. Data: {data}. Overrides: {' '.join(settings['overrides']) or 'none'}. "
        f"Seeds: {seeds}. Primary metric: {primary} ({direction}), on the {split} split.",
        "",
        "Metrics: mean ± sample standard deviation (n − 1) over the finished seeds (`seeds` column); "
        "Δ is the difference of means to full fine-tuning. Trainable params: the method's and the task head's; "
        "% of all parameters. Adapter size: bytes of the run's adapter/ folder. Train s and samples/s: the "
        "training loop without evaluation, mean over seeds. Peak RSS: the largest, over seeds, of the cell "
        "process's own resident-memory high-water mark (model, data, training and evaluation; blank when the "
        "cells ran in one process, where it cannot be told apart per cell).",
        "",
        *lines,
    ]
    left_out = [s for s in summaries if s.errors]
    if left_out:
        text += ["", "Not finished:", ""]
        for s in left_out:
            text.append(f"- {s.method}: {s.cells - s.finished} of {s.cells} cells {s.status if not s.finished else 'failed'}: "
                        + "; ".join(s.errors))
    return "\n".join(text) + "\n"


def table_csv(summaries: list[MethodSummary], names: list[str], primary: str) -> str:
    reference = _reference(summaries)
    header = ["method", "status", "seeds_finished", "seeds", "trainable_params", "trainable_percent", "adapter_bytes"]
    for name in names:
        header += [f"{name}_mean", f"{name}_std"]
    header += [f"delta_{primary}_vs_full", "train_seconds", "samples_per_s", "peak_rss_mb", "peak_gpu_mb", "error"]
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for s in summaries:
        row = [s.method, s.status if not s.finished else "finished", s.finished, s.cells, s.trainable, s.percent,
               s.adapter_bytes]
        for name in names:
            mean, std = s.metrics.get(name, (None, None))
            row += [mean, std]
        row += [_delta(s, reference, primary), s.train_seconds, s.samples_per_s, s.peak_rss_mb, s.peak_gpu_mb,
                "; ".join(s.errors)]
        writer.writerow(["" if value is None else repr(value) if isinstance(value, float) else value for value in row])
    return buffer.getvalue()


def plot_pareto(path: Path, summaries: list[MethodSummary], primary: str, higher_is_better: bool, title: str) -> None:
    """Primary metric (mean, std error bars) against trainable % on a log axis; the
    Pareto front drawn as a line through its circled points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    done = [s for s in summaries if s.finished and primary in s.metrics and s.percent]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: the library never touches the user's backend
    axes = figure.add_subplot()
    xs = [s.percent for s in done]
    ys = [s.metrics[primary][0] for s in done]
    errors = [s.metrics[primary][1] or 0.0 for s in done]
    axes.errorbar(xs, ys, yerr=errors, fmt="o", color="tab:blue", ecolor="gray", capsize=3, label="method (mean ± std)")
    for s, x, y in zip(done, xs, ys):
        axes.annotate(s.method, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    front = sorted(pareto_front(list(zip(xs, ys)), higher_is_better), key=lambda i: xs[i])
    if front:
        axes.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:red", linewidth=1, zorder=0)
        axes.scatter([xs[i] for i in front], [ys[i] for i in front], s=140, facecolors="none",
                     edgecolors="tab:red", label="Pareto front")
    axes.set_xscale("log")
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 0.1, 1, 10 rather than 10^-1
    axes.set_xlabel("trainable parameters (% of all, log scale)")
    axes.set_ylabel(f"{primary} ({'higher' if higher_is_better else 'lower'} is better)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    with io.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def _fmt_metric(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _fmt_mean_std(mean_and_std) -> str:
    if mean_and_std is None:
        return "—"
    mean, std = mean_and_std
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _fmt_number(value, spec: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _fmt_bytes(size: int | None) -> str:
    if size is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def _cell_main(argv: list[str]) -> int:
    """One cell in a fresh process: `peftlab run ARGS`, then this process's peak memory
    as a last stdout line for the sweep to record."""
    from peftlab.pipelines.cli import main
    from peftlab.shared.training import peak_rss_mb

    code = main(["run", *argv])
    if code == 0:
        print(json.dumps({PEAK_LINE_KEY: peak_rss_mb()}), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(_cell_main(sys.argv[1:]))
