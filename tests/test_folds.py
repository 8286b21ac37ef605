"""`splits: {fold_by: COLUMN}`: one file whose column names each record's split, or the
values of each fold. Every task: the same records read through a fold column and through
one file per split give the same examples, so splitting, hold-out and per-cell checks are
the task's own."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile
import yaml
from conftest import JSON_RECORDS, read_task_data, without_locations, write_task_card
from peftlab.domains.video_text.data import write_video
from peftlab.pipelines import bench, runner
from peftlab.pipelines.cli import main
from peftlab.shared.data import fingerprint
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import get_task, list_tasks
from PIL import Image

SPLITS = ("train", "validation", "test")


def _table(header, rows, delimiter=","):
    return "".join(delimiter.join(cells) + "\n" for cells in [header, *rows])


def _tables(folder, header, rows, suffix=".csv", delimiter=","):
    """`rows` of (split, cells) -> all.csv with a `part` column, and one file per split
    without it; returns the two cards' data lines."""
    (folder / f"all{suffix}").write_text(_table([*header, "part"], [[*cells, split] for split, cells in rows], delimiter))
    for split in SPLITS:
        (folder / f"{split}{suffix}").write_text(_table(header, [cells for s, cells in rows if s == split], delimiter))
    return (f"files: {{data: all{suffix}}}\nsplits: {{fold_by: part}}",
            f"splits: {{{', '.join(f'{s}: {s}{suffix}' for s in SPLITS)}}}")


def _split_of(i):
    return SPLITS[0] if i % 5 < 3 else SPLITS[1 + i % 5 % 3]


def _protein_classify(folder):
    rows = [(_split_of(i), [f"MKV{'A' * (i % 7)}L{'G' * (i % 3)}", "ab"[i % 2]]) for i in range(40)]
    fold, per_split = _tables(folder, ["sequence", "label"], rows)
    return "format: csv\nlabels: [a, b]", fold, per_split


def _protein_ppi(folder):
    (folder / "p.fasta").write_text("".join(f">p{i}\nMKV{'A' * i}L\n" for i in range(12)))
    pairs = [(a, b) for a in range(12) for b in range(a + 1, 12)]
    rows = [(_split_of(i), [f"p{a}", f"p{b}", str((a + b) % 2)]) for i, (a, b) in enumerate(pairs)]
    fold, per_split = _tables(folder, ["protein_a", "protein_b", "label"], rows, ".tsv", "\t")
    fold = fold.replace("files: {data: all.tsv}", "files: {sequences: p.fasta, pairs: all.tsv}")
    return "format: fasta+pairs_tsv", fold, f"files: {{sequences: p.fasta}}\n{per_split}"


def _medical(folder):
    for i in range(30):
        Image.new("RGB", (8, 8), (8 * i, 0, 0)).save(folder / f"x{i}.png")
    rows = [(_split_of(i), [f"x{i}.png", ["benign", "malignant"][i % 2], f"site{i % 3}"]) for i in range(30)]
    fold, per_split = _tables(folder, ["path", "label", "site"], rows)
    return "format: csv\ngroup_by: site", fold, per_split


def _speech(folder):
    for i in range(20):
        soundfile.write(folder / f"c{i}.wav", np.sin(np.arange(1600) * (i + 1) / 50).astype(np.float32), 16000)
    rows = [(_split_of(i), [f"c{i}.wav", ["neutral", "angry"][i % 2], f"s{i % 5}"]) for i in range(20)]
    fold, per_split = _tables(folder, ["path", "label", "speaker"], rows)
    return "format: audio_csv\nlabels: [neutral, angry]", fold, per_split


def _pointcloud(folder):
    """Clouds come in formats of their own: a loader's records carry the fold."""
    (folder / "cloud_loader.py").write_text(
        "import numpy as np\n\ndef read(path):\n    arrays = np.load(path)\n"
        "    return [{'points': p, 'label': str(l), 'id': str(n), **({'part': str(s)} if 'part' in arrays else {})}\n"
        "            for p, l, n, s in zip(arrays['points'], arrays['label'], arrays['name'],\n"
        "                                  arrays['part'] if 'part' in arrays else arrays['name'])]\n")
    rng = np.random.default_rng(0)
    parts = [_split_of(i) for i in range(36)]
    points, labels = rng.normal(size=(36, 64, 3)).astype(np.float32), np.array([["chair", "lamp", "table"][i % 3] for i in range(36)])
    names = np.array([f"c{i}" for i in range(36)])
    np.savez(folder / "all.npz", points=points, label=labels, name=names, part=np.array(parts))
    for split in SPLITS:
        keep = np.array([p == split for p in parts])
        np.savez(folder / f"{split}.npz", points=points[keep], label=labels[keep], name=names[keep])
    return ("format: my_clouds\nloader: cloud_loader:read", "files: {data: all.npz}\nsplits: {fold_by: part}",
            "splits: {train: train.npz, validation: validation.npz, test: test.npz}")


