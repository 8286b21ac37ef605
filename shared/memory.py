"""Keep a training process's resident memory close to what its tensors need (glibc).

During training on a CPU, tensors of 128 KiB and more come from `cpu_allocator`'s
cache, which `HeapTrimmer` empties between batches; what follows is about the rest,
which the C library serves (and about all of it where that allocator is not built).

PyTorch takes CPU tensor memory from the C allocator. glibc serves a request below its
mmap threshold from its heap, and heap space freed in the middle of the heap stays with
the process: it still counts in the resident set, and later requests of other sizes
reuse it only in part. Training allocates and frees every activation of every batch,
and batch shapes change from step to step (length-bucketed sequences), so each step
leaves holes of different sizes behind. glibc also raises the threshold to the largest
block freed so far (up to 32 MiB), so after loading a checkpoint most activations come
from the heap.

`compact_heap_for_training` fixes the threshold at 4 MiB, so large activations get
their own mapping that goes back to the kernel when the tensor is freed, and hands the
heap's free pages back once, before the first step (loading the backbone leaves about
130 MiB free there). Measured on `protein-classify`, LoRA on ESM-2 35M, bf16, batch 8,
30-1000 residues: peak RSS 3.8 GB with glibc's own threshold, 2.3 GB with 4 MiB. A
lower threshold saves more (256 KiB: 2.0 GB) but every smaller activation then costs a
mapping and its page faults: the ESM-2 8M training benchmark ran 1.3x slower at 256 KiB,
1.6x at 128 KiB (system time doubling), so 4 MiB is the trade.

Activations below 4 MiB still come from the heap, and over many steps of changing
shapes its free space splits into holes that the next shapes do not fit: on the ESM-2
35M run above the heap held about 900 MiB free against 400 MiB in use between steps.
`HeapTrimmer` hands those free pages back before the batches that set the peak (the
largest ones), where they would count on top of the batch's own activations.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections import Counter

import torch
from peftlab.shared import cpu_allocator
from torch import nn

MMAP_THRESHOLD_BYTES = 4 * 2**20
"""Requests at least this large get their own memory mapping, returned when freed."""

_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): it has neither knob
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def compact_heap_for_training() -> bool:
    """Freed tensor memory leaves the resident set at once from here on, and what the
    heap holds free now (e.g. from loading a checkpoint) goes back to the kernel.
    False where the C library is not glibc (nothing to tune)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    libc.malloc_trim(0)
    return True


class HeapTrimmer:
    """Hands the heap's free pages back to the kernel before the batches that set the
    memory peak: each batch larger than any before it, and one at least `near_largest`
    of the largest at most every `min_batches_between` batches.

    A trim costs the page faults of re-using what it returned, so trimming every step
    slowed the ESM-2 8M training benchmark by about 7 %. Before the largest batches only
    it cost nothing measurable, and `benchmarks/lora_vs_full_memory.py` (ESM-2 35M, 12
    steps) peaked at LoRA 2345 MiB, full fine-tuning 3372 MiB, against 2771 and 3950
    without it."""

    def __init__(self, near_largest: float = 0.8, min_batches_between: int = 8):
        self.near_largest = near_largest
        self.min_batches_between = min_batches_between
        self.largest = 0
        self.batches_since_trim = min_batches_between
        self._libc = _glibc()

    def before_batch(self, size: int) -> bool:
        """`size`: the batch's padded size (examples x longest). True where it trimmed.
        Also empties `cpu_allocator`'s cache (where training uses it), every batch: its
        blocks serve the layers of one batch, and the next batch's shapes differ."""
        cpu_allocator.release_cached()
        larger_than_all = size > self.largest
        near_largest = size >= self.near_largest * self.largest
        self.largest = max(self.largest, size)
        self.batches_since_trim += 1
        due = larger_than_all or (near_largest and self.batches_since_trim >= self.min_batches_between)
        if self._libc is None or not due:
            return False
        self._libc.malloc_trim(0)
        self.batches_since_trim = 0
        return True


@contextlib.contextmanager
def frozen_linears_in(model: nn.Module, dtype: torch.dtype):
    """Frozen linear layers hold their weights and biases in `dtype` inside the block;
    yields how many layers that is.

    For training under autocast to `dtype`: autocast casts every linear layer's weight
    to it for each matmul anyway, so the products are bit for bit the same, while the
    fp32 copy of a frozen weight, and autocast's cast of it in every forward pass, is
    memory the step never reads (about 100 MiB of ESM-2 35M's 134 with LoRA on k/v).
    Left as they are: layers with a trainable parameter, layers a PEFT method wraps
    (peft's `base_layer`: DoRA, for one, reads the base weight itself), and weights
    shared with another module (tied embeddings, whose lookups autocast does not cast).
    On leaving, the weights are back in their own dtype, with the values rounded to
    `dtype` (which is what the matmuls computed with)."""
    wrapped = {id(m.base_layer) for m in model.modules() if isinstance(getattr(m, "base_layer", None), nn.Module)}
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    lowered = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if (type(module) is nn.Linear and id(module) not in wrapped and module.weight.dtype != dtype
                and not any(p.requires_grad or uses[id(p)] > 1 for p in own)):
            lowered.append((module, module.weight.dtype))
            module.to(dtype)
    try:
        yield len(lowered)
    finally:
        for module, original in lowered:
            module.to(original)
