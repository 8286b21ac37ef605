"""A corpus of hostile inputs: malformed cards, data files, configs and run directories
across every domain and the CLI layer.

Each case writes its bad files into a temporary folder and runs one `peftlab` command.
Every case must end the same way: exit code 2, exactly one line on stderr that starts
with `error:` and names the file / line / field at fault (the case's regex), no
traceback, and no run directory that looks finished (nothing with a metrics.json). The
cases fail before any training, so they run in-process (`cli.main`); two of them also
run as the real command in a subprocess, to show it behaves identically.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_peftlab
from peftlab.pipelines.cli import main

# ----------------------------------------------------------------------------- builders


def write_card(folder: Path, task: str, domain: str, fmt: str, **header) -> Path:
    """A data card `card.md` in `folder` (header fields as given, `None` values left out)."""
    fields = {"name": "hostile", "domain": domain, "task": task, "format": fmt,
              **{k: v for k, v in header.items() if v is not None}}
    path = folder / "card.md"
    path.write_text("---\n" + yaml.safe_dump(fields, sort_keys=False) + "---\nA hostile input.\n", encoding="utf-8")
    return path


def run_argv(pipeline: str, card: Path, folder: Path, *overrides: str) -> list[str]:
    return ["run", pipeline, "--demo", "--data", str(card), "--out", str(folder / "run"), *overrides]


PROTEIN = ("protein", "protein-ppi")
CLASSIFY = ("protein", "protein-classify")
MEDICAL = ("medical_imaging", "medical-classify")
SPEECH = ("speech_emotion", "speech-emotion")
POINTS = ("point_cloud", "pointcloud-classify")
NECESSITY = ("code_review", "code-review-necessity")
COMMENT = ("code_review", "code-review-comment")
REFINE = ("code_review", "code-refine")


def card_run(kind: tuple[str, str], fmt: str, write: dict[str, str | bytes] | None = None,
             overrides: tuple[str, ...] = (), **header) -> Callable[[Path], list[str]]:
    """A builder: `write` files (name -> text or bytes) next to a card, run the pipeline on it."""
    domain, task = kind

    def build(folder: Path) -> list[str]:
        for name, content in (write or {}).items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        return run_argv(task, write_card(folder, task, domain, fmt, **header), folder, *overrides)

    return build


def demo_run(pipeline: str, *overrides: str) -> Callable[[Path], list[str]]:
    return lambda folder: ["run", pipeline, "--demo", "--out", str(folder / "run"), *overrides]


def raw_card(text: str | bytes, pipeline: str = "protein-ppi") -> Callable[[Path], list[str]]:
    def build(folder: Path) -> list[str]:
        path = folder / "card.md"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return run_argv(pipeline, path, folder)

    return build


def npz_bytes(**arrays) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def wav_bytes(samples: np.ndarray, rate: int = 16000, subtype: str = "FLOAT") -> bytes:
    import io

    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def clouds(count: int = 4, points: int = 64, bad: float | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(count, points, 3)).astype(np.float32)
    if bad is not None:
        data[1, 5, 2] = bad
    return {"points": data, "label": np.arange(count) % 2, "split": np.array([0, 0, 1, 1][:count]),
            "class_names": np.array(["chair", "table"])}


def a_run_dir(*files: str) -> Callable[[Path], Path]:
    """A folder holding some of a run directory's files (but not a usable run)."""
    def make(folder: Path) -> Path:
        run = folder / "fake-run"
        run.mkdir()
        for name in files:
            (run / name).write_text("{" if name.endswith(".json") else "pipeline: [unclosed\n")
        return run

    return make


def a_started_run(*broken: str) -> Callable[[Path], Path]:
    """A real run.yaml (protein-classify demo) with a checkpoint, and `broken` files truncated."""
    def make(folder: Path) -> Path:
        from peftlab.pipelines import config as cfg
        from peftlab.pipelines import runner

        run = folder / "started-run"
        step = run / "checkpoints" / "step-00000003"
        step.mkdir(parents=True)
        config = cfg.to_yaml_dict(runner.build_config("protein-classify", demo=True))
        (run / "run.yaml").write_text(yaml.safe_dump(config))
        (run / "meta.json").write_text(json.dumps({"labels": ["a", "b"]}))
        (run / "card.md").write_text("---\nname: demo\ndomain: protein\ntask: protein-classify\nformat: demo\n---\n")
        (run / "adapter").mkdir()
        (step / "state.json").write_text(json.dumps({"train": {}}))
        (run / "checkpoints" / "last").symlink_to(step.name)
        for name in broken:
            (run / name).write_text((run / name).read_text()[:7])
        return run

    return make


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


FASTA = ">a\nMKTAYIAK\n>b\nMKVLAAGIV\n>c\nMSTNPKPQR\n"
TONE = 0.3 * np.sin(np.linspace(0, 200 * np.pi, 8000)).astype(np.float32)
PLY_HEAD = "ply\nformat ascii 1.0\nelement vertex {count}\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
POINT_LINES = "0 0 0\n1 0 0\n0 1 0\n0 0 1\n"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], list[str]]
    message: str
    """A regex the one `error:` line must match (it names the file, line or field)."""


