"""Reuse a finished run: `peftlab.load(run_dir)` -> a predictor (evaluate, predict, merge)."""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from peftlab.pipelines import config as cfg
from peftlab.pipelines import runner
from peftlab.shared import checkpoint, io, methods
from peftlab.shared.cards import card_text, read_card
from peftlab.shared.errors import MissingField, UserError
from peftlab.shared.evaluation import check_finite, predict_outputs
from peftlab.shared.tasks import get_task
from peftlab.shared.training import make_accelerator

if TYPE_CHECKING:
    from peftlab.pipelines.multi_adapter import MultiAdapter


class Predictor:
    """A run's model rebuilt from its directory: backbone + saved adapter + head.

    The model is built on first use, so a request that fails on its data (an unknown
    split, a missing column) says so before a large backbone loads; `load` builds it at
    once. `attach(predictor, backbone, adapter_dir) -> backbone` replaces the default
    adapter loading (`methods.load_adapter`): the multi-adapter server uses it to put the
    run's adapter on a backbone it shares with other runs.
    """

    def __init__(self, run_dir: str | Path, force: bool = False, attach=None):
        if not isinstance(run_dir, str | PathLike):
            raise UserError(f"a run directory is a path (str or Path), not {type(run_dir).__name__}")
        self.run_dir = Path(run_dir).expanduser()
        if not self.run_dir.is_dir():
            what = "a file, not a run directory" if self.run_dir.exists() else "no such run directory"
            raise UserError(f"{self.run_dir}: {what} (runs are written under runs/<pipeline>/ by default)")
        if (self.run_dir / "bench.json").is_file():  # `peftlab bench` OUT: its cells are the runs
            cells = sorted(path.name for path in (self.run_dir / "runs").glob("*") if (path / "metrics.json").is_file())
            example = f" (finished: {', '.join(cells)})" if cells else ""
            raise UserError(f"{self.run_dir} is a bench directory; each of its cells is a run: pass "
                            f"{self.run_dir / 'runs' / '<method>-seed<N>'}{example}")
        for required in ("run.yaml", "meta.json", "card.md", runner.ADAPTER):
            if not (self.run_dir / required).exists():
                started = (self.run_dir / "run.yaml").is_file()  # a run stopped before it finished
                hint = f"; continue it with `peftlab run --resume {self.run_dir}`" if started else ""
                raise UserError(f"{self.run_dir} is not a finished peftlab run directory (no {required}){hint}")
        self.config = cfg.validate(cfg.read_config_file(self.run_dir / "run.yaml"), where=str(self.run_dir / "run.yaml"))
        self.meta = io.read_json(self.run_dir / "meta.json")
        self.task = get_task(self.config.task_name)
        self.options = cfg.build_task_options(self.task, self.config.task_options)
        self.labels: list[str] = self.meta["labels"]
        # Input tables are read with the columns the run was trained on.
        self.card_fields = read_card(self.run_dir / "card.md").fields
        self.batch_size = self.config.train.eval_batch_size or self.config.train.batch_size
        self._force, self._attach = force, attach

    @functools.cached_property
    def model(self):
        model = self.task.build_model(self.config.backbone.name, self.labels, self.options)
        self._check_backbone(model, self._force)
        adapter = self.run_dir / runner.ADAPTER
        if self._attach is None:
            model.backbone = methods.load_adapter(model.backbone, adapter)
        else:
            model.backbone = self._attach(self, model.backbone, adapter)
        checkpoint.load_state(model.head, io.load_tensors(adapter / runner.HEAD_FILE), str(adapter))
        if (adapter / runner.BUFFERS_FILE).is_file():
            checkpoint.load_state(model.backbone, io.load_tensors(adapter / runner.BUFFERS_FILE), str(adapter))
        return model.eval()

    def build(self) -> Predictor:
        """Load the backbone and put the adapter on it now, rather than on first use."""
        self.model  # noqa: B018 - the cached property does the work
        return self

    @functools.cached_property
    def accelerator(self):
        return make_accelerator(self.config.train.precision, self.model)

    def _check_backbone(self, model, force: bool) -> None:
        saved = self.meta["backbone"].get("weights_sha256")
        actual = model.backbone_info.get("weights_sha256")
        if saved and actual and saved != actual and self.meta["method"]["name"] != "full" and not force:
            raise UserError(
                f"{self.run_dir}: the adapter was trained on backbone {self.meta['backbone']['name']!r} with weights "
                f"{saved[:12]}…, but {self.config.backbone.name!r} now has weights {actual[:12]}…; "
                f"pass --force to use it anyway"
            )

    def evaluate(self, split: str = "test", card: str | None = None, predictions_file=None,
                 outputs_of=None) -> dict[str, Any]:
        """The run's metrics on `split` of its own card (as saved in metrics.json, exactly),
        or of another `card` of the task with the run's classes: {metric: value}, plus
        `by_group` where the data has groups and per-dataset accuracies for reasoning.
        `predictions_file`: a JSONL path for one row per example (and a task's per-class
        report beside it), as `peftlab eval --predictions` writes. `outputs_of`: where the
        model runs elsewhere (`MultiAdapter.evaluate`)."""
        loaded = self._load_card(card)
        # The run's own card is read as in training (same subsample and fold), named or not;
        # another card whole, with its own splits.
        config = self.config if card is None or self._is_run_card(loaded) else self.config.model_copy(
            update={"data": self.config.data.model_copy(update={"limit": None, "splits": None})})
        try:
            dataset = runner.read_dataset(config, self.task, self.options, loaded, training=False)
        except UserError as error:
            if not self._names_run_copy(card):
                raise
            # the run's data may have moved since training: another card is the way on
            raise UserError(f"{error}; or evaluate on the data where it is now: "
                            f"`peftlab eval {self.run_dir} --data CARD`") from None
        if card is not None:
            self._match_labels(dataset, loaded)
        if split not in dataset.splits:
            raise UserError(f"split {split!r} is not in {loaded.card_path}; it has {', '.join(dataset.splits)}")
        if config is not self.config:
            self._note_another_card(loaded)
        runner.log_notes(dataset, training=False)
        runner.log(f"{split}: {len(dataset.splits[split])} examples of {loaded.card_path}")
        return runner.evaluate_split(self.task, self.model, dataset, split, self.meta["metrics"],
                                     self.batch_size, self.accelerator.autocast, predictions_file, outputs_of)

    def _names_run_copy(self, card: str | Path | None) -> bool:
        """None, or RUN/card.md by its path: the run's copy, whose relative paths start at
        the original card's folder, not the run directory."""
        return card is None or Path(card).expanduser().resolve() == (self.run_dir / "card.md").resolve()

    def _load_card(self, card: str | Path | None):
        """`card`, or the run's own (its copy) when None or named."""
        if self._names_run_copy(card):
            return runner.load_run_card(self.run_dir, self.config, self.task)
        return runner.load_card(str(card), self.task)

    def _is_run_card(self, card) -> bool:
        """Whether `card` is the card the run trained on: at its path, or its text (a copy,
        say, beside data that has moved). A run trained on one fold (`data.splits`) keeps
        that fold there; read as another card, its default fold could be training data."""
        copy = self.run_dir / "card.md"
        return Path(card.card_path).resolve() == Path(self.config.data.card).resolve() or (
            copy.is_file() and card.text == card_text(copy))

    def _note_another_card(self, card) -> None:
        """Says, once the card is read, that the run's fold does not apply to another card."""
        if self.config.data.splits:
            given = ", ".join(f"{key}={value}" for key, value in self.config.data.splits.items())
            runner.log(f"note: {self.run_dir.name} trained with data.splits {given} on {self.config.data.card}; "
                       f"{card.card_path} is another card, read with its own splits")

    def _match_labels(self, dataset, card) -> None:
        """Another card's classes must be the run's; named in another order, its examples
        are renumbered by name."""
        labels = dataset.labels
        if labels == self.labels:
            return
        if sorted(labels) != sorted(self.labels):
            raise UserError(f"{card.card_path}: labels {labels} differ from the run's {self.labels}; "
                            f"evaluation needs the classes the run was trained on")
        position = [self.labels.index(name) for name in labels]  # card's index -> run's index
        for examples in dataset.splits.values():
            for example in examples:
                if "targets" in example:  # multi-label: one entry per class, in the card's order
                    targets = [0.0] * len(labels)
                    for index, value in enumerate(example["targets"]):
                        targets[position[index]] = value
                    example["targets"] = targets
                elif isinstance(example.get("label"), int):
                    example["label"] = position[example["label"]]
        dataset.labels = list(self.labels)
        runner.log(f"note: {card.card_path} names the classes in another order; its labels are matched to the run's by name")

    def predict(self, inputs, split: str | None = None, outputs_of=None) -> list[dict[str, Any]]:
        """`inputs`: the task's natural files (paths: one, or a list), one data card (a `.md`
        path), or example dicts as the task reads them. `split` picks one of a card's
        splits. Returns one row per input (per example of a card), as `peftlab predict`
        writes them. `outputs_of(examples, progress) -> outputs` replaces this run's own
        model (the multi-adapter server computes them on a shared backbone)."""
        outputs_of = outputs_of or self._outputs
        inputs = _input_list(inputs)
        cards = [i for i in inputs if isinstance(i, str | Path) and Path(i).suffix.lower() == ".md"]
        if cards:
            if len(inputs) > 1:
                raise UserError(f"{cards[0]}: a data card is predicted on its own; pass the card alone, or files without it")
            return self._predict_card(cards[0], split, outputs_of)
        if split is not None:
            raise UserError(f"--split {split} picks a split of a data card; files are predicted whole")
        if not inputs:
            raise UserError("nothing to predict: give files, a data card or example dicts")
        if all(isinstance(i, str | Path) for i in inputs):
            missing = [str(i) for i in inputs if not Path(i).exists()]
            if missing:
                raise UserError(f"{missing[0]}: no such file or folder")
            compressed = next((i for i in inputs if io.compressed_by_suffix(i)), None)
            if compressed is not None:
                raise UserError(f"{compressed}: {io.compressed_by_suffix(compressed)}, then pass the file it holds")
            try:
                examples = self.task.read_inputs([Path(i) for i in inputs], self.options, self.card_fields)
            except MissingField as error:  # the card whose fields name the columns is the run's; predict takes none
                names = f"fields {self.card_fields}" if self.card_fields else "the default field names"
                kind = "keys" if re.search(r"\.jsonl?\b", error.where, re.IGNORECASE) else "columns"
                raise UserError(f"{error.where}: {error.what}; predict reads inputs with the run's card, "
                                f"{self.run_dir / 'card.md'} ({names}): name the {kind} so in the input") from None
            for note in _left_out_notes(map(Path, inputs), examples, self.task.name):
                runner.log(f"note: {note}")
        elif all(isinstance(i, dict) for i in inputs):
            # dicts made by hand may carry no id; a line names its input by position then
            examples = [_HandMadeExample(example if "id" in example else {"id": str(index), **example})
                        for index, example in enumerate(inputs)]
        else:
            kinds = sorted({type(i).__name__ for i in inputs})
            raise UserError(f"predict takes paths (files or one data card) or example dicts, not {', '.join(kinds)}")
        repeated = [key for key, count in Counter(e["id"] for e in examples).items() if count > 1]
        if repeated:  # rows are still one per input, in order; only a lookup by id would be ambiguous
            runner.log(f"note: {len(repeated)} ids name more than one input (e.g. {repeated[0]!r}); "
                       f"their prediction rows follow the input order")
        try:
            if hasattr(self.task, "input_notes"):  # what a card's reader notes, for inputs given without one (crops)
                for note in self.task.input_notes(examples, self.options):
                    runner.log(f"note: {note}")
            return self.rows(examples, outputs_of(examples, "predict"))
        except _MissingField as missing:
            raise UserError(f"an example dict lacks the field {missing.args[0]!r} that {self.task.name} reads; build "
                            f"examples as its reader does (the task's read_inputs), or pass files") from None
        except (KeyError, TypeError, ValueError, IndexError) as error:
            if not all(isinstance(i, dict) for i in inputs):
                raise
            # Dicts made by hand are not checked by a reader: a value that does not fit shows up here.
            raise UserError(f"an example dict holds a value {self.task.name} cannot read ({type(error).__name__}: "
                            f"{str(error)[:120]}); build examples as its reader does (the task's read_inputs), or "
                            f"pass files") from None

    def parse_request(self, payload) -> list[dict]:
        """A JSON request body in the task's natural form -> examples (UserError naming the field)."""
        if not isinstance(payload, dict):
            raise UserError(f"the request body must be a JSON object, not {type(payload).__name__}")
        if not takes_json_requests(self.task):
            raise UserError(f"task {self.task.name!r} has no JSON input form; use `peftlab predict` with files")
        return self.task.parse_request(payload, self.options)

    def predict_request(self, payload, outputs_of=None) -> list[dict[str, Any]]:
        """One JSON request body of `peftlab serve` (the task's `parse_request` form, e.g.
        {"sequences": [...]}), checked as the service checks it -> rows."""
        examples = self.parse_request(payload)
        return self.rows(examples, (outputs_of or self._outputs)(examples, "predict"))

    def rows(self, examples: list[dict], outputs: list[Any]) -> list[dict[str, Any]]:
        """Prediction rows (plain JSON types) for examples and their model outputs."""
        check_finite(examples, outputs)
        if hasattr(self.task, "describe_predictions"):  # rows that depend on each other (retrieval ranks the inputs)
            return _plain(self.task.describe_predictions(examples, outputs, self.labels))
        return [_plain(self.task.describe(e, o, self.labels)) for e, o in zip(examples, outputs)]

    def _outputs(self, examples: list[dict], progress: str) -> list[Any]:
        return predict_outputs(self.model, examples, self.batch_size, self.accelerator.autocast, progress=progress)

    def _predict_card(self, card_path, split: str | None, outputs_of) -> list[dict[str, Any]]:
        """Every example of the card's splits (or of `split`), read by the task's reader as
        training reads a card, each line naming its split. Labels in the data are read, not used."""
        card = self._load_card(card_path)
        run_card = self._is_run_card(card)
        if run_card:  # its splits as the run made them: the test of a fold run is that fold's
            card = runner.with_split_overrides(card, self.config.data.splits, self.task)
        try:
            dataset = self.task.read(card, self.options)
        except MissingField as error:
            if error.field not in ("label", "caption"):  # the targets a card's data carries
                raise
            raise UserError(f"{error.where}: {error.what}; predict reads a card's data as training does, targets "
                            f"included: give unlabelled data as files instead (peftlab predict RUN FILE ...)") from None
        if split is not None and split not in dataset.splits:
            raise UserError(f"split {split!r} is not in {card.card_path}; it has {', '.join(dataset.splits)}")
        if not run_card:
            self._note_another_card(card)
        if dataset.labels and dataset.labels != self.labels:
            runner.log(f"note: {card.card_path} names the classes {dataset.labels}; predictions name the run's, {self.labels}")
        runner.log_notes(dataset, training=False)
        rows = []
        for name in [split] if split is not None else list(dataset.splits):
            examples = dataset.splits[name]
            rows += [{"split": name, **row} for row in self.rows(examples, outputs_of(examples, f"predict {name}"))]
        return rows

    def merge(self, out: str | Path) -> Path:
        """Write a run directory whose adapter is the merged backbone (method `full`). This
        predictor goes on with the merged weights (equal to the adapter's up to rounding)."""
        check_merge_request(self.run_dir, self.meta, out=out)
        out = Path(out)
        merged = self.model.backbone.merge()
        self.model.backbone = methods.apply(merged, "full")
        out.mkdir(parents=True, exist_ok=True)
        try:
            runner.save_adapter(self.model, out / runner.ADAPTER)
            config = io.read_json(self.run_dir / "meta.json")
            merged_from = {"run_dir": str(self.run_dir.resolve()), "method": config["method"], "params": config["params"]}
            config["method"] = {"name": "full", "options": {}, "merged_from": merged_from}
            config["params"] = runner.parameter_summary(self.model)  # the merged model's: no adapter modules left
            io.write_json(out / "meta.json", config)
            # the config that trained the adapter: `run --config` repeats that training (and says so)
            shutil.copy(self.run_dir / "run.yaml", out / "run.yaml")
            shutil.copy(self.run_dir / "card.md", out / "card.md")
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        return out


    def export(self, directory: str | Path) -> Path:
        """The merged backbone in its own library's format (fair-esm, timm, transformers, ...),
        loadable without peftlab, plus `export.json` saying what it is and how to load it."""
        check_merge_request(self.run_dir, self.meta, export=directory)
        directory = Path(directory)
        adapted = self.model.backbone
        method = self.meta["method"]["name"]
        self.model.backbone = adapted.base_model if method == "full" else adapted.merge()
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            usage = self.task.export_backbone(self.model, tmp)
            described = {"run_dir": str(self.run_dir.resolve()), "task": self.task.name, "backbone": self.meta["backbone"],
                         "merged_method": self.meta["method"], "load_without_peftlab": usage}
            if self.model.head.state_dict():  # generation tasks answer with the LM's own output layer: no head
                described["not_included"] = (
                    f"the task head ({self.run_dir.resolve() / runner.ADAPTER / runner.HEAD_FILE}, a peftlab module): this "
                    f"folder is the adapted backbone, whose features the run's head scores; `peftlab merge --out` "
                    f"keeps both")
            io.write_json(tmp / "export.json", described)
            shutil.rmtree(directory, ignore_errors=True)
            tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            self.model.backbone = methods.apply(self.model.backbone, "full")
        return directory


