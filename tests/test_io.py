"""Atomic writes: the final file appears whole or not at all, with the mode a new file gets."""

from __future__ import annotations

import os
import stat

import pytest
from peftlab.shared import io


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        io.write_json(tmp_path / "runs" / "meta.json", {"a": 1})
        io.save_tensors(tmp_path / "runs" / "adapter.safetensors", {})
    finally:
        os.umask(previous)
    for name in ("meta.json", "adapter.safetensors"):  # mkstemp's 0600 made runs unreadable to a server or colleague
        assert stat.S_IMODE((tmp_path / "runs" / name).stat().st_mode) == mode
    assert os.umask(previous) == previous  # the umask is left as it was


def test_a_failed_write_leaves_neither_the_file_nor_its_temporary(tmp_path):
    with pytest.raises(RuntimeError), io.atomic_path(tmp_path / "metrics.json") as temporary:
        temporary.write_text("{half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
