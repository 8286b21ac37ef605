"""Keep a training process's resident memory close to what its tensors need (glibc).

PyTorch takes CPU tensor memory from the C allocator. glibc serves a request below its
mmap threshold from its heap, and heap space freed in the middle of the heap stays with
the process: it still counts in the resident set, and later requests of other sizes
reuse it only in part. Training allocates and frees every activation of every batch,
and batch shapes change from step to step (length-bucketed sequences), so each step
leaves holes of different sizes behind.

Measured on `protein-classify`, LoRA on ESM-2 35M, bf16, batch 8, 30-1000 residues, with
the 4 MiB threshold peftlab set before: after 6 steps glibc's heap held 1.26 GB of which
0.44 GB were in use, and loading the backbone (a checkpoint read, then copied into the
model) had left 130 MB free on the heap before the first step. The activations of a
batch of short sequences are 0.3-4 MiB each, all below that threshold.

`compact_heap_for_training` sets the threshold to 256 KiB, so every activation of a
batch of realistic size gets its own mapping that goes back to the kernel when the
tensor is freed, and hands the heap's free pages back once, before the first step.
Small allocations (Python objects, metadata, scalars) stay on the fast heap; the cost
per step was within this machine's measurement noise (user and system CPU time of 6
steps unchanged within 5 %).
"""

from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD_BYTES = 256 * 1024
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
