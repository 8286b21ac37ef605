"""Small C++ extensions built for this machine at first use (`torch.utils.cpp_extension`).

Each is compiled into a cache folder keyed by its source, torch's version, the flags and
the CPU's flags (`$PEFTLAB_KERNEL_CACHE`, default `~/.cache/peftlab/kernels`), so a home
directory shared between different CPUs gets one build per CPU. A failed build (no
compiler, say) returns the compiler's first error line; the caller says what runs instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

import torch


def cache_folder() -> Path:
    return Path(os.environ.get("PEFTLAB_KERNEL_CACHE", Path.home() / ".cache" / "peftlab" / "kernels"))


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def build(name: str, source: Path, flags: list[str], what: str, seconds: int, instead: str) -> str | None:
    """Build (first time on this machine) and load `source` as the library `peftlab_<name>`,
    whose TORCH_LIBRARY ops then live in `torch.ops`. Returns None, or where the build
    failed the reason (the compiler's first error line), which it also prints on stderr
    with `instead` (what runs without it). `what` and `seconds` tell the user what is
    being built and for how long."""
    key = hashlib.sha256("\n".join([source.read_text(), torch.__version__, " ".join(flags), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    folder = cache_folder() / f"{name}-{key}"
    library = f"peftlab_{name}"
    try:
        cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_extension_log.level
        cpp_extension_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": these kernels are CPU-only
        try:
            from torch.utils.cpp_extension import load
        finally:
            cpp_extension_log.setLevel(level)

        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{library}.so").exists():
            print(f"peftlab: building {what} for this CPU in {folder} (once per machine, about {seconds} s)",
                  file=sys.stderr, flush=True)
        load(library, [str(source)], extra_cflags=flags, extra_ldflags=[f for f in flags if f == "-fopenmp"],
             build_directory=str(folder), is_python_module=False, verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: run without it
        lines = str(error).strip().splitlines() or [type(error).__name__]
        reason = next((line.strip() for line in lines if "error:" in line), lines[-1])
        print(f"peftlab: {what} could not be built in {folder} ({reason}); {instead}", file=sys.stderr)
        return reason
    return None
