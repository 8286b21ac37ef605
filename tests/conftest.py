from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

# Tests never reach for the network: backbones resolve locally or fail clearly.
os.environ.setdefault("PEFTLAB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist each worker gets its share of the cores, so workers do not fight
# over them; a plain run uses up to two threads.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.out_proj(self.q_proj(h) * torch.sigmoid(self.v_proj(h)))
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyNet(nn.Module):
    """A 3-block transformer-shaped model with a conv stem and BatchNorm: every module
    type the generic methods handle."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv1d(4, width, kernel_size=3, padding=1)
        self.stem_norm = nn.BatchNorm1d(width)
        self.layers = nn.ModuleList([Block(width) for _ in range(3)])
        self.final_norm = nn.LayerNorm(width)

    def forward(self, x):  # x: (batch, 4, length)
        h = self.stem_norm(self.stem(x)).transpose(1, 2)
        for block in self.layers:
            h = block(h)
        return self.final_norm(h)


@pytest.fixture
def one_thread():
    """For tiny models: a second intra-op thread costs more in synchronisation than it
    saves, up to 10-20x slower when other processes share the 2 cores (measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_net():
    torch.manual_seed(0)
    return TinyNet()


def run_peftlab(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The real `peftlab` command, in a subprocess."""
    # The subprocess gets this worker's share of the cores, as the tests in-process do.
    full_env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    script = Path(sys.executable).parent / "peftlab"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "peftlab.pipelines.cli"]
    return subprocess.run([*command, *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def real_assets() -> Path:
    root = os.environ.get("PEFTLAB_REAL_ASSETS")
    if not root or not Path(root).is_dir():
        pytest.skip("PEFTLAB_REAL_ASSETS is not set to the real-assets folder")
    return Path(root)


def demo_card_for(task_name: str) -> Path:
    from peftlab.shared.cards import read_card

    for path in sorted((REPO / "data_cards").glob("*.md")):
        card = read_card(path)
        if card.task == task_name and card.format == "demo":
            return path
    raise AssertionError(f"task {task_name} has no demo card in data_cards/")


def tiny_model_with_default_method(task_name: str):
    """Task `task_name`'s tiny model with LoRA (or `full` where LoRA does not fit), at
    its default options, and a training batch of its first 4 demo examples. Returns
    (model, batch, method)."""
    from peftlab.shared import methods
    from peftlab.shared.cards import read_card
    from peftlab.shared.tasks import get_task

    task = get_task(task_name)
    options = task.options()
    dataset = task.read(read_card(demo_card_for(task_name)), options)
    torch.manual_seed(0)
    model = task.build_model("tiny", dataset.labels, options)
    method = "lora" if methods.get_method("lora").fits(model.backbone) else "full"
    model.backbone = methods.apply(model.backbone, method, **task.default_method_options(method, model))
    return model, model.collate(dataset.splits["train"][:4], rng=None), method


@pytest.fixture
def failing_compiler(monkeypatch, tmp_path):
    """C++ extensions fail to build as without a compiler, into an empty kernel cache
    (`tmp_path`): reset the module's `_built` and `build_error` so it tries again."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("error: command 'c++' failed: No such file or directory")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setenv("PEFTLAB_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def write_task_card(folder: Path, task_name: str, header: str, name: str = "card.md") -> Path:
    """A data card for `task_name` whose YAML header holds `header` (lines after name, domain, task)."""
    from peftlab.shared.tasks import get_task

    path = folder / name
    path.write_text(f"---\nname: t\ndomain: {get_task(task_name).domain}\ntask: {task_name}\n{header}\n---\n")
    return path


def read_task_data(path: Path, task_name: str, splits: dict | None = None):
    """The card's dataset as a run reads it (with `data.splits` overrides); reading needs no
    Java (the caption task's default PTB tokeniser scores on it, so words here)."""
    from peftlab.pipelines import runner
    from peftlab.shared.tasks import get_task

    task = get_task(task_name)
    options = task.options(caption_tokenizer="words") if task_name == "video-caption" else task.options()
    card = runner.with_split_overrides(runner.load_card(str(path), task), splits, task)
    return task.read(card, options)


def without_locations(splits: dict) -> dict:
    """The examples less what names where they were read (ids from line numbers, table rows)."""
    return {split: [{k: v for k, v in e.items() if k not in ("id", "row")} for e in examples]
            for split, examples in splits.items()}


JSON_RECORDS = {
    "code-review-necessity": lambda i: {"patch": f"@@ -1 +1 @@\n+x = {i}", "y": i % 2, "id": f"r{i}"},
    "code-review-comment": lambda i: {"patch": f"@@ -1 +1 @@\n+x = {i}", "msg": f"name {i}", "id": f"r{i}"},
    "code-refine": lambda i: {"old": f"x = {i}", "comment": "rename", "new": f"y = {i}", "id": f"r{i}"},
    "reasoning-commonsense": lambda i: {"question": f"is {i} even?", "answer": ["false", "true"][i % 2 == 0],
                                        "dataset": "boolq", "id": f"q{i}"},
    "reasoning-arithmetic": lambda i: {"question": f"{i} + 1?", "answer": str(i + 1), "dataset": "gsm8k", "id": f"q{i}"},
}
"""Record i of each JSON-lines task, in its own format (CodeReviewer's keys, the reasoning shapes)."""
