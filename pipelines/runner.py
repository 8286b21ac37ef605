"""Run a pipeline end to end, and reuse what it wrote.

`run` validates everything it can (config, card, data, backbone, method) before it
creates the run directory, so a user mistake leaves nothing behind. The directory
holds run.yaml, card.md, adapter/, meta.json, metrics.json, predictions/ and
checkpoints/ (ARCHITECTURE section 6); metrics.json is written last, so a run
without it is unfinished and can be resumed.

Under a launcher (`--num-processes N`, torchrun, `accelerate launch`) every process
prepares the same run; the main process alone picks and writes the run directory and
the others learn its path, so one run is one directory whoever started it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import peftlab
import torch
from peftlab.pipelines import config as cfg
from peftlab.shared import checkpoint, io, methods, sharding
from peftlab.shared.cards import Card, card_text, read_card
from peftlab.shared.data import subsample
from peftlab.shared.errors import UserError
from peftlab.shared.evaluation import evaluate
from peftlab.shared.folds import check_fold_by
from peftlab.shared.metrics import list_metrics
from peftlab.shared.tasks import Dataset, get_task
from peftlab.shared.training import (
    launcher_rank,
    main_process_decides,
    make_accelerator,
    peak_rss_mb,
    process_state,
    resolve_precision,
    seed_everything,
    train,
    trained_state_file,
)
from pydantic import ValidationError

ADAPTER = "adapter"
HEAD_FILE = "head.safetensors"
BUFFERS_FILE = "buffers.safetensors"


class _StderrHandler(logging.Handler):
    """Writes each message alone to the stderr of the moment (a notebook or a test may
    swap it after import)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


LOGGER = logging.getLogger("peftlab")
"""What runs, evaluations and predictions say. From Python,
`logging.getLogger("peftlab").setLevel(logging.WARNING)` quiets it."""
LOGGER.addHandler(_StderrHandler())
if LOGGER.level == logging.NOTSET:  # a level set before this module loaded (`import peftlab` does not load it) stays
    LOGGER.setLevel(logging.INFO)
LOGGER.propagate = False  # one copy of each line, whatever the root logger does


def log(message: str) -> None:
    if launcher_rank() == 0:  # one voice for all processes of a run
        LOGGER.info(message)


