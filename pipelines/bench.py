"""`peftlab bench`: several PEFT methods on the same data, backbone and budget, compared.

A sweep is a grid of cells, one per method x seed (`train.seed` = base seed + k, full
fine-tuning first as the reference row), and x fold with `--folds KEY=V1,V2,...`: each
fold sets the card's `splits.KEY` (`test=1,2,3,4,5` over a card split `fold_by: session`
is leave-one-session-out, PEFT-SER's protocol; `seed=0,1,2` draws three random splits),
and the table averages over folds and seeds. Each cell is an ordinary run directory written
by the runner, `OUT/runs/<method>-seed<seed>/`, so every cell can be evaluated, reused
or repeated like any run. The sweep writes into OUT:

    bench.json     the sweep's settings; a re-run into OUT must use the same ones
    results.jsonl  one line per cell: finished (metrics, params, cost), failed (the
                   one-line error) or skipped (the method does not fit the backbone)
    table.md/.csv  one row per method: mean +/- std over seeds (and folds) of every scalar metric
    pareto.png     primary metric against trainable %, the Pareto front marked
                   (these three are rewritten after each cell, as results.jsonl is)
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
never got as far as its run.yaml; failed cells are tried again. A resume is refused
where the data or the backbone's weights (each cell's meta.json has their digest) have
changed since the cells were trained: one table never mixes two of either.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import dataclasses
import fcntl
import hashlib
import io as text_io
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from peftlab.pipelines import config as cfg
from peftlab.pipelines import runner
from peftlab.shared import io
from peftlab.shared.errors import UserError

REFERENCE = "full"
SETTINGS_FILE = "bench.json"
LOCK_FILE = ".bench.lock"
"""Held (flock) by the sweep's process and its cell processes: one sweep per directory."""
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
    fold: str | None = None
    """`KEY=VALUE` of `--folds` (the card's `splits.KEY`), None without folds."""

    @property
    def name(self) -> str:
        return cell_name(self.method, self.fold, self.seed)


def cell_name(method: str, fold: str | None, seed: int) -> str:
    """The cell's run directory and results key: `lora-seed0`, `lora-splits.test=2-seed0`."""
    if fold is None:
        return f"{method}-seed{seed}"
    return f"{method}-splits.{re.sub(r'[^A-Za-z0-9._=+-]', '_', fold)}-seed{seed}"


CONSTANT_ANSWER = "the best constant answer (the training split's class or finding frequencies, or one answer always)"
"""Chance's basis for classification (`chance_levels`)."""


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
    metric_names: list[str] = field(default_factory=list)
    """The metrics every cell computes (a task may report more, e.g. `accuracy/<dataset>`)."""
    lock_fd: int | None = None
    """OUT's lock while the sweep runs, passed on to the cell processes."""
    chance: dict[str, float] = field(default_factory=dict)
    """Metric -> the score of a model that learnt nothing (see `chance_levels`); empty where unknown."""
    chance_basis: str = CONSTANT_ANSWER
    """What that model answers, for the table's note."""
    folds: list[str | None] = field(default_factory=lambda: [None])
    """`KEY=VALUE` per fold of `--folds`; [None] without folds."""
    backbone_sha256: str | None = None
    """The digest of the backbone's weights as loaded now (`weights_sha256` of the task
    model's backbone_info, which each cell's meta.json records as trained)."""
    recorded_overrides: list[str] | None = None
    """The key=value list of OUT's bench.json, which its cells were trained with (the
    current command's may differ in ways that act alike, e.g. their order)."""


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
    folds: str | None = None,
) -> Path:
    """Run (or resume) the sweep and write its results, table and plot; returns OUT."""
    return run_sweep(pipeline, methods, seeds=seeds, demo=demo, data=data, backbone=backbone, out=out, full=full,
                     overrides=overrides, columns=columns, isolate=isolate, folds=folds).out


