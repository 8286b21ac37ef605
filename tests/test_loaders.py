"""A card's `loader: module:function`: a format no domain knows, read by the user's
function into records that the task reads as its own record format. Every task: the
same data through a loader and through the task's own format reads to the same examples."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import peftlab
import pytest
import soundfile
from conftest import JSON_RECORDS, read_task_data, run_peftlab, without_locations, write_task_card
from peftlab.domains.video_text.data import write_video
from peftlab.pipelines import runner
from peftlab.shared.data import fingerprint
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import get_task, list_tasks
from PIL import Image

# The user's loaders: each reads a file of the task's own format, as a loader would read
# a format peftlab does not know, so that the two reads can be compared.
LOADERS = '''
import csv, json
import numpy as np

def table(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))

def pairs(path):
    with open(path) as handle:
        return [dict(zip(("protein_a", "protein_b", "label"), line.rstrip("\\n").split("\\t"))) for line in handle]

def json_lines(path):  # any iterable of records
    return (json.loads(line) for line in open(path).read().splitlines() if line.strip())

def clouds(path):
    arrays = np.load(path)
    names = [str(name) for name in arrays["class_names"]]
    return [{"points": points, "label": names[label], "id": str(name)}
            for points, label, name in zip(arrays["points"], arrays["label"], arrays["name"])]
'''


def _protein_classify(folder):
    for split, n in (("train", 30), ("test", 10)):
        (folder / f"{split}.csv").write_text("id,sequence,label\n" + "".join(
            f"{split}{i},MKV{'A' * (i % 7)}L,{'ab'[i % 2]}\n" for i in range(n)))
    splits = "splits: {train: train.csv, test: test.csv}"
    return f"format: csv\nlabels: [a, b]\n{splits}", f"loader: card_loaders:table\nlabels: [a, b]\n{splits}"


def _protein_ppi(folder):
    (folder / "p.fasta").write_text("".join(f">p{i}\nMKV{'A' * i}L\n" for i in range(12)))
    pairs = [(a, b) for a in range(12) for b in range(a + 1, 12)]
    (folder / "pairs.tsv").write_text("".join(f"p{a}\tp{b}\t{(a + b) % 2}\n" for a, b in pairs))
    common = "files: {sequences: p.fasta, pairs: pairs.tsv}\nsplits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 3}"
    return f"format: fasta+pairs_tsv\n{common}", f"loader: card_loaders:pairs\n{common}"


def _medical(folder):
    rows = []
    for i in range(24):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(folder / f"x{i}.png")
        rows.append(f"x{i}.png,{['benign', 'malignant'][i % 2]},site{i % 3}\n")
    (folder / "images.csv").write_text("path,label,site\n" + "".join(rows))
    common = "files: {data: images.csv}\ngroup_by: site\nsplits: {ratios: {train: 0.5, validation: 0.25, test: 0.25}}"
    return f"format: csv\n{common}", f"loader: card_loaders:table\n{common}"


def _speech(folder):
    rows = []
    for i in range(16):
        soundfile.write(folder / f"c{i}.wav", np.sin(np.arange(1600) * (i + 1) / 50).astype(np.float32), 16000)
        rows.append(f"c{i}.wav,{['neutral', 'angry'][i % 2]},s{i % 4}\n")
    (folder / "clips.csv").write_text("path,label,speaker\n" + "".join(rows))
    common = "files: {data: clips.csv}\nlabels: [neutral, angry]\nsplits: {ratios: {train: 0.5, validation: 0.25, test: 0.25}}"
    return f"format: audio_csv\n{common}", f"loader: card_loaders:table\n{common}"


def _pointcloud(folder):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 6)):
        np.savez(folder / f"{split}.npz", points=rng.normal(size=(n, 64, 3)).astype(np.float32),
                 label=np.arange(n) % 3, name=np.array([f"{split}{i}" for i in range(n)]),
                 class_names=np.array(["chair", "lamp", "table"]))
    # the task's own format packs both splits in one file with a split array
    train, test = np.load(folder / "train.npz"), np.load(folder / "test.npz")
    np.savez(folder / "all.npz", **{key: np.concatenate([train[key], test[key]]) for key in ("points", "label", "name")},
             split=np.array([0] * 30 + [1] * 6), class_names=train["class_names"])
    return ("format: points_npz\nfiles: {data: all.npz}",
            "loader: card_loaders:clouds\nsplits: {train: train.npz, test: test.npz}")


def _code_review(record):
    def write(folder):
        (folder / "records.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(30)))
        common = "files: {data: records.jsonl}\nsplits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 1}"
        return f"format: jsonl\n{common}", f"loader: card_loaders:json_lines\n{common}"
    return write


def _reasoning(record):
    def write(folder):
        for split, n in (("train", 20), ("test", 8)):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(record(i)) + "\n" for i in range(n)))
        splits = "splits: {train: train.jsonl, test: test.jsonl}"
        return f"format: jsonl\n{splits}", f"loader: card_loaders:json_lines\n{splits}"
    return write


def _video(folder):
    for v in range(10):
        write_video(folder / f"v{v}.mp4", np.full((2, 8, 8, 3), 10 * v, np.uint8))  # reading decodes every video
    (folder / "captions.csv").write_text("video,caption\n" + "".join(f"v{v},a clip {v} take {c}\n"
                                                                     for v in range(10) for c in range(2)))
    common = "files: {data: captions.csv}\nsplits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}}"
    return f"format: csv\n{common}", f"loader: card_loaders:table\n{common}"


CASES = {
    "protein-classify": _protein_classify,
    "protein-ppi": _protein_ppi,
    "medical-classify": _medical,
    "speech-emotion": _speech,
    "pointcloud-classify": _pointcloud,
    **{name: (_code_review if name.startswith("code") else _reasoning)(record) for name, record in JSON_RECORDS.items()},
    "video-text-retrieval": _video,
    "video-caption": _video,
}


def test_every_task_has_a_case():
    assert set(CASES) == {task.name for task in list_tasks()}


@pytest.mark.parametrize("task_name", sorted(CASES))
def test_a_loader_reads_the_same_examples_as_the_task_own_format(task_name, tmp_path):
    (tmp_path / "card_loaders.py").write_text(LOADERS)
    native_header, loader_header = CASES[task_name](tmp_path)
    native = read_task_data(write_task_card(tmp_path, task_name, native_header), task_name)
    loaded = read_task_data(write_task_card(tmp_path, task_name, f"format: my_format\n{loader_header}", "loaded.md"), task_name)
    assert loaded.labels == native.labels
    assert {s: len(e) for s, e in loaded.splits.items()} == {s: len(e) for s, e in native.splits.items()}
    assert all(loaded.splits.values())
    assert fingerprint(without_locations(loaded.splits)) == fingerprint(without_locations(native.splits))


def test_record_ids_and_error_locations_name_the_file_and_record(tmp_path):
    (tmp_path / "card_loaders.py").write_text(LOADERS)
    (tmp_path / "rows.csv").write_text("sequence,label\nMKVL,a\nMKVAL,b\n")
    loaded = read_task_data(write_task_card(tmp_path, "protein-classify", "format: my_format\nloader: card_loaders:table\nlabels: [a, b]\n"
                                                       "files: {data: rows.csv}\nsplits: {ratios: {test: 1.0}}"),
                   "protein-classify")
    assert sorted(e["id"] for e in loaded.splits["test"]) == ["rows.csv:1", "rows.csv:2"]  # record N of the file
    (tmp_path / "rows.csv").write_text("sequence,label\nMKVL,a\nMKVAL,c\n")
    with pytest.raises(UserError, match=r"rows\.csv:2: label 'c' is not one of \['a', 'b'\] or an index"):
        read_task_data(tmp_path / "card.md", "protein-classify")


def _loader_card(tmp_path, source: str, loader: str = "my_loader:read", task_name: str = "protein-classify", format="my_format"):
    (tmp_path / "my_loader.py").write_text(source)
    (tmp_path / "data.bin").write_bytes(b"\x00")
    return write_task_card(tmp_path, task_name, f"format: {format}\nloader: {loader}\nlabels: [a, b]\nfiles: {{data: data.bin}}")


@pytest.mark.parametrize("source, loader, message", [
    ("def read(path):\n    return []\n", "my_loader.read",
     r"card\.md: loader: 'my_loader\.read' is not module:function; e\.g\. `loader: my_loader:read`"),
    ("", "no_such_module:read", r"card\.md: loader: no module 'no_such_module': neither .*no_such_module\.py \(or a "
                                r"package folder\) nor an installed module; put no_such_module\.py beside the card or "
                                r"install it$"),
    ("def load(path):\n    return []\ndef helper():\n    pass\n", "my_loader:read",
     r"card\.md: loader: module 'my_loader' has no function 'read'; its functions: helper, load$"),
    ("import no_such_dependency\n", "my_loader:read",
     r"card\.md: loader: importing 'my_loader' failed: ModuleNotFoundError: No module named 'no_such_dependency' "
     r"\(.*my_loader\.py:1\)$"),
    ("def read(path):\n    return {}['sequence']\n", "my_loader:read",
     r"data\.bin: loader my_loader:read failed: KeyError: 'sequence' \(.*my_loader\.py:2\); fix the loader or the file$"),
    ("def read(path):\n    return {'sequence': ['MKVL'], 'label': ['a']}\n", "my_loader:read",
     r"data\.bin: loader my_loader:read returned a dict; return the file's records, a list of dicts"),
    ("def read(path):\n    return [['MKVL', 'a']]\n", "my_loader:read",
     r"data\.bin:1: loader my_loader:read gave a list, not a dict; each record is a dict \(field name -> value\)$"),
    ("def read(path):\n    return [{'sequence': 'MKVL', 'class': 'a'}]\n", "my_loader:read",
     r"data\.bin: column 'label' for fields\.label not found; the header has \['sequence', 'class'\]$"),
    ("def read(path, columns):\n    return []\n", "my_loader:read",
     r"card\.md: loader: my_loader:read takes \(path, columns\); a loader takes one argument, the data file's path$"),
    ("def read(path):\n    return []\n", "my_loader:read", r"data\.bin: loader my_loader:read gave no records for this file$"),
    ("def read(path):\n    raise SystemExit('stop')\n", "my_loader:read",
     r"data\.bin: loader my_loader:read failed: SystemExit: stop \(.*my_loader\.py:2\); fix the loader or the file$"),
    ("import sys\nsys.exit(3)\n", "my_loader:read",
     r"card\.md: loader: importing 'my_loader' failed: SystemExit: 3 \(.*my_loader\.py:2\)$"),
    ("def read(path):\n    return [\n", "my_loader:read",
     r"card\.md: loader: importing 'my_loader' failed: SyntaxError: .* \(.*my_loader\.py:2\)$"),
])
def test_a_broken_loader_is_one_line_naming_the_card_or_the_file(tmp_path, source, loader, message):
    card = _loader_card(tmp_path, source, loader)
    with pytest.raises(UserError, match=message):
        read_task_data(card, "protein-classify")


def test_positional_fields_are_refused_beside_a_loader(tmp_path):
    # a loader's records are dicts: a column position would pick whichever key came third
    card = _loader_card(tmp_path, "def read(path):\n    return []\n")
    card.write_text(card.read_text().replace("labels: [a, b]", "labels: [a, b]\nfields: {sequence: seq, label: 2}"))
    with pytest.raises(UserError, match=r"card\.md: fields\.label: 2 is a column position, and a loader's records "
                                        r"name their fields: give the name \(fields: \{label: NAME\}\) or leave it out$"):
        runner.load_card(str(card), get_task("protein-classify"))


def test_a_loader_package_and_its_helpers_import_from_the_card_folder_when_it_loads_and_when_it_runs(tmp_path):
    package = tmp_path / "lab_formats"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "columns.py").write_text("RENAME = {'seq': 'sequence', 'class': 'label'}\n")
    (package / "readers.py").write_text(
        "from .columns import RENAME\n"
        "def read(path):\n"
        "    import lab_helpers  # a sibling of the package, imported when the loader runs\n"
        "    return [{RENAME[k]: v for k, v in row.items()} for row in lab_helpers.rows(path)]\n")
    (tmp_path / "lab_helpers.py").write_text(
        "def rows(path):\n    return [dict(zip(('seq', 'class'), line.split())) for line in open(path).read().splitlines()]\n")
    (tmp_path / "train.txt").write_text("MKVL a\nMKVAL b\n" * 5)
    (tmp_path / "test.txt").write_text("MKVAAL a\nMKL b\n")
    card = write_task_card(tmp_path, "protein-classify", "format: lab_text\nloader: lab_formats.readers:read\nlabels: [a, b]\n"
                                               "splits: {train: train.txt, test: test.txt, validation_fraction: 0}")
    dataset = read_task_data(card, "protein-classify")
    assert [(e["seq"], e["label"]) for e in dataset.splits["test"]] == [("MKVAAL", 0), ("MKL", 1)]


def test_a_saved_dataset_folder_is_a_data_file_for_a_loader(tmp_path):
    for split, rows in (("train", 10), ("test", 4)):
        (tmp_path / f"{split}_set").mkdir()
        (tmp_path / f"{split}_set" / "rows.json").write_text(json.dumps([{"sequence": "MKVL", "label": i % 2} for i in range(rows)]))
    (tmp_path / "folder_loader.py").write_text("import json\ndef read(folder):\n    return json.loads((folder / 'rows.json').read_text())\n")
    card = write_task_card(tmp_path, "protein-classify", "format: saved_folders\nloader: folder_loader:read\nlabels: [a, b]\n"
                                               "splits: {train: train_set, test: test_set, validation_fraction: 0}")
    assert {split: len(examples) for split, examples in read_task_data(card, "protein-classify").splits.items()} == {"train": 10, "test": 4}


def test_an_edited_loader_and_another_cards_loader_of_the_same_name_are_each_read_afresh(tmp_path):
    (tmp_path / "rows.csv").write_text("x\n")
    header = "format: mine\nloader: same_name:read\nlabels: [a, b]\nfiles: {data: rows.csv}\nsplits: {ratios: {test: 1.0}}"
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, sequence in ((first, "MKVL"), (second, "MKAAL")):
        folder.mkdir()
        (folder / "rows.csv").write_text("x\n")
        (folder / "same_name.py").write_text(f"def read(path):\n    return [{{'sequence': '{sequence}', 'label': 'a'}}]\n")
        write_task_card(folder, "protein-classify", header)
    assert read_task_data(first / "card.md", "protein-classify").splits["test"][0]["seq"] == "MKVL"
    assert read_task_data(second / "card.md", "protein-classify").splits["test"][0]["seq"] == "MKAAL"
    (first / "same_name.py").write_text("def read(path):\n    return [{'sequence': 'MKVVVL', 'label': 'b'}]\n")
    os.utime(first / "same_name.py", (1, 1))  # another modification time, whatever the clock's resolution
    assert read_task_data(first / "card.md", "protein-classify").splits["test"][0]["seq"] == "MKVVVL"


def test_missing_values_are_missing_fields_and_unread_columns_may_hold_anything(tmp_path):
    # JSON tasks: None and NaN are an absent key, as in JSON lines
    (tmp_path / "problems.bin").write_bytes(b"")
    (tmp_path / "nan_loader.py").write_text(
        "import math\n"
        "def read(path):\n"
        "    return [{'question': f'{i} + 1?', 'answer': str(i + 1) if i else math.nan, 'id': None} for i in range(4)]\n")
    card = write_task_card(tmp_path, "reasoning-arithmetic", "format: mine\nloader: nan_loader:read\nfiles: {data: problems.bin}")
    with pytest.raises(UserError, match=r"problems\.bin:1: no answer; labelled data needs the gold answer$"):
        read_task_data(card, "reasoning-arithmetic")
    # a float necessity label reads as the table tasks' 1.0 does; a list column no one reads is no error
    (tmp_path / "review_loader.py").write_text(
        "import datetime\n"
        "def read(path):\n"
        "    return [{'patch': f'+x = {i}', 'y': float(i % 2), 'id': None, 'tags': ['a', 'b'],\n"
        "             'when': datetime.date(2024, 1, i + 1)} for i in range(10)]\n")
    card = write_task_card(tmp_path, "code-review-necessity", "format: mine\nloader: review_loader:read\nfiles: {data: problems.bin}\n"
                                                    "splits: {ratios: {test: 1.0}}", "reviews.md")
    examples = read_task_data(card, "code-review-necessity").splits["test"]
    assert sorted(e["label"] for e in examples) == [0] * 5 + [1] * 5
    assert sorted(e["id"] for e in examples) == [f"problems.bin:{n}" for n in sorted(range(1, 11), key=str)]
    (tmp_path / "rows.csv").write_text("x\n")
    table = _loader_card(tmp_path, "import datetime\ndef read(path):\n    return [{'sequence': 'MKVL', 'label': 'a', "
                                   "'go_terms': ['GO:1', 'GO:2'], 'when': datetime.date(2024, 1, 1)}] * 4\n")
    assert len(read_task_data(table, "protein-classify").splits["train"]) >= 1


def test_a_loaders_prints_go_to_stderr_not_into_the_results(tmp_path, capsys):
    card = _loader_card(tmp_path, "print('loading')\ndef read(path):\n    print('reading', path.name)\n"
                                  "    return [{'sequence': 'MKVL', 'label': 'a'}] * 10\n")
    read_task_data(card, "protein-classify")
    captured = capsys.readouterr()
    assert captured.out == "" and "loading" in captured.err and "reading data.bin" in captured.err


def test_a_loader_beside_a_format_the_task_reads_itself_is_refused(tmp_path):
    card = _loader_card(tmp_path, "def read(path):\n    return []\n", format="csv")
    with pytest.raises(UserError, match=r"card\.md: loader: protein-classify reads format 'csv' itself; leave `loader` "
                                        r"out, or set `format` to the name of the format your loader reads$"):
        runner.load_card(str(card), get_task("protein-classify"))


def test_values_from_numpy_and_pandas_read_as_their_python_values(tmp_path):
    pytest.importorskip("pandas")
    source = ("import numpy as np, pandas as pd\n"
              "def read(path):\n"
              "    return pd.DataFrame({'sequence': ['MKVL', 'MKVAL', 'MKVAAL'], 'label': np.array([0, 1, 1]),\n"
              "                         'weight': [1.5, float('nan'), True]})\n")
    dataset = read_task_data(_loader_card(tmp_path, source).parent / "card.md", "protein-classify")
    assert {e["seq"]: e["label"] for examples in dataset.splits.values() for e in examples} == \
        {"MKVL": 0, "MKVAL": 1, "MKVAAL": 1}


def test_a_run_on_a_loader_card_evaluates_from_its_run_folder_to_the_same_metrics(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "card_loaders.py").write_text(LOADERS)
    card = write_task_card(data, "protein-classify", f"format: my_format\n{_protein_classify(data)[1]}")
    run_dir = peftlab.run("protein-classify", data=str(card), backbone="tiny", out=tmp_path / "run",
                          overrides={"train.epochs": 1})
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    # the run's copy of the card finds the loader beside the original card
    assert peftlab.load(run_dir).evaluate("test") == saved


def test_the_cli_refuses_a_broken_loader_in_one_line_with_exit_code_2(tmp_path):
    card = _loader_card(tmp_path, "def read(path):\n    raise ValueError('unknown magic number')\n")
    result = run_peftlab("card", "validate", card)
    assert result.returncode == 2
    assert re.fullmatch(r"error: .*data\.bin: loader my_loader:read failed: ValueError: unknown magic number "
                        r"\(.*my_loader\.py:2\); fix the loader or the file\n", result.stderr)
