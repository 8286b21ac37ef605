"""Protein data: FASTA, D-SCRIPT pair TSVs, `sequence,label` CSVs, and demo generators.

Readers check what a user can get wrong and say where: letters outside ESM-2's
alphabet, empty sequences, pairs naming an id the FASTA lacks, labels outside the
card's list. Each error names the file and line.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from peftlab.shared import io
from peftlab.shared.data import header_column, label_cell, parse_label, table_rows
from peftlab.shared.errors import MissingField, UserError

from .backbones import AMINO_ACIDS

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"


def check_sequence(sequence: str, where: str) -> str:
    """The sequence upper-cased, less a final `*` (a stop), checked to be amino-acid letters."""
    sequence = sequence.strip().upper().removesuffix("*")
    if not sequence:
        raise UserError(f"{where}: empty sequence; remove the record or give its residues")
    bad = sorted(set(sequence) - AMINO_ACIDS)
    if bad:
        raise UserError(f"{where}: {not_amino_acids(bad)}; sequences use {''.join(sorted(AMINO_ACIDS))} (X for unknown residues)")
    return sequence


def not_amino_acids(bad: list[str]) -> str:
    letters = ", ".join(repr(c) for c in bad)
    return f"{letters} {'is not an amino-acid letter' if len(bad) == 1 else 'are not amino-acid letters'}"


def read_fasta(path: Path) -> dict[str, str]:
    """id -> sequence. The id is the header's first word."""
    records: dict[str, list[str]] = {}
    header_line: dict[str, int] = {}
    stop_line: dict[str, int] = {}
    current = None
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise io.not_utf8(path, error, "is this a FASTA file?") from None
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if not line[1:].strip():
                raise UserError(f"{path}:{number}: FASTA header without an id")
            current = line[1:].split()[0]
            if current in records:
                raise UserError(f"{path}:{number}: duplicate FASTA id {current!r} (first at line {header_line[current]})")
            records[current] = []
            header_line[current] = number
            continue
        if current is None:
            raise UserError(f"{path}:{number}: sequence before the first '>' header; is this a FASTA file?")
        bad = sorted(set(line.upper()) - AMINO_ACIDS - {"*"})
        if bad:
            raise UserError(f"{path}:{number}: {not_amino_acids(bad)} (record {current!r}); "
                            f"sequences use {''.join(sorted(AMINO_ACIDS))}")
        if "*" in line:
            stop_line.setdefault(current, number)
        records[current].append(line.upper())
    if not records:
        raise UserError(f"{path}: no FASTA records (lines starting with '>')")
    sequences = {}
    for name, parts in records.items():
        sequence = "".join(parts)
        sequence = sequence[:-1] if sequence.endswith("*") else sequence  # the stop codon's mark ends a protein
        if "*" in sequence:
            raise UserError(f"{path}:{stop_line[name]}: '*' (a stop) inside record {name!r}; a stop ends a protein: "
                            f"remove it, or cut the record there")
        sequences[name] = check_sequence(sequence, f"{path}:{header_line[name]} (record {name!r})")
    return sequences


def _column(fields: dict, key: str, default, header: list[str] | None, path: Path) -> int:
    spec = fields.get(key, default)
    if isinstance(spec, int):
        return spec
    index = None if header is None else header_column(header, spec, path)
    if index is None:
        raise MissingField(str(path), f"column {spec!r} for fields.{key} not found", f"the header has {header}", field=key)
    return index