CASES = [
    # ------------------------------------------------------------------ cards (any domain)
    Case("card-no-front-matter", raw_card("name: x\n"), r"card\.md:1: a data card starts with a '---' line"),
    Case("card-unclosed-header", raw_card("---\nname: x\n"), r"card\.md: the YAML header has no closing '---'"),
    Case("card-yaml-syntax", raw_card("---\nname: [x\n---\n"), r"card\.md: line \d+: the YAML header does not parse"),
    Case("card-not-a-mapping", raw_card("---\n- a\n- b\n---\n"), r"card\.md: the YAML header must be a mapping"),
    Case("card-missing-task", raw_card("---\nname: x\ndomain: protein\nformat: demo\n---\n"),
         r"card\.md: required field 'task' is missing; add `task:`"),
    Case("card-labels-wrong-type", card_run(CLASSIFY, "demo", labels="abc"), r"card\.md: field 'labels\.?\S*':"),
    Case("card-duplicate-labels", card_run(CLASSIFY, "demo", labels=["a", "a", "b", "c"]),
         r"card\.md: `labels` names 'a' twice"),
    Case("card-utf16", raw_card("---\nname: x\n---\n".encode("utf-16")), r"card\.md: not UTF-8 text"),
    Case("card-unknown-field", card_run(PROTEIN, "demo", colour="blue"), r"card\.md: unknown field 'colour'; valid fields"),
    Case("card-group-by-without-groups", card_run(PROTEIN, "demo", group_by="organism"),
         r"card\.md: group_by: protein-ppi reports no per-group metrics \(medical-classify and speech-emotion do\); "
         r"leave group_by out"),
    Case("card-demo-with-splits", card_run(MEDICAL, "demo", splits={"ratios": {"train": 0.5, "test": 0.5}}),
         r"card\.md: splits: a demo card's splits are its generator's; set their sizes under `demo:` \(as "
         r"medical-classify's demo card does\) and leave splits out"),
    Case("card-labels-on-generation", card_run(COMMENT, "demo", labels=["good", "bad"]),
         r"card\.md: labels: code-review-comment has no classes to name \(its targets are text\); leave `labels` out"),
    Case("card-loader-beside-a-known-format", card_run(PROTEIN, "demo", loader="mine:load"),
         r"card\.md: loader: protein-ppi reads format 'demo' itself; leave `loader` out, or set `format` to the name "
         r"of the format your loader reads$"),
    Case("card-loader-missing", card_run(PROTEIN, "parquet", {"p.fasta": ">a\nMKV\n", "p.parquet": b"PAR1"},
                                         loader="no_such_loader:load", files={"sequences": "p.fasta", "pairs": "p.parquet"}),
         r"card\.md: loader: no module 'no_such_loader': neither .*no_such_loader\.py \(or a package folder\) nor an "
         r"installed module; put no_such_loader\.py beside the card or install it$"),
    Case("card-unknown-metric", card_run(PROTEIN, "demo", metrics=["aupr", "bogus_metric"]),
         r"card\.md: metrics: unknown metric 'bogus_metric'; protein-ppi computes aupr, "),
    Case("config-unknown-metrics", demo_run("protein-ppi", "eval.metrics=[aupr,bogus_metric]"),
         r"eval\.metrics: unknown metric 'bogus_metric'; protein-ppi computes aupr, "),
    Case("card-unknown-format", card_run(PROTEIN, "custom"),
         r"card\.md: format 'custom' is not one protein-ppi reads \(fasta\+pairs_tsv, demo\); convert the data to one of "
         r"them, or read it with `loader: module:function`$"),
    Case("card-unset-variable", card_run(PROTEIN, "fasta+pairs_tsv", files={"sequences": "${PEFTLAB_NOT_SET_ANYWHERE}/s.fasta", "pairs": "p.tsv"}),
         r"card\.md: files\.sequences: environment variable PEFTLAB_NOT_SET_ANYWHERE is not set"),
    Case("card-missing-file", card_run(PROTEIN, "fasta+pairs_tsv", files={"sequences": "nowhere.fasta", "pairs": "p.tsv"}),
         r"card\.md: files\.sequences = \S*nowhere\.fasta does not exist"),
    Case("card-wrong-format", card_run(PROTEIN, "parquet"), r"card\.md: format 'parquet' is not one protein-ppi reads"),
    Case("card-ratios-not-summing", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\n"},
                                             files={"sequences": "s.fasta", "pairs": "p.tsv"},
                                             splits={"ratios": {"train": 0.9, "validation": 0.5}}),
         r"card\.md: splits\.ratios must be non-negative and sum to 1"),
    Case("card-empty-validation-split", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\nb\tc\t0\n"},
                                                 files={"sequences": "s.fasta", "pairs": "p.tsv"},
                                                 splits={"ratios": {"train": 0.9, "validation": 0.05, "test": 0.05}}),
         r"card\.md: split 'validation' is empty: the card's splits \(a ratio, or validation_fraction of train\) round "
         r"it to none of these examples \(train 2, validation 0, test 0\); give it examples \(raise its share, name its "
         r"fold values, or give it a file\) or leave it out of eval\.splits$"),  # 5 % of two pairs rounds to none
    Case("card-validation-fraction-holds-out-none",
         card_run(CLASSIFY, "csv", {"tr.csv": "sequence,label\nMKVL,0\nMKVA,1\nMKVG,0\nMKVW,1\n", "te.csv": "sequence,label\nMKVC,0\n"},
                  splits={"train": "tr.csv", "test": "te.csv"}),
         r"card\.md: split 'validation' is empty: the card's splits \(a ratio, or validation_fraction of train\) round "
         r"it to none of these examples \(train 4, test 1, validation 0\)"),  # 10 % of two per class rounds to none
    Case("card-no-validation-split", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\nb\tc\t0\n"},
                                              files={"sequences": "s.fasta", "pairs": "p.tsv"},
                                              splits={"ratios": {"train": 1.0, "validation": 0.0, "test": 0.0}}),
         r"card\.md: eval\.splits names 'validation'; the data has train: set eval\.splits=\[\] or give the card a "
         r"validation split \(a file, a ratio, or with fold_by, validation: \[VALUES\]\)$"),
    # ------------------------------------------------------------------ protein
    Case("fasta-binary-garbage", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": bytes(range(256)) * 4, "p.tsv": "a\tb\t1\n"},
                                          files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"s\.fasta: not UTF-8 text \(byte \d+\); is this a FASTA file\?"),
    Case("fasta-utf16", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA.encode("utf-16"), "p.tsv": "a\tb\t1\n"},
                                 files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"s\.fasta: not UTF-8 text \(byte \d+\); is this a FASTA file\?"),
    Case("fasta-truncated-header", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA + ">\n", "p.tsv": "a\tb\t1\n"},
                                            files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"s\.fasta:7: FASTA header without an id"),
    Case("fasta-duplicate-id", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA + ">a\nMK\n", "p.tsv": "a\tb\t1\n"},
                                        files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"s\.fasta:7: duplicate FASTA id 'a'"),
    Case("fasta-empty", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": "", "p.tsv": "a\tb\t1\n"},
                                 files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"s\.fasta: no FASTA records"),
    Case("splits-misspelt-key", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\n"},
                                         files={"sequences": "s.fasta", "pairs": "p.tsv"}, splits={"group_by_protien": True}),
         r"card\.md: splits\.group_by_protien is not understood by protein-ppi; did you mean splits\.group_by_protein\? "
         r"its split keys: .*group_by_protein"),
    Case("splits-group-a-string", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\n"},
                                           files={"sequences": "s.fasta", "pairs": "p.tsv"}, splits={"group_by_protein": "false"}),
         r"card\.md: splits\.group_by_protein must be true or false, got 'false'"),
    Case("splits-seed-a-word", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\n"},
                                        files={"sequences": "s.fasta", "pairs": "p.tsv"}, splits={"seed": "zero"}),
         r"card\.md: field 'splits': .*splits\.seed must be a whole number, got 'zero'"),
    Case("pairs-unknown-protein", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\na\tzz\t0\n"},
                                           files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"p\.tsv:2: protein 'zz' is not in the FASTA"),
    Case("pairs-unknown-label", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\tmaybe\n"},
                                         files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"p\.tsv:1: label 'maybe' is not one of"),
    Case("pairs-nan-label", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\nb\tc\tnan\n"},
                                     files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"p\.tsv:2: label 'nan' is not"),
    Case("pairs-inf-label", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\tinf\n"},
                                     files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"p\.tsv:1: label 'inf' is not"),
    Case("pairs-too-few-columns", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "a\tb\t1\nc\n"},
                                           files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"p\.tsv:2: expected 3 tab-separated columns"),
    Case("pairs-empty-file", card_run(PROTEIN, "fasta+pairs_tsv", {"s.fasta": FASTA, "p.tsv": "\n\n"},
                                      files={"sequences": "s.fasta", "pairs": "p.tsv"}), r"p\.tsv: no pairs"),
    Case("csv-latin1", card_run(CLASSIFY, "csv", {"d.csv": "sequence,label\nMKT,caf\xe9\n".encode("latin-1")}, files={"data": "d.csv"}),
         r"d\.csv: not UTF-8 text \(byte \d+\)"),
    Case("csv-gzipped", card_run(CLASSIFY, "csv", {"d.csv": gzip.compress(b"sequence,label\nMKT,0\n")}, files={"data": "d.csv"}),
         r"d\.csv: gzip-compressed: decompress it \(gunzip\), then pass the text file$"),
    Case("csv-missing-column", card_run(CLASSIFY, "csv", {"d.csv": "seq,label\nMKT,0\n"}, files={"data": "d.csv"}),
         r"d\.csv: column 'sequence' for fields\.sequence not found"),
    Case("csv-ragged-row", card_run(CLASSIFY, "csv", {"d.csv": "sequence,label\nMKT,0\nMKV,1,extra\n"}, files={"data": "d.csv"}),
         r"d\.csv:3: 3 columns, the header has 2"),
    Case("csv-over-long-cell", card_run(CLASSIFY, "csv", {"d.csv": "sequence,label\n" + "M" * 200_000 + ",0\n"}, files={"data": "d.csv"}),
         r"d\.csv: malformed CSV \(field larger than field limit"),
    Case("csv-column-named-twice", card_run(CLASSIFY, "csv", {"d.csv": "sequence,label,label\nMKT,0,1\n"}, files={"data": "d.csv"}),
         r"d\.csv: the header row names column 'label' 2 times \(columns 2, 3\); rename all but one"),
    Case("csv-fold-column-named-twice", card_run(CLASSIFY, "csv", {"d.csv": "sequence,label,fold,fold\nMKT,0,1,2\n"},
                                                 files={"data": "d.csv"}, splits={"fold_by": "fold", "test": [1]}),
         r"d\.csv: the header row names column 'fold' 2 times \(columns 3, 4\)"),
    Case("csv-label-out-of-range", card_run(CLASSIFY, "csv", {"d.csv": "sequence,label\nMKT,0\nMKV,7\n"}, files={"data": "d.csv"},
                                            labels=["a", "b"]), r"d\.csv:3: label '7' is out of range"),
    # ------------------------------------------------------------------ medical imaging
    Case("image-not-an-image", card_run(MEDICAL, "csv", {"d.csv": "path,label\nx.png,0\ny.png,1\n", "x.png": b"\x89PNG\r\n\x1a\nnope",
                                                         "y.png": b"GIF89a"}, files={"data": "d.csv"}, labels=["a", "b"]),
         r"d\.csv:[23]: .*[xy]\.png: unreadable or truncated image .*on_bad_file: skip"),
    Case("image-missing-file", card_run(MEDICAL, "csv", {"d.csv": "path,label\nmissing.png,0\n"}, files={"data": "d.csv"}, labels=["a", "b"]),
         r"d\.csv:2: .*missing\.png: image file not found"),
    Case("image-group-named-twice", card_run(MEDICAL, "csv", {"d.csv": "path,label,sex\nmissing.png,0,f\n"}, files={"data": "d.csv"},
                                             labels=["a", "b"], group_by="age", fields={"group": "sex"}),
         r"card\.md: group_by is 'age' but fields.group names column 'sex'; name the group column once \(group_by: sex\)"),
    Case("image-csv-semicolons", card_run(MEDICAL, "csv", {"d.csv": "path;label\nx.png;0\n"}, files={"data": "d.csv"}, labels=["a", "b"]),
         r"d\.csv:1: the header 'path;label' is one column: the file is separated by semicolons; save it with commas"),
    Case("image-csv-path-named-twice", card_run(MEDICAL, "csv", {"d.csv": "path,label,path\nx.png,0,y.png\n"}, files={"data": "d.csv"},
                                                labels=["a", "b"]), r"d\.csv: the header row names column 'path' 2 times"),
    Case("image-csv-unknown-label", card_run(MEDICAL, "csv", {"d.csv": "path,label\nx.png,tumour\n"}, files={"data": "d.csv"}, labels=["a", "b"]),
         r"d\.csv:2: label 'tumour' is not one of"),
    Case("image-folder-missing", card_run(MEDICAL, "imagefolder", path="no-such-folder"), r"card\.md: path = \S*no-such-folder does not exist"),
    Case("medmnist-nan-pixels", card_run(MEDICAL, "medmnist_npz", {"m.npz": npz_bytes(
        train_images=np.where(np.eye(8)[None].repeat(4, 0) > 0, np.nan, 0.5), train_labels=np.zeros((4, 1)))},
        files={"data": "m.npz"}), r"m\.npz: train_images holds NaN or infinite pixels"),
    Case("medmnist-negative-label", card_run(MEDICAL, "medmnist_npz", {"m.npz": npz_bytes(
        train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.array([[0], [-1], [-1]]))}, files={"data": "m.npz"}),
         r"m\.npz: train_labels\[1\] is -1: labels are class indices 0, 1, \.\.\.; 2 rows are not$"),
    Case("medmnist-fractional-label", card_run(MEDICAL, "medmnist_npz", {"m.npz": npz_bytes(
        train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.array([[0.0], [0.5]]))}, files={"data": "m.npz"}),
         r"m\.npz: train_labels\[1\] is 0\.5: labels are class indices 0, 1, \.\.\.$"),
    Case("medmnist-one-hot", card_run(MEDICAL, "medmnist_npz", {"m.npz": npz_bytes(
        train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.eye(2))}, files={"data": "m.npz"}),
         r"m\.npz: train_labels has 2 columns, one 1 per row \(one-hot\): save the class indices "
         r"\(train_labels\.argmax\(axis=1\)\) for single-label data, or set task\.multi_label=true"),
    Case("medmnist-channels-first", card_run(MEDICAL, "medmnist_npz", {"m.npz": npz_bytes(
        train_images=np.zeros((2, 3, 8, 8), np.uint8), train_labels=np.zeros((2, 1)))}, files={"data": "m.npz"}),
         r"m\.npz: train_images has shape \(2, 3, 8, 8\), channels first; MedMNIST stores \(N, H, W, C\): save "
         r"np\.transpose\(images, \(0, 2, 3, 1\)\)$"),
    Case("medmnist-missing-labels", card_run(MEDICAL, "medmnist_npz", {"m.npz": npz_bytes(train_images=np.zeros((2, 8, 8), np.uint8))},
                                             files={"data": "m.npz"}), r"m\.npz: has train_images but no train_labels"),
    Case("medmnist-truncated", card_run(MEDICAL, "medmnist_npz", {"m.npz": npz_bytes(train_images=np.zeros((2, 8, 8)))[:60]},
                                        files={"data": "m.npz"}), r"m\.npz: not a readable \.npz archive"),
    Case("medical-bad-on-bad-file", card_run(MEDICAL, "demo", on_bad_file="ignore"), r"card\.md: on_bad_file must be error or skip"),
    # ------------------------------------------------------------------ speech emotion
    Case("audio-csv-speaker-named-twice", card_run(SPEECH, "audio_csv", {"t.csv": "path,label,speaker,speaker\nx.wav,happy,a,b\n"},
                                                   files={"data": "t.csv"}), r"t\.csv: the header row names column 'speaker' 2 times"),
    Case("audio-missing-file", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\nnone.wav,happy\n"}, files={"data": "t.csv"}),
         r"none\.wav: file not found"),
    Case("audio-garbage", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\nx.wav,happy\n", "x.wav": b"RIFF....WAVEjunk" * 10},
                                   files={"data": "t.csv"}), r"x\.wav: not a readable WAV/FLAC/OGG/MP3 file"),
    Case("audio-nan-samples", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\nx.wav,happy\n",
                                                             "x.wav": wav_bytes(np.where(np.arange(8000) == 100, np.nan, TONE))},
                                       files={"data": "t.csv"}), r"x\.wav: contains NaN or infinite samples"),
    Case("audio-silent", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\nx.wav,happy\n", "x.wav": wav_bytes(np.zeros(8000))},
                                  files={"data": "t.csv"}), r"x\.wav: silent"),
    Case("audio-too-short", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\nx.wav,happy\n", "x.wav": wav_bytes(TONE[:100])},
                                     files={"data": "t.csv"}), r"x\.wav: only 0\.006 s long"),
    Case("audio-table-utf16", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\nx.wav,happy\n".encode("utf-16")},
                                       files={"data": "t.csv"}), r"t\.csv: not UTF-8 text"),
    Case("audio-unknown-label", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\nx.wav,bored\n", "x.wav": wav_bytes(TONE)},
                                         files={"data": "t.csv"}, labels=["happy", "sad"]), r"t\.csv:2: label 'bored' is not one of"),
    Case("audio-unknown-field", card_run(SPEECH, "audio_csv", {"t.csv": "path,label\n"}, files={"data": "t.csv"}, fields={"mood": "label"}),
         r"card\.md: fields\.mood is not a field speech-emotion reads; its fields: path, label, speaker"),
    Case("audio-fold-value-not-a-split", card_run(SPEECH, "audio_csv", {"t.csv": "path,label,session\nx.wav,happy,1\n", "x.wav": wav_bytes(TONE)},
                                             files={"data": "t.csv"}, fields={"session": "session"}, splits={"fold_by": "session"}),
         r"t\.csv:2: session is '1', not a split name \(train, validation or valid, test\); the column holds 1: list "
         r"the values that test \(and validate\), e\.g\. splits: \{fold_by: session, test: \[1\]\}, and the rest trains$"),
    Case("audio-fold-override-names-no-row",
         card_run(SPEECH, "audio_csv", {"t.csv": "path,label,session\nx.wav,happy,1\n", "x.wav": wav_bytes(TONE)},
                  overrides=("data.splits.test=[9]",), files={"data": "t.csv"}, fields={"session": "session"},
                  splits={"fold_by": "session", "test": [1]}),
         r"card\.md: splits\.test names session '9', which no record has.*\(the card's splits with data\.splits test=\[9\]\)"),
    Case("train-keep-unknown", demo_run("protein-classify", "train.keep=worst"), r"train\.keep: Input should be 'best' or 'last'"),
    Case("speech-augment-not-bool", demo_run("speech-emotion", "task.augment=maybe"),
         r"option 'augment' must be true or false, got 'maybe'"),
    Case("speech-prompt-placement", demo_run("speech-emotion", "--method", "speech_prompt", "method.placement=deep"),
         r"method 'speech_prompt': placement must be every_layer or input, got 'deep'"),
    Case("point-prompt-blocks-negative", demo_run("pointcloud-classify", "--method", "point_peft", "method.prompt_blocks=-1"),
         r"method 'point_peft': prompt_blocks must be >= 0, got -1"),
    Case("point-prompt-blocks-over-depth", demo_run("pointcloud-classify", "--method", "point_peft", "method.prompt_blocks=3"),
         r"prompt_blocks is 3, but this Point-BERT has 2 blocks"),
    Case("video-text-tokens-over-context", demo_run("video-text-retrieval", "task.max_text_tokens=99"),
         r"task\.max_text_tokens is 99, more than the text tower's context of 77 tokens; set task\.max_text_tokens=77"),
    Case("reasoning-answer-prefix-not-text", demo_run("reasoning-commonsense", "task.answer_prefix=[1]"),
         r"answer_prefix"),
    Case("data-splits-unknown-key", demo_run("speech-emotion", "data.splits.fold=1"),
         r"data\.splits\.fold is not a split key speech-emotion reads"),
    Case("speech-max-seconds-zero", demo_run("speech-emotion", "task.max_seconds=0"), r"max_seconds must be > 0"),
    # ------------------------------------------------------------------ point clouds
    Case("npz-nan-point", card_run(POINTS, "points_npz", {"c.npz": npz_bytes(**clouds(bad=np.nan))}, files={"data": "c.npz"}),
         r"c\.npz \(shape 1, c:1\): point 5 has a NaN or infinite coordinate"),
    Case("npz-inf-point", card_run(POINTS, "points_npz", {"c.npz": npz_bytes(**clouds(bad=np.inf))}, files={"data": "c.npz"}),
         r"c\.npz \(shape 1, c:1\): point 5 has a NaN or infinite coordinate"),
    Case("npz-missing-arrays", card_run(POINTS, "points_npz", {"c.npz": npz_bytes(points=np.zeros((2, 8, 3)))}, files={"data": "c.npz"}),
         r"c\.npz: the \.npz lacks \['label', 'split', 'class_names'\]"),
    Case("npz-label-out-of-range", card_run(POINTS, "points_npz", {"c.npz": npz_bytes(**{**clouds(), "label": np.array([0, 1, 5, 0])})},
                                            files={"data": "c.npz"}), r"c\.npz: labels must lie in 0\.\.1"),
    Case("npz-empty", card_run(POINTS, "points_npz", {"c.npz": npz_bytes(points=np.zeros((0, 8, 3)), label=np.zeros(0, int),
                                                                         split=np.zeros(0, int), class_names=np.array(["a"]))},
                               files={"data": "c.npz"}), r"c\.npz: no clouds"),
    Case("ply-bad-vertex-count", card_run(POINTS, "point_folder", {"r/chair/a.ply": PLY_HEAD.format(count="many") + POINT_LINES,
                                                                   "r/table/b.ply": PLY_HEAD.format(count=4) + POINT_LINES},
                                          files={"root": "r"}), r"a\.ply: 'element vertex many': the count must be a whole number"),
    Case("ply-truncated-binary", card_run(POINTS, "point_folder", {
        "r/chair/a.ply": PLY_HEAD.format(count=100).replace("ascii", "binary_little_endian").encode() + struct.pack("<3f", 0, 0, 1),
        "r/table/b.ply": PLY_HEAD.format(count=4) + POINT_LINES}, files={"root": "r"}), r"a\.ply: the file is shorter than its 100 vertices"),
    Case("off-face-index-out-of-range", card_run(POINTS, "point_folder", {"r/chair/a.off": "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 9\n",
                                                                         "r/table/b.txt": POINT_LINES}, files={"root": "r"}),
         r"a\.off:6: vertex index out of range 0\.\.2"),
    Case("xyz-text-not-numbers", card_run(POINTS, "point_folder", {"r/chair/a.txt": "0 0 0\n1 zero 0\n", "r/table/b.txt": POINT_LINES},
                                          files={"root": "r"}), r"a\.txt:2: expected numbers"),
    Case("points-all-coincide", card_run(POINTS, "point_folder", {"r/chair/a.txt": "1 1 1\n" * 5, "r/table/b.txt": POINT_LINES},
                                         files={"root": "r"}), r"a\.txt: all 5 points coincide"),
    Case("npy-object-array", card_run(POINTS, "point_folder", {"r/chair/a.npy": b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }" + b" " * 50 + b"\n",
                                                               "r/table/b.txt": POINT_LINES}, files={"root": "r"}), r"a\.npy: not a plain numeric \.npy array"),
    Case("npy-channels-first", card_run(POINTS, "point_folder", {"r/chair/a.npy": npy_bytes(np.random.default_rng(0).random((3, 20))),
                                                                 "r/table/b.txt": POINT_LINES}, files={"root": "r"}),
         r"a\.npy: 3 points of 20 values each; this looks like channels-first \(C, N\): store the transpose"),
    Case("point-folder-val-split", card_run(POINTS, "point_folder", {"r/chair/train/a.txt": POINT_LINES, "r/chair/val/b.txt": POINT_LINES,
                                                                    "r/table/train/c.txt": POINT_LINES}, files={"root": "r"}),
         r"r/chair/val: a split folder is named train, validation or test \(rename it to validation\); or put the class's files directly in"),
    Case("point-folder-capitalised-split", card_run(POINTS, "point_folder", {"r/chair/Train/a.txt": POINT_LINES,
                                                                            "r/table/Train/c.txt": POINT_LINES}, files={"root": "r"}),
         r"r/chair/Train: a split folder is named train, validation or test \(rename it to train\)"),
    Case("point-folder-mixed-layout", card_run(POINTS, "point_folder", {"r/chair/train/a.txt": POINT_LINES, "r/chair/test/b.txt": POINT_LINES,
                                                                       "r/table/c.txt": POINT_LINES}, files={"root": "r"}),
         r"r/table holds its files directly but .*r/chair in split folders; lay out every class one way"),
    Case("point-folder-shape-names", card_run(POINTS, "point_folder", {"r/chair/a.txt": POINT_LINES, "r/table/c.txt": POINT_LINES},
                                              files={"root": "r"}, splits={"shape_names": ["chair"]}),
         r"card\.md: splits.shape_names names the class-list file of the modelnet_txt format .* for format 'point_folder': remove it"),
    Case("h5-garbage", card_run(POINTS, "scanobjectnn_h5", {"t.h5": b"not hdf5 at all"}, files={"train": "t.h5"}), r"t\.h5: not a readable HDF5 file"),
    Case("pointcloud-num-points-too-few", demo_run("pointcloud-classify", "task.num_points=4"), r"task\.num_points=4 is fewer than"),
    # ------------------------------------------------------------------ code review
    Case("jsonl-broken-line", card_run(NECESSITY, "jsonl", {"d.jsonl": '{"patch": "+x", "y": 1}\n{"patch": \n'}, files={"data": "d.jsonl"}),
         r"d\.jsonl:2: not a JSON object"),
    Case("jsonl-array-line", card_run(NECESSITY, "jsonl", {"d.jsonl": '[1, 2]\n'}, files={"data": "d.jsonl"}), r"d\.jsonl:1: a list, not a JSON object"),
    Case("jsonl-pretty-printed-array", card_run(NECESSITY, "jsonl", {"d.jsonl": '[\n  {"patch": "+x", "y": 1}\n]\n'},
                                                files={"data": "d.jsonl"}),
         r"d\.jsonl: a JSON array over several lines, not JSON lines; write each record as one JSON object on a line "
         r"of its own$"),
    Case("jsonl-gzipped", card_run(NECESSITY, "jsonl", {"d.jsonl": gzip.compress(b'{"patch": "+x", "y": 1}\n')},
                                   files={"data": "d.jsonl"}), r"d\.jsonl: gzip-compressed: decompress it \(gunzip\)"),
    Case("jsonl-key-twice", card_run(NECESSITY, "jsonl", {"d.jsonl": '{"patch": "+x", "y": 1}\n{"patch": "+x", "y": 1, "y": 0}\n'},
                                     files={"data": "d.jsonl"}), r"d\.jsonl:2: an object names the key 'y' twice; keep the one meant"),
    Case("jsonl-missing-field", card_run(COMMENT, "jsonl", {"d.jsonl": '{"patch": "+x"}\n'}, files={"data": "d.jsonl"}),
         r"d\.jsonl:1: no field 'msg' \(needed as `label`\)"),
    Case("jsonl-nan-label", card_run(NECESSITY, "jsonl", {"d.jsonl": '{"patch": "+x", "y": NaN}\n'}, files={"data": "d.jsonl"}),
         r"d\.jsonl:1: field 'y' is nan; review necessity labels are 1"),
    Case("jsonl-label-two", card_run(NECESSITY, "jsonl", {"d.jsonl": '{"patch": "+x", "y": 2}\n'}, files={"data": "d.jsonl"}),
         r"d\.jsonl:1: field 'y' is 2"),
    Case("jsonl-number-as-text", card_run(COMMENT, "jsonl", {"d.jsonl": '{"patch": 5, "msg": "ok"}\n'}, files={"data": "d.jsonl"}),
         r"d\.jsonl:1: field 'patch' is a number, expected a string"),
    Case("jsonl-latin1", card_run(REFINE, "jsonl", {"d.jsonl": '{"old": "caf\xe9"}\n'.encode("latin-1")}, files={"data": "d.jsonl"}),
         r"d\.jsonl: not UTF-8 text"),
    Case("tufano-three-columns", card_run(COMMENT, "tufano_tsv", {"d.tsv": "a\tb\tc\n"}, files={"data": "d.tsv"}),
         r"d\.tsv:1: expected 2 tab-separated columns"),
    Case("tufano-refine-no-code-tag", card_run(REFINE, "tufano_tsv", {"d.tsv": "int x;\tint y;\n"}, files={"data": "d.tsv"}),
         r"d\.tsv:1: the source must read <code>OLD</code>"),
    Case("prompt-budget-too-small", demo_run("code-review-comment", "task.max_prompt_tokens=8"), r"max_prompt_tokens must be >= 16"),
    Case("prompt-template-bad-field", demo_run("code-review-necessity", "task.prompt_template='{diff}'"), r"prompt_template must use exactly"),
    # ------------------------------------------------------------------ config and CLI
    Case("config-batch-size-zero", demo_run("protein-ppi", "train.batch_size=0"), r"train\.batch_size: Input should be greater than or equal to 1"),
    Case("config-epochs-zero", demo_run("protein-ppi", "train.epochs=0"), r"train\.epochs: Input should be greater than or equal to 1"),
    Case("config-lr-infinite", demo_run("protein-ppi", "train.lr=.inf"), r"train\.lr: Input should be a finite number"),
    Case("config-lr-nan", demo_run("protein-ppi", "train.lr=.nan"), r"train\.lr: Input should be a finite number"),
    Case("config-warmup-above-one", demo_run("protein-ppi", "train.warmup_ratio=1.5"), r"train\.warmup_ratio: Input should be less than or equal to 1"),
    Case("config-unknown-schedule", demo_run("protein-ppi", "train.schedule=wavy"), r"train\.schedule: Input should be 'cosine', 'linear' or 'constant'"),
    Case("config-seed-not-a-number", demo_run("protein-ppi", "train.seed=abc"), r"train\.seed: Input should be a valid integer"),
    Case("config-unknown-section", demo_run("protein-ppi", "optimizer.lr=1"), r"unknown config key 'optimizer\.lr'; valid sections"),
    Case("config-unknown-eval-key", demo_run("protein-ppi", "eval.splitz=[test]"), r"unknown config key 'eval\.splitz'; valid eval keys"),
    Case("config-limit-one-number", demo_run("protein-ppi", "data.limit=5"), r"data\.limit: .*give a number per split: data\.limit\.train=N"),
    Case("config-negative-limit", demo_run("protein-ppi", "data.limit.validation=-5"), r"data\.limit\.validation: .*greater than or equal to 1"),
    Case("speech-backbone-missing-folder", demo_run("speech-emotion", "--backbone", "/nonexistent/whisper"),
         r"speech backbone folder /nonexistent/whisper does not exist; fix the path"),
    Case("config-eval-unknown-split", demo_run("protein-ppi", "eval.splits=[dev]"), r"eval\.splits names 'dev'; the data has train, validation, test: set eval\.splits=\[validation, test\]"),
    Case("run-out-under-a-file", lambda f: (f / "afile").write_text("x") and ["run", "protein-classify", "--demo", "--out",
                                                                              str(f / "afile" / "run")],
         r"--out \S*afile/run: cannot create the folder \(\S*afile is a file, not a folder\); choose another --out$"),
    Case("config-text-metric-on-classes", demo_run("code-review-necessity", "eval.metrics=[f1,bleu4]"),
         r"eval\.metrics: code-review-necessity cannot compute 'bleu4' \(it scores generated text\); it computes f1, "),
    Case("config-class-metric-on-text", demo_run("code-review-comment", "eval.primary_metric=auroc"),
         r"eval\.primary_metric: code-review-comment cannot compute 'auroc' \(it scores class predictions\)"),
    Case("config-ranking-metric-on-classes", demo_run("protein-classify", "eval.primary_metric=t2v_r1"),
         r"eval\.primary_metric: protein-classify cannot compute 't2v_r1' \(it scores a retrieval ranking\)"),
    Case("config-unknown-metric", demo_run("protein-ppi", "eval.primary_metric=goodness"),
         r"eval\.primary_metric: unknown metric 'goodness'; protein-ppi computes aupr, "),
    Case("method-rank-not-whole", demo_run("speech-emotion", "method.r=2.5"), r"method 'lora': option 'r' must be a whole number, got 2\.5"),
    Case("method-rank-a-word", demo_run("protein-ppi", "method.r=abc"), r"method 'lora': option 'r' must be a whole number, got 'abc'"),
    Case("task-rate-a-word", demo_run("protein-ppi", "task.head_dropout=abc"),
         r"task 'protein-ppi': option 'head_dropout' must be a number, got 'abc' \(task\.head_dropout=\.\.\.\)"),
    Case("task-length-not-whole", demo_run("protein-ppi", "task.max_length=12.5"),
         r"task 'protein-ppi': option 'max_length' must be a whole number, got 12\.5"),
    Case("task-optional-weight-a-word", demo_run("protein-ppi", "task.pos_weight=abc"),
         r"task 'protein-ppi': option 'pos_weight' must be a number or null, got 'abc'"),
    Case("task-head-dropout-out-of-range", demo_run("protein-classify", "task.head_dropout=2"),
         r"task 'protein-classify': head_dropout must be in \[0, 1\), got 2"),
    Case("task-head-without-width", demo_run("protein-classify", "task.head_hidden=0"),
         r"task 'protein-classify': head_hidden must be >= 1, got 0"),
    Case("task-negative-positive-weight", demo_run("protein-ppi", "task.pos_weight=-3"),
         r"task 'protein-ppi': pos_weight must be > 0 \(or null\), got -3"),
    Case("task-ppi-option-on-classify", demo_run("protein-classify", "task.combine=mean_product"),
         r"task 'protein-classify' has no option 'combine'; valid task options: crop_eval, crop_train, head_dropout"),
    Case("config-file-not-yaml", lambda f: (f.joinpath("run.yaml").write_text("pipeline: [\n"), ["run", "--config", str(f / "run.yaml")])[1],
         r"run\.yaml: not valid YAML"),
    Case("config-file-a-list", lambda f: (f.joinpath("run.yaml").write_text("- a\n"), ["run", "--config", str(f / "run.yaml")])[1],
         r"run\.yaml: a run config is a YAML mapping"),
    Case("config-file-misspelt-pipeline",
         lambda f: (f.joinpath("run.yaml").write_text("pipeline: protein-pp\ntask: {name: protein-ppi}\n"),
                    ["run", "--config", str(f / "run.yaml")])[1],
         r"run\.yaml: pipeline 'protein-pp' is not a pipeline \(did you mean 'protein-ppi'\?\); known: code-refine"),
    Case("config-file-pipeline-of-another-task",
         lambda f: (f.joinpath("run.yaml").write_text("pipeline: speech-emotion\ntask: {name: protein-ppi}\n"),
                    ["run", "--config", str(f / "run.yaml")])[1],
         r"run\.yaml: pipeline 'speech-emotion' runs task 'speech-emotion', not 'protein-ppi'; fix `pipeline:` or `task\.name`"),
    Case("config-out-is-a-file", lambda f: (f.joinpath("taken").write_text("x"), ["run", "protein-ppi", "--demo", "--out", str(f / "taken")])[1],
         r"Invalid value for '--out': Directory '\S*taken' is a file"),
    Case("cli-unknown-option", lambda f: ["run", "protein-ppi", "--demoo"], r"No such option '--demoo'\. Did you mean '--demo'\? \(see `peftlab run --help`\)"),
    # ------------------------------------------------------------------ run directories
    Case("override-template-read-as-mapping", lambda f: ["run", "code-review-comment", "--demo", "task.prompt_template={patch}"],
         r"task\.prompt_template is text, but the value was read as a YAML dict; quote it"),
    Case("eval-not-a-run", lambda f: ["eval", str(a_run_dir()(f))], r"fake-run is not a finished peftlab run directory \(no run\.yaml\)"),
    Case("predict-not-a-run", lambda f: ["predict", str(a_run_dir()(f)), "x.fasta"], r"fake-run is not a finished peftlab run directory"),
    Case("merge-not-a-run", lambda f: ["merge", str(a_run_dir()(f)), "--out", str(f / "merged")], r"fake-run is not a finished peftlab run directory"),
    Case("eval-a-file", lambda f: (f.joinpath("x").write_text("x"), ["eval", str(f / "x")])[1], r"x: a file, not a run directory"),
    Case("eval-corrupt-run-yaml", lambda f: ["eval", str(a_run_dir("run.yaml", "meta.json", "card.md", "adapter")(f))], r"run\.yaml: not valid YAML"),
    Case("resume-not-a-run", lambda f: ["run", "--resume", str(a_run_dir()(f))], r"fake-run is not a peftlab run directory \(no run\.yaml\)"),
    Case("resume-truncated-checkpoint", lambda f: ["run", "--resume", str(a_started_run("checkpoints/last/state.json")(f))],
         r"state\.json: not valid JSON .*; this checkpoint cannot be resumed"),
    Case("eval-unfinished-run", lambda f: (lambda run: (shutil.rmtree(run / "adapter"), ["eval", str(run)])[1])(a_started_run()(f)),
         r"started-run is not a finished peftlab run directory \(no adapter\); continue it with `peftlab run --resume \S*started-run`"),
    Case("eval-truncated-meta-json", lambda f: ["eval", str(a_started_run("meta.json")(f))], r"meta\.json: not valid JSON"),
    Case("resume-corrupt-run-yaml", lambda f: ["run", "--resume", str(a_run_dir("run.yaml")(f))], r"run\.yaml: not valid YAML"),
]