def _json_lines(record):
    def write(folder):
        records = [(_split_of(i), record(i)) for i in range(30)]
        (folder / "all.jsonl").write_text("".join(json.dumps({**r, "part": split}) + "\n" for split, r in records))
        for split in SPLITS:
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for s, r in records if s == split))
        return ("format: jsonl", "files: {data: all.jsonl}\nsplits: {fold_by: part}",
                "splits: {train: train.jsonl, validation: validation.jsonl, test: test.jsonl}")
    return write


def _video(folder):
    for v in range(10):
        write_video(folder / f"v{v}.mp4", np.full((2, 8, 8, 3), 10 * v, np.uint8))  # reading decodes every video
    rows = [(_split_of(v), [f"v{v}", f"a clip {v} take {c}"]) for v in range(10) for c in range(2)]
    fold, per_split = _tables(folder, ["video", "caption"], rows)
    return "format: csv", fold, per_split


CASES = {
    "protein-classify": _protein_classify,
    "protein-ppi": _protein_ppi,
    "medical-classify": _medical,
    "speech-emotion": _speech,
    "pointcloud-classify": _pointcloud,
    **{name: _json_lines(record) for name, record in JSON_RECORDS.items()},
    "video-text-retrieval": _video,
    "video-caption": _video,
}


def test_every_task_has_a_case():
    assert set(CASES) == {task.name for task in list_tasks()}


@pytest.mark.parametrize("task_name", sorted(CASES))
def test_a_fold_column_reads_as_one_file_per_split(task_name, tmp_path):
    common, fold, per_split = CASES[task_name](tmp_path)
    by_column = read_task_data(write_task_card(tmp_path, task_name, f"{common}\n{fold}"), task_name)
    by_files = read_task_data(write_task_card(tmp_path, task_name, f"{common}\n{per_split}", "files.md"), task_name)
    assert list(by_column.splits) == list(SPLITS) and all(by_column.splits.values())
    assert by_column.labels == by_files.labels
    assert fingerprint(without_locations(by_column.splits)) == fingerprint(without_locations(by_files.splits))


@pytest.mark.parametrize("task_name", ["protein-classify", "code-refine", "speech-emotion"])
def test_folds_by_value_hold_validation_out_of_the_rest_as_per_split_files_do(task_name, tmp_path):
    """`test: [..]` lists values: those rows test; the rest train, with validation held
    out of them as it is held out of a per-split train file (same seed, same rows)."""
    common, fold, _ = CASES[task_name](tmp_path)
    card = write_task_card(tmp_path, task_name, f"{common}\n{fold}")
    dataset = read_task_data(card, task_name, {"test": ["validation", "test"], "seed": 4})
    # the same rows as files: train = every row not in the test fold, in file order
    source = next(tmp_path.glob("all.*"))
    lines = source.read_text().splitlines()
    if source.suffix == ".jsonl":
        rest = [line for line in lines if json.loads(line)["part"] == "train"]
        held = [line for line in lines if json.loads(line)["part"] != "train"]
    else:
        rest = [lines[0]] + [line for line in lines[1:] if line.endswith(",train")]
        held = [lines[0]] + [line for line in lines[1:] if not line.endswith(",train")]
    (tmp_path / f"rest{source.suffix}").write_text("\n".join(rest) + "\n")
    (tmp_path / f"held{source.suffix}").write_text("\n".join(held) + "\n")
    files = f"splits: {{train: rest{source.suffix}, test: held{source.suffix}, seed: 4}}"
    expected = read_task_data(write_task_card(tmp_path, task_name, f"{common}\n{files}", "files.md"), task_name)
    assert set(dataset.splits) == set(SPLITS) and dataset.splits["validation"]
    assert fingerprint(without_locations(dataset.splits)) == fingerprint(without_locations(expected.splits))
    assert len(dataset.splits["test"]) == len(held) - (source.suffix != ".jsonl")  # less the header row


