"""The caching CPU allocator (shared/cpu_allocator.cpp): freed blocks serve later
requests of their size class, the cache stays within its limit and empties on request
and on leaving, results are bit-identical to torch's allocator (one step by hand and
a whole training run), a forked child can allocate, and a failed build says why."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import run_peftlab
from peftlab.shared import cpu_allocator, io

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the allocator")

MIB = 2**20


def test_freed_blocks_serve_later_requests_of_their_class():
    assert cpu_allocator.load(), cpu_allocator.build_error
    with cpu_allocator.caching():
        assert cpu_allocator.active()
        before = cpu_allocator.stats()
        for step in range(5):
            block = torch.full((MIB,), float(step))  # 4 MiB
            assert block.min().item() == block.max().item() == step
            del block
        after = cpu_allocator.stats()
        assert after["maps"] - before["maps"] == 1  # mapped once, then reused four times
        assert after["reuses"] - before["reuses"] == 4
        assert after["cached"] == 4 * MIB
        small = torch.ones(100)  # below 128 KiB: the C library's, not counted here
        assert cpu_allocator.stats()["in_use"] == after["in_use"]
        del small
        # a request a size class away maps a block of its own
        odd = torch.empty(int(1.3 * MIB))
        assert cpu_allocator.stats()["maps"] == after["maps"] + 1
        del odd
        assert cpu_allocator.release_cached() >= 4 * MIB
        assert cpu_allocator.stats()["cached"] == 0
    assert not cpu_allocator.active()


def test_the_cache_keeps_within_its_limit_and_empties_on_leaving():
    assert cpu_allocator.load(), cpu_allocator.build_error
    ops = torch.ops.peftlab_cpu_allocator
    ops.set_cache_limit(2 * MIB, 0.0)
    try:
        start = cpu_allocator.stats()["in_use"]  # tensors of other tests still alive
        with cpu_allocator.caching():
            blocks = [torch.empty(MIB // 4) for _ in range(6)]  # 1 MiB each
            kept = torch.empty(4 * MIB)  # still in use when the block is left
            del blocks
            assert cpu_allocator.stats()["cached"] == 2 * MIB  # four of six unmapped when freed
            maps = cpu_allocator.stats()["maps"]
        assert cpu_allocator.stats()["cached"] == 0
        assert cpu_allocator.stats()["in_use"] == start + 16 * MIB
        del kept  # freed after leaving: unmapped at once
        assert cpu_allocator.stats()["in_use"] == start and cpu_allocator.stats()["cached"] == 0
        outside = torch.empty(4 * MIB)  # torch's allocator again
        assert cpu_allocator.stats()["maps"] == maps and cpu_allocator.stats()["in_use"] == start
        del outside
    finally:
        ops.set_cache_limit(256 * MIB, 0.25)


def test_a_full_cache_gives_way_to_the_sizes_in_use_now():
    """Evaluation batches change shape without the cache being emptied between them: the
    blocks freed longest ago make room, so the new size is mapped once and then reused
    (were the newly freed block unmapped instead, every request would map afresh)."""
    assert cpu_allocator.load(), cpu_allocator.build_error
    ops = torch.ops.peftlab_cpu_allocator
    ops.set_cache_limit(2 * MIB, 0.0)
    try:
        with cpu_allocator.caching():
            earlier = [torch.empty(MIB // 4) for _ in range(2)]  # 1 MiB each: an earlier batch's size
            del earlier
            assert cpu_allocator.stats()["cached"] == 2 * MIB
            before = cpu_allocator.stats()
            for step in range(5):
                block = torch.full((int(0.3 * MIB),), float(step))  # 1.2 MiB: another size class
                assert block[0].item() == block[-1].item() == step
                del block
            after = cpu_allocator.stats()
            assert after["maps"] - before["maps"] == 1 and after["reuses"] - before["reuses"] == 4
            assert after["cached"] <= 2 * MIB
            again = torch.empty(MIB // 4)  # its class was given up for the newer one
            assert cpu_allocator.stats()["maps"] == after["maps"] + 1
            del again
    finally:
        ops.set_cache_limit(256 * MIB, 0.25)


def _one_step_gradients(model: torch.nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens).float().pow(2).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_a_training_step_gives_bit_identical_gradients(one_thread):
    from peftlab.domains.protein.backbones import ESM2_ARCHITECTURES, ESMEncoder

    torch.manual_seed(0)
    encoder = ESMEncoder(*ESM2_ARCHITECTURES["esm2_t6_8M_UR50D"])  # 320 wide: activations of 128 KiB and more
    tokens = encoder.tokenize(["".join("ACDEFGHIKLMNPQRSTVWY"[(i * 7 + j) % 20] for j in range(length))
                               for i, length in enumerate([200, 150, 90])])
    plain = _one_step_gradients(encoder, tokens)
    with cpu_allocator.caching():
        reuses = cpu_allocator.stats()["reuses"]
        cached = _one_step_gradients(encoder, tokens)
        assert cpu_allocator.stats()["reuses"] - reuses > 100  # the step ran on the cache
    assert plain.keys() == cached.keys() and plain
    assert all(torch.equal(plain[name], cached[name]) for name in plain)


def test_a_forked_child_allocates_and_frees():
    with cpu_allocator.caching():
        held = torch.ones(MIB)
        pid = os.fork()
        if pid == 0:  # the child: its own copy of the pool, lock released
            torch.set_num_threads(1)  # GNU OpenMP's thread pool does not survive a fork
            code = 0 if torch.equal(torch.ones(2 * MIB).sum(), torch.tensor(2.0 * MIB)) and held.sum() == MIB else 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        del held
    assert os.waitstatus_to_exitcode(status) == 0


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return {f"{name}:{key}": value for name in ("adapter_model.safetensors", "head.safetensors")
            for key, value in io.load_tensors(run_dir / "adapter" / name).items()}


def test_a_training_run_gives_the_results_of_torchs_allocator(tmp_path):
    settings = ["train.epochs=2", "data.limit.train=96", "train.batch_size=16"]
    runs = {}
    for label, switch in (("caching", "0"), ("torch", "1")):
        out = tmp_path / label
        result = run_peftlab("run", "protein-classify", "--demo", "--out", out, *settings,
                             env={"PEFTLAB_NO_CPU_CACHING": switch})
        assert result.returncode == 0, result.stderr[-2000:]
        runs[label] = (_adapter(out), json.loads((out / "metrics.json").read_text()))
    (ours, our_metrics), (theirs, their_metrics) = runs["caching"], runs["torch"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert our_metrics["test"] == their_metrics["test"]


def test_a_build_that_fails_says_why_and_leaves_torchs_allocator(failing_compiler, monkeypatch, capsys):
    monkeypatch.setattr(cpu_allocator, "_built", None)  # this process has not loaded it yet
    monkeypatch.setattr(cpu_allocator, "build_error", None)
    with cpu_allocator.caching():
        assert not cpu_allocator.active()
    message = capsys.readouterr().err
    assert "caching CPU allocator could not be built" in message and "No such file" in message
    assert str(failing_compiler) in message
    assert cpu_allocator.stats()["maps"] == 0 and cpu_allocator.release_cached() == 0