def run_sweep(pipeline: str, methods: list[str] | str, *, seeds: int = 1, demo: bool = False, data: str | None = None,
              backbone: str | None = None, out: str | Path | None = None, full: bool = True,
              overrides: list[str] | tuple[str, ...] = (), columns: list[str] | str | None = None,
              isolate: bool = True, folds: str | None = None) -> Sweep:
    """`bench`, returning the sweep it ran: the CLI tells the cells this command planned
    from those an earlier run into OUT left (`planned_cells`)."""
    if out is not None:  # before the plan reads the data and builds the models, not after
        _check_not_foreign(Path(out))
        runner.check_out_can_be_made(Path(out))
    sweep = plan(pipeline, methods, seeds=seeds, demo=demo, data=data, backbone=backbone, out=out,
                 full=full, overrides=overrides, folds=folds)
    columns = _split_names(columns) if isinstance(columns, str) else columns
    check_columns(columns or [], sweep.metric_names)
    _check_out_dir(sweep)
    with _exclusive(sweep.out) as sweep.lock_fd:
        _claim_out_dir(sweep)
        per_fold = f" x {_count(len(sweep.folds), 'fold')}" if sweep.folds != [None] else ""
        runner.log(f"bench {pipeline}: {_count(len(sweep.methods), 'method')}{per_fold} x {_count(len(sweep.seeds), 'seed')} "
                   f"-> {sweep.out} (cell logs in {sweep.out / 'logs'}; re-run with --out {sweep.out} to resume)")
        for method, reason in sweep.skipped.items():
            runner.log(f"skipped {method}: {reason}")
        note = recipe_options_note(sweep)
        if note:
            runner.log(f"note: {note}")
        rows = run_cells(sweep, isolate=isolate, columns=columns)
        write_reports(sweep, rows, columns)
    return sweep


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def plan(pipeline, methods, *, seeds, demo, data, backbone, out, full, overrides, folds=None) -> Sweep:
    """Every cell's config, validated before anything is trained or written."""
    from peftlab.shared.data import fingerprint
    from peftlab.shared.methods.registry import build_options, get_method
    from peftlab.shared.metrics import get_metric
    from peftlab.shared.tasks import get_task

    names = method_names(methods)
    if seeds < 1:
        raise UserError(f"--seeds: {seeds} is not a number of seeds; pass 1 or more")
    overrides = list(overrides)
    if any(item.partition("=")[0] in ("method", "method.name") for item in overrides):
        raise UserError("method.name: a sweep sets the method per cell; list methods with --methods")
    if not full and REFERENCE in names:  # which one the user meant cannot be guessed
        raise UserError(f"--methods names {REFERENCE} and --no-full leaves it out; drop one of the two")
    if full and REFERENCE not in names:
        names.insert(0, REFERENCE)
    names = list(dict.fromkeys(names))  # a method named twice runs once
    specs = {name: get_method(name) for name in names}
    general = [item for item in overrides if not item.startswith("method.")]
    option_overrides = _method_option_overrides(specs, [item for item in overrides if item.startswith("method.")])

    base = runner.build_config(pipeline, demo=demo, backbone=backbone, data=data, overrides=general)
    task = get_task(base.task_name)
    options = cfg.build_task_options(task, base.task_options)
    fold_items = parse_folds(folds, task, general)
    # the data and the backbone, checked once up front: a card, file or backbone error
    # stops the sweep with exit 2 before anything is written, not as the same error
    # recorded in every cell
    card = runner.load_card(base.data.card, task)
    if fold_items:  # the card's own fold need not exist (`fold_by: fold` with no test: the folds name it)
        fold_datasets = {fold: _fold_dataset(pipeline, demo, backbone, data, general, fold, override, task, options, card)
                         for fold, override in fold_items}
    else:
        fold_datasets = {None: runner.read_dataset(base, task, options, card)}
    for fold, fold_dataset in fold_datasets.items():  # a split a fold leaves empty stops the sweep now, named
        try:
            runner.evaluated_splits(base.eval.splits, card, fold_dataset, announce=False)
        except UserError as error:
            raise UserError(f"--folds {fold}: {error}" if fold else str(error)) from None
    dataset = next(iter(fold_datasets.values()))
    prints = {fold: fingerprint(d.splits) for fold, d in fold_datasets.items()}  # each fold's examples, once
    same = _same_splits(prints)
    if same:
        raise UserError(f"--folds {same[0]} and {same[1]} give the same splits: this card's splits do not depend "
                        f"on splits.{same[0].partition('=')[0]} (e.g. one file per split, or demo data); "
                        f"fold over a key the card's splits use")
    for fold, fold_dataset in fold_datasets.items():  # what each fold's reading did, e.g. a patient in two splits
        for note in runner.dataset_notes(fold_dataset, training=True):
            runner.log(f"note: --folds {fold}: {note}" if fold else f"note: {note}")
    metric_names, primary = runner.run_metrics(base, task, card, dataset)
    reported = "test" if "test" in base.eval.splits else base.eval.splits[-1]
    model = task.build_model(base.backbone.name, dataset.labels, options)
    skipped = _methods_that_do_not_fit(model.backbone, [specs[name] for name in names])
    seed_values = [base.train.seed + k for k in range(seeds)]
    cells = []
    for name in names:
        # The recipe's own method keeps the recipe's options (e.g. LoReFT's positions); any
        # other starts from its defaults, as `peftlab run --method` does.
        method_argument = None if name == base.method_name else name
        for fold, fold_override in fold_items or [(None, None)]:
            for seed in seed_values:
                cell_overrides = [*general, *([fold_override] if fold_override else []), *option_overrides[name],
                                  f"train.seed={seed}"]
                config = runner.build_config(pipeline, demo=demo, method=method_argument, backbone=backbone, data=data,
                                             overrides=cell_overrides)
                build_options(specs[name], config.method_options)
                cells.append(Cell(name, seed, config, method_argument, cell_overrides, fold))
        if name not in skipped:
            refusal = _refusal_on(model, task, cells[-1].config)
            if refusal is not None and option_overrides[name]:
                # a refusal the user's method.KEY=VALUE brings about (target_modules=[typo]) is a
                # mistake to fix, as in `peftlab run`; only one the method meets without them is
                # the architecture's, for which the method is skipped
                plain = runner.build_config(pipeline, demo=demo, method=method_argument, backbone=backbone, data=data,
                                            overrides=[item for item in cells[-1].overrides
                                                       if item not in option_overrides[name]])
                if _refusal_on(model, task, plain) is None:
                    raise UserError(refusal)
            if refusal is not None:
                skipped[name] = refusal
    cells = [cell for cell in cells if cell.method not in skipped]
    settings = {"pipeline": pipeline, "demo": demo, "data": data, "backbone": backbone, "overrides": overrides,
                "data_fingerprint": prints[None] if None in prints else
                hashlib.sha256("".join(prints.values()).encode()).hexdigest()}
    if fold_items:  # absent without folds, so that a sweep written before folds existed resumes
        settings["folds"] = [fold for fold, _ in fold_items]
    out_dir = Path(out) if out is not None else _default_out_dir(pipeline)
    chance, chance_basis = _mean_chance([chance_levels(task, d, reported, metric_names) for d in fold_datasets.values()])
    return Sweep(pipeline, out_dir, cells, skipped, names, seed_values, settings, primary,
                 get_metric(primary).higher_is_better, metric_names, chance=chance, chance_basis=chance_basis,
                 folds=[fold for fold, _ in fold_items] or [None],
                 backbone_sha256=model.backbone_info.get("weights_sha256"))


def parse_folds(folds: str | None, task, overrides: list[str]) -> list[tuple[str, str]]:
    """`--folds test=1,2,3` or `--folds test=[03,08],[09,10]` -> [(fold label, the
    data.splits override), ...]: one run per value of the card's `splits.KEY`. Values are
    text as typed ("03" stays "03"; a bracketed group is one fold of several values),
    numbers only for `seed`. Checked before anything runs."""
    if folds is None:
        return []
    key, sep, values = folds.partition("=")
    key = key.strip().removeprefix("data.").removeprefix("splits.")
    items = _top_level_items(values)
    if not sep or not key or not items:
        raise UserError(f"--folds {folds!r}: give a card split key and its values, e.g. --folds test=1,2,3,4,5 "
                        f"(with splits.fold_by in the card), test=[03,08],[09,10] (two values per fold) "
                        f"or seed=0,1,2")
    if key not in task.split_keys:
        raise UserError(f"--folds: {key!r} is not a split key {task.name} reads; its split keys: {', '.join(task.split_keys)}")
    labels = [f"{key}={'+'.join(value) if isinstance(value, list) else value}" for value in items]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise UserError(f"--folds: {repeated[0]} is listed twice; list each fold once")
    fixed = [item for item in overrides if item.partition("=")[0] in ("data.splits", f"data.splits.{key}")]
    if fixed:
        raise UserError(f"{fixed[0]}: --folds sets data.splits.{key} per fold; drop the key=value")
    if key == "seed":
        bad = [value for value in items if not (isinstance(value, str) and value.lstrip("-").isdigit())]
        if bad:
            raise UserError(f"--folds seed={bad[0]}: a split seed is a whole number")
        items = [int(value) for value in items]
    # JSON is YAML: the override keeps each value's type as parsed here ("03" a string)
    return [(label, f"data.splits.{key}={json.dumps(value)}") for label, value in zip(labels, items)]


def _top_level_items(text: str) -> list[str | list[str]]:
    """`1,2,[3,4]` -> ["1", "2", ["3", "4"]]: commas inside brackets group values."""
    items: list[str | list[str]] = []
    for part in re.findall(r"\[[^\]]*\]|[^,\[\]]+", text):
        part = part.strip()
        if part.startswith("["):
            group = [value.strip() for value in part[1:-1].split(",") if value.strip()]
            if group:
                items.append(group)
        elif part:
            items.append(part)
    return items