def build_config(
    pipeline: str | None = None,
    *,
    config_file: str | None = None,
    demo: bool = False,
    method: str | None = None,
    backbone: str | None = None,
    data: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> cfg.RunConfig:
    """Recipe (or config file), then --demo, --method/--backbone/--data, then key=value."""
    trained_on = None  # the card of the run a config file repeats
    if config_file:
        raw = cfg.read_config_file(config_file)
        if pipeline and raw.get("pipeline") != pipeline:
            raise UserError(f"{config_file} is for pipeline {raw.get('pipeline')!r}, not {pipeline!r}")
        _note_merged_config(Path(config_file))
        trained_on = (raw.get("data") or {}).get("card")
    elif pipeline:
        raw = cfg.read_recipe(pipeline)
    else:
        raise UserError("name a pipeline (see `peftlab list pipelines`) or pass --config FILE")
    recipe_method = dict(raw.get("method") or {})
    if demo:
        if not raw.get("demo"):
            raise UserError(f"pipeline {raw.get('pipeline')!r} has no demo settings")
        demo_method = raw["demo"].get("method") or {}
        if demo_method.get("name") not in (None, recipe_method.get("name")):
            raw["method"] = {}  # another method: the recipe's method options do not apply to it
        raw = cfg.merge(raw, raw["demo"])
    raw.pop("demo", None)
    # Naming the recipe's own method or backbone keeps the recipe's options for it (with
    # --demo too, where the demo trains another method: LoReFT's rank and positions).
    if method and method != (raw.get("method") or {}).get("name"):
        raw["method"] = recipe_method if method == recipe_method.get("name") else {"name": method}
    if backbone and backbone != (raw.get("backbone") or {}).get("name"):
        raw["backbone"] = {"name": backbone}
    if data:
        raw.setdefault("data", {})
        raw["data"] = {"card": data}
    raw = cfg.apply_overrides(raw, list(overrides))
    config = cfg.validate(raw, where=config_file or f"pipeline {pipeline}")
    if trained_on and config.data.card and \
            cfg.resolve_card_path(config.data.card).resolve() == cfg.resolve_card_path(trained_on).resolve():
        _note_changed_card(Path(config_file), config)
    return config


@dataclass
class Prepared:
    config: cfg.RunConfig
    task: Any
    options: Any
    card: Card
    dataset: Dataset
    model: Any
    metrics: list[str]
    primary_metric: str


def load_card(card_path: str | Path, task, root: Path | None = None) -> Card:
    card = read_card(cfg.resolve_card_path(str(card_path)), root=root)
    # Which task the card is for first: another task's card fails on that, not on a key
    # that task reads and this one does not.
    if card.task != task.name:
        raise UserError(f"{card.card_path}: the card is for task {card.task!r}, this pipeline runs {task.name!r}; pass a {task.name} card")
    if card.domain != task.domain:
        raise UserError(f"{card.card_path}: domain {card.domain!r} does not match task {task.name!r} (domain {task.domain!r})")
    card.check_keys(task.card_keys)
    card.check_split_keys(task.split_keys, task.name)
    card.check_field_keys(task.field_keys, task.name)
    if card.loader is not None:
        if card.format in task.formats:
            raise UserError(f"{card.card_path}: loader: {task.name} reads format {card.format!r} itself; leave "
                            f"`loader` out, or set `format` to the name of the format your loader reads")
        positional = [key for key, spec in (card.fields or {}).items() if isinstance(spec, int)]
        if positional:
            raise UserError(f"{card.card_path}: fields.{positional[0]}: {card.fields[positional[0]]} is a column "
                            f"position, and a loader's records name their fields: give the name "
                            f"(fields: {{{positional[0]}: NAME}}) or leave it out")
        # The loader's records are read as the task's own record format: its reader takes that branch.
        card = card.model_copy(update={"format": task.loader_format})
    elif card.format not in task.formats:
        raise UserError(f"{card.card_path}: format {card.format!r} is not one {task.name} reads ({', '.join(task.formats)}); "
                        f"convert the data to one of them, or read it with `loader: module:function`")
    check_fold_by(card, task)
    if card.format == "demo" and card.splits is not None:
        raise UserError(f"{card.card_path}: splits: a demo card's splits are its generator's; set their sizes under "
                        f"`demo:` (as {task.name}'s demo card does) and leave splits out")
    if card.labels is not None and not getattr(task, "named_classes", True):
        raise UserError(f"{card.card_path}: labels: {task.name} has no classes to name (its targets are text); "
                        f"leave `labels` out")
    if card.group_by is not None and not getattr(task, "group_metrics", False):
        raise UserError(f"{card.card_path}: group_by: {task.name} reports no per-group metrics (medical-classify and "
                        f"speech-emotion do); leave group_by out")
    unknown = [name for name in card.metrics or [] if name not in list_metrics()]
    if unknown:
        raise UserError(f"{card.card_path}: metrics: unknown metric {unknown[0]!r}; {task.name} computes "
                        f"{', '.join(task.metrics)}")
    return card


def with_split_overrides(card: Card, overrides: dict[str, Any] | None, task) -> Card:
    """The card with `data.splits` keys in place of its own `splits:` ones (a fold or a
    split seed chosen per run, e.g. by `peftlab bench --folds`); the card file is unchanged."""
    if not overrides:
        return card
    unknown = sorted(set(overrides) - set(task.split_keys))
    if unknown:
        raise UserError(f"data.splits.{unknown[0]} is not a split key {task.name} reads; "
                        f"its split keys: {', '.join(task.split_keys)}")
    for key, value in overrides.items():
        if key in ("train", "validation", "test") and "fold_by" not in {**(card.splits or {}), **overrides} \
                and not (isinstance(value, str) and card.data_exists(card.resolve(value, f"data.splits.{key}"))):
            raise UserError(f"data.splits.{key}={value}: {card.card_path} has no splits.fold_by, so splits.{key} "
                            f"names a file, and there is none there; to pick fold values add fold_by: COLUMN to the "
                            f"card's splits (or give --folds seed=0,1,2 for random splits)")
    # KEY=null takes the card's key away (its ratios, say, for a fold run)
    merged = {key: value for key, value in {**(card.splits or {}), **overrides}.items() if value is not None}
    try:
        changed = card.model_validate({**card.model_dump(), "splits": merged})
    except ValidationError as error:
        first = error.errors()[0]
        raise UserError(f"data.splits: {first['msg'].removeprefix('Value error, ')}") from None
    try:
        check_fold_by(changed, task)
    except UserError as error:
        given = ", ".join(f"{key}={value}" for key, value in overrides.items())
        raise UserError(f"{error} (the card's splits with data.splits {given})") from None
    return changed


def load_run_card(run_dir: Path, config: cfg.RunConfig, task) -> Card:
    """The card a run trained on: its copy, RUN/card.md, with relative paths starting at
    the original card's folder. Evaluating or resuming with the copy reads the data
    training read, even after the original card was edited or moved."""
    original = Path(config.data.card)
    card = load_card(run_dir / "card.md", task, root=original.parent)
    if original.is_file() and card_text(original) != card.text:
        log(f"note: {original} has changed since training; reading the run's copy, {card.card_path} "
            f"(pass --data {original} to use the edited card)")
    return card


def read_dataset(config: cfg.RunConfig, task, options, card: Card, training: bool = True) -> Dataset:
    """The card's data, with `data.splits` and `data.limit` applied; `training` asks for a train split."""
    card = with_split_overrides(card, config.data.splits, task)
    try:
        dataset = task.read(card, options)
    except UserError as error:
        if not config.data.splits:
            raise
        # the card's splits were changed for this run: say so, or the card seems to name the value
        given = ", ".join(f"{key}={value}" for key, value in config.data.splits.items())
        raise UserError(f"{error} (the card's splits with data.splits {given})") from None
    limit = config.data.limit or {}
    unknown = sorted(set(limit) - set(dataset.splits))
    if unknown:
        raise UserError(f"data.limit names split {unknown[0]!r}; the card has {', '.join(dataset.splits)}")
    cut = []
    for split, examples in dataset.splits.items():
        dataset.splits[split] = subsample(examples, limit.get(split), config.train.seed)
        if len(dataset.splits[split]) < len(examples):
            cut.append(f"{split} {len(dataset.splits[split])} of {len(examples)}")
    if cut:
        dataset.notes.append(f"data.limit keeps {', '.join(cut)} examples (a seeded sample, in class proportions where there are classes)")
    if training and not dataset.splits.get("train"):
        raise UserError(f"{card.card_path}: the train split is empty; check `splits`")
    return dataset


def log_notes(dataset: Dataset, training: bool) -> None:
    """Logs `dataset_notes`; called once the request is known to be valid, so a note
    never comes before an error."""
    for note in dataset_notes(dataset, training):
        log(f"note: {note}")


def dataset_notes(dataset: Dataset, training: bool) -> list[str]:
    """What the reader did that a user should know, and, for training, what the splits
    leave out."""
    notes = list(dataset.notes)
    if not training:
        return notes
    if absent := classes_missing_from(dataset, "train"):
        notes.append(f"no training examples of {', '.join(absent)}: the model cannot learn "
                     f"{'it' if len(absent) == 1 else 'them'} (check the card's labels and splits)")
    for split in ("validation", "test"):
        if absent := classes_missing_from(dataset, split):
            notes.append(f"the {split} split has no examples of {', '.join(absent)}: "
                         f"{'its' if len(absent) == 1 else 'their'} per-class scores are undefined there")
    if "validation" not in dataset.splits and "train" in dataset.splits:  # not for a card to evaluate on
        notes.append("no validation split, so no checkpoint selection or early stopping: the last epoch's model "
                     "is kept (give the card a validation split or ratio)")
    return notes


def single_label(examples) -> bool:
    """Whether every example has one class index (not multi-label targets, not text)."""
    return all("targets" not in e and isinstance(e.get("label"), int | np.integer) for e in examples)


def classes_missing_from(dataset: Dataset, split: str) -> list[str]:
    """The classes of a single-label task that no example of `split` has (none where the
    split is absent or empty)."""
    examples = dataset.splits.get(split, [])
    if not dataset.labels or not examples or not single_label(examples):
        return []
    seen = {e["label"] for e in examples}
    return [label for index, label in enumerate(dataset.labels) if index not in seen]


def run_metrics(config: cfg.RunConfig, task, card: Card, dataset: Dataset) -> tuple[list[str], str]:
    """The metrics a run computes (config, else card, else the task's) and its primary one,
    each checked to exist and to apply to what the task outputs on this data: refused
    before training, not at its first evaluation."""
    from peftlab.shared.metrics import get_metric, metrics_scoring

    if hasattr(task, "applicable_metrics"):
        applicable = tuple(task.applicable_metrics(dataset))
    else:  # its own metrics, and any other that scores what they score
        scored = dict.fromkeys(get_metric(name).scores for name in task.metrics if get_metric(name).fn is not None)
        applicable = tuple(dict.fromkeys([*task.metrics, *(name for what in scored for name in metrics_scoring(what))]))
    metric_names = config.eval.metrics or card.metrics or list(task.metrics)
    primary = config.eval.primary_metric or task.primary_metric
    given = (("eval.metrics", config.eval.metrics or []), (f"{card.card_path}: metrics", card.metrics or []),
             ("eval.primary_metric", [primary]))
    others = [name for name in applicable if name not in task.metrics]
    offered = ", ".join(task.metrics) + (f" (and on request {', '.join(others)})" if others else "")
    for key, names in given:
        unknown = [name for name in names if name not in list_metrics()]
        if unknown:
            raise UserError(f"{key}: unknown metric {unknown[0]!r}; {task.name} computes {offered}")
        wrong = [name for name in names if name not in applicable]
        if wrong:
            raise UserError(f"{key}: {task.name} cannot compute {wrong[0]!r} ({_scores_what(wrong[0])}); it "
                            f"computes {offered}")
    if primary not in metric_names:
        metric_names = [primary, *metric_names]
    return metric_names, primary


def _scores_what(name: str) -> str:
    from peftlab.shared.metrics import get_metric

    metric = get_metric(name)
    if metric.fn is None:
        return "a value only the tasks that list it derive"
    return {"classes": "it scores class predictions", "text": "it scores generated text",
            "ranking": "it scores a retrieval ranking"}[metric.scores]


def evaluated_splits(wanted: list[str], card: Card, dataset: Dataset, announce: bool = True) -> list[str]:
    """The splits a run evaluates: `wanted` (eval.splits), less validation where the data
    has none (a card with validation_fraction: 0, or no validation ratio, runs with the
    recipes' [validation, test]). Each must be in the data and hold examples: found before
    training, not after."""
    others = [split for split in wanted if split != "validation"]
    if "validation" not in dataset.splits and "validation" in wanted and others \
            and all(split in dataset.splits for split in others):
        if announce:
            log(f"note: the data has no validation split; eval.splits is {others}")
        wanted = others
    for split in wanted:
        if split not in dataset.splits:
            held_out = [present for present in dataset.splits if present != "train"]
            raise UserError(f"{card.card_path}: eval.splits names {split!r}; the data has {', '.join(dataset.splits)}: "
                            f"set eval.splits=[{', '.join(held_out)}] or give the card a {split} split (a file, a "
                            f"ratio, or with fold_by, {split}: [VALUES])")
        if not dataset.splits[split]:
            sizes = ", ".join(f"{name} {len(examples)}" for name, examples in dataset.splits.items())
            raise UserError(f"{card.card_path}: split {split!r} is empty: the card's splits (a ratio, or "
                            f"validation_fraction of train) round it to none of these examples ({sizes}); give it "
                            f"examples (raise its share, name its fold values, or give it a file) or leave it out "
                            f"of eval.splits")
    return wanted


def prepare(config: cfg.RunConfig, run_dir: Path | None = None) -> Prepared:
    """`run_dir`: a run being resumed, whose own copy of the card is read."""
    task = get_task(config.task_name)
    options = cfg.build_task_options(task, config.task_options)
    card = load_card(config.data.card, task) if run_dir is None else load_run_card(run_dir, config, task)
    dataset = read_dataset(config, task, options, card)
    metric_names, primary = run_metrics(config, task, card, dataset)
    config.eval.splits = evaluated_splits(config.eval.splits, card, dataset)
    log_notes(dataset, training=True)
    model = build_model(config, task, options, dataset.labels)
    log(f"data: {describe_split_sizes(task, dataset)}")  # once nothing more can refuse the run
    return Prepared(config, task, options, card, dataset, model, metric_names, primary)


def split_units(task, splits) -> dict[str, str]:
    """What each split's examples are (`card validate` counts them so): the task's
    `example_unit`, or for held-out splits its `held_out_example_unit` where it has one."""
    return {split: task.example_unit if split == "train" else getattr(task, "held_out_example_unit", task.example_unit)
            for split in splits}


def describe_split_sizes(task, dataset: Dataset) -> str:
    """`train 48, validation 6, test 6 (sequences)`; each unit named after its splits."""
    units = split_units(task, dataset.splits)
    parts = []
    for index, (split, examples) in enumerate(dataset.splits.items()):
        following = list(units.values())[index + 1:]
        unit = f" ({units[split]})" if not following or following[0] != units[split] else ""
        parts.append(f"{split} {len(examples):,}{unit}")
    return ", ".join(parts)


def build_model(config: cfg.RunConfig, task, options, labels):
    """The backbone with the method applied and the task's head, as training starts."""
    seed_everything(config.train.seed)  # head and method initialisation
    model = task.build_model(config.backbone.name, labels, options)
    method_options = {**task.default_method_options(config.method_name, model), **config.method_options}
    model.backbone = methods.apply(model.backbone, config.method_name, **method_options)
    return model


def default_run_dir(pipeline: str, method: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / pipeline / f"{stamp}-{method}"
    candidate, suffix = base, 1
    while True:
        try:
            _make_run_dir(candidate, exist_ok=False)  # exclusive: two runs never share one
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = base.with_name(f"{base.name}-{suffix}")


def parameter_summary(model) -> dict[str, Any]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    counts = model.backbone.parameter_counts()
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100.0 * trainable / total,
        "method": counts["method"],
        "method_percent_of_backbone": counts["method_percent"],
        "head": sum(p.numel() for p in model.head.parameters()),
    }


def library_versions() -> dict[str, str]:
    versions = {"peftlab": peftlab.__version__}
    for name in ("torch", "transformers", "peft", "accelerate", "fair-esm", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def check_out(out: str | Path | None) -> None:
    """Refuse an --out that cannot hold a new run before any work (reading, building):
    one that holds files, or one that cannot be made."""
    if out is None:
        return
    run_dir = Path(out)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not empty; choose another --out, or continue it with --resume {run_dir}")
    check_out_can_be_made(run_dir)


def check_out_can_be_made(out: Path) -> None:
    """--out is a folder or can become one: tried (and undone, so that a mistake found
    later leaves nothing behind) rather than predicted, since permissions alone do not
    say it (root may not make a folder in /proc either)."""
    out = Path(os.path.abspath(out))  # `new/../kept`: walk what mkdir makes, not a name that passes through `new`
    missing = []  # the folders mkdir would make, deepest first
    existing = out
    while not existing.exists() and existing != existing.parent:
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: cannot create the folder ({existing} is a file, not a folder); choose another --out")
    if not missing:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)  # exist_ok: the processes of a --num-processes run all check
    except OSError as error:
        raise UserError(f"--out {out}: cannot create the folder ({os_reason(error, out)}); choose another --out") from None
    finally:
        for folder in missing:
            with contextlib.suppress(OSError):
                folder.rmdir()


def os_reason(error: OSError, path: Path) -> str:
    """The OS's words (`Operation not permitted`), and the path they are about where it is not `path`."""
    reason = error.strerror or type(error).__name__
    return f"{reason}: {error.filename}" if error.filename and Path(error.filename) != path else reason


def _claim_run_dir(config: cfg.RunConfig, out: str | Path | None) -> Path:
    if out is not None:
        check_out(out)  # again: another process may have written there since
        run_dir = Path(out)
        _make_run_dir(run_dir, exist_ok=True)
        return run_dir
    return default_run_dir(config.pipeline, config.method_name)


def _make_run_dir(run_dir: Path, exist_ok: bool) -> None:
    """`mkdir -p`, with a folder that cannot be made (under a file, read-only, /proc) a
    one-line UserError. `exist_ok`: the folder `--out` names (it may exist, empty); else a
    default run folder, claimed exclusively (FileExistsError passes through)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        if not exist_ok:
            raise
        raise UserError(f"--out {run_dir}: a file, not a folder; choose another --out") from None
    except OSError as error:
        if exist_ok:  # the folder --out named
            raise UserError(f"--out {run_dir}: cannot create the folder ({os_reason(error, run_dir)}); choose another "
                            f"--out") from None
        raise UserError(f"{run_dir}: cannot create the run folder ({os_reason(error, run_dir)}); run from a folder you "
                        f"can write to, or pass --out") from None


def run(config: cfg.RunConfig, out: str | Path | None = None) -> Path:
    check_out(out)
    prepared = prepare(config)
    main = process_state().is_main_process
    claimed: tuple[str, str] | None = None
    if main:
        try:
            claimed = ("dir", str(_claim_run_dir(config, out)))
        except UserError as error:
            claimed = ("error", str(error))
    kind, value = main_process_decides(claimed)  # the other processes learn the main's choice
    if kind == "error":
        raise UserError(value)
    run_dir = Path(value)
    try:
        if main:
            _write_start(run_dir, prepared)
        with _training_lock(run_dir, main):
            return _train_and_finish(run_dir, prepared, resume=False)
    except UserError:
        if main:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    except KeyboardInterrupt as interrupt:
        _say_how_to_resume(run_dir, main, interrupt)
        raise


def merged_source(run_dir: Path) -> dict | None:
    """`meta.json`'s record of the run a `peftlab merge` directory was merged from."""
    meta = run_dir / "meta.json"
    return (io.read_json(meta).get("method") or {}).get("merged_from") if meta.is_file() else None


def _note_merged_config(config_file: Path) -> None:
    source = merged_source(config_file.parent)
    if source and config_file.name == "run.yaml":
        log(f"note: {config_file.parent} is a merged model; its run.yaml repeats the training of "
            f"{source['run_dir']} ({source['method']['name']} on the base backbone), not a run on the merged weights "
            f"(for that, train on its export: `peftlab merge --export`)")


def _note_changed_card(config_file: Path, config: cfg.RunConfig) -> None:
    """A run repeated from its run.yaml reads the card as it is now; where that card is
    not the one the run trained on (RUN/card.md), the repeat is not the same experiment."""
    copy, card = config_file.parent / "card.md", cfg.resolve_card_path(config.data.card)
    if config_file.name != "run.yaml" or not copy.is_file() or not card.is_file():
        return
    if card_text(card) != card_text(copy):
        log(f"note: {card} has changed since {config_file.parent} trained on it; this run reads it as it is now "
            f"(the card that run read is {copy})")


def resume(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "run.yaml").is_file():
        raise UserError(f"{run_dir} is not a peftlab run directory (no run.yaml)")
    if (run_dir / "metrics.json").is_file():
        raise UserError(f"{run_dir} is already finished (metrics.json exists); evaluate it with `peftlab eval {run_dir}`")
    if merged_from := merged_source(run_dir):  # its run.yaml trains the base: "resuming" would train over the merge
        raise UserError(f"{run_dir} is a merged model (`peftlab merge` of {merged_from['run_dir']}), not an unfinished "
                        f"run; evaluate or predict with it, or train on it from its export (`peftlab merge --export`)")
    config = cfg.validate(cfg.read_config_file(run_dir / "run.yaml"), where=str(run_dir / "run.yaml"))
    main = process_state().is_main_process
    try:
        with _training_lock(run_dir, main):
            checkpoints = run_dir / "checkpoints"
            if checkpoint.has_checkpoint(checkpoints):
                checkpoint.check_checkpoint(checkpoints)
            prepared = prepare(config, run_dir=run_dir if (run_dir / "card.md").is_file() else None)
            if main:  # killed before the start was written in full: eval, predict and merge need all of it
                if not (run_dir / "card.md").is_file():
                    io.write_text(run_dir / "card.md", prepared.card.text)
                if not (run_dir / "meta.json").is_file():
                    io.write_json(run_dir / "meta.json", _meta(prepared))
            return _train_and_finish(run_dir, prepared, resume=True)
    except KeyboardInterrupt as interrupt:
        _say_how_to_resume(run_dir, main, interrupt)
        raise


@contextlib.contextmanager
def _training_lock(run_dir: Path, main: bool):
    """Held on run.yaml while a process trains the run, so that `--resume` of a run still
    training elsewhere is refused instead of two processes writing one directory."""
    if not main:
        yield
        return
    with open(run_dir / "run.yaml", "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another peftlab process is training this run; let it finish, or stop it "
                            f"and then resume") from None
        yield


def _say_how_to_resume(run_dir: Path, main: bool, interrupt: KeyboardInterrupt) -> None:
    """On Ctrl-C: where the run can go on from (its last checkpoint, or the start). The
    interrupt is marked as said, so the CLI does not say "interrupted" a second time."""
    if main:
        last = checkpoint.latest(run_dir / "checkpoints")
        start = f"from its checkpoint {last.resolve().name}" if last is not None else "from the start (no checkpoint yet)"
        log(f"interrupted; `peftlab run --resume {run_dir}` continues it {start}")
        interrupt.said = True


def _write_start(run_dir: Path, prepared: Prepared) -> None:
    config = cfg.to_yaml_dict(prepared.config)
    config["data"]["card"] = str(prepared.card.card_path)
    if prepared.config.backbone.name not in prepared.task.backbones():  # a preset or hub name stays a name
        config["backbone"]["name"] = absolute_backbone(prepared.config.backbone.name)
    config["method"] = {"name": prepared.config.method_name, **prepared.model.backbone.options.__dict__}
    io.write_yaml(run_dir / "run.yaml", config)
    io.write_text(run_dir / "card.md", prepared.card.text)
    io.write_json(run_dir / "meta.json", _meta(prepared))


def absolute_backbone(name: str) -> str:
    """A backbone named by a relative path, alone or after `ARCH:` (`resnet50:w.pth`,
    `ViT-B-32:ckpt.pt`), made absolute, so the run loads from any folder; other names as given."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    prefix, sep, rest = name.partition(":")
    if sep and rest and Path(rest).expanduser().exists():
        return f"{prefix}:{Path(rest).expanduser().resolve()}"
    return name


def _meta(prepared: Prepared) -> dict:
    return {
        "domain": prepared.task.domain,
        "task": prepared.task.name,
        "pipeline": prepared.config.pipeline,
        "backbone": prepared.model.backbone_info,
        "labels": prepared.dataset.labels,
        "examples": {split: len(examples) for split, examples in prepared.dataset.splits.items()},
        "method": {"name": prepared.config.method_name, "options": prepared.model.backbone.options.__dict__},
        "metrics": prepared.metrics,
        "primary_metric": prepared.primary_metric,
        "params": parameter_summary(prepared.model),
        "precision": resolve_precision(prepared.config.train.precision, prepared.model),
        "versions": library_versions(),
        "created": datetime.now().isoformat(timespec="seconds"),
    }


def _train_and_finish(run_dir: Path, prepared: Prepared, resume: bool) -> Path:
    config, model = prepared.config, prepared.model
    params = parameter_summary(model)
    log(f"{config.pipeline}: {config.method_name} on {config.backbone.name}: "
        f"{params['trainable']:,} of {params['total']:,} parameters train ({params['percent']:.3f}%)")
    accelerator = make_accelerator(config.train.precision, model)
    if torch.cuda.is_available():  # this run's peak, not an earlier run's in the same process (bench --in-process)
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    state = train(prepared.task, model, prepared.dataset.splits["train"], prepared.dataset.splits.get("validation", []),
                  config.train, prepared.metrics, prepared.primary_metric, run_dir, accelerator, resume=resume, log=log)
    if not accelerator.is_main_process:
        return run_dir
    if sharding.is_sharded(model):  # in shards across the processes: evaluate and save a whole one
        model = build_model(config, prepared.task, prepared.options, prepared.dataset.labels)
        trained = trained_state_file(run_dir)
        checkpoint.load_state(model, io.load_tensors(trained), str(trained))
        model.eval()
    save_adapter(model, run_dir / ADAPTER)
    results = {}
    batch = config.train.eval_batch_size or config.train.batch_size
    for split in config.eval.splits:
        results[split] = evaluate_split(prepared.task, model, prepared.dataset, split, prepared.metrics,
                                        batch, accelerator.autocast, run_dir / "predictions" / f"{split}.jsonl")
    results["train"] = {
        "samples_per_s": state["samples"] / max(state["seconds"], 1e-9),
        "seconds": state["seconds"],
        "epoch_seconds": state.get("epoch_seconds", []),
        "wall_seconds": time.perf_counter() - started,
        # after --resume, seconds and samples/s count every segment; wall time and peak memory the last process
        "resumed_at_steps": state.get("resumed_at_steps", []),
        "steps": state["global_step"],
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "kept_epoch": state["best_epoch"] if config.train.keep == "best" and state["best_epoch"] else state["epoch"],
        "peak_rss_mb": peak_rss_mb(),
        "precision": resolve_precision(config.train.precision, model),
    }
    if torch.cuda.is_available():
        results["train"]["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    results["params"] = params
    results["history"] = state["history"]
    io.write_json(run_dir / "metrics.json", results)  # last: marks the run finished
    return run_dir


def save_adapter(model, directory: Path) -> None:
    """adapter/ = the method's files + the head + BatchNorm buffers, swapped in whole."""
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.backbone.save(tmp)
    io.save_tensors(tmp / HEAD_FILE, model.head.state_dict())
    buffers = checkpoint.batchnorm_buffers(model.backbone)
    if buffers:
        io.save_tensors(tmp / BUFFERS_FILE, buffers)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def evaluate_split(task, model, dataset: Dataset, split: str, metric_names, batch_size, autocast, predictions_file=None,
                   outputs_of=None) -> dict:
    examples = dataset.splits[split]
    if not examples:
        raise UserError(f"split {split!r} is empty")
    if any("label" not in e for e in examples):
        raise UserError(f"split {split!r} has unlabelled examples; it cannot be evaluated")
    results, outputs = evaluate(task, model, examples, metric_names, batch_size, autocast, progress=f"evaluate {split}",
                                outputs_of=outputs_of)
    empty = sum(1 for output in outputs if isinstance(output, str) and not output.strip())
    if empty:  # a score of 0 then says "nothing generated", not "a metric is broken"
        log(f"note: {empty} of {len(outputs)} generated outputs on split {split!r} are empty "
            f"(the model ends at once: too little training, or a prompt it has not learned to answer)")
    if predictions_file is not None:
        rows = []
        for example, output in zip(examples, outputs):
            row = task.describe(example, output, dataset.labels)
            label = example["label"]
            row["label"] = dataset.labels[label] if isinstance(label, int | np.integer) and dataset.labels else label
            rows.append(row)
        io.write_jsonl(predictions_file, rows)
        if hasattr(task, "write_report"):
            task.write_report(split, examples, outputs, dataset.labels, Path(predictions_file).parent)
    return results


def metrics_line(run_dir: Path, results: dict) -> str:
    summary = {"run_dir": str(run_dir)}
    summary.update({k: v for k, v in results.items() if k not in ("history",)})
    return json.dumps(summary, default=float)
