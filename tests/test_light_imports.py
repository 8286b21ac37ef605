"""The light commands stay light: listing the registries, writing and validating a card
import none of the libraries that only building models, training or computing metrics
need (each costs seconds on every `peftlab list`)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY_LIBRARIES = (
    "accelerate",
    "datasets",
    "matplotlib",
    "open_clip",
    "peft",
    "scipy",
    "sklearn",
    "timm",
    "torchaudio",
    "torchvision",
    "transformers",
)

# In a fresh interpreter: what the test process imported itself would hide the answer.
LIGHT_COMMANDS = f"""
import contextlib, io, json, sys

from peftlab.pipelines.cli import main
from peftlab.shared import methods
from peftlab.shared.tasks import list_tasks, load_domains

load_domains()
tasks = [task.name for task in list_tasks()]
options = {{name: methods.options_help(methods.get_method(name)) for name in methods.list_methods()}}
with contextlib.redirect_stdout(io.StringIO()) as printed:
    exit_codes = [main(["list"]), main(["card", "new", "protein", "protein-classify"]),
                  main(["card", "validate", sys.argv[1]])]
print(json.dumps({{
    "tasks": tasks,
    "lora_options": [row[0] for row in options["lora"]],
    "exit_codes": exit_codes,
    "validated": json.loads(printed.getvalue().strip().splitlines()[-1]),
    "imported": [name for name in {HEAVY_LIBRARIES!r} if name in sys.modules],
}}))
"""

CARD = """---
name: light-import-check
domain: protein
task: protein-classify
format: csv
files:
  data: sequences.csv
fields: {sequence: sequence, label: label}
labels: [negative, positive]
splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}
license: MIT
source: written by the test
---
Random peptides.
"""


def test_registries_and_card_commands_import_no_heavy_library(tmp_path):
    rows = ["sequence,label"] + [f"{'ACDEFGHIKLMNPQRSTVWY'[i % 20:] + 'MKV' * (i % 5)},{['negative', 'positive'][i % 2]}"
                                 for i in range(40)]
    (tmp_path / "sequences.csv").write_text("\n".join(rows) + "\n")
    card = tmp_path / "card.md"
    card.write_text(CARD)

    result = subprocess.run([sys.executable, "-c", LIGHT_COMMANDS, str(card)], capture_output=True, text=True,
                            timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"protein-classify", "medical-classify", "speech-emotion", "video-caption"} <= set(report["tasks"])
    assert {"r", "alpha", "target_modules"} <= set(report["lora_options"])
    assert report["exit_codes"] == [0, 0, 0]
    assert report["validated"]["splits"] == {"train": 32, "validation": 4, "test": 4}
    assert report["imported"] == []


def test_tab_completion_offers_the_api_without_importing_it():
    """`dir(peftlab)` listed none of run, load, bench (they are imported on first use), so
    IPython's `peftlab.<TAB>` offered nothing; listing them must not import torch."""
    listed = subprocess.run([sys.executable, "-c", "import json, sys, peftlab; print(json.dumps("
                             "[[n for n in dir(peftlab) if not n.startswith('_')], 'torch' in sys.modules]))"],
                            capture_output=True, text=True, check=True)
    names, torch_imported = json.loads(listed.stdout)
    assert names == ["MultiAdapter", "Predictor", "UserError", "bench", "load", "run"] and not torch_imported