def _fold_dataset(pipeline, demo, backbone, data, general, fold, override, task, options, card):
    """One fold's data, read up front: a fold the card cannot make (a session no row has)
    stops the sweep before anything is trained, naming the fold."""
    config = runner.build_config(pipeline, demo=demo, backbone=backbone, data=data, overrides=[*general, override])
    try:
        return runner.read_dataset(config, task, options, card)
    except UserError as error:
        raise UserError(f"--folds {fold}: {error}") from None


def _same_splits(prints: dict) -> tuple[str, str] | None:
    """Two folds whose splits hold the same examples (fold -> fingerprint), or None."""
    seen: dict[str, str] = {}
    for fold, key in prints.items():
        if key in seen:
            return seen[key], fold
        seen[key] = fold
    return None


def _mean_chance(levels: list[tuple[dict[str, float], str]]) -> tuple[dict[str, float], str]:
    """Chance per fold -> its mean over folds (the table's means are over folds too)."""
    names = set.intersection(*(set(values) for values, _ in levels))
    return {name: statistics.fmean(values[name] for values, _ in levels) for name in levels[0][0] if name in names}, levels[0][1]


def chance_levels(task, dataset, split: str, metric_names: list[str]) -> tuple[dict[str, float], str]:
    """-> (metric -> the best a model that ignores its input scores on `split`, what it answers).

    By default that model answers a constant, scored through the task's own metric code,
    and each metric takes the best of these constants: the training split's frequencies
    (the class frequencies for single-label classification, each finding's rate for
    multi-label data: AUROC 0.5, AUPR the positive rate) and one answer always (each class;
    every finding or none). So F1 of a binary task is the all-positive answer's 2p/(1+p),
    which a degenerate "always yes" adapter reaches, whatever the training rate. A task
    whose metrics rank (retrieval) gives its own levels (`task.chance_levels`). Empty for
    generated text, which has no such baseline."""
    from peftlab.shared import evaluation
    from peftlab.shared.metrics import get_metric

    train, scored = dataset.splits.get("train", []), dataset.splits.get(split, [])
    if hasattr(task, "chance_levels"):
        return task.chance_levels(metric_names, train, scored) if scored else ({}, "")
    if not dataset.labels or not train or not scored:
        return {}, ""
    if all("targets" in e for e in [*train, *scored]):
        rates = np.mean([e["targets"] for e in train], axis=0)
        constants = [rates, np.ones_like(rates), np.zeros_like(rates)]
    elif runner.single_label([*train, *scored]):
        counts = np.bincount([e["label"] for e in train], minlength=len(dataset.labels))
        prior, always = counts / counts.sum(), np.eye(len(counts))
        # binary tasks score P(class 1)
        constants = [prior[1], 0.0, 1.0] if len(prior) == 2 else [prior, *always]
    else:
        return {}, ""
    levels: dict[str, float] = {}
    for constant in constants:
        values = evaluation.compute_metrics(task, metric_names, scored, [np.array(constant)] * len(scored))
        for name in metric_names:
            value = values.get(name)
            if not isinstance(value, int | float):
                continue
            best = levels.get(name)
            if best is None or (value > best if get_metric(name).higher_is_better else value < best):
                levels[name] = float(value)
    return levels, CONSTANT_ANSWER


def _method_option_overrides(specs: dict, overrides: list[str]) -> dict[str, list[str]]:
    """method -> the `method.KEY=VALUE` overrides it takes. An option goes to the methods
    that have it (`method.r=4` sets LoRA's rank and leaves full fine-tuning and BitFit
    alone); one that no method of the sweep has is a mistake."""
    takes = {name: {option.name for option in dataclasses.fields(spec.options)} for name, spec in specs.items()}
    chosen: dict[str, list[str]] = {name: [] for name in specs}
    for item in overrides:
        key = item.partition("=")[0].removeprefix("method.").split(".")[0]
        users = [name for name in specs if key in takes[name]]
        if not users:
            raise UserError(f"{item}: no method of the sweep ({', '.join(specs)}) has option {key!r}; "
                            f"see `peftlab list methods`")
        if len(users) < len(specs):
            others = [name for name in specs if name not in users]
            runner.log(f"note: {item} applies to {', '.join(users)}; {', '.join(others)} "
                       f"{'has' if len(others) == 1 else 'have'} no option {key!r}")
        for name in users:
            chosen[name].append(item)
    return chosen


def check_columns(requested: list[str], metric_names: list[str]) -> None:
    """--columns checked before training: each must be a metric the cells compute, or one
    a task derives from it (`accuracy/<dataset>`, `accuracy_avg`)."""
    for name in requested:
        if not any(name in (known, f"{known}_avg") or name.startswith(f"{known}/") for known in metric_names):
            raise UserError(f"--columns: {name!r} is not a metric of this sweep; its metrics: {', '.join(metric_names)} "
                            f"(set others with eval.metrics=[...])")


def _split_names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def method_names(methods: list[str] | str | None) -> list[str]:
    """--methods as registered names: comma-separated, case folded (`LoRA` is lora)."""
    from peftlab.shared.methods.registry import list_methods

    names = _split_names(methods) if isinstance(methods, str) else [name.strip() for name in methods or [] if name.strip()]
    if not names:
        raise UserError("--methods: name at least one method, e.g. --methods lora,bitfit (see `peftlab list methods`)")
    joined = next((name for name in names if re.search(r"[;\s]", name)), None)
    if joined is not None:  # `lora;bitfit` or `lora bitfit` would otherwise read as one unknown name
        with_commas = ",".join(re.split(r"[;\s]+", joined))
        raise UserError(f"--methods: {joined!r} is not one method; separate methods with commas, e.g. "
                        f"--methods {with_commas}")
    known = set(list_methods())
    return [name if name in known else name.lower() for name in names]


def _methods_that_do_not_fit(backbone, specs) -> dict[str, str]:
    """Architecture-specific methods (`applies_to`) checked on the sweep's backbone."""
    return {spec.name: f"method {spec.name!r} does not fit the {type(backbone).__name__} backbone ({spec.description})"
            for spec in specs if not spec.fits(backbone)}