def _fold_card(tmp_path, splits: str, table: str | None = None, task_name="protein-classify"):
    (tmp_path / "all.csv").write_text(table or "sequence,label,fold\n" + "".join(
        f"MKV{'A' * i}L,{'ab'[i % 2]},{1 + i % 3}\n" for i in range(12)))
    return write_task_card(tmp_path, task_name, f"format: csv\nlabels: [a, b]\nfiles: {{data: all.csv}}\nsplits: {splits}")


def test_card_validate_says_when_a_fold_card_gives_no_test_split(tmp_path, capsys):
    card = _fold_card(tmp_path, "{fold_by: fold, validation: [3]}")
    assert main(["card", "validate", str(card)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"] == {"train": 8, "validation": 4}
    assert "the card gives no test split: a run then needs eval.splits=[validation]; give it one (a file, a ratio, or " \
           "with fold_by, test: [VALUES])" in summary["notes"]


def test_a_fold_per_run_and_per_sweep_cell(tmp_path):
    card = _fold_card(tmp_path, "{fold_by: fold, test: [3], validation: [2]}")
    dataset = read_task_data(card, "protein-classify")
    assert {split: len(examples) for split, examples in dataset.splits.items()} == {"train": 4, "validation": 4, "test": 4}
    other = read_task_data(card, "protein-classify", {"test": "1", "validation": [3]})  # a value as --folds gives it: text
    assert [e["id"] for e in other.splits["test"]] == [f"all.csv:{n}" for n in (2, 5, 8, 11)]
    assert [e["id"] for e in other.splits["validation"]] == [f"all.csv:{n}" for n in (4, 7, 10, 13)]
    assert card.read_text().count("test: [3]") == 1  # the card itself is unchanged


@pytest.mark.parametrize("splits, table, message", [
    ("{fold_by: fold}", None, r"all\.csv:2: fold is '1', not a split name \(train, validation or valid, test\); the "
                              r"column holds 1, 2, 3: list the values that test \(and validate\), e\.g\. splits: "
                              r"\{fold_by: fold, test: \[3\]\}, and the rest trains$"),
    ("{fold_by: part}", "sequence,label,part\nMKVL,a,train\nMKVAL,b,holdout\n",  # a name: no value guessed
     r"all\.csv:3: part is 'holdout', not a split name .* e\.g\. splits: \{fold_by: part, test: \[VALUE\]\}"),
    ("{fold_by: part}", "sequence,label,part\nMKVL,a,training\nMKVAL,b,testing\nMKVG,a,validating\n", None),
    ("{fold_by: part, validation: [valid]}", "sequence,label,part\nMKVL,a,train\nMKVAL,b,valid\nMKVG,a,Test\n",
     r"all\.csv:4: part is 'Test', a split's name that splits\.test and splits\.validation do not list, so it would "
     r"train; list it \(e\.g\. test: \[Test\]\), or leave test and validation out to read the cells as split names$"),
    ("{fold_by: part, test: [b]}", "sequence,label,part\nMKVL,a,a\nMKVAL,b,b\nMKVG,a,test_set\n",
     r"all\.csv:4: part is 'test_set', a split's name .* \(e\.g\. test: \[test_set\]\)"),
    ("{fold_by: fold, test: [1, null]}", None, r"card\.md: splits\.test lists an empty value \(None\); list fold "
                                               r"values, e\.g\. test: \[5\]$"),
    ("{fold_by: fold, validation: ' '}", None, r"card\.md: splits\.validation lists an empty value \(' '\)"),
    ("{fold_by: fold, test: [010]}", "sequence,label,fold\nMKVL,a,008\nMKVAL,b,010\n",
     r"card\.md: splits\.test names fold '10', which no record has; the data has \['008', '010'\] \(write it quoted, "
     r"test: \['010'\], to keep its zeros\)$"),
    ("{fold_by: fold, test: [1]}", "sequence,label,fold\n", r"all\.csv: no records to divide by splits\.fold_by$"),
    ("{fold_by: fold, test: [1]}", "sequence,label,fold\nMKVL,a,1\nMKVAL,b,\n",
     r"all\.csv:3: no 'fold' value; splits\.fold_by: fold needs one in every record$"),
    ("{fold_by: fold, test: [1]}", "sequence,label\nMKVL,a\n",
     r"all\.csv: splits\.fold_by names column 'fold', which the header lacks \(sequence, label\); name one of them "
     r"\(fold_by needs a header row naming the column\)$"),
    ("{fold_by: fold, test: [7]}", None, r"card\.md: splits\.test names fold '7', which no record has; the data has "
                                         r"\['1', '2', '3'\]$"),
    ("{fold_by: fold, test: [05]}", "sequence,label,fold\nMKVL,a,04\nMKVAL,b,05\n",
     r"card\.md: splits\.test names fold '5', which no record has; the data has \['04', '05'\] \(write it quoted, "
     r"test: \['05'\], to keep its zeros\)$"),
    ("{fold_by: fold, test: [1], validation: [1]}", None,
     r"card\.md: splits names fold '1' for both test and validation"),
    ("{fold_by: fold, test: [1, 2], validation: [3]}", None,
     r"card\.md: splits\.fold_by: fold leaves no record to train on: every fold value is in test or validation$"),
    ("{fold_by: fold, test: [1], validation: [2], validation_fraction: 0.2}", None,
     r"card\.md: splits\.validation_fraction holds validation out of train, but the data gives a validation split"),
    ("{fold_by: fold, test: [1], ratios: {train: 0.8, test: 0.2}}", None,
     r"card\.md: splits\.ratios beside splits\.fold_by: the fold column makes the splits \(every record not in test or "
     r"validation trains\); remove splits\.ratios$"),
    ("{fold_by: fold, train: [2], test: [1]}", None, r"card\.md: splits\.train beside splits\.fold_by"),
    ("{fold_by: fold, test: []}", None, r"card\.md: splits\.test names no fold value; list the values that make test"),
    ("{fold_by: fold, test: ~}", None, r"card\.md: splits\.test names no fold value"),
    ("{fold_by: fold, test: [[1, 2]]}", None, r"card\.md: splits\.test lists \[1, 2\]; list fold values"),
    ("{fold_by: fold, test: test.csv}", None, r"card\.md: splits\.test = test\.csv is a file, but beside splits\.fold_by "
                                              r"test lists fold values; give one file \(files\.data\) with the fold "
                                              r"column, or leave fold_by out to read one file per split$"),
    ("{fold_by: [fold], test: [1]}", None, r"card\.md: splits\.fold_by names the column that holds each record's split"),
])
def test_fold_mistakes_are_one_line_naming_the_place(tmp_path, splits, table, message):
    card = _fold_card(tmp_path, splits, table)
    if message is None:  # training, testing, validating name the splits too
        splits = read_task_data(card, "protein-classify").splits
        assert {name: [e["id"] for e in examples] for name, examples in splits.items()} == {
            "train": ["all.csv:2"], "test": ["all.csv:3"], "validation": ["all.csv:4"]}
        return
    with pytest.raises(UserError, match=message):
        read_task_data(card, "protein-classify")


def test_a_json_record_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "all.jsonl").write_text('{"question": "1 + 1?", "answer": "2", "part": "train"}\n[1, 2]\n')
    card = write_task_card(tmp_path, "reasoning-arithmetic", "format: jsonl\nfiles: {data: all.jsonl}\nsplits: {fold_by: part}")
    with pytest.raises(UserError, match=r"all\.jsonl:2: a list, not a record \(a JSON object of named fields\)$"):
        read_task_data(card, "reasoning-arithmetic")


@pytest.mark.parametrize("task_name, header", [
    ("medical-classify", "format: imagefolder\npath: images"),
    ("video-caption", "format: msrvtt_json\nfiles: {annotations: a.json}"),
    ("pointcloud-classify", "format: points_npz\nfiles: {data: a.npz}"),
])
def test_fold_by_is_refused_where_the_format_has_no_records_to_divide(tmp_path, task_name, header):
    card = write_task_card(tmp_path, task_name, f"{header}\nsplits: {{fold_by: part}}")
    loader_format = get_task(task_name).loader_format
    with pytest.raises(UserError, match=rf"card\.md: splits\.fold_by divides the records of one {loader_format} file by "
                                        rf"a column; format '{header.split()[1]}' has none"):
        runner.load_card(str(card), get_task(task_name))


def test_a_run_override_that_adds_fold_by_to_a_demo_says_so(tmp_path, capsys):
    assert main(["run", "protein-classify", "--demo", "--out", str(tmp_path / "run"), "data.splits.fold_by=part"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and re.search(r"splits\.fold_by divides the records of one csv file by a column; format "
                                         r"'demo' has none .*\(the card's splits with data\.splits fold_by=part\)$",
                                         error[0]), error
    assert not (tmp_path / "run").exists()


def test_bench_runs_one_cell_per_fold_of_the_column(tmp_path):
    """Cross-validation on a table with a fold column: `--folds test=1,2,3`, each cell
    testing on its fold (and validating on what the card says) and training on the rest."""
    from peftlab.domains.protein.data import demo_sequences

    examples = demo_sequences({"train": 60}, 2, seed=0)["train"]
    (tmp_path / "all.csv").write_text("sequence,label,fold\n" + "".join(
        f"{e['seq']},{e['label']},{1 + i % 3}\n" for i, e in enumerate(examples)))
    card = write_task_card(tmp_path, "protein-classify", "format: csv\nlabels: [a, b]\nfiles: {data: all.csv}\n"
                                               "splits: {fold_by: fold, test: [1], validation_fraction: 0.25}")
    out = bench.bench("protein-classify", "bitfit", seeds=1, data=str(card), backbone="tiny", out=tmp_path / "sweep",
                      full=False, overrides=["train.epochs=2"], folds="test=1,2,3", isolate=False)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(row["fold"], row["status"]) for row in rows] == [(f"test={k}", "finished") for k in (1, 2, 3)]
    tested = []
    for row, fold in zip(rows, (1, 2, 3)):
        run = out / row["run_dir"]
        assert yaml.safe_load((run / "run.yaml").read_text())["data"]["splits"] == {"test": str(fold)}
        ids = {json.loads(line)["id"] for line in (run / "predictions" / "test.jsonl").read_text().splitlines()}
        assert ids == {f"all.csv:{i + 2}" for i in range(60) if 1 + i % 3 == fold}
        tested.append(ids)
    assert set.union(*tested) == {f"all.csv:{i + 2}" for i in range(60)}  # every row tested once
    # another card is read with its own splits: the cell's fold (data.splits.test) was the training card's
    from peftlab.pipelines.predictor import Predictor

    other = write_task_card(tmp_path, "protein-classify", "format: csv\nlabels: [a, b]\nfiles: {data: all.csv}\n"
                                                          "splits: {ratios: {test: 1.0}}", "other.md")
    assert Predictor(out / rows[0]["run_dir"]).evaluate("test", card=str(other)).keys() >= {"accuracy", "macro_f1"}


def test_a_video_or_patient_in_two_splits_is_noted(tmp_path):
    """Given splits (a fold column, or files) may put one video's captions, or one
    patient's images, in train and test: the run says so."""
    for v in range(4):
        write_video(tmp_path / f"v{v}.mp4", np.zeros((2, 8, 8, 3), np.uint8))
    (tmp_path / "all.csv").write_text("video,caption,part\nv0,a,train\nv0,b,test\nv1,c,train\nv2,d,validation\nv3,e,test\n")
    card = write_task_card(tmp_path, "video-text-retrieval", "format: csv\nfiles: {data: all.csv}\nsplits: {fold_by: part}")
    notes = read_task_data(card, "video-text-retrieval").notes
    assert "1 video has captions in more than one split (e.g. v0): results on them are not on unseen videos" in notes
    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"x{i}.png")
    (tmp_path / "images.csv").write_text("path,label,patient,part\n" + "".join(
        f"x{i}.png,{'ab'[i % 2]},p{i // 2},{['train', 'train', 'test'][i % 3]}\n" for i in range(6)))
    card = write_task_card(tmp_path, "medical-classify", "format: csv\nlabels: [a, b]\nfiles: {data: images.csv}\n"
                                               "fields: {patient: patient}\nsplits: {fold_by: part, validation_fraction: 0}")
    notes = read_task_data(card, "medical-classify").notes
    assert "2 patients have images in more than one split (e.g. p1, p2): results on them are not on unseen patients" in notes
    (tmp_path / "images.csv").write_text("path,label,patient,part\n" + "".join(
        f"x{i}.png,{'ab'[i % 2]},p{i // 2},{['train', 'test'][i // 4]}\n" for i in range(6)))
    assert not any("patients" in note for note in read_task_data(card, "medical-classify").notes)


def test_speakers_a_fold_column_puts_in_two_splits_are_noted(tmp_path):
    common, fold, per_split = CASES["speech-emotion"](tmp_path)
    for name in ("all.csv", "train.csv", "test.csv"):  # one speaker for train and test clips
        (tmp_path / name).write_text((tmp_path / name).read_text().replace(",s4", ",s0"))
    notes = read_task_data(write_task_card(tmp_path, "speech-emotion", f"{common}\n{fold}"), "speech-emotion").notes
    assert "speakers ['s0'] are in more than one split (splits.fold_by: part): results are not speaker-independent" \
        in notes
    notes = read_task_data(write_task_card(tmp_path, "speech-emotion", f"{common}\n{per_split}", "files.md"),
                           "speech-emotion").notes
    assert "speakers ['s0'] are in more than one split (the split files): results are not speaker-independent" in notes


def test_fold_values_compare_as_numbers_and_split_names_in_any_case(tmp_path):
    """5, "5", 5.0 and "5.0" are one fold (a float column writes 5.0); "05" keeps its zero;
    cells that name splits may be Train, TEST, valid or dev."""
    values = [5, "5", 5.0, "5.0", 4, "05"]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1), "fold": v}) + "\n"
                                                for i, v in enumerate(values * 3)))
    card = write_task_card(tmp_path, "reasoning-arithmetic", "format: jsonl\nfiles: {data: all.jsonl}\n"
                                                             "splits: {fold_by: fold, test: [5.0], validation: ['05']}")
    dataset = read_task_data(card, "reasoning-arithmetic")
    assert {split: len(examples) for split, examples in dataset.splits.items()} == {"train": 3, "validation": 3, "test": 12}
    # booleans are one value however written (YAML true, JSON true, "True"); decimals by value (5.5, "5.50")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1), "held": v}) + "\n"
                                              for i, v in enumerate([True, "true", "True", False, 5.5, "5.50", 5.25])))
    card = write_task_card(tmp_path, "reasoning-arithmetic", "format: jsonl\nfiles: {data: b.jsonl}\n"
                                                             "splits: {fold_by: held, test: [true], validation: [5.5]}", "b.md")
    dataset = read_task_data(card, "reasoning-arithmetic")
    assert {split: len(examples) for split, examples in dataset.splits.items()} == {"train": 2, "validation": 2, "test": 3}
    (tmp_path / "named.csv").write_text("sequence,label,part\n" + "".join(
        f"MKV{'A' * i}L,{'ab'[i % 2]},{part}\n" for i, part in enumerate(["Train", " train", "TEST", "valid", "dev", "Validation"])))
    card = write_task_card(tmp_path, "protein-classify", "format: csv\nlabels: [a, b]\nfiles: {data: named.csv}\n"
                                                         "splits: {fold_by: part}", "named.md")
    dataset = read_task_data(card, "protein-classify")
    assert {split: [e["id"] for e in examples] for split, examples in dataset.splits.items()} == {
        "train": ["named.csv:2", "named.csv:3"], "validation": ["named.csv:5", "named.csv:6", "named.csv:7"],
        "test": ["named.csv:4"]}


