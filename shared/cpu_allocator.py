"""A caching allocator for CPU tensors during training (`cpu_allocator.cpp`).

PyTorch takes CPU tensor memory from the C library. With glibc, a large block is a
fresh memory mapping each time: every page of every activation of every step is
faulted in and zeroed by the kernel, and given back when the tensor is freed. A
training step of ESM-2 35M (bf16, 8 sequences of up to 1000 residues) allocates about
11 GB that way against 0.3-1 GB live at any moment. Smaller blocks come from glibc's
heap, where freed space between live blocks stays resident: it held 400-900 MiB free
at the peak of the same run.

Here blocks of 128 KiB and more come from size classes (four per power of two) and a
freed block waits for the next request of its class, so layer after layer reuses
resident pages. The cache holds at most the larger of 256 MiB and a quarter of the
bytes in tensors; past that the blocks freed longest ago are unmapped first, so the
cache follows the sizes in use now (evaluation's batches change shape without it being
emptied). The training loop empties it between batches (`release_cached`), whose
shapes differ. Smaller requests still go to the C library.

Built at first use like the narrow-attention kernel (`native.build`); without a
compiler, training runs on torch's own allocator with one line on stderr saying so.
`PEFTLAB_NO_CPU_CACHING=1` (or `true`, `yes`) turns it off (torch's allocator, the same results).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from peftlab.shared import native

SOURCE = Path(__file__).with_name("cpu_allocator.cpp")
_FLAGS = ["-O2"]

_built: bool | None = None
build_error: str | None = None
"""Why the build failed, where it did (the compiler's first error line)."""


def load() -> bool:
    """Build (first time on this machine) and load the allocator, once per process;
    False, with one line on stderr saying why, where it cannot be built."""
    global _built, build_error
    if _built is None:
        build_error = native.build("cpu_allocator", SOURCE, _FLAGS, "the caching CPU allocator", 15,
                                   instead="training uses torch's own CPU allocator (same results, slower and more "
                                           "memory)")
        _built = build_error is None
    return _built


@contextlib.contextmanager
def caching():
    """New CPU tensors of 128 KiB and more come from the cache inside the block; on
    leaving it the cache is emptied and torch's allocator is back. Does nothing where
    the allocator cannot be built, when already inside such a block, or with
    `PEFTLAB_NO_CPU_CACHING=1`."""
    if os.environ.get("PEFTLAB_NO_CPU_CACHING", "").lower() in ("1", "true", "yes") or not load() or active():
        yield
        return
    torch.ops.peftlab_cpu_allocator.install()
    try:
        yield
    finally:
        torch.ops.peftlab_cpu_allocator.uninstall()


def active() -> bool:
    """Whether new CPU tensors come from the cache now."""
    return bool(_built) and torch.ops.peftlab_cpu_allocator.active()


def release_cached() -> int:
    """Gives every free block back to the system; returns how many bytes (0 where not built)."""
    return torch.ops.peftlab_cpu_allocator.release_cached() if _built else 0


def stats() -> dict[str, int]:
    """Bytes in tensors, bytes cached free, mappings made, and requests served from the cache."""
    if not _built:
        return {"in_use": 0, "cached": 0, "maps": 0, "reuses": 0}
    in_use, cached, maps, reuses = torch.ops.peftlab_cpu_allocator.stats()
    return {"in_use": in_use, "cached": cached, "maps": maps, "reuses": reuses}
