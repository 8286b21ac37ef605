"""Property-based tests of the protein readers: round trips, and no input makes them fail
with anything but a one-line UserError."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peftlab.domains.protein import data
from peftlab.shared.errors import UserError

RESIDUES = "ACDEFGHIKLMNPQRSTVWYXBZUO"
ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789_.|", min_size=1, max_size=12)
sequences = st.text(RESIDUES, min_size=1, max_size=200)
records = st.dictionaries(ids, sequences, min_size=1, max_size=8)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _write(text: str | bytes) -> Path:
    handle = tempfile.NamedTemporaryFile(delete=False, suffix=".txt")
    handle.write(text.encode() if isinstance(text, str) else text)
    handle.close()
    return Path(handle.name)


@SETTINGS
@given(records, st.integers(min_value=5, max_value=80), st.booleans())
def test_fasta_round_trips_whatever_the_line_width_and_case(proteins, width, lower):
    lines = []
    for name, sequence in proteins.items():
        lines.append(f">{name} some description")
        body = sequence.lower() if lower else sequence
        lines += [body[i:i + width] for i in range(0, len(body), width)]
    assert data.read_fasta(_write("\n".join(lines) + "\n")) == proteins


@SETTINGS
@given(records, st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7), st.sampled_from(["0", "1", "1.0", "0.0"])), min_size=1, max_size=20))
def test_pairs_read_back_the_written_ids_and_labels(proteins, rows):
    names = sorted(proteins)
    table = [(names[a % len(names)], names[b % len(names)], label) for a, b, label in rows]
    path = _write("".join(f"{a}\t{b}\t{label}\n" for a, b, label in table))
    examples = data.read_pairs(path, proteins, {}, ["no", "yes"])
    assert [(e["a"], e["b"], e["label"]) for e in examples] == [(a, b, int(float(label))) for a, b, label in table]
    assert all(e["a_seq"] == proteins[e["a"]] for e in examples)


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_fail_only_with_a_user_error(blob):
    path = _write(blob)
    for read in (data.read_fasta, lambda p: data.read_sequence_csv(p, {}, None)):
        try:
            read(path)
        except UserError as error:
            assert "\n" not in str(error) and str(path) in str(error)