def test_fold_keys_by_position_and_misspelt_json_keys(tmp_path):
    (tmp_path / "all.jsonl").write_text('{"question": "1 + 1?", "answer": "2", "split": "train"}\n')
    card = write_task_card(tmp_path, "reasoning-arithmetic", "format: jsonl\nfiles: {data: all.jsonl}\nsplits: {fold_by: splti}")
    with pytest.raises(UserError, match=r"all\.jsonl: splits\.fold_by names key 'splti', which no record has \(did you "
                                        r"mean 'split'\?\); known: answer, question, split$"):
        read_task_data(card, "reasoning-arithmetic")
    common, fold, _ = CASES["speech-emotion"](tmp_path)  # header path,label,speaker,part: part is column 3
    card = write_task_card(tmp_path, "speech-emotion", f"{common}\nfields: {{session: 3}}\nfiles: {{data: all.csv}}\n"
                                                       "splits: {fold_by: session}", "speech.md")
    assert set(read_task_data(card, "speech-emotion").splits) == set(SPLITS)


def test_a_fold_override_needs_a_fold_column_and_null_takes_a_card_key_away(tmp_path):
    card = _fold_card(tmp_path, "{ratios: {train: 0.5, validation: 0.25, test: 0.25}}")
    with pytest.raises(UserError, match=r"^data\.splits\.test=1: .*card\.md has no splits\.fold_by, so splits\.test names "
                                        r"a file, and there is none there; to pick fold values add fold_by: COLUMN"):
        read_task_data(card, "protein-classify", {"test": "1"})
    dataset = read_task_data(card, "protein-classify", {"ratios": None, "fold_by": "fold", "test": [1]})
    assert len(dataset.splits["test"]) == 4
    with pytest.raises(UserError, match=r"format 'demo' has none \(a demo generates its own splits\)"):
        runner.load_card(str(write_task_card(tmp_path, "medical-classify", "format: demo\nsplits: {fold_by: x}", "d.md")),
                         get_task("medical-classify"))