def _refusal_on(model, task, config) -> str | None:
    """The error applying `config`'s method to the sweep's model gives (e.g. bottleneck
    adapters on a CNN, LN tuning without LayerNorms), found on a copy without weights (on
    the meta device: no memory, no time), so that it is listed as skipped instead of
    failing each of its cells; None where it applies."""
    from peftlab.shared import methods

    try:
        weightless = _weightless_copy(model)
    except Exception:  # a model that cannot be copied is checked by its cells
        return None
    try:
        with contextlib.redirect_stderr(text_io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = {**task.default_method_options(config.method_name, weightless), **config.method_options}
            methods.apply(weightless.backbone, config.method_name, **options)
    except UserError as error:
        return str(error)
    except Exception:  # e.g. an initialisation that computes on the weights (SVD): the cells will tell
        return None
    return None


def _weightless_copy(model):
    """A deep copy of `model` whose parameters and buffers are meta tensors of the same
    shapes: its structure, without copying a byte of weights."""
    from torch import nn

    memo = {}
    for module in model.modules():
        for _, parameter in module.named_parameters(recurse=False):
            memo[id(parameter)] = nn.Parameter(parameter.detach().to("meta"), requires_grad=parameter.requires_grad)
        for _, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                memo[id(buffer)] = buffer.to("meta")
    return copy.deepcopy(model, memo)


def _default_out_dir(pipeline: str) -> Path:
    base = Path("bench") / pipeline / datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, suffix = base, 1
    while candidate.exists():  # a sweep started in the same second keeps its own folder
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    return candidate


def _check_out_dir(sweep: Sweep) -> None:
    """OUT is new, empty, or a sweep with the same settings; checked before writing anything."""
    settings_file = sweep.out / SETTINGS_FILE
    if settings_file.is_file():
        previous, current = _comparable(io.read_json(settings_file)), _comparable(sweep.settings)
        if "data_fingerprint" not in previous:  # written before sweeps recorded it: nothing to compare with
            current.pop("data_fingerprint")
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if "overrides" in changed:  # key=value lists that build the same configs are the same settings
            effects = _override_effects(sweep, io.read_json(settings_file).get("overrides") or [])
            changed = [k for k in changed if k != "overrides"] + (
                [f"overrides: {'; '.join(effects[:3])}{'; ...' if len(effects) > 3 else ''}"] if effects else [])
        if changed == ["data_fingerprint"]:
            raise UserError(f"{sweep.out}: the data has changed since this sweep's cells were trained (the same card "
                            f"reads other examples now); choose another --out, so that no table mixes the two")
        if changed:
            raise UserError(f"{sweep.out}: this bench directory was run with other settings ({', '.join(changed)}); "
                            f"choose another --out, or repeat them to resume it")
    else:
        _check_not_foreign(sweep.out)
    _check_backbone_weights(sweep)
    for cell in sweep.cells:
        trained = _run_dir(sweep, cell) / "run.yaml"
        changes = _config_changes(cell.config, trained) if trained.is_file() else []
        if changes:
            raise UserError(f"{trained}: cell {cell.name} was trained with other settings than the same command gives "
                            f"now ({'; '.join(changes[:3])}{'; ...' if len(changes) > 3 else ''}): the recipe or a "
                            f"default changed since; choose another --out, or delete {trained.parent} to retrain it")


def _check_not_foreign(out: Path) -> None:
    """OUT holds nothing, or a sweep (its bench.json): another folder's files are not ours to mix with."""
    if not (out / SETTINGS_FILE).is_file() and out.is_dir() and any(path.name != LOCK_FILE for path in out.iterdir()):
        raise UserError(f"{out} exists and is not a bench directory (no {SETTINGS_FILE}); choose another --out")


def _check_backbone_weights(sweep: Sweep) -> None:
    """Every cell OUT holds (finished, partly trained, or an earlier run's) was trained on
    the weights the backbone has now. bench.json names the backbone, but the same path or
    hub name can hold other weights later (a re-trained checkpoint, an updated snapshot);
    each run's meta.json records the digest of the weights it loaded."""
    if sweep.backbone_sha256 is None:
        return
    for meta_file in sorted((sweep.out / "runs").glob("*/meta.json")):
        try:
            trained = io.read_json(meta_file).get("backbone", {}).get("weights_sha256")
        except (OSError, UserError):  # unreadable: the cell's own reading of it reports that
            continue
        if trained is not None and trained != sweep.backbone_sha256:
            backbone = sweep.settings["backbone"] or ("the demo backbone" if sweep.settings["demo"]
                                                      else "the recipe's backbone")
            raise UserError(f"{sweep.out}: the backbone's weights have changed since this sweep's cells were trained "
                            f"({meta_file.parent.name} loaded weights {trained[:12]}, {backbone} has "
                            f"{sweep.backbone_sha256[:12]} now); choose another --out, so that no table mixes the two")


def _override_effects(sweep: Sweep, previous: list[str]) -> list[str]:
    """`key: before -> now` for each setting the earlier sweep's overrides gave a method's
    cells otherwise than this one's (`train.seed=0` given where 0 is the default changes
    nothing). Built without each cell's seed and fold: those are compared on their own."""
    changes: list[str] = []
    for cell in {cell.method: cell for cell in sweep.cells}.values():
        try:
            before = _method_config(sweep, cell, previous)
        except UserError as error:
            return [f"the earlier overrides no longer apply ({error})"]
        after = _method_config(sweep, cell, sweep.settings["overrides"])
        changes += [f"{key}: {before.get(key, '(unset)')} -> {after.get(key, '(unset)')}"
                    for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]
    return list(dict.fromkeys(changes))


def _method_config(sweep: Sweep, cell: Cell, overrides: list[str]) -> dict[str, Any]:
    """The flat config a sweep's overrides give `cell`'s method (its own `method.` options only)."""
    from peftlab.shared.methods.registry import get_method

    takes = {option.name for option in dataclasses.fields(get_method(cell.method).options)}
    chosen = [item for item in overrides if not item.startswith("method.")
              or item.partition("=")[0].removeprefix("method.").split(".")[0] in takes]
    settings = sweep.settings
    built = runner.build_config(sweep.pipeline, demo=settings["demo"], method=cell.method_argument,
                                backbone=settings["backbone"], data=settings["data"], overrides=chosen)
    return _flat(cfg.to_yaml_dict(built))


def _config_changes(config: cfg.RunConfig, trained_file: Path) -> list[str]:
    """`key: trained -> now` for each setting a cell's run.yaml holds otherwise than `config`
    (a recipe edited, or a package update that changed a recipe, between a sweep and its re-run).
    The trained method section is the method's resolved options: only the options `config`
    names are compared there. The card's path is left out: its data is compared by digest."""
    try:
        trained = cfg.to_yaml_dict(cfg.validate(cfg.read_config_file(trained_file), where=str(trained_file)))
    except UserError:
        return [f"{trained_file.name} no longer reads as a run config"]
    current = cfg.to_yaml_dict(config)
    trained_method, current_method = trained.pop("method"), current.pop("method")
    # where the card lies is not what it reads (bench.json's digest of the data is): a
    # packaged card moves with the installed package
    trained["data"].pop("card"), current["data"].pop("card")
    current["backbone"]["name"] = runner.absolute_backbone(current["backbone"]["name"])
    trained["backbone"]["name"] = runner.absolute_backbone(trained["backbone"]["name"])
    before, after = _flat(trained), _flat(current)
    changes = [f"{key}: {before.get(key, '(unset)')} -> {after.get(key, '(unset)')}"
               for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]
    for key, value in current_method.items():
        if trained_method.get(key) != value:
            changes.append(f"method.{key}: {trained_method.get(key, '(unset)')} -> {value}")
    return changes


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _comparable(settings: dict) -> dict:
    """Settings as they act: overrides as the config they make (their order is free),
    paths absolute (a resume may start from another folder)."""
    data = settings.get("data")
    return {**settings,
            "overrides": cfg.apply_overrides({}, list(settings.get("overrides") or [])),
            "data": str(Path(data).expanduser().resolve()) if data and Path(data).expanduser().exists() else data,
            "backbone": runner.absolute_backbone(settings["backbone"]) if settings.get("backbone") else None}


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold OUT's lock for the sweep. The cell processes inherit it, so a cell left
    running by a killed sweep still keeps a new sweep out of its directory."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as error:  # e.g. a folder made read-only since the plan checked it
        raise UserError(f"--out {out}: cannot write the sweep there ({runner.os_reason(error, out)}); choose another --out") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise UserError(f"{out}: another peftlab bench (process {holder}) is running this sweep; "
                        f"wait for it to end, or choose another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield handle.fileno()
    finally:
        handle.close()


def _claim_out_dir(sweep: Sweep) -> None:
    """Under the lock: a new OUT gets bench.json; an existing one is checked again."""
    _check_out_dir(sweep)
    if not (sweep.out / SETTINGS_FILE).is_file():
        io.write_json(sweep.out / SETTINGS_FILE, sweep.settings)
    sweep.recorded_overrides = list(io.read_json(sweep.out / SETTINGS_FILE).get("overrides") or [])


# --------------------------------------------------------------------------- running


def run_cells(sweep: Sweep, isolate: bool = True, columns: list[str] | None = None) -> list[dict]:
    """Run every unfinished cell; returns one results row per cell, in plan order. The
    reports are written with results.jsonl, before the first cell and after each
    (`columns`: the table's; cells still to run count as pending), so that a sweep stopped
    midway leaves table.md, table.csv and pareto.png that agree with results.jsonl."""
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
        runner.log(f"{len(sweep.cells) - len(pending)} of {len(sweep.cells)} cells already finished (their runs are "
                   f"kept); running the other {len(pending)}")
    earlier = _earlier_rows(sweep)

    def save() -> None:
        io.write_jsonl(sweep.out / RESULTS_FILE, _ordered_rows(sweep, rows) + earlier)
        still_to_run = {cell.name: _pending_row(cell) for cell in pending if cell.name not in rows}
        write_reports(sweep, _ordered_rows(sweep, {**still_to_run, **rows}) + earlier, columns, final=False)

    save()
    progress = tqdm(total=len(pending), desc="bench", unit="cell", file=sys.stderr, dynamic_ncols=True)
    try:
        for cell in pending:
            progress.set_postfix_str(f"{cell.method}{'' if cell.fold is None else ' ' + cell.fold} seed {cell.seed}",
                                     refresh=True)
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
    return _ordered_rows(sweep, rows) + earlier


def _pending_row(cell: Cell) -> dict:
    """A cell not run yet, as the interim reports count it (`1/2` seeds); never in results.jsonl."""
    return {"method": cell.method, "seed": cell.seed, **_fold_key(cell.fold), "cell": cell.name, "status": "pending"}


def planned_cells(sweep: Sweep) -> set[str]:
    """The cells this command names (skipped ones too); any other row of OUT's results is
    an earlier run's (another --methods or --seeds), kept as it was."""
    return {cell_name(method, fold, seed) for method in sweep.methods for fold in sweep.folds for seed in sweep.seeds}


def _earlier_rows(sweep: Sweep) -> list[dict]:
    """Rows an earlier run into OUT recorded for cells this one does not plan (another
    --methods or --seeds): kept, so a sweep can grow by a method without losing the others."""
    results = sweep.out / RESULTS_FILE
    if not results.is_file():
        return []
    planned = planned_cells(sweep)
    kept = [row for row in io.read_jsonl(results) if row.get("cell") not in planned]
    if kept:
        runner.log(f"keeping {_count(len(kept), 'earlier cell')} this run does not name: "
                   f"{', '.join(row['cell'] for row in kept)}")
    return kept


def _run_dir(sweep: Sweep, cell: Cell) -> Path:
    return sweep.out / "runs" / cell.name


def _log_file(sweep: Sweep, cell: Cell) -> Path:
    return sweep.out / "logs" / f"{cell.name}.log"


def _ordered_rows(sweep: Sweep, rows: dict[str, dict]) -> list[dict]:
    ordered = []
    for method in sweep.methods:
        for fold in sweep.folds:
            for seed in sweep.seeds:
                name = cell_name(method, fold, seed)
                if method in sweep.skipped:
                    ordered.append({"method": method, "seed": seed, **_fold_key(fold), "cell": name,
                                    "status": "skipped", "error": sweep.skipped[method]})
                elif name in rows:
                    ordered.append(rows[name])
    return ordered


def _fold_key(fold: str | None) -> dict[str, str]:
    """A results row's `fold` entry, only in sweeps with folds."""
    return {} if fold is None else {"fold": fold}


def run_cell(sweep: Sweep, cell: Cell, isolate: bool) -> dict:
    """Train one cell (resuming what a killed sweep left); returns its results row."""
    run_dir = _run_dir(sweep, cell)
    resume = (run_dir / "run.yaml").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # killed before its run.yaml: nothing there to resume
    log_file = _log_file(sweep, cell)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if not resume:
        log_file.unlink(missing_ok=True)  # a resumed cell's log goes on; a restarted one starts afresh
    if isolate:
        error, peak = _run_cell_in_subprocess(sweep, cell, run_dir, resume, log_file)
    else:
        error, peak = _run_cell_in_process(cell, run_dir, resume, log_file), None
    if error is not None:
        return {"method": cell.method, "seed": cell.seed, **_fold_key(cell.fold), "cell": cell.name, "status": "failed", "error": error,
                "log": str(log_file.relative_to(sweep.out))}
    if peak is not None:
        io.write_json(run_dir / PEAK_FILE, {"peak_rss_mb": peak, "what": "VmHWM of the cell's own process"})
    return finished_row(cell, run_dir, sweep.out)


def _run_cell_in_process(cell: Cell, run_dir: Path, resume: bool, log_file: Path) -> str | None:
    with open(log_file, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log):
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
    with open(log_file, "a", encoding="utf-8") as log:
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                   pass_fds=() if sweep.lock_fd is None else (sweep.lock_fd,),
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    if completed.returncode != 0:
        return _error_from_log(log_file, completed.returncode), None
    peak = None
    for line in reversed(completed.stdout.splitlines()):
        if PEAK_LINE_KEY in line:
            peak = json.loads(line)[PEAK_LINE_KEY]
            break
    return None, peak


def _die_with_parent() -> None:
    """In the cell process before it starts: end it (SIGTERM) when the sweep's process
    dies, even by SIGKILL, rather than train on as an orphan beside a resumed sweep."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
"""Loaded before any fork: the child between fork and exec only makes the call."""


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
    from peftlab.shared.methods.adapted import METHOD_FILE

    results = io.read_json(run_dir / "metrics.json")
    meta = io.read_json(run_dir / "meta.json")
    splits = [name for name, value in results.items() if name not in NON_METRIC_SECTIONS and isinstance(value, dict)]
    split = "test" if "test" in splits else splits[-1]
    train = results.get("train", {})
    peak_file = run_dir / PEAK_FILE
    params = results.get("params") or meta["params"]
    return {
        "method": cell.method, "seed": cell.seed, **_fold_key(cell.fold), "cell": cell.name, "status": "finished",
        "run_dir": str(run_dir.relative_to(out)),
        "primary_metric": meta["primary_metric"],
        "split": split,
        "metrics": scalar_metrics(results[split]),
        "params": {key: params[key] for key in ("trainable", "total", "percent")},
        "adapter_bytes": folder_bytes(run_dir / runner.ADAPTER),
        # as trained: the method's defaults, the task's choice of modules, the recipe's and key=value's
        "method_options": io.read_json(run_dir / runner.ADAPTER / METHOD_FILE)["options"],
        "options_given": cell.config.method_options,  # the recipe's and key=value's, for the table's note
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
    pending: int = 0
    """Cells not run yet (the reports written while the sweep runs, or after it was stopped)."""
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
        summary.pending = sum(row["status"] == "pending" for row in method_rows)
        summaries.append(summary)
        if not done:  # failed or skipped says more than pending where a method has both
            summary.status = next((row["status"] for row in method_rows if row["status"] != "pending"), "pending")
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


def pareto_front_above_chance(points: list[tuple[float, float]], higher_is_better: bool,
                              chance: float | None) -> list[int]:
    """The Pareto front of the points that beat `chance` (all of them when it is None):
    the fewest parameters for nothing learnt is not a trade-off worth drawing."""
    def learnt(y: float) -> bool:
        return chance is None or (y > chance + 1e-9 if higher_is_better else y < chance - 1e-9)

    candidates = [i for i, (_, y) in enumerate(points) if learnt(y)]
    return [candidates[j] for j in pareto_front([points[i] for i in candidates], higher_is_better)]


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


def write_reports(sweep: Sweep, rows: list[dict], columns: list[str] | None = None, final: bool = True) -> None:
    """table.md, table.csv and pareto.png from `rows`; `final=False` while cells are still
    to run (said once, at the end)."""
    summaries = order_reference_first(summarise(rows))
    try:
        names = metric_columns(summaries, sweep.primary_metric, columns)
    except UserError:
        if final:
            raise
        return  # a --columns metric no cell has reported yet: the reports wait for one that does
    split = next((row["split"] for row in rows if row["status"] == "finished"), "test")
    io.write_text(sweep.out / "table.md", table_markdown(sweep, summaries, names, split, rows))
    chance_methods = {s.method for s in summaries if at_chance(s, sweep)}
    io.write_text(sweep.out / "table.csv", table_csv(summaries, names, sweep.primary_metric, chance_methods))
    plot_pareto(sweep.out / "pareto.png", summaries, sweep.primary_metric, sweep.higher_is_better,
                title=f"{sweep.pipeline}: {sweep.primary_metric} ({split}) vs trainable parameters",
                chance=sweep.chance.get(sweep.primary_metric))
    if not final:
        return
    counts = {status: sum(row["status"] == status for row in rows) for status in ("finished", "failed", "skipped")}
    runner.log(", ".join(f"{n} {status}" for status, n in counts.items()) + f" cells; table: {sweep.out / 'table.md'}")
    note = earlier_failures_note(sweep, rows)
    if note:
        runner.log(f"note: {note}")


def earlier_failures_note(sweep: Sweep, rows: list[dict]) -> str | None:
    """Failed cells of an earlier run into OUT that this command does not plan: they stay
    in the reports, but this command does not retry them, so they are not its failure;
    say which they are and what retries them."""
    planned = planned_cells(sweep)
    failed = [row for row in rows if row["status"] == "failed" and row["cell"] not in planned]
    if not failed:
        return None
    retries = []
    for method in dict.fromkeys(row["method"] for row in failed):
        if method not in sweep.methods:
            retries.append("leave out --no-full" if method == REFERENCE else f"add {method} back to --methods")
    if any(row["method"] in sweep.methods for row in failed):  # a seed beyond this command's --seeds
        needed = max(row["seed"] for row in failed if row["method"] in sweep.methods) - sweep.seeds[0] + 1
        retries.append(f"run with --seeds {needed}")
    return (f"{_count(len(failed), 'cell')} of an earlier run failed, which this command does not run "
            f"({', '.join(row['cell'] for row in failed)}): table.md lists them, but only this command's cells decide "
            f"its exit status; to retry them, {' and '.join(retries)}")


def order_reference_first(summaries: list[MethodSummary]) -> list[MethodSummary]:
    return sorted(summaries, key=lambda s: s.method != REFERENCE)  # stable: the others keep their order


def at_chance(summary: MethodSummary, sweep: Sweep) -> bool:
    """The method's mean primary metric is no better than chance's (`chance_levels`)."""
    chance, mean = sweep.chance.get(sweep.primary_metric), summary.metrics.get(sweep.primary_metric, (None,))[0]
    if chance is None or mean is None:
        return False
    return mean <= chance + 1e-9 if sweep.higher_is_better else mean >= chance - 1e-9


def _delta(summary: MethodSummary, reference: MethodSummary | None, metric: str) -> float | None:
    if reference is None or summary is reference or metric not in summary.metrics or metric not in reference.metrics:
        return None
    return summary.metrics[metric][0] - reference.metrics[metric][0]


def _reference(summaries) -> MethodSummary | None:
    return next((s for s in summaries if s.method == REFERENCE and s.finished), None)


def table_markdown(sweep: Sweep, summaries: list[MethodSummary], names: list[str], split: str,
                   rows: list[dict] | None = None) -> str:
    primary = sweep.primary_metric
    reference = _reference(summaries)
    has_gpu = any(s.peak_gpu_mb is not None for s in summaries)
    folded = sweep.folds != [None]
    runs = "runs" if folded else "seeds"
    header = ["method", runs, "trainable params", "% trainable", "adapter size"]
    for name in names:
        header.append(name)
        if name == primary and reference is not None:
            header.append(f"Δ {primary} vs full")
    header += ["train s", "samples/s", "peak RSS MB"] + (["peak GPU MB"] if has_gpu else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    formats = {name: _column_format(summaries, name) for name in names}
    for s in summaries:
        if not s.finished:
            continue
        name = f"{s.method} (reference)" if s is reference else s.method
        cells = [f"{name} (at chance)" if at_chance(s, sweep) else name, f"{s.finished}/{s.cells}",
                 f"{s.trainable:,}", f"{s.percent:.4g}", _fmt_bytes(s.adapter_bytes)]
        for name in names:
            cells.append(_fmt_mean_std(s.metrics.get(name), formats[name]))
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
    # the overrides the cells were trained with (bench.json's): a resume may type ones that act alike
    trained_with = settings["overrides"] if sweep.recorded_overrides is None else sweep.recorded_overrides
    seeds = seeds_averaged(sweep, rows)
    if folded:
        key = sweep.folds[0].partition("=")[0]
        seeds += (f". Folds: splits.{key} = {', '.join(fold.partition('=')[2] for fold in sweep.folds)}, one run "
                  f"per fold and seed")
    over = "folds and seeds" if folded else "seeds"
    text = [
        f"# peftlab bench: {sweep.pipeline}",
        "",
        f"Backbone: {backbone}. Data: {data}. Overrides: {' '.join(trained_with) or 'none'}. "
        f"Seeds: {seeds}. Primary metric: {primary} ({direction}), on the {split} split.",
        "",
        f"Metrics: mean ± sample standard deviation (n − 1) over the finished {over} (`{runs}` column)"
        + ("; Δ is the difference of means to full fine-tuning. " if reference is not None else ". ")
        + "Trainable params: the method's and the task head's; "
        "% of all parameters. Adapter size: bytes of the run's adapter/ folder. Train s and samples/s: the "
        f"training loop without evaluation, mean over {over}. Peak RSS: the largest, over {over}, of the cell "
        "process's own resident-memory high-water mark (model, data, training and evaluation; blank when the "
        "cells ran in one process, where it cannot be told apart per cell).",
        "",
        *lines,
    ]
    text += ["", "Method options set by the recipe or key=value (each method's other options are its defaults, with "
                 "the task's choice of modules; every cell's resolved options are in results.jsonl): "
                 + method_options_line(sweep, rows) + "."]
    if sweep.chance:
        levels = ", ".join(f"{name} {sweep.chance[name]:.4f}" for name in names if name in sweep.chance)
        text += ["", f"Chance, the scores of {sweep.chance_basis} on the {split} "
                     f"split{' (mean over folds)' if folded else ''}: {levels}. A method marked (at chance) scores no better on {primary}: it has not learnt."]
    if folded and rows:
        text += ["", *per_fold_table(sweep, summaries, rows)]
    left_out = [s for s in summaries if s.errors]
    if left_out:
        text += ["", "Not finished:", ""]
        for s in left_out:
            text.append(f"- {s.method}: {s.cells - s.finished - s.pending} of {s.cells} cells "
                        f"{s.status if not s.finished else 'failed'}: " + "; ".join(s.errors))
    still_to_run = [row["cell"] for row in rows or [] if row["status"] == "pending"]
    if still_to_run:
        text += ["", f"Not run yet (the sweep is running, or was stopped: the same command resumes it): "
                     f"{', '.join(still_to_run)}."]
    return "\n".join(text) + "\n"


def seeds_averaged(sweep: Sweep, rows: list[dict] | None) -> str:
    """The seeds of the finished rows, which the table averages (an earlier run into OUT
    may have trained more than this command names): `0, 1`, or `0, 1 (ia3: 0)` where a
    method has fewer. This command's seeds while no cell has finished."""
    by_method: dict[str, set[int]] = {}
    for row in rows or []:
        if row["status"] == "finished":
            by_method.setdefault(row["method"], set()).add(row["seed"])
    if not by_method:
        return ", ".join(str(seed) for seed in sweep.seeds)
    every = sorted(set().union(*by_method.values()))
    fewer = [f"{method}: {', '.join(str(seed) for seed in sorted(seeds))}"
             for method, seeds in by_method.items() if len(seeds) < len(every)]
    return ", ".join(str(seed) for seed in every) + (f" ({'; '.join(fewer)})" if fewer else "")


def per_fold_table(sweep: Sweep, summaries: list[MethodSummary], rows: list[dict]) -> list[str]:
    """The primary metric of each method on each fold (mean over seeds; — where no cell
    finished): how much of the spread the folds make."""
    primary, key = sweep.primary_metric, sweep.folds[0].partition("=")[0]
    header = ["method", *(f"{key}={fold.partition('=')[2]}" for fold in sweep.folds)]
    lines = [f"{primary} per fold (mean over seeds):", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summaries:
        cells = [summary.method]
        for fold in sweep.folds:
            values = [row["metrics"][primary] for row in rows if row["method"] == summary.method
                      and row.get("fold") == fold and row["status"] == "finished"
                      and row["metrics"].get(primary) is not None]
            cells.append(_fmt_metric(statistics.fmean(values)) if values else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def recipe_options_note(sweep: Sweep) -> str | None:
    """Where the recipe's own method keeps options of the recipe's (not given on the
    command line) beside other methods, which start from their defaults: say so."""
    own = next((cell for cell in sweep.cells if cell.method_argument is None), None)
    typed = {item.partition("=")[0] for item in sweep.settings["overrides"]}
    given = {key: value for key, value in (own.config.method_options if own else {}).items()
             if f"method.{key}" not in typed}
    if not given or len({cell.method for cell in sweep.cells}) < 2:
        return None
    return (f"{own.method} keeps the recipe's options ({', '.join(f'{k}={v}' for k, v in sorted(given.items()))}); "
            f"the other methods start from their defaults: method.KEY=VALUE gives one to every method that has it")


def method_options_line(sweep: Sweep, rows: list[dict] | None = None) -> str:
    """`lora: alpha=32, dropout=0.1; bitfit, full: none`: what each method was given
    beyond its defaults, so rows trained with different settings say so. Methods of
    `rows` an earlier run into OUT trained (another --methods) come from their rows."""
    given: dict[str, str] = {}
    planned = [(cell.method, cell.config.method_options) for cell in sweep.cells]
    earlier = [(row["method"], row["options_given"]) for row in rows or [] if "options_given" in row]
    for method, options in planned + earlier:
        if method not in given:
            given[method] = ", ".join(f"{key}={value}" for key, value in sorted(options.items())) or "none"
    plain = [method for method, text in given.items() if text == "none"]
    parts = [f"{method}: {text}" for method, text in given.items() if text != "none"]
    return "; ".join(parts + ([f"{', '.join(plain)}: none"] if plain else []))


def table_csv(summaries: list[MethodSummary], names: list[str], primary: str, chance_methods=frozenset()) -> str:
    """`chance_methods`: those whose primary metric is no better than chance (`at_chance`)."""
    reference = _reference(summaries)
    header = ["method", "status", "seeds_finished", "seeds", "at_chance", "trainable_params", "trainable_percent",
              "adapter_bytes"]
    for name in names:
        header += [f"{name}_mean", f"{name}_std"]
    header += [f"delta_{primary}_vs_full", "train_seconds", "samples_per_s", "peak_rss_mb", "peak_gpu_mb", "error"]
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for s in summaries:
        row = [s.method, s.status if not s.finished else "finished", s.finished, s.cells,
               s.method in chance_methods if s.finished else None, s.trainable, s.percent, s.adapter_bytes]
        for name in names:
            mean, std = s.metrics.get(name, (None, None))
            row += [mean, std]
        row += [_delta(s, reference, primary), s.train_seconds, s.samples_per_s, s.peak_rss_mb, s.peak_gpu_mb,
                "; ".join(s.errors)]
        writer.writerow(["" if value is None else repr(value) if isinstance(value, float) else value for value in row])
    return buffer.getvalue()


def plot_pareto(path: Path, summaries: list[MethodSummary], primary: str, higher_is_better: bool, title: str,
                chance: float | None = None) -> None:
    """`pareto_figure`, written to `path` as a PNG."""
    figure = pareto_figure(summaries, primary, higher_is_better, title, chance)
    with io.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def pareto_figure(summaries: list[MethodSummary], primary: str, higher_is_better: bool, title: str,
                  chance: float | None = None):
    """Primary metric (mean, std error bars) against trainable % on a log axis; the
    Pareto front drawn as a line through its circled points. With `chance` (what a model
    that learnt nothing scores) a dashed line marks it, and a method no better than it is left off
    the front: fewest parameters for nothing learnt is not a trade-off. A footnote names
    the methods without a point (failed, skipped), so the plot is not read as complete."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [s for s in summaries if s.finished and primary in s.metrics and s.percent]
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)  # no pyplot: the library never touches the user's backend
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=10)
    not_shown = [f"{s.method} ({s.status if not s.finished else f'no {primary}'})" for s in summaries if s not in done]
    if not_shown:
        figure.supxlabel(f"not shown: {', '.join(not_shown)}", fontsize=8, color="dimgray")
    if not done:  # the file exists whatever happened, and says why it is empty
        axes.text(0.5, 0.5, "no method finished: see table.md for the errors", ha="center", va="center",
                  transform=axes.transAxes)
        axes.set_axis_off()
        return figure
    xs = [s.percent for s in done]
    ys = [s.metrics[primary][0] for s in done]
    errors = [s.metrics[primary][1] or 0.0 for s in done]
    axes.errorbar(xs, ys, yerr=errors, fmt="o", color="tab:blue", ecolor="gray", capsize=3, label="method (mean ± std)")
    front = sorted(pareto_front_above_chance(list(zip(xs, ys)), higher_is_better, chance), key=lambda i: xs[i])
    if chance is not None:
        axes.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance (a model that learnt nothing)")
    if front:
        axes.plot([xs[i] for i in front], [ys[i] for i in front], "-", color="tab:red", linewidth=1, zorder=0)
        axes.scatter([xs[i] for i in front], [ys[i] for i in front], s=140, facecolors="none",
                     edgecolors="tab:red", label="Pareto front")
    axes.set_xscale("log")
    axes.set_xlim(min(xs) / 2, max(xs) * 2)  # room on either side for the outermost labels
    bottom, top = min(y - e for y, e in zip(ys, errors)), max(y + e for y, e in zip(ys, errors))
    if chance is not None:
        bottom, top = min(bottom, chance), max(top, chance)
    margin = 0.15 * ((top - bottom) or abs(top) or 1.0)
    axes.set_ylim(bottom - margin, top + margin)
    _label_points(axes, [s.method for s in done], xs, ys, ringed=set(front))
    # plain numbers (0.1, 2, 100) on major and, over a short range, minor ticks: never 2×10^0;
    # none past 100 %, where the axis only makes room for full fine-tuning's label
    plain = _plain_log_formatter()
    axes.xaxis.set_major_formatter(plain(labelOnlyBase=False))
    axes.xaxis.set_minor_formatter(plain(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))
    axes.set_xlabel("trainable parameters (% of all, log scale)")
    axes.set_ylabel(f"{primary} ({'higher' if higher_is_better else 'lower'} is better)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return figure


def _label_points(axes, names: list[str], xs: list[float], ys: list[float], fontsize: int = 8,
                  ringed: set[int] = frozenset()) -> None:
    """Name each point beside it, moving a label up or down until it clears the labels
    already placed and the other points' markers (methods of similar size and score
    otherwise print over each other); a label moved past the next row has a line to its
    point. `ringed`: the points circled as the Pareto front, whose ring is wider."""
    placed: list[tuple[float, float, float, float]] = []
    points_to_pixels = axes.figure.dpi / 72
    height = 1.3 * fontsize * points_to_pixels
    centres = [axes.transData.transform((x, y)) for x, y in zip(xs, ys)]
    # half-widths: the errorbar's "o", and the front's ring (s=140 points², about 12 points across)
    radii = [(6 if index in ringed else 4) * points_to_pixels for index in range(len(xs))]
    markers = [(x - r, y - r, x + r, y + r) for (x, y), r in zip(centres, radii)]

    def overlaps(box, other) -> bool:
        return box[0] < other[2] and other[0] < box[2] and box[1] < other[3] and other[1] < box[3]

    for index in sorted(range(len(names)), key=lambda i: (xs[i], ys[i])):
        x, y = centres[index]
        width = 0.62 * fontsize * points_to_pixels * len(names[index])
        obstacles = placed + markers[:index] + markers[index + 1:]
        for shift in (0, 1, -1, 2, -2, 3, -3, 4, -4):
            left, bottom = x + 5 * points_to_pixels, y + 2 * points_to_pixels + shift * height
            box = (left, bottom, left + width, bottom + height)
            if not any(overlaps(box, other) for other in obstacles):
                break
        placed.append(box)
        # a label beside the next row reads as its point's; one moved further is tied to it by a line
        arrow = {"arrowstyle": "-", "color": "gray", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4} if abs(shift) > 1 else None
        axes.annotate(names[index], (xs[index], ys[index]), textcoords="offset pixels", fontsize=fontsize,
                      xytext=(box[0] - x, box[1] - y), va="bottom", ha="left", arrowprops=arrow)


def _plain_log_formatter():
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return "" if x > 100 * (1 + 1e-9) else f"{x:g}"  # no share of the parameters is over 100 %

    return PlainLogFormatter


def _fmt_metric(value) -> str:
    return "n/a" if value is None else _fmt_value(value, ".4f")


def _fmt_value(value: float, spec: str) -> str:
    """`value` in `spec`, unless that rounds a value other than 0 to 0: then two significant
    digits (3.1e-05), so that a small spread is not read as none (`± 0.0000`)."""
    text = format(value, spec)
    if value != 0 and float(text) == 0:
        return f"{value:.2g}"
    return text


def _fmt_mean_std(mean_and_std, spec: str = ".4f") -> str:
    if mean_and_std is None:
        return "—"
    mean, std = mean_and_std
    return _fmt_value(mean, spec) if std is None else f"{_fmt_value(mean, spec)} ± {_fmt_value(std, spec)}"


def _column_format(summaries: list[MethodSummary], name: str) -> str:
    """Four decimals, or none for a column of counts (a median rank on which the seeds
    agree reads 5, not 5.0000); scores within [0, 1] keep their decimals even when whole."""
    values = [v for s in summaries if name in s.metrics for v in s.metrics[name] if v is not None]
    counts = values and all(float(v).is_integer() for v in values) and max(values) > 1
    return ".0f" if counts else ".4f"


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
