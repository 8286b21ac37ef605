"""Many runs served on shared backbones: `peftlab.load([run_a, run_b, ...])`.

Each distinct backbone (the same `meta.json` backbone record: name, source,
architecture, weights hash) is held once in memory for the runs that can share it, and
every run keeps its own head. Which path a run takes depends on its method:

- `lora`: a named adapter on one peft model per backbone. A batch may mix adapters row
  by row (peft's `adapter_names`) when the task's backbone sees one input row per example
  (`task.rows_follow_examples(options)`); the backbone then runs once for the whole batch
  and each run's head reads its own rows.
- the other peft methods (`dora`, `ia3`, `loha`, `lokr`, `vera`, `ln_tuning`): named
  adapters on one peft model per backbone and peft type, switched with `set_adapter`
  under the backbone's lock (peft mixes batches for plain LoRA only; DoRA refuses).
- methods that change the backbone itself (`bitfit`, `ssf`, bottleneck adapters,
  `freeze_layers`, `full`, the domain methods, peft's prompt learning) and runs that saved
  BatchNorm statistics: their own model each (a `Predictor`), correct at the cost of a
  backbone each.

Requests go through `submit(adapter, examples)`: one worker thread per backbone collects
what arrives within `max_wait_ms` (up to `max_batch` examples), runs it, and resolves
each request's future. Every output is what `Predictor.predict` gives for the same
example: mixed batches differ from single-run batches only in which rows share a
padded batch, so scores agree to float rounding (the tests allow 1e-5) and labels exactly.
"""

from __future__ import annotations

import inspect
import json
import queue
import threading
import time
import weakref
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
from peftlab.pipelines import runner
from peftlab.pipelines.predictor import Predictor, takes_json_requests
from peftlab.shared import io, methods
from peftlab.shared.backbone_cache import shared_backbones
from peftlab.shared.errors import UserError
from peftlab.shared.evaluation import attention_kernels, predict_outputs, to_device
from torch import nn

MIXABLE_METHODS = ("lora",)
"""peft implements mixed-adapter batches (`adapter_names`) for plain LoRA only."""
SHARED_PEFT_METHODS = ("lora", "dora", "ia3", "loha", "lokr", "vera", "ln_tuning")
"""peft methods whose adapters load by name into one peft model and switch with set_adapter."""


@dataclass
class Adapter:
    """One served run: its predictor (config, task, labels, model with its own head)."""

    name: str
    predictor: Predictor
    engine: Engine
    peft_name: str | None = None
    """Its adapter's name inside the shared peft model (None on a private model)."""

    @property
    def task(self):
        return self.predictor.task

    @property
    def method(self) -> str:
        return self.predictor.meta["method"]["name"]

    @property
    def mixable(self) -> bool:
        rows_follow = getattr(self.task, "rows_follow_examples", None)
        return (self.engine.shared and self.method in MIXABLE_METHODS
                and rows_follow is not None and bool(rows_follow(self.predictor.options)))

    def mixing_key(self) -> str:
        """Runs whose batches are collated alike (same task, options, precision) can share one."""
        p = self.predictor
        return json.dumps([p.task.name, p.config.task_options, p.config.train.precision], sort_keys=True, default=str)

    def describe(self) -> dict[str, Any]:
        p = self.predictor
        metrics_file = p.run_dir / "metrics.json"
        metrics = io.read_json(metrics_file) if metrics_file.is_file() else {}
        # Clients see names, not the server's folders: a run by its directory's name, a
        # backbone given as a local path by its file or folder name.
        return {
            "name": self.name,
            "run": p.run_dir.name,
            "task": p.task.name,
            "labels": p.labels,
            "backbone": _public_name(p.meta["backbone"].get("name")),
            "backbone_sha256": p.meta["backbone"].get("weights_sha256"),
            "method": self.method,
            "serving": "mixed batches" if self.mixable else ("switched" if self.engine.shared else "own model"),
            "request": request_form(p.task),
            "metrics": {split: metrics[split] for split in ("validation", "test") if split in metrics},
            **self._merged_from(),
        }

    def _merged_from(self) -> dict[str, Any]:
        """A `peftlab merge` run has no metrics of its own until evaluated: name what it came from."""
        source = self.predictor.meta["method"].get("merged_from")
        return {"merged_from": {"run": Path(source["run_dir"]).name, "method": source["method"]["name"]}} if source else {}


