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
