"""Freed tensor memory leaves the resident set during training (shared/memory.py)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Run in a fresh process: glibc's allocator settings are process-wide and sticky, and
# the effect is measured on the process's resident set.
CHURN = r"""
import ctypes, json
import torch
from peftlab.shared.memory import compact_heap_for_training

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

def retained_after_churn():
    # 40 activations of 5 MiB freed while a small neighbour of each stays alive,
    # as a training step leaves them
    before = resident_mib()
    big, kept = [], []
    for _ in range(40):
        big.append(torch.ones(5 * 2**18))
        kept.append(torch.ones(2**10))
    del big
    return resident_mib() - before, kept

torch.ones(2**23)  # freeing a 32 MiB block raises glibc's threshold, as loading a checkpoint does
assert compact_heap_for_training()
with_call, kept_a = retained_after_churn()
ctypes.CDLL("libc.so.6").mallopt(-3, 32 * 2**20)  # the raised threshold, as without the call
without_call, kept_b = retained_after_churn()
before_trim = resident_mib()
compact_heap_for_training()
print(json.dumps({"with": with_call, "without": without_call, "returned": before_trim - resident_mib()}))
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_activations_leave_the_resident_set_and_free_heap_is_returned():
    result = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True)
    mib = json.loads(result.stdout.strip().splitlines()[-1])
    # 40 x 5 MiB were freed: without the setting they stay resident (the case it fixes) ...
    assert mib["without"] > 150
    # ... with it only the small neighbours (40 x 4 KiB) remain
    assert mib["with"] < 10
    # and the heap's free pages left by the first case go back to the kernel at once
    assert mib["returned"] > 150


class _CountingLibc:
    def __init__(self):
        self.trims = 0

    def malloc_trim(self, pad):
        self.trims += 1
        return 1


def test_heap_is_trimmed_before_the_largest_batches_only(monkeypatch):
    from peftlab.shared import memory

    libc = _CountingLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    trimmer = memory.HeapTrimmer(near_largest=0.8, min_batches_between=3)
    decisions = [trimmer.before_batch(size) for size in [100, 50, 120, 110, 110, 60, 70, 119, 100, 130]]
    # larger than all before: 100, 120, 130; near the largest (>= 96) once 3 batches passed: the 119
    assert decisions == [True, False, True, False, False, False, False, True, False, True]
    assert libc.trims == 4


def test_without_glibc_the_trimmer_does_nothing(monkeypatch):
    from peftlab.shared import memory

    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert not memory.HeapTrimmer().before_batch(10)


TRIM = r"""
import json
import torch
from peftlab.shared.memory import HeapTrimmer, compact_heap_for_training

def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

compact_heap_for_training()  # activations below 4 MiB come from the heap
trimmer = HeapTrimmer()
trimmer.before_batch(100)
held, kept = [], []
for _ in range(100):  # 2 MiB activations from the heap, each with a small survivor after it
    held.append(torch.ones(2**19))
    kept.append(torch.ones(2**10))
del held  # holes between the survivors: glibc keeps them resident
before = resident_mib()
small = trimmer.before_batch(50)
after_small = resident_mib()
large = trimmer.before_batch(200)
print(json.dumps({"small": small, "large": large, "kept_by_small": before - after_small,
                  "returned": after_small - resident_mib()}))
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_free_heap_goes_back_to_the_kernel_before_a_larger_batch():
    result = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True)
    mib = json.loads(result.stdout.strip().splitlines()[-1])
    assert mib["small"] is False and mib["large"] is True
    assert abs(mib["kept_by_small"]) < 5  # a smaller batch leaves the heap as it is
    assert mib["returned"] > 150  # 200 MiB freed in the heap's middle leave the resident set