def test_eval_and_predict_on_the_run_s_own_card_keep_the_run_s_fold(tmp_path, capsys):
    """A run trained on one fold (data.splits.test=[2]) evaluates and predicts on that fold
    whether its card is named or not (the card's own default fold trained it); another
    card is read with its own splits, and the run says so."""
    from peftlab import run as run_pipeline
    from peftlab.pipelines.predictor import Predictor

    card = _fold_card(tmp_path, "{fold_by: fold, test: [3]}")
    run_dir = run_pipeline("protein-classify", data=str(card), backbone="tiny", out=tmp_path / "run",
                           overrides={"train.epochs": 1, "data.splits": {"test": [2], "validation_fraction": 0}})
    fold2 = [f"all.csv:{n}" for n in (3, 6, 9, 12)]
    tested = [json.loads(line)["id"] for line in (run_dir / "predictions" / "test.jsonl").read_text().splitlines()]
    assert tested == fold2
    predictor = Predictor(run_dir)
    saved = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert predictor.evaluate("test", card=str(card)) == predictor.evaluate("test") == saved
    copy = tmp_path / "moved"  # the card copied beside data that moved: the same card, by its text
    copy.mkdir()
    (copy / "all.csv").write_text((tmp_path / "all.csv").read_text())
    (copy / "card.md").write_text(card.read_text())
    assert predictor.evaluate("test", card=str(copy / "card.md")) == saved
    # the run's own copy, named: its relative paths start at the original card's folder, not the run's
    assert predictor.evaluate("test", card=str(run_dir / "card.md")) == saved
    assert [row["id"] for row in predictor.predict(str(run_dir / "card.md"), split="test")] == fold2
    assert [row["id"] for row in predictor.predict(str(card), split="test")] == fold2
    capsys.readouterr()
    other = write_task_card(tmp_path, "protein-classify", "format: csv\nlabels: [a, b]\nfiles: {data: all.csv}\n"
                                                          "splits: {fold_by: fold, test: [3], seed: 1}", "other.md")
    assert [row["id"] for row in predictor.predict(str(other), split="test")] == [f"all.csv:{n}" for n in (4, 7, 10, 13)]
    assert f"note: run trained with data.splits test=[2], validation_fraction=0 on {card}; {other} is another card, " \
           f"read with its own splits" in capsys.readouterr().err