def load(run_dir: str | Path | list | tuple, force: bool = False) -> Predictor | MultiAdapter:
    """One run directory -> a `Predictor`; a list of them -> a `MultiAdapter` serving all
    of them on shared backbones (NAME=RUN_DIR names an adapter; use it in a `with` block,
    or `close()` it, to stop its threads at once). `force`: load a run whose backbone
    weights differ from the ones it was trained on."""
    if isinstance(run_dir, list | tuple):
        from peftlab.pipelines.multi_adapter import MultiAdapter

        return MultiAdapter(run_dir, force=force)
    return Predictor(run_dir, force=force).build()  # now: `load` is where a Python user expects the wait and its errors


def check_merge_request(run_dir: Path, meta: dict, out=None, export=None) -> None:
    """Everything `merge --out OUT` / `--export EXPORT` can refuse from meta.json alone,
    so the command refuses it before the backbone loads: a target folder that is not
    empty, a method that cannot merge, a task with no export format."""
    for directory, option in ((out, "--out"), (export, "--export")):
        if directory is not None and Path(directory).is_dir() and any(Path(directory).iterdir()):
            raise UserError(f"{directory} exists and is not empty; choose another {option}")
    check_mergeable(run_dir, meta, into_run=out is not None)
    task = get_task(meta["task"])
    if export is not None and not hasattr(task, "export_backbone"):
        instead = ("use the run as it is (eval, predict, serve)" if meta["method"]["name"] == "full"
                   else "`peftlab merge --out` writes a merged run")
        raise UserError(f"task {task.name!r} has no export format; {instead}")