def test_an_out_check_leaves_folders_it_did_not_make(tmp_path):
    """`--out new/../kept/run`: the check tried the folder and removed `new/../kept`, an
    existing empty folder, on its way out."""
    from peftlab.pipelines.runner import check_out_can_be_made

    (tmp_path / "kept").mkdir()
    check_out_can_be_made(tmp_path / "new" / ".." / "kept" / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_the_corpus_is_large_and_covers_every_domain():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    text = " ".join(c.name for c in CASES)
    for prefix in ("fasta", "csv", "image", "medmnist", "audio", "npz", "ply", "off", "jsonl", "tufano", "config", "card", "resume"):
        assert prefix in text, prefix


def _finished_runs(folder: Path) -> list[Path]:
    return [p.parent for p in folder.rglob("metrics.json")]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_gives_one_line_and_exit_code_2(case: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.build(tmp_path)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(case.message, lines[0]), lines[0]
    assert not _finished_runs(tmp_path)
    run_dir = tmp_path / "run"
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(run_dir.rglob("*"))


def test_the_real_command_behaves_identically(tmp_path, capsys):
    case = next(c for c in CASES if c.name == "npz-nan-point")
    argv = case.build(tmp_path)
    assert main(argv) == 2
    in_process = capsys.readouterr().err.strip()
    result = run_peftlab(*argv)
    assert result.returncode == 2
    assert result.stderr.strip() == in_process and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