def _public_name(backbone: str | None) -> str | None:
    """A hub or preset name as given; a local path as its last part."""
    if backbone is None or not Path(backbone).expanduser().exists():
        return backbone
    return Path(backbone).name


@dataclass
class _Job:
    adapter: Adapter
    examples: list[dict]
    future: Future = field(default_factory=Future)


class Engine:
    """One backbone in memory and the worker thread that runs every batch on it."""

    def __init__(self, key: str, shared: bool, max_batch: int, max_wait_ms: float):
        self.key = key
        self.shared = shared
        self.backbone: methods.AdaptedModel | None = None
        """The shared adapted backbone (shared engines only)."""
        self.adapters: list[Adapter] = []
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000
        self.lock = threading.Lock()
        self.stats = {"rounds": 0, "mixed_batches": 0, "most_adapters_in_a_batch": 0, "examples": 0}
        """What the engine did: for the load test, and for tests that a batch really mixed."""
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        # An engine dropped without close() (a notebook cell run again) still stops its
        # thread: the thread holds the engine only while it runs a round.
        weakref.finalize(self, self._queue.put, None)

    # ----------------------------------------------------------------------- loading
    def attach(self, adapter: Adapter, fresh_backbone: nn.Module, adapter_dir: Path) -> nn.Module:
        """The backbone `adapter`'s model should use, with its adapter loaded."""
        if not self.shared:
            return methods.load_adapter(fresh_backbone, adapter_dir)
        if self.backbone is None:
            self.backbone = methods.load_adapter(fresh_backbone, adapter_dir)
            adapter.peft_name = self.backbone.model.active_adapter
            return self.backbone
        # This run's freshly built backbone is dropped: the shared one takes its adapter.
        adapter.peft_name = f"adapter_{len(self.adapters)}"
        peft_model: peft.PeftModel = self.backbone.model
        result = peft_model.load_adapter(str(adapter_dir), adapter_name=adapter.peft_name, is_trainable=False)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{adapter.peft_name}." in k]
        if missing:
            raise UserError(f"{adapter_dir}: adapter weights do not fit the shared backbone (missing {missing[:3]})")
        return self.backbone

    # ----------------------------------------------------------------------- serving
    def submit(self, adapter: Adapter, examples: list[dict]) -> Future:
        job = _Job(adapter, list(examples))
        if not job.examples:
            job.future.set_result([])
            return job.future
        self._start()
        self._queue.put(job)
        return job.future

    def _start(self) -> None:
        with self.lock:
            if self._worker is None:
                self._worker = threading.Thread(target=_serve, args=(weakref.ref(self), self._queue),
                                                name=f"peftlab-engine-{id(self)}", daemon=True)
                self._worker.start()

    def stop(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def serve_round(self, job: _Job) -> None:
        """Run `job` with whatever else is queued within max_wait, up to max_batch examples."""
        jobs, count = [job], len(job.examples)
        deadline = time.perf_counter() + self.max_wait
        while count < self.max_batch:
            try:
                more = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if more is None:
                self._queue.put(None)  # stop after this round
                break
            jobs.append(more)
            count += len(more.examples)
        # A request whose client went away was cancelled: skip it. The others are
        # marked running, so they can no longer be cancelled under our feet.
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if jobs:
            self._run_jobs(jobs)

    def _run_jobs(self, jobs: list[_Job]) -> None:
        try:
            outputs = self.outputs([(job.adapter, e) for job in jobs for e in job.examples])
        except Exception as error:  # a bad job must not fail the others: run each alone to find it
            if len(jobs) > 1:
                for job in jobs:
                    self._run_jobs([job])
            else:
                jobs[0].future.set_exception(error)
            return
        start = 0
        for job in jobs:
            job.future.set_result(outputs[start:start + len(job.examples)])
            start += len(job.examples)

    def outputs(self, requests: list[tuple[Adapter, dict]]) -> list[Any]:
        """Per-example outputs (as `Predictor.predict` computes them) for (adapter, example) pairs."""
        results: list[Any] = [None] * len(requests)
        mixed: dict[str, list[int]] = defaultdict(list)
        alone: dict[str, list[int]] = defaultdict(list)
        for index, (adapter, _) in enumerate(requests):
            if adapter.mixable:
                mixed[adapter.mixing_key()].append(index)
            else:
                alone[adapter.name].append(index)
        with self.lock, torch.inference_mode():
            self.stats["rounds"] += 1
            self.stats["examples"] += len(requests)
            for indices in mixed.values():
                for chunk in self._length_sorted_chunks(requests, indices):
                    for index, output in zip(chunk, self._mixed_batch([requests[i] for i in chunk])):
                        results[index] = output
            for indices in alone.values():
                adapter = requests[indices[0]][0]
                if adapter.peft_name is not None:
                    self.backbone.model.set_adapter(adapter.peft_name)
                p = adapter.predictor
                rows = predict_outputs(p.model, [requests[i][1] for i in indices], p.batch_size, p.accelerator.autocast)
                for index, output in zip(indices, rows):
                    results[index] = output
        return results

    def _length_sorted_chunks(self, requests, indices: list[int]) -> list[list[int]]:
        """Batches of at most `max_batch` rows, similar lengths together (less padding)."""
        model = requests[indices[0]][0].predictor.model
        ordered = sorted(indices, key=lambda i: model.example_length(requests[i][1]))
        return [ordered[i:i + self.max_batch] for i in range(0, len(ordered), self.max_batch)]

    def _mixed_batch(self, requests: list[tuple[Adapter, dict]]) -> list[Any]:
        """One backbone pass with each row's own LoRA adapter, then each run's head on its rows."""
        adapters = [a for a, _ in requests]
        first = adapters[0].predictor
        model = first.model
        model.eval()
        device = next(model.parameters()).device
        batch = to_device(model.collate([e for _, e in requests], rng=None), device)
        captured: list[Any] = []
        handle = self.backbone.register_forward_hook(lambda module, args, output: captured.append(output))
        lora_model = self.backbone.model.base_model
        try:
            # peft's own mechanism behind `model(..., adapter_names=[...])`: every LoRA layer
            # applies row i's adapter to row i. Entered here because the task model, not
            # peft, calls the backbone.
            with lora_model._enable_peft_forward_hooks(adapter_names=[a.peft_name for a in adapters]), \
                    first.accelerator.autocast(), attention_kernels():
                first_logits = model(batch)
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(f"{first.task.name}: the backbone ran {len(captured)} times in one forward; "
                               f"rows_follow_examples must be False for this task")
        distinct = {a.name: a for a in adapters}
        self.stats["mixed_batches"] += 1
        self.stats["most_adapters_in_a_batch"] = max(self.stats["most_adapters_in_a_batch"], len(distinct))
        outputs: list[Any] = [None] * len(requests)
        for adapter in distinct.values():
            rows = [i for i, a in enumerate(adapters) if a is adapter]
            own = adapter.predictor.model
            if own is model:
                logits = first_logits
            else:
                own.backbone = _Replay(self.backbone, captured[0])
                try:
                    with adapter.predictor.accelerator.autocast():
                        logits = own(batch)
                finally:
                    own.backbone = self.backbone
            scores = own.scores(logits).float().cpu().numpy()
            for row in rows:
                outputs[row] = scores[row]
        return outputs


class _Replay(nn.Module):
    """Stands in for the shared backbone: returns the output it already computed for this
    batch, so a second run's head reads the same backbone pass (attributes such as the
    tokenizer's alphabet are looked up on the real backbone)."""

    def __init__(self, backbone: nn.Module, output: Any):
        super().__init__()
        self.real = backbone
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output

    @property
    def base_model(self) -> nn.Module:
        return self.real.base_model


def _serve(engine_ref: weakref.ref, jobs: queue.Queue) -> None:
    """An engine's worker thread. It holds the engine only while a round runs, so an engine
    no one holds any more is collected; its finalizer's None then ends the thread."""
    while True:
        job = jobs.get()
        engine = engine_ref()
        if job is None or engine is None:
            return
        engine.serve_round(job)
        del engine, job  # a job holds its adapter, and through it the engine


class MultiAdapter:
    """Runs served together; names are the run folders' names unless given as NAME=RUN_DIR."""

    def __init__(self, run_dirs, force: bool = False, max_batch: int = 32, max_wait_ms: float = 5.0,
                 json_requests: bool = False):
        """`json_requests`: every run must answer JSON request bodies (`peftlab serve`); a
        run whose task has no JSON input form is refused before any backbone loads."""
        named = parse_named_runs(run_dirs)
        self.engines: dict[str, Engine] = {}
        self.adapters: dict[str, Adapter] = {}
        # Every run's directory, config and task are read before any backbone loads: a
        # mistake in the last run named then stops at once, not after loading the others.
        predictors = [Predictor(run_dir, force=force, attach=self._attacher(name, max_batch, max_wait_ms))
                      for name, run_dir in named.items()]
        if json_requests:
            for predictor in predictors:
                check_json_requests(predictor)
        with shared_backbones():  # each distinct backbone is read once; the other runs copy it
            for predictor in predictors:
                predictor.build()  # building attaches the adapter (see `_attacher`)

    def _attacher(self, name: str, max_batch: int, max_wait_ms: float):
        """The `attach` for run `name`'s Predictor: puts its adapter on an engine and serves it as `name`."""

        def attach(predictor: Predictor, fresh_backbone: nn.Module, adapter_dir: Path) -> nn.Module:
            engine = self._engine_for(predictor, adapter_dir, max_batch, max_wait_ms)
            adapter = Adapter(name, predictor, engine)
            backbone = engine.attach(adapter, fresh_backbone, adapter_dir)
            engine.adapters.append(adapter)
            self.adapters[name] = adapter  # models build in the order named, so names() keeps it
            return backbone

        return attach

    def _engine_for(self, predictor: Predictor, adapter_dir: Path, max_batch: int, max_wait_ms: float) -> Engine:
        method = predictor.meta["method"]["name"]
        shareable = method in SHARED_PEFT_METHODS and not (adapter_dir / runner.BUFFERS_FILE).is_file()
        if not shareable:
            key = f"own:{predictor.run_dir}"
        else:
            peft_type = io.read_json(adapter_dir / "adapter_config.json")["peft_type"]
            key = json.dumps([predictor.meta["backbone"], peft_type], sort_keys=True, default=str)
        if key not in self.engines:
            self.engines[key] = Engine(key, shareable, max_batch, max_wait_ms)
        return self.engines[key]

    # --------------------------------------------------------------------- the API
    def names(self) -> list[str]:
        return list(self.adapters)

    def backbone_count(self) -> int:
        """Distinct backbones served (by `meta.json` backbone record: name, source, weights hash).
        Not `len(self.engines)`: that counts backbone copies in memory, one per shared
        (backbone, peft type) and one per run on its own model."""
        return len({json.dumps(a.predictor.meta["backbone"], sort_keys=True, default=str)
                    for a in self.adapters.values()})

    def get(self, name: str) -> Adapter:
        if name not in self.adapters:
            raise UserError(f"no adapter named {name!r}; served: {', '.join(self.adapters)}")
        return self.adapters[name]

    def submit(self, name: str, examples: list[dict]) -> Future:
        """Queue `examples` for adapter `name`; the future gives their outputs, in order."""
        adapter = self.get(name)
        return adapter.engine.submit(adapter, examples)

    def predict(self, name: str, inputs, split: str | None = None) -> list[dict[str, Any]]:
        """`Predictor.predict` for adapter `name` (files, a data card or example dicts),
        computed on the shared backbone."""
        return self.get(name).predictor.predict(inputs, split, outputs_of=self._outputs_of(name))

    def evaluate(self, name: str, split: str = "test", card: str | None = None, predictions_file=None) -> dict[str, Any]:
        """`Predictor.evaluate` for adapter `name` (its own card's `split`, as in its
        metrics.json, or another card's), computed on the shared backbone."""
        return self.get(name).predictor.evaluate(split, card, predictions_file, outputs_of=self._outputs_of(name))

    def predict_request(self, name: str, payload: Any) -> list[dict[str, Any]]:
        """One JSON request body (the task's form, as `POST /predict/NAME` takes it) -> rows."""
        return self.get(name).predictor.predict_request(payload, outputs_of=self._outputs_of(name))

    def _outputs_of(self, name: str):
        return lambda examples, progress: self.submit(name, examples).result()

    def parse_request(self, name: str, payload: Any) -> list[dict]:
        """A JSON request body in the task's natural form -> examples (UserError naming the field)."""
        return self.get(name).predictor.parse_request(payload)

    def describe(self, name: str, examples: list[dict], outputs: list[Any]) -> list[dict]:
        return self.get(name).predictor.rows(examples, outputs)

    def summary(self) -> list[dict[str, Any]]:
        return [adapter.describe() for adapter in self.adapters.values()]

    def close(self) -> None:
        """Stop the batching threads (a later request starts them again)."""
        for engine in self.engines.values():
            engine.stop()

    def __enter__(self) -> MultiAdapter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def request_form(task) -> str | None:
    """The body `POST /predict/NAME` takes for `task`, as its `parse_request` states it
    (one source for the service and the code), or None where it has no JSON form."""
    if not takes_json_requests(task):
        return None
    return " ".join(inspect.getdoc(task.parse_request).split())


def check_json_requests(predictor: Predictor) -> None:
    """UserError where `predictor`'s run could be loaded but never answer an HTTP request."""
    if not takes_json_requests(predictor.task):
        raise UserError(f"{predictor.run_dir}: task {predictor.task.name!r} cannot be served: it has no JSON "
                        f"request form, so every request would fail; predict on its files with "
                        f"`peftlab predict {predictor.run_dir} INPUT...` instead")


def parse_named_runs(run_dirs) -> dict[str, Path]:
    """RUN_DIR or NAME=RUN_DIR -> {name: path}; names must be unique."""
    if isinstance(run_dirs, str | Path):
        run_dirs = [run_dirs]
    named: dict[str, Path] = {}
    for item in run_dirs:
        text = str(item)
        name, sep, path = text.partition("=")
        if not sep or "/" in name:
            name, path = Path(text).resolve().name, text  # a '=' inside a path names nothing
        elif not name:
            raise UserError(f"{text}: the adapter name before '=' is empty; pass NAME=RUN_DIR or RUN_DIR alone")
        elif not path:
            raise UserError(f"{text}: no run directory after '='; pass NAME=RUN_DIR or RUN_DIR alone")
        if not name or any(c in name for c in "/?#% "):
            raise UserError(f"{text}: an adapter name may not contain '/', '?', '#', '%' or spaces; pass NAME=RUN_DIR")
        if name in named:
            raise UserError(f"two runs would both be served as {name!r}; name them with NAME=RUN_DIR")
        named[name] = Path(path)
    if not named:
        raise UserError("name at least one run directory to serve")
    return named
