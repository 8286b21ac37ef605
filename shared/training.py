"""The one training loop, on accelerate.

AdamW over the trainable parameters only, warm-up then cosine/linear decay, gradient
accumulation and clipping, bf16 autocast where the hardware has it, evaluation each
epoch, best checkpoint on the task's primary metric, early stopping, seeding, a
progress bar, and resume from `checkpoints/last` that ends with the same weights as an
uninterrupted run (batch order and training-time randomness are pure functions of
seed, epoch and batch index; the global RNG is restored from the checkpoint).

Several processes (`peftlab run --num-processes N`, `torchrun`, `accelerate launch`)
train one model with DDP: every process walks the same global batches and trains on
its contiguous share of each, DDP averages the gradients, and each share's loss is
weighted by its size, so a step follows the gradient of the global batch mean, as one
process would (exactly, for losses that are means over examples). The main process
alone evaluates, decides (best epoch, early stopping; the others learn its decision)
and writes; training randomness (augmentation, dropout) differs per process, so a
multi-process run matches a single-process one statistically, not bit for bit.
With `train.sharding` the processes shard the model instead of copying it (FSDP,
`shared/sharding.py`); the loop is the same, with evaluation and checkpoints on the
gathered model.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from peftlab.shared import checkpoint, cpu_allocator, io, memory, methods, metrics, sharding
from peftlab.shared.data import BucketBatchSampler
from peftlab.shared.errors import UserError
from peftlab.shared.evaluation import attention_kernels, evaluate, hidden_unless, to_device
from peftlab.shared.tasks import Example, TaskModel
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

BEST_STATE = Path("checkpoints") / "best" / "trainable.safetensors"
"""In a run directory: the trainable state of the best validated epoch."""


class TrainConfig(BaseModel):
    # NaN passes no range check and inf passes `gt=0`: both are refused outright.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int = Field(10, ge=1, description="passes over the training split")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    early_stopping_patience: int | None = Field(3, ge=1, description="epochs without improvement before stopping")
    keep: Literal["best", "last"] = Field(
        "best", description="the model kept and evaluated: best, the epoch with the best validation primary metric; "
        "last, the model as training ends (what papers that report the final epoch evaluate, e.g. pyreft)")
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1, description="also checkpoint every N steps (always at epoch end)")
    eval_batch_size: int | None = Field(None, ge=1)
    activation_checkpointing: bool = Field(
        False, description="recompute each backbone block's activations in the backward pass instead of keeping "
        "them: far less memory for about a third more compute")
    sharding: Literal["none", "fsdp", "fsdp_grad_op"] = Field(
        "none", description="with several processes: `fsdp` shards parameters, gradients and optimizer state "
        "over them (each keeps 1/N, like ZeRO-3) instead of DDP's full copy in each, for models whose training "
        "state does not fit one device; `fsdp_grad_op` keeps each block's gathered parameters from its forward "
        "to its backward (like ZeRO-2: fewer gathers, more memory)")
    feature_cache_gb: float = Field(
        4.0, ge=0, description="memory for frozen-feature caching: the outputs of backbone stages the method leaves "
        "frozen are computed once, not every epoch, when training inputs are fixed (0: off)")


def resolve_precision(precision: str, model: torch.nn.Module | None = None) -> str:
    """`auto` -> bf16 where the device computes it natively, else fp32; fp32 on every
    device for narrow models (the typical layer narrower than 256).

    CPU autocast casts every matmul's inputs to bf16; for narrow layers the casts cost
    more than bf16 matmuls save (measured on this project's 2-core CPU: width-64 demo
    models trained 1.4-3x slower in bf16, ESM-2 8M at width 320 1.4x faster). On a GPU
    they learned less in bf16 (on an H100 the commonsense and point-cloud demos missed
    their tests' bars in bf16 and met them in fp32: README, "On a GPU"), and layers that
    narrow are too little work for bf16's faster matmuls to matter.
    """
    if precision != "auto":
        return precision
    if model is not None and typical_layer_width(model) < 256:
        return "fp32"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def typical_layer_width(model: torch.nn.Module) -> float:
    """Median input width of the model's linear and convolution layers (inf if none)."""
    widths = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    widths += [m.in_channels for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    return float(np.median(widths)) if widths else float("inf")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def launcher_rank() -> int:
    """This process's rank as a launcher (torchrun, accelerate launch, --num-processes)
    set it in the environment; 0 for a lone process. Needs no process group, so it can
    decide who prints even before one exists."""
    return int(os.environ.get("RANK", "0"))


def process_state():
    """accelerate's process-wide state: joins the launcher's process group (gloo on CPU,
    NCCL on GPUs) the first time, and says which process this is."""
    from accelerate import PartialState

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local_processes > torch.cuda.device_count():
        # NCCL refuses two processes on one GPU, with a traceback from deep inside
        raise UserError(f"{local_processes} processes on this machine but {torch.cuda.device_count()} GPU(s) "
                        f"visible: each process needs a GPU of its own; start at most "
                        f"{torch.cuda.device_count()}, or train on the CPU with CUDA_VISIBLE_DEVICES=''")
    # accelerate only forms a CPU process group when told the device is the CPU
    return PartialState(cpu=not torch.cuda.is_available())


def main_process_decides(value, state=None):
    """`value` as the main process has it, on every process (no-op for a lone process)."""
    state = state or process_state()
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def make_accelerator(precision: str, model: torch.nn.Module | None = None):
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    _import_training_libraries()
    refuse_sharded_training()
    mixed = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[resolve_precision(precision, model)]
    process_state()
    # accelerate keeps one process-wide state; runs in one Python process (the API,
    # `peftlab bench`) may differ in precision. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Some methods leave trainable parameters out of a given forward (e.g. prompts
    # on one input kind); DDP must then not wait for their gradients.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def _import_training_libraries() -> None:
    """What training and evaluation import at first use (peft's input casting, the
    transformers LR schedules, scikit-learn's metrics), imported before a run starts its
    clocks: a first import inside `train` or the first evaluation would add seconds to
    the times metrics.json reports. Not at the top of this module: `peftlab list` and
    `peftlab card validate` import it and need none of them."""
    import peft.helpers  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import transformers.optimization  # noqa: F401


def refuse_sharded_training(accelerator=None) -> None:
    """UserError where accelerate runs FSDP, DeepSpeed or Megatron-LM, or the launcher
    asked for one (`accelerate launch` with such a config sets ACCELERATE_USE_<NAME>=true).

    peftlab's main process evaluates and saves from its own full copy of the model, which
    sharded training does not keep. The launcher's request counts too, checked before an
    Accelerator exists: on CPUs accelerate 1.15 ignores an FSDP or DeepSpeed config and
    runs DDP (a config should not mean something else on another machine), and without
    DeepSpeed installed, building the Accelerator would fail with an ImportError."""
    sharded = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
    running = [accelerator.distributed_type.name] if accelerator is not None else []
    requested = [name for name in sharded if os.environ.get(f"ACCELERATE_USE_{name}", "false").lower() == "true"]
    sharding = next((name for name in running + requested if name in sharded), None)
    if sharding:
        raise UserError(f"peftlab does not run accelerate's {sharding}; launch with torchrun or `accelerate launch "
                        f"--multi_gpu`, adding train.sharding=fsdp to shard the model (README, multi-process training)")


def enable_activation_checkpointing(task_model) -> None:
    """The backbone's own switch, on the outermost module that has one: peftlab's
    encoders (`activation_checkpointing`), timm and open_clip (`set_grad_checkpointing`),
    transformers (`gradient_checkpointing_enable`)."""
    backbone = task_model.backbone
    base = methods.network_of(backbone)
    for module in base.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = True
            return
        if hasattr(module, "set_grad_checkpointing"):
            module.set_grad_checkpointing(True)
            return
        if getattr(module, "supports_gradient_checkpointing", False):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return
    raise UserError(f"train.activation_checkpointing: the {type(base).__name__} backbone has no activation "
                    f"checkpointing; set train.activation_checkpointing=false")


def batch_share(indices: list[int], rank: int, processes: int) -> tuple[list[int], float]:
    """This process's contiguous share of a global batch, and the weight of its mean loss
    that makes DDP's average over processes the global batch mean: share size x
    processes / batch size. With fewer examples than processes, a process gets one
    stand-in example at weight 0 (it still joins the gradient all-reduce)."""
    if processes == 1:
        return indices, 1.0
    share = np.array_split(np.asarray(indices), processes)[rank].tolist()
    if not share:
        return indices[:1], 0.0
    return share, len(share) * processes / len(indices)


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark, in MiB.

    Linux's VmHWM first: `ru_maxrss` survives exec, so a run started from a large
    process (a sweep, a notebook's subprocess) would report at least its parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train(
    task,
    model: TaskModel,
    train_examples: list[Example],
    validation_examples: list[Example],
    config: TrainConfig,
    metric_names: Sequence[str],
    primary_metric: str,
    run_dir: Path,
    accelerator,
    resume: bool = False,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict:
    """Train in place; on return `model` holds the kept weights (`config.keep`: the best
    validated epoch's or the last; on the main process).
    Returns the train state. On a CPU, the tensors of training come from
    `cpu_allocator`'s cache (faster, less memory; same results). In bf16 training, frozen
    linear layers hold bf16 weights while it runs (`memory.frozen_linears_in`: the
    matmuls are the same, the fp32 copies were memory they never read). Under autocast,
    peft's adapters take their input as it comes instead of casting it to their weights'
    dtype: a bf16 input (what a layer after a matmul reads, e.g. fc2 or out_proj) was
    widened to an fp32 copy that autocast then narrowed again into a second bf16 copy
    kept for backward. Bit for bit the same steps (tested on every task), 3-15 % fewer
    bytes kept for backward where LoRA reads such inputs."""
    import peft.helpers

    on_cpu = accelerator.device.type == "cpu"
    lower = accelerator.mixed_precision == "bf16" and not shards_the_model(config, accelerator)  # FSDP owns storage
    with (cpu_allocator.caching() if on_cpu else contextlib.nullcontext(), attention_kernels(),
          memory.frozen_linears_in(model, torch.bfloat16) if lower else contextlib.nullcontext(),
          peft.helpers.disable_input_dtype_casting(model, active=accelerator.mixed_precision != "no")):
        return _train(task, model, train_examples, validation_examples, config, metric_names, primary_metric,
                      run_dir, accelerator, resume, log)


def shards_the_model(config: TrainConfig, accelerator) -> bool:
    """Whether `train.sharding` applies: it needs more than one process."""
    return config.sharding != "none" and accelerator.num_processes > 1


def _above(progress, log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` with the progress bar cleared first and redrawn after, so a message starts
    its own line (into a file the bar's last state and the message were one line)."""

    def log_above(message: str) -> None:
        with progress.external_write_mode(file=sys.stderr):
            log(message)

    return log_above


def _train(task, model: TaskModel, train_examples: list[Example], validation_examples: list[Example],
           config: TrainConfig, metric_names: Sequence[str], primary_metric: str, run_dir: Path, accelerator,
           resume: bool, log: Callable[[str], None]) -> dict:
    from transformers import get_scheduler

    checkpoints = Path(run_dir) / "checkpoints"
    processes, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    refuse_sharded_training(accelerator)
    if not main:
        log = lambda message: None  # noqa: E731 - the main process speaks for all
    seed_everything(config.seed)
    memory.compact_heap_for_training()
    if config.activation_checkpointing:
        enable_activation_checkpointing(model)
    sharded = shards_the_model(config, accelerator)
    if sharded:  # before the optimizer: sharding replaces the parameters
        units = sharding.shard(model, accelerator.device, keep_gathered_for_backward=config.sharding == "fsdp_grad_op")
        log(f"{config.sharding}: parameters, gradients and optimizer state sharded over {processes} processes "
            f"({units} units)")
    elif config.sharding != "none":
        log(f"{config.sharding}: one process, nothing to shard")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    sampler = BucketBatchSampler([model.example_length(e) for e in train_examples], config.batch_size, config.seed)
    heap = memory.HeapTrimmer()
    micro_batches = len(sampler)
    steps_per_epoch = math.ceil(micro_batches / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_scheduler(
        {"constant": "constant_with_warmup"}.get(config.schedule, config.schedule),
        optimizer,
        num_warmup_steps=int(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    task_model = model  # the task's own object: collate, loss and scores live here
    if sharded:  # already distributed; DDP must not wrap it
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    state = {
        "epoch": 0, "step_in_epoch": 0, "global_step": 0, "total_steps": total_steps,
        "best_metric": None, "best_epoch": None, "bad_epochs": 0, "history": [],
        "samples": 0, "seconds": 0.0, "done": False, "epoch_loss_sum": 0.0,
    }
    if resume and checkpoint.has_checkpoint(checkpoints):
        state = checkpoint.load_checkpoint(checkpoints, task_model, optimizer, scheduler)
        state["resumed_at_steps"] = [*state.get("resumed_at_steps", []), state["global_step"]]
        where = (f"after step {state['step_in_epoch']} of epoch {state['epoch'] + 1}" if state["step_in_epoch"]
                 else f"at the start of epoch {state['epoch'] + 1}")
        log(f"resumed from step {state['global_step']} of {total_steps} ({where}; {checkpoint.latest(checkpoints).resolve().name})")
    elif resume:
        log(f"no checkpoint in {checkpoints} yet: training from the start")
    eval_batch = config.eval_batch_size or config.batch_size
    plan_cache = getattr(task_model, "plan_feature_cache", None)
    if plan_cache is not None and config.feature_cache_gb > 0:
        if sharded:  # a process that skipped a cached stage would leave the others waiting in its gather
            log(f"feature cache: off (train.sharding={config.sharding}: every process must run every stage)")
        else:
            log(plan_cache(train_examples, int(config.feature_cache_gb * 2**30)))
    best_file = Path(run_dir) / BEST_STATE

    progress = tqdm(total=total_steps, initial=state["global_step"], desc="train", unit="step",
                    file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **hidden_unless(main))
    log = _above(progress, log)
    model.train()
    try:  # Ctrl-C: the bar ends before the run says how to resume it
        while state["epoch"] < config.epochs and not state["done"]:
            epoch = state["epoch"]
            sampler.set_epoch(epoch)
            batches = sampler.batches()
            start_batch = state["step_in_epoch"] * config.grad_accum
            epoch_start = time.perf_counter()
            seconds_before_epoch = state["seconds"]
            if start_batch == 0:
                state["epoch_loss_sum"] = 0.0
            # checkpointed with the state, so a resumed epoch reports the loss of all its batches
            state.setdefault("epoch_loss_sum", 0.0)
            batches_run = len(batches)  # fewer where train.max_steps ends the epoch early
            for index in range(start_batch, len(batches)):
                indices = batches[index]
                heap.before_batch(len(indices) * int(sampler.lengths[indices].max()))
                share, weight = batch_share(indices, rank, processes)
                # a pure function of (seed, epoch, batch[, process]): resumed runs draw the same
                seed = [config.seed, epoch, index] if processes == 1 else [config.seed, epoch, index, rank]
                batch = task_model.collate([train_examples[i] for i in share], rng=np.random.default_rng(seed))
                batch = to_device(batch, accelerator.device)
                last_micro = (index + 1) % config.grad_accum == 0 or index + 1 == len(batches)
                sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(model)
                with sync, accelerator.autocast():
                    loss = task_model.loss(model(batch), batch) * weight
                accelerator.backward(loss / config.grad_accum)
                if processes > 1:  # the global batch's mean loss, for the log
                    loss = accelerator.reduce(loss.detach(), reduction="mean")
                step_loss = loss.item()
                if not math.isfinite(step_loss):  # else NaN weights surface later as a metric library's error
                    progress.close()
                    raise UserError(f"the training loss became {step_loss} at step {state['global_step'] + 1} "
                                    f"(epoch {epoch + 1}): training diverged; lower train.lr (now {config.lr:g})"
                                    + (" or train in fp32 (train.precision=fp32)" if accelerator.mixed_precision != "no" else ""))
                state["epoch_loss_sum"] += step_loss
                state["samples"] += len(indices)
                if not last_micro:
                    continue
                if sharded:
                    sharding.average_replicated_gradients(task_model)
                if config.max_grad_norm and sharded:
                    accelerator.unscale_gradients()
                    sharding.clip_grad_norm_(params, config.max_grad_norm)
                elif config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["global_step"] += 1
                state["step_in_epoch"] += 1
                progress.update(1)
                elapsed = state["seconds"] + time.perf_counter() - epoch_start
                progress.set_postfix(epoch=epoch + 1, loss=f"{step_loss:.4f}",
                                     samples_s=f"{state['samples'] / max(elapsed, 1e-9):.1f}", refresh=False)
                if state["global_step"] >= total_steps:
                    state["done"] = True
                    batches_run = index + 1
                    break
                if config.checkpoint_every and state["global_step"] % config.checkpoint_every == 0:
                    state["seconds"] += time.perf_counter() - epoch_start
                    epoch_start = time.perf_counter()
                    _save(checkpoints, accelerator, task_model, optimizer, scheduler, state)
            state["seconds"] += time.perf_counter() - epoch_start

            entry = {"epoch": epoch + 1, "step": state["global_step"],
                     "train_loss": state["epoch_loss_sum"] / max(batches_run, 1)}
            # kept beside the history, which stays a pure function of the run's settings
            state.setdefault("epoch_seconds", []).append(state["seconds"] - seconds_before_epoch)
            if validation_examples:
                with sharding.gathered(task_model):  # the main process evaluates alone
                    scores = None
                    if main:
                        scores, _ = evaluate(task, task_model, validation_examples, metric_names, eval_batch,
                                             accelerator.autocast)
                    scores = main_process_decides(scores, accelerator.state)
                    entry["validation"] = scores
                    value = scores.get(primary_metric)
                    if metrics.is_better(primary_metric, value, state["best_metric"]):
                        state.update(best_metric=value, best_epoch=epoch + 1, bad_epochs=0)
                        if main and config.keep == "best":
                            io.save_tensors(best_file, checkpoint.trainable_state(task_model))
                    elif value is not None:  # an undefined score is no evidence to stop on
                        state["bad_epochs"] += 1
                log(f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f}, validation {primary_metric} "
                    f"{_fmt(value)} (best {_fmt(state['best_metric'])}"
                    f"{'' if state['best_epoch'] is None else ' at epoch ' + str(state['best_epoch'])})")
            state["history"].append(entry)
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            if config.early_stopping_patience and state["bad_epochs"] >= config.early_stopping_patience:
                log(f"early stopping: no {primary_metric} improvement for {state['bad_epochs']} epochs")
                state["done"] = True
            _save(checkpoints, accelerator, task_model, optimizer, scheduler, state)
    except KeyboardInterrupt:
        progress.close()
        raise
    progress.close()
    if validation_examples and state["best_epoch"] is None and config.keep == "best":
        log(f"note: validation {primary_metric} was undefined at every epoch (e.g. the split holds one class), so "
            f"the last epoch's model is kept; give validation more examples or set another eval.primary_metric")
    if plan_cache is not None:
        task_model.feature_cache = None  # training's alone; frees its memory

    if sharded:  # the caller builds an unsharded model from `trained_state_file`
        return state
    if main and best_file.is_file():
        checkpoint.load_state(task_model, io.load_tensors(best_file), str(best_file))
    task_model.eval()
    return state


def trained_state_file(run_dir: Path) -> Path:
    """The trained model's trainable state as training left it on disk: the best epoch's,
    or the last checkpoint's where nothing was validated."""
    best = Path(run_dir) / BEST_STATE
    last = checkpoint.latest(Path(run_dir) / "checkpoints") or Path(run_dir) / "checkpoints" / "last"
    return best if best.is_file() else last / "trainable.safetensors"


def _save(checkpoints, accelerator, model, optimizer, scheduler, state) -> None:
    checkpoint.save_checkpoint(checkpoints, model, optimizer, scheduler, state, write=accelerator.is_main_process)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