def check_mergeable(run_dir: Path, meta: dict, into_run: bool = False) -> None:
    """Refuse a method that adds modules (adapters, prompts, LoReFT) before any backbone loads;
    `into_run` (merge --out) also a run that is the whole backbone already (merged or full:
    a copy would claim a merge that never happened). Exporting one is fine."""
    method = meta["method"]["name"]
    if into_run and method == "full":
        what = "a merged run" if meta["method"].get("merged_from") else "a full fine-tuning run"
        export = ", or --export it in its library's format" if hasattr(get_task(meta["task"]), "export_backbone") else ""
        raise UserError(f"{run_dir}: {what} has no adapter to merge: its weights are the whole backbone; "
                        f"use it as it is (eval, predict, serve){export}")
    if method != "full" and not methods.get_method(method).mergeable:
        mergeable = [m for m in methods.list_methods() if methods.get_method(m).mergeable and m != "full"]
        raise UserError(f"{run_dir}: method {method!r} cannot be merged into the backbone weights; "
                        f"mergeable methods: {', '.join(mergeable)}")


def _left_out_notes(inputs, examples: list[dict], task_name: str) -> list[str]:
    """Files in a folder given to predict that no input reads (a README, a table beside
    the images): said, not passed over. Hidden files (macOS `._x`, checkpoints) are not
    counted: every reader leaves them out."""
    inputs = list(inputs)
    folders = list({os.path.abspath(path): path for path in inputs if path.is_dir()}.values())  # each once
    if not folders:
        return []
    # a file is read where an example names it, or where it was given itself (a table of the videos beside it)
    read = {os.path.abspath(value) for example in examples for value in example.values()
            if isinstance(value, str) and len(value) < 4096} | {os.path.abspath(path) for path in inputs if path.is_file()}
    notes = []
    for folder in folders:
        left_out = []
        for path in sorted(folder.rglob("*")):
            parts = path.relative_to(folder).parts
            # read as itself, or as part of a folder that is one input (a video's frames)
            if path.is_file() and not any(part.startswith(".") for part in parts) \
                    and not any(os.path.abspath(read_as) in read for read_as in (path, *path.parents[:len(parts)])):
                left_out.append(path)
        if left_out:
            files = "1 file" if len(left_out) == 1 else f"{len(left_out)} files"
            notes.append(f"{files} in {folder} left out: not {task_name} inputs (e.g. {left_out[0].relative_to(folder)})")
    return notes