def read_pairs(path: Path, sequences: dict[str, str], fields: dict, labels: list[str] | None,
               labelled: bool = True, rows: list[tuple[int, list[str]]] | None = None) -> list[dict]:
    """D-SCRIPT pair TSV: `protein_a<TAB>protein_b<TAB>label`, no header (or a named header).
    `rows`: a card loader's records of the file as a table (its header names the fields)."""
    header = None
    if rows is not None:
        header, rows = rows[0][1], rows[1:]
        fields = {"protein_a": "protein_a", "protein_b": "protein_b", "label": "label", **fields}
    else:
        rows = table_rows(path, "\t")
        if rows and _is_header(rows[0][1], fields, sequences, labels):
            header, rows = rows[0][1], rows[1:]
    a_col = _column(fields, "protein_a", 0, header, path)
    b_col = _column(fields, "protein_b", 1, header, path)
    label_col = _column(fields, "label", 2, header, path) if labelled else None
    examples = []
    for number, cells in rows:
        need = max(a_col, b_col, label_col if label_col is not None else 0) + 1
        if len(cells) < need:
            if label_col is not None and len(cells) > max(a_col, b_col):  # an unlabelled pair (predict says so)
                raise MissingField(f"{path}:{number}", f"expected {need} tab-separated columns, found {len(cells)}: the "
                                   f"pair has no label", f"add its label (fields.label is column {label_col})", field="label")
            raise UserError(f"{path}:{number}: expected {need} tab-separated columns, found {len(cells)}")
        a, b = cells[a_col].strip(), cells[b_col].strip()
        for name in (a, b):
            if name not in sequences:
                raise UserError(f"{path}:{number}: protein {name!r} is not in the FASTA file; add its sequence or drop the pair")
        example = {"id": f"{a}|{b}", "a": a, "b": b, "a_seq": sequences[a], "b_seq": sequences[b]}
        if label_col is not None:
            example["label"] = parse_label(cells[label_col], labels, f"{path}:{number}")
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no pairs")
    return examples


def read_sequence_csv(path: Path, fields: dict, labels: list[str] | None, labelled: bool = True,
                      rows: list[tuple[int, list[str]]] | None = None) -> list[dict]:
    """CSV with a header: a sequence column and (when labelled) a label column. `rows`: a
    card loader's records of the file as a table."""
    rows = table_rows(path, ",") if rows is None else rows
    if not rows:
        raise UserError(f"{path}: empty CSV file")
    header = [h.strip() for h in rows[0][1]]
    seq_col = _column(fields, "sequence", "sequence", header, path)
    label_col = _column(fields, "label", "label", header, path) if labelled else None
    if isinstance(fields.get("sequence"), int) and _reads_as_record(header, seq_col, label_col, labels):
        raise UserError(f"{path}:{rows[0][0]}: the first row reads as a record ({','.join(header)}), but a table's first "
                        f"row is its header: add a header row naming the columns (e.g. id,sequence,label)")
    # ids from `fields.id`, else from a column named `id`, else file:line; a table to
    # predict on may leave out the id column the training card named
    id_spec = fields.get("id", "id")
    if "id" in fields and (labelled or isinstance(id_spec, int) or id_spec in header):
        id_col = _column(fields, "id", None, header, path)
    else:
        id_col = header_column(header, id_spec, path)
    examples = []
    for number, cells in rows[1:]:
        if len(cells) != len(header):
            raise UserError(f"{path}:{number}: {len(cells)} columns, the header has {len(header)}")
        example = {"id": cells[id_col] if id_col is not None else f"{path.name}:{number}",
                   "seq": check_sequence(cells[seq_col], f"{path}:{number}")}
        if label_col is not None:
            example["label"] = label_cell(cells[label_col], labels, f"{path}:{number}")
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no data rows under the header")
    return examples


def nucleotide_note(sequences, where: str) -> str | None:
    """A note where every sequence spells nucleotides only: A, C, G and T are amino acids
    too, so a DNA file reads without error, and ESM-2 models proteins."""
    sequences = [s for s in sequences if s]
    if sequences and all(set(s.upper()) <= set("ACGTN") for s in sequences):
        return (f"{where}: every sequence holds only A, C, G, T (N): if these are DNA, translate them to protein "
                f"first; ESM-2 reads amino acids")
    return None


def repeated_ids_note(examples, where: str) -> str | None:
    """A note where rows share an id: prediction lines would name them alike."""
    counts = Counter(e["id"] for e in examples)
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if not repeated:
        return None
    return (f"{where}: {len(repeated)} id{'s are' if len(repeated) > 1 else ' is'} given to more than one row "
            f"(e.g. {repeated[0]!r}); their prediction lines share it")


HEADER_WORDS = {"id", "name", "sequence", "sequences", "seq", "label", "labels", "target", "class", "y"}
"""Column names that mark a row as a header whatever else it holds."""