def test_bench_folds_are_checked_before_training_and_need_no_default_fold(tmp_path, capsys):
    (tmp_path / "all.csv").write_text("sequence,label,fold\n" + "".join(
        f"MKV{'A' * i}L,{'ab'[i % 2]},{1 if i < 16 else 2}\n" for i in range(20)))
    card = write_task_card(tmp_path, "protein-classify", "format: csv\nlabels: [a, b]\nfiles: {data: all.csv}\n"
                                                         "splits: {fold_by: fold}")  # no test: the folds name it
    argv = ["bench", "protein-classify", "--methods", "bitfit", "--no-full", "--data", str(card), "--backbone", "tiny",
            "--out", str(tmp_path / "sweep"), "train.epochs=1"]
    # fold test=1 leaves 4 training rows: 10 % of them for validation rounds to none; found before any training
    assert main([*argv, "--folds", "test=2,1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"^error: --folds test=1: .*card\.md: split 'validation' is empty: .* \(train 4, test 16, "
                     r"validation 0\)", error), error
    assert not (tmp_path / "sweep").exists()
    assert main([*argv, "--folds", "test=2", "data.splits.validation_fraction=0.25"]) == 0
    err = capsys.readouterr().err
    assert "note: --folds test=2: validation: 4 training sequences held out" in err