def takes_json_requests(task) -> bool:
    """Whether a task has a JSON input form (`parse_request`), so that `peftlab serve` can
    answer it; a task without one (every built-in task has one) predicts on files only."""
    return callable(getattr(task, "parse_request", None))


class _MissingField(KeyError):
    pass


class _HandMadeExample(dict):
    """An example dict given to `predict`: a field the task reads and the dict lacks is
    named as such, not confused with a KeyError from reading a value (a tokenizer's)."""

    def __missing__(self, key):
        raise _MissingField(key)


def _input_list(inputs) -> list:
    """`predict`'s inputs as a list: one path or dict, or an iterable of them. Anything
    else is refused here, naming what to pass, rather than failing on its first use."""
    if isinstance(inputs, str | PathLike | dict):
        return [inputs]
    if hasattr(inputs, "to_dict") and hasattr(inputs, "columns"):  # a pandas DataFrame iterates its column names
        raise UserError("predict takes paths or example dicts, not a DataFrame: pass df.to_dict('records') (one dict "
                        "per row, named as the task reads them) or the file it was read from")
    if isinstance(inputs, bytes) or not isinstance(inputs, Iterable):
        raise UserError(f"predict takes a path (file, folder or data card), an example dict, or a list of them, "
                        f"not {type(inputs).__name__}")
    return list(inputs)


def _plain(value):
    """numpy scalars and arrays, and paths -> JSON types."""
    if isinstance(value, dict):
        return {k.item() if isinstance(k, np.generic) else k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, PathLike):
        return str(value)
    return value