def _reads_as_record(cells: list[str], seq_col: int, label_col: int | None, labels: list[str] | None) -> bool:
    """Whether a header row, its columns given by position, could be a record. With the
    card's `labels`, a valid sequence and label say so ("sequence" spells amino acids, but
    "label" is no class); without them (names are classes then, and predict reads no
    label), a valid sequence in capitals beside no column name: a header is words."""
    if seq_col >= len(cells) or any(cell.strip().lower() in HEADER_WORDS for cell in cells):
        return False
    sequence = cells[seq_col].strip()
    try:
        check_sequence(sequence, "")
        if label_col is not None and labels is not None:
            if label_col >= len(cells):
                return False
            parse_label(cells[label_col], labels, "")
            return True
    except UserError:
        return False
    return sequence == sequence.upper()


def _is_header(cells: list[str], fields: dict, sequences: dict[str, str], labels: list[str] | None) -> bool:
    """Whether a pairs file's first row names its columns: always where the card names a
    column, else where it has the protein columns, neither protein cell is a FASTA id and
    the label cell, if any, is no label (predict reads files with or without labels). A
    first pair with an unknown protein, or a row in another delimiter, is then data, and
    stops with the usual error instead of being taken for a header and dropped."""
    specs = {key: fields.get(key, default) for key, default in (("protein_a", 0), ("protein_b", 1), ("label", 2))}
    if any(isinstance(spec, str) for spec in specs.values()):
        return True
    if len(cells) <= max(specs["protein_a"], specs["protein_b"]):
        return False
    proteins = [cells[specs[key]].strip() for key in ("protein_a", "protein_b")]
    if any(protein in sequences for protein in proteins):
        return False
    if specs["label"] < len(cells):
        try:
            parse_label(cells[specs["label"]], labels, "")
            return False
        except UserError:
            pass
    return True


# ----------------------------------------------------------------------------- demo data
# Synthetic protein families, each marked by a planted motif. Whether two proteins
# interact is decided by their families (family 2k pairs with 2k+1), so a model must
# recognise each protein's motif to score a pair: learnable, but not by length or
# by the pair's composition alone.


def demo_proteins(families: int, per_family: int, seed: int) -> tuple[dict[str, str], dict[str, int]]:
    rng = np.random.default_rng(seed)
    residues = np.array(list(STANDARD_RESIDUES))
    motifs = ["".join(rng.choice(residues, size=6)) for _ in range(families)]
    sequences, family_of = {}, {}
    for family, motif in enumerate(motifs):
        for member in range(per_family):
            length = int(rng.integers(40, 90))
            body = list(rng.choice(residues, size=length))
            for _ in range(3):
                start = int(rng.integers(0, length - len(motif)))
                body[start:start + len(motif)] = motif
            name = f"fam{family}_p{member}"
            sequences[name] = "".join(body)
            family_of[name] = family
    return sequences, family_of


def demo_pairs(sizes: dict[str, int], families: int, per_family: int, positive_fraction: float, seed: int):
    sequences, family_of = demo_proteins(families, per_family, seed)
    names = sorted(sequences)
    rng = np.random.default_rng(seed + 1)
    partner = {f: f ^ 1 for f in range(families)}  # 0<->1, 2<->3, ...
    by_family = {f: [n for n in names if family_of[n] == f] for f in range(families)}
    splits = {}
    for split, count in sizes.items():
        examples = []
        for _ in range(count):
            a = names[int(rng.integers(len(names)))]
            if rng.random() < positive_fraction:
                pool = by_family[partner[family_of[a]]]
                label = 1
            else:
                pool = [n for n in names if family_of[n] != partner[family_of[a]]]
                label = 0
            b = pool[int(rng.integers(len(pool)))]
            examples.append({"id": f"{a}|{b}", "a": a, "b": b, "a_seq": sequences[a], "b_seq": sequences[b], "label": label})
        splits[split] = examples
    return splits


def demo_sequences(sizes: dict[str, int], families: int, seed: int):
    """Single sequences labelled by family (one motif per class)."""
    total = sum(sizes.values())
    sequences, family_of = demo_proteins(families, (total + families - 1) // families, seed)
    names = sorted(sequences)
    order = np.random.default_rng(seed + 2).permutation(len(names))
    examples = [{"id": names[i], "seq": sequences[names[i]], "label": family_of[names[i]]} for i in order]
    splits, start = {}, 0
    for split, count in sizes.items():
        splits[split] = examples[start:start + count]
        start += count
    return splits
