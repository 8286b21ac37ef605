"""Property-based tests of the point-cloud, medical-image, speech and code-review readers:
valid data written in the real format reads back equal, and arbitrary bytes give either
records or a one-line UserError naming the file, never another exception.
(The protein readers have their own: tests/test_protein_properties.py.)"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from peftlab.domains.code_review import data as code_data
from peftlab.domains.medical_imaging import data as image_data
from peftlab.domains.point_cloud import data as point_data
from peftlab.domains.speech_emotion import data as speech_data
from peftlab.shared.errors import UserError

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FOLDER = Path(tempfile.mkdtemp(prefix="peftlab-properties-"))


def _write(content: str | bytes, suffix: str) -> Path:
    handle = tempfile.NamedTemporaryFile(delete=False, suffix=suffix, dir=FOLDER)
    handle.write(content.encode() if isinstance(content, str) else content)
    handle.close()
    return Path(handle.name)


def _only_user_errors(read, path: Path) -> None:
    """`read(path)` returns, or fails with one line naming the file."""
    try:
        read(path)
    except UserError as error:
        assert "\n" not in str(error) and path.name in str(error), str(error)


# ----------------------------------------------------------------------------- point clouds

coordinates = st.floats(-1e3, 1e3, allow_nan=False, width=32)
clouds = hnp.arrays(np.float32, st.tuples(st.integers(2, 40), st.just(3)), elements=coordinates).filter(
    lambda p: np.ptp(p, axis=0).max() > 0)


def _ply(points: np.ndarray, binary: bool) -> bytes:
    header = (f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\ncomment made by a test\n"
              f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\n"
              f"property uchar red\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n").encode()
    if binary:
        rows = np.zeros(len(points), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
        rows["x"], rows["y"], rows["z"] = points.T
        return header + rows.tobytes()
    return header + "".join(f"{x!r} {y!r} {z!r} 7\n" for x, y, z in points.astype(float).tolist()).encode()


@SETTINGS
@given(clouds, st.sampled_from([".npy", ".ply-ascii", ".ply-binary", ".txt-comma", ".txt-space"]))
def test_point_files_round_trip(points, kind):
    if kind == ".npy":
        buffer = io.BytesIO()
        np.save(buffer, points)
        path = _write(buffer.getvalue(), ".npy")
    elif kind.startswith(".ply"):
        path = _write(_ply(points, binary=kind == ".ply-binary"), ".ply")
    else:
        separator = "," if kind == ".txt-comma" else " "
        path = _write("".join(separator.join(map(repr, row)) + ",0,0,1\n" for row in points.astype(float).tolist()), ".txt")
    np.testing.assert_array_equal(point_data.read_point_file(path), points)


@SETTINGS
@given(st.lists(clouds, min_size=1, max_size=6), st.data())
def test_points_npz_round_trips_clouds_labels_and_splits(cloud_list, draw):
    size = min(len(c) for c in cloud_list)
    stacked = np.stack([c[:size] for c in cloud_list]).astype(np.float32)
    stacked[:, :2] = [[0, 0, 0], [1, 1, 1]]  # no cut-down cloud is degenerate
    labels = np.array(draw.draw(st.lists(st.integers(0, 2), min_size=len(cloud_list), max_size=len(cloud_list))))
    splits = np.array(draw.draw(st.lists(st.integers(0, 1), min_size=len(cloud_list), max_size=len(cloud_list))))
    buffer = io.BytesIO()
    np.savez(buffer, points=stacked, label=labels, split=splits, class_names=np.array(["a", "b", "c"]))
    read, names = point_data.read_points_npz(_write(buffer.getvalue(), ".npz"))
    assert names == ["a", "b", "c"]
    for split, code in (("train", 0), ("test", 1)):
        chosen = np.flatnonzero(splits == code)
        assert [e["label"] for e in read[split]] == labels[chosen].tolist()
        for example, index in zip(read[split], chosen):
            np.testing.assert_array_equal(example["points"], stacked[index])


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([".npy", ".ply", ".off", ".txt", ".npz"]),
       st.sampled_from([b"", b"ply\nformat ascii 1.0\n", b"OFF\n", b"PK\x03\x04", b"\x93NUMPY"]))
def test_point_readers_take_any_bytes(blob, suffix, prefix):
    path = _write(prefix + blob, suffix)
    _only_user_errors(point_data.read_points_npz if suffix == ".npz" else point_data.read_point_file, path)


# ----------------------------------------------------------------------------- medical images

LABELS = ["benign", "malignant", "normal"]
names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_-/. ", min_size=1, max_size=20).map(str.strip).filter(bool)


def _csv(rows: list[list[str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


@SETTINGS
@given(st.lists(st.tuples(names, st.sampled_from(LABELS + ["0", "2"]), names), min_size=1, max_size=15))
def test_image_csv_round_trips_paths_labels_and_groups(rows):
    path = _write(_csv([["path", "label", "site"], *map(list, rows)]), ".csv")
    examples = image_data.read_image_csv(path, FOLDER, {}, LABELS, "site", multi_label=False)
    expected = [(p, LABELS.index(lab) if lab in LABELS else int(lab), site) for p, lab, site in rows]
    assert [(e["id"], e["label"], e["group"]) for e in examples] == expected
    assert all(e["path"] == str(FOLDER / e["id"]) for e in examples)


@SETTINGS
@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.just(8), st.just(8))), st.data())
def test_medmnist_npz_round_trips_images_and_labels(images, draw):
    labels = np.array(draw.draw(st.lists(st.integers(0, 2), min_size=len(images), max_size=len(images)))).reshape(-1, 1)
    buffer = io.BytesIO()
    np.savez(buffer, train_images=images, train_labels=labels, test_images=images[:1], test_labels=labels[:1])
    splits, read_labels = image_data.read_medmnist_npz(_write(buffer.getvalue(), ".npz"), LABELS, multi_label=False)
    assert read_labels == LABELS and set(splits) == {"train", "test"}
    assert [e["label"] for e in splits["train"]] == labels[:, 0].tolist()
    assert all(np.array_equal(e["image"], image) for e, image in zip(splits["train"], images))


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"", b"path,label\n", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n"]))
def test_image_readers_take_any_bytes(blob, prefix):
    _only_user_errors(lambda p: image_data.read_image_csv(p, FOLDER, {}, LABELS, None, False), _write(prefix + blob, ".csv"))
    _only_user_errors(lambda p: image_data.read_medmnist_npz(p, None, False), _write(prefix + blob, ".npz"))
    _only_user_errors(image_data.load_image, _write(prefix + blob, ".png"))


# ----------------------------------------------------------------------------- speech tables


@pytest.fixture(scope="module")
def clip() -> Path:
    import soundfile

    path = FOLDER / "clip.wav"
    soundfile.write(path, 0.3 * np.sin(np.linspace(0, 300, 4000)), 16000)
    return path


@SETTINGS
@given(rows=st.lists(st.tuples(st.sampled_from(["happy", "sad", "angry"]), names), min_size=1, max_size=12),
       tabs=st.booleans())
def test_audio_table_round_trips_labels_and_speakers(clip, rows, tabs):
    table = [["file", "emotion", "speaker"], *[[clip.name, label, speaker] for label, speaker in rows]]
    if tabs:
        path = _write("".join("\t".join(r) + "\n" for r in table), ".tsv")
    else:
        path = _write(_csv(table), ".csv")
    read = speech_data.read_table(path, FOLDER, {"path": "file", "label": "emotion"}, ["happy", "sad", "angry"],
                                  None, None, "error")
    assert [(e["label"], e["speaker"]) for e in read.examples] == [(["happy", "sad", "angry"].index(lab), s) for lab, s in rows]
    assert read.skipped == []


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"", b"path,label\n", b"RIFF\x00\x00\x00\x00WAVE"]))
def test_speech_readers_take_any_bytes(blob, prefix):
    _only_user_errors(lambda p: speech_data.read_table(p, FOLDER, {}, None, None, None, "error"), _write(prefix + blob, ".csv"))
    _only_user_errors(speech_data.audio_example, _write(prefix + blob, ".wav"))


# ----------------------------------------------------------------------------- code review

# Any text, line breaks of every kind included (JSON escapes \n; \x85, \u2028 or a form
# feed may stand raw), and a Tufano cell may hold any character but the tab and the
# newline that frame it (a line of blanks only is skipped as empty).
texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)
cells = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\t\n\r"), min_size=1, max_size=60).filter(str.strip)
code = texts.filter(str.strip)  # the code under review: an empty one is refused
comment = texts.filter(str.strip)  # the comment a model learns to write: an empty one is refused too


@SETTINGS
@given(st.lists(st.tuples(code, comment, texts), min_size=1, max_size=8), st.booleans())
def test_codereviewer_jsonl_round_trips_every_task(records, ascii_only):
    assume(not any(code_data.diff_marked(a, c) for a, _, c in records))  # CodeReviewer's markers come off (tested apart)
    lines = "".join(json.dumps({"patch": a, "y": i % 2, "msg": b, "old": a, "comment": b, "new": c},
                               ensure_ascii=ascii_only) + "\n" for i, (a, b, c) in enumerate(records))
    path = _write(lines, ".jsonl")
    assert [(e["patch"], e["label"]) for e in code_data.read_jsonl(path, "necessity", {})] == [(a, i % 2) for i, (a, _, _) in enumerate(records)]
    assert [(e["patch"], e["label"]) for e in code_data.read_jsonl(path, "comment", {})] == [(a, b) for a, b, _ in records]
    assert [(e["old"], e["comment"], e["label"]) for e in code_data.read_jsonl(path, "refine", {})] == list(records)


@SETTINGS
@given(st.lists(st.tuples(cells, cells), min_size=1, max_size=8))
def test_tufano_pairs_round_trip(pairs):
    comment = code_data.read_tufano_tsv(_write("".join(f"{a}\t{b}\n" for a, b in pairs), ".tsv"), "comment")
    assert [(e["patch"], e["label"]) for e in comment] == pairs


@SETTINGS
@given(st.binary(max_size=400), st.sampled_from([b"", b'{"patch": "', b"<code>"]))
def test_code_review_readers_take_any_bytes(blob, prefix):
    for kind in ("necessity", "comment", "refine"):
        _only_user_errors(lambda p, kind=kind: code_data.read_jsonl(p, kind, {}), _write(prefix + blob, ".jsonl"))
    for kind in ("comment", "refine"):
        _only_user_errors(lambda p, kind=kind: code_data.read_tufano_tsv(p, kind), _write(prefix + blob, ".tsv"))
