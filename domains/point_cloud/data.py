"""Point-cloud data: the field's formats, normalisation, augmentation, and the demo.

Readers return float32 (N, 3) xyz arrays and check what a user can get wrong, naming
the file: NaN/inf coordinates, empty or degenerate meshes, malformed headers, vertex
indices out of range. Formats:

- ModelNet `.off` meshes (Princeton), sampled to points uniformly over the surface
  (triangles chosen in proportion to their area, then uniform barycentric points);
- ModelNet40 resampled `.txt` (`x,y,z,nx,ny,nz` per line) with
  `modelnet40_shape_names.txt` and `modelnet40_{train,test}.txt`;
- ScanObjectNN `.h5` (`data` (N, P, 3+), `label` (N,));
- plain `.npy` (N, >=3) and `.ply` (ASCII or binary little-endian): a cloud's vertices,
  or, for a mesh (a `face` element), its surface sampled as `.off` is;
- a packed `.npz` (`points`, `label`, `split`, `class_names`).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
from peftlab.shared.data import parse_label
from peftlab.shared.errors import MissingField, UserError

POINT_SUFFIXES = (".npy", ".ply", ".off", ".txt")


def check_points(points: np.ndarray, where: str) -> np.ndarray:
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] < 3:
        raise UserError(f"{where}: expected points of shape (N, 3+) (x, y, z first), got {points.shape}")
    if points.shape[0] in (3, 4, 6) and points.shape[1] > 16:  # (xyz[, w | normals], N): no point has 17+ values
        raise UserError(f"{where}: {points.shape[0]} points of {points.shape[1]} values each; this looks like "
                        f"channels-first (C, N): store the transpose, shape (N, 3+)")
    points = points[:, :3].astype(np.float32)
    if len(points) == 0:
        raise UserError(f"{where}: no points")
    if not np.isfinite(points).all():
        bad = int(np.flatnonzero(~np.isfinite(points).all(axis=1))[0])
        raise UserError(f"{where}: point {bad} has a NaN or infinite coordinate; remove or fix that point")
    if np.ptp(points, axis=0).max() == 0:
        raise UserError(f"{where}: all {len(points)} points coincide; the shape is degenerate")
    return points


def normalize_to_unit_sphere(points: np.ndarray) -> np.ndarray:
    """Centre on the centroid and scale so the farthest point is at distance 1 (the
    PointNet / Point-BERT convention for ModelNet and ScanObjectNN)."""
    points = np.asarray(points, dtype=np.float64)  # float32 overflows on sums of 1e38 and underflows on 1e-44 spans
    centered = points - points.mean(axis=0, keepdims=True)
    return (centered / np.linalg.norm(centered, axis=1).max()).astype(np.float32)


# ----------------------------------------------------------------------------- OFF meshes


def read_off(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """-> (vertices (V, 3), triangles (T, 3)); polygons are fan-triangulated.

    Accepts the ModelNet quirk of counts glued to the header (`OFF490 518 0`)."""
    try:
        lines = [(n, line.split("#")[0].strip()) for n, line in enumerate(Path(path).read_text(encoding="ascii").splitlines(), 1)]
    except UnicodeDecodeError:
        raise UserError(f"{path}: not an ASCII OFF file (binary OFF is not supported)") from None
    lines = [(n, line) for n, line in lines if line]
    if not lines or not lines[0][1].startswith("OFF"):
        raise UserError(f"{path}:1: an OFF file starts with 'OFF'")
    header = lines[0][1][3:].split()
    rest = lines[1:]
    if not header:
        if not rest:
            raise UserError(f"{path}: no vertex/face counts after 'OFF'")
        (number, counts_line), rest = rest[0], rest[1:]
        header = counts_line.split()
    try:
        num_vertices, num_faces = int(header[0]), int(header[1])
    except (ValueError, IndexError):
        raise UserError(f"{path}: the counts line must be 'vertices faces edges', got {' '.join(header)!r}") from None
    if num_vertices == 0 or num_faces == 0:
        raise UserError(f"{path}: empty mesh ({num_vertices} vertices, {num_faces} faces)")
    if len(rest) < num_vertices + num_faces:
        raise UserError(f"{path}: the header promises {num_vertices} vertices and {num_faces} faces, the file has {len(rest)} data lines")
    try:
        vertices = np.array([[float(v) for v in line.split()[:3]] for _, line in rest[:num_vertices]], dtype=np.float64)
    except ValueError:
        raise UserError(f"{path}: a vertex line is not three numbers") from None
    if vertices.shape != (num_vertices, 3):
        raise UserError(f"{path}: every vertex line needs x y z")
    triangles = []
    for number, line in rest[num_vertices:num_vertices + num_faces]:
        cells = line.split()
        try:
            count = int(cells[0])
            index = [int(c) for c in cells[1:1 + count]]
        except (ValueError, IndexError):
            raise UserError(f"{path}:{number}: a face line is 'n i1 ... in'") from None
        if len(index) != count:
            raise UserError(f"{path}:{number}: a face needs as many vertex indices as its count")
        triangles += fan_triangles(index, num_vertices, f"{path}:{number}")
    return vertices, np.asarray(triangles, dtype=np.int64)


def fan_triangles(index: list[int], num_vertices: int, where: str) -> list[tuple[int, int, int]]:
    """One polygon face (vertex indices) as triangles sharing its first vertex."""
    if len(index) < 3:
        raise UserError(f"{where}: a face needs at least 3 vertex indices")
    if min(index) < 0 or max(index) >= num_vertices:
        raise UserError(f"{where}: vertex index out of range 0..{num_vertices - 1}")
    return [(index[0], index[i], index[i + 1]) for i in range(1, len(index) - 1)]


def sample_surface(vertices: np.ndarray, triangles: np.ndarray, count: int, rng: np.random.Generator, where: str) -> np.ndarray:
    """Uniform points on the mesh surface: triangles by area, then uniform barycentrics."""
    if not np.isfinite(vertices).all():
        raise UserError(f"{where}: a vertex has a NaN or infinite coordinate")
    a, b, c = (vertices[triangles[:, i]] for i in range(3))
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    total = areas.sum()
    if not total > 0:
        raise UserError(f"{where}: the mesh has zero surface area (degenerate faces); it cannot be sampled")
    chosen = rng.choice(len(triangles), size=count, p=areas / total)
    # sqrt(u) makes the barycentric sample uniform over the triangle's area.
    u = np.sqrt(rng.random((count, 1)))
    v = rng.random((count, 1))
    points = (1 - u) * a[chosen] + u * (1 - v) * b[chosen] + u * v * c[chosen]
    return check_points(points, where)


# ----------------------------------------------------------------------------- PLY


_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Vertex x, y, z of an ASCII or binary little-endian PLY, and the triangles of its
    `face` element where it has faces (a mesh; None for a plain cloud). Other elements
    are skipped."""
    raw = Path(path).read_bytes()
    end = raw.find(b"end_header")
    if not raw.startswith(b"ply") or end < 0:
        raise UserError(f"{path}: not a PLY file (no 'ply' magic line or no 'end_header')")
    body_start = raw.index(b"\n", end) + 1
    header = raw[:end].decode("ascii", errors="replace").splitlines()
    fmt, elements = None, []  # elements: [name, count, [(name, type or ('list', count_t, item_t))]]
    for line in header[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        needed = {"format": 3, "element": 3, "property": 5 if words[1:2] == ["list"] else 3}.get(words[0], 0)
        if len(words) < needed:
            raise UserError(f"{path}: the PLY header line {line.strip()!r} is incomplete")
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            if not words[2].isdigit():
                raise UserError(f"{path}: {line.strip()!r}: the count must be a whole number")
            elements.append([words[1], int(words[2]), []])
        elif words[0] == "property" and elements:
            types = words[2:4] if words[1] == "list" else words[1:2]
            unknown = [t for t in types if t not in _PLY_TYPES]
            if unknown:
                raise UserError(f"{path}: unknown PLY property type {unknown[0]!r}")
            if words[1] == "list":
                elements[-1][2].append((words[4], ("list", words[2], words[3])))
            else:
                elements[-1][2].append((words[2], words[1]))
    if fmt not in ("ascii", "binary_little_endian"):
        raise UserError(f"{path}: PLY format {fmt!r} is not supported; use ascii or binary_little_endian")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise UserError(f"{path}: the PLY has no 'vertex' element")
    vertex = elements[names.index("vertex")]
    props = [p[0] for p in vertex[2]]
    if not {"x", "y", "z"} <= set(props):
        raise UserError(f"{path}: the PLY vertex element lacks x, y or z (has {props})")
    faces = elements[names.index("face")] if "face" in names and names.index("face") > names.index("vertex") else None
    if faces is not None and (not faces[1] or not faces[2] or not isinstance(faces[2][0][1], tuple)):
        faces = None  # no faces, or no vertex-index list to read them by
    if fmt == "ascii":
        lines = raw[body_start:].decode("ascii", errors="replace").splitlines()
        skip = sum(e[1] for e in elements[:names.index("vertex")])
        rows = lines[skip:skip + vertex[1]]
        if len(rows) < vertex[1]:
            raise UserError(f"{path}: the header promises {vertex[1]} vertices, the file has {len(rows)} lines")
        try:
            table = np.array([[float(v) for v in row.split()[:len(props)]] for row in rows], dtype=np.float64)
        except ValueError:
            raise UserError(f"{path}: a vertex line holds a non-number") from None
        if table.shape != (vertex[1], len(props)):
            raise UserError(f"{path}: every vertex line needs {len(props)} values")
        points = check_points(table[:, [props.index(a) for a in "xyz"]], str(path))
        if faces is None:
            return points, None
        first = skip + sum(e[1] for e in elements[names.index("vertex"):names.index("face")])
        triangles = []
        for number, row in enumerate(lines[first:first + faces[1]], start=first + 1):
            try:
                count, *rest = (int(v) for v in row.split())
            except ValueError:
                raise UserError(f"{path}: face {number - first}: a face line is 'n i1 ... in'") from None
            triangles += fan_triangles(rest[:count], len(points), f"{path}: face {number - first}")
        return points, np.asarray(triangles, dtype=np.int64)
    for element in elements[:names.index("vertex")]:
        if element[1] and any(isinstance(t, tuple) for _, t in element[2]):
            raise UserError(f"{path}: binary PLY with a list element before 'vertex' is not supported")
    offset = body_start + sum(e[1] * sum(np.dtype(_PLY_TYPES[t]).itemsize for _, t in e[2]) for e in elements[:names.index("vertex")])
    if any(isinstance(t, tuple) for _, t in vertex[2]):
        raise UserError(f"{path}: binary PLY vertices with list properties are not supported")
    dtype = np.dtype([(name, "<" + _PLY_TYPES[t]) for name, t in vertex[2]])
    if len(raw) < offset + vertex[1] * dtype.itemsize:
        raise UserError(f"{path}: the file is shorter than its {vertex[1]} vertices; is it complete?")
    table = np.frombuffer(raw, dtype=dtype, count=vertex[1], offset=offset)
    points = check_points(np.stack([table[a].astype(np.float64) for a in "xyz"], axis=1), str(path))
    if faces is None:
        return points, None
    between = elements[names.index("vertex") + 1:names.index("face")]
    if len(faces[2]) > 1 or any(isinstance(t, tuple) for e in between for _, t in e[2]):
        raise UserError(f"{path}: binary PLY faces with more than a vertex-index list are not supported; "
                        f"save the mesh as ASCII PLY or .off")
    offset += vertex[1] * dtype.itemsize + sum(e[1] * sum(np.dtype(_PLY_TYPES[t]).itemsize for _, t in e[2]) for e in between)
    return points, _binary_ply_triangles(raw, offset, faces[1], faces[2][0][1], len(points), str(path))


def _binary_ply_triangles(raw: bytes, offset: int, count: int, kind: tuple, num_vertices: int, where: str) -> np.ndarray:
    """The faces of a binary PLY (a list of vertex indices each) as triangles."""
    count_type, index_type = (np.dtype("<" + _PLY_TYPES[t]) for t in kind[1:])
    sides = int(np.frombuffer(raw, dtype=count_type, count=1, offset=offset)[0]) if len(raw) > offset else 0
    uniform = np.dtype([("n", count_type), ("i", index_type, (max(sides, 1),))])
    if sides >= 3 and len(raw) >= offset + count * uniform.itemsize:  # every face with the first one's sides (the usual)
        table = np.frombuffer(raw, dtype=uniform, count=count, offset=offset)
        if (table["n"] == sides).all():
            index = table["i"].astype(np.int64)
            if index.min() < 0 or index.max() >= num_vertices:
                raise UserError(f"{where}: a face's vertex index is out of range 0..{num_vertices - 1}")
            return np.concatenate([index[:, [0, k, k + 1]] for k in range(1, sides - 1)])
    triangles = []
    for face in range(count):
        if len(raw) < offset + count_type.itemsize:
            raise UserError(f"{where}: the file is shorter than its {count} faces; is it complete?")
        sides = int(np.frombuffer(raw, dtype=count_type, count=1, offset=offset)[0])
        offset += count_type.itemsize
        if len(raw) < offset + sides * index_type.itemsize:
            raise UserError(f"{where}: the file is shorter than its {count} faces; is it complete?")
        index = np.frombuffer(raw, dtype=index_type, count=sides, offset=offset).astype(int).tolist()
        offset += sides * index_type.itemsize
        triangles += fan_triangles(index, num_vertices, f"{where}: face {face + 1}")
    return np.asarray(triangles, dtype=np.int64)


# ----------------------------------------------------------------------------- single files


def read_point_file(path: Path, off_points: int = 8192, seed: int = 0) -> np.ndarray:
    """Any single-cloud file -> float32 (N, 3) raw coordinates."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise UserError(f"{path}: {'a folder, not a point file' if path.is_dir() else 'file does not exist'}")
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # pickled, truncated, or not .npy at all
            raise UserError(f"{path}: not a plain numeric .npy array ({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
            raise UserError(f"{path}: not a plain numeric .npy array (an .npz archive, or {getattr(array, 'dtype', '?')} values)")
        return check_points(array, str(path))
    if suffix in (".ply", ".off"):  # a mesh is sampled over its surface, not read as its corners
        vertices, triangles = read_ply(path) if suffix == ".ply" else read_off(path)
        if triangles is None:
            return vertices
        return sample_surface(vertices, triangles, off_points, np.random.default_rng(seed), str(path))
    if suffix == ".txt":
        return read_xyz_text(path)
    raise UserError(f"{path}: unsupported point file; use {', '.join(POINT_SUFFIXES)}")


def list_point_files(folder: Path) -> list[Path]:
    """The point files below `folder`, sorted; hidden ones (`.ipynb_checkpoints/`, macOS
    `._x.ply`) left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in POINT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_xyz_text(path: Path) -> np.ndarray:
    """`x,y,z[,nx,ny,nz]` (ModelNet40 resampled) or whitespace-separated, one point per line."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not ASCII text") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append([float(v) for v in re.split(r"[,\s]+", line)[:3]])
        except ValueError:
            raise UserError(f"{path}:{number}: expected numbers 'x,y,z[,nx,ny,nz]', got {line[:60]!r}") from None
        if len(rows[-1]) < 3:
            raise UserError(f"{path}:{number}: a point needs x, y and z")
    if not rows:
        raise UserError(f"{path}: no points")
    return check_points(np.asarray(rows), str(path))


# ----------------------------------------------------------------------------- datasets


def read_modelnet_txt(root: Path, shape_names: str = "modelnet40_shape_names.txt") -> tuple[dict[str, list[dict]], list[str]]:
    """ModelNet40 resampled: `<root>/modelnet40_shape_names.txt`, `modelnet40_train.txt`,
    `modelnet40_test.txt` (shape ids like `airplane_0001`), `<root>/<class>/<id>.txt`."""
    names_file = root / shape_names
    if not names_file.is_file():
        raise UserError(f"{root}: no {names_file.name} (the class list of ModelNet40 resampled)")
    labels = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    prefix = names_file.name.replace("_shape_names.txt", "")
    splits = {}
    for split in ("train", "test"):
        listing = root / f"{prefix}_{split}.txt"
        if not listing.is_file():
            raise UserError(f"{root}: no {listing.name} (the {split} split list)")
        examples = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            shape_id = line.strip()
            if not shape_id:
                continue
            label_name = shape_id.rsplit("_", 1)[0]
            if label_name not in labels:
                raise UserError(f"{listing}:{number}: class {label_name!r} of {shape_id!r} is not in {names_file.name}")
            file = root / label_name / f"{shape_id}.txt"
            if not file.is_file():
                raise UserError(f"{listing}:{number}: {file} does not exist")
            examples.append({"id": shape_id, "points": read_xyz_text(file), "label": labels.index(label_name)})
        splits[split] = examples
    return splits, labels


def read_point_folder(root: Path, suffixes: tuple[str, ...], off_points: int, seed: int) -> tuple[dict[str, list[dict]], list[str]]:
    """`<root>/<class>/<split>/<file>` (the ModelNet layout; split = train/test) or
    `<root>/<class>/<file>` (every file in `all`, split later by ratios)."""
    if not root.is_dir():
        raise UserError(f"{root}: not a folder of class sub-folders")
    labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not labels:
        raise UserError(f"{root}: no class sub-folders")
    splits: dict[str, list[dict]] = {}
    layout_of: dict[str, Path] = {}  # "split folders" or "files" -> the first class folder laid out so
    for label, name in enumerate(labels):
        files = [p for p in list_point_files(root / name) if p.suffix.lower() in suffixes]
        if not files:
            raise UserError(f"{root / name}: no {'/'.join(suffixes)} files")
        for file in files:
            relative = file.relative_to(root / name).parts
            split = relative[0] if len(relative) > 1 else "all"
            if split != "all" and split not in FOLDER_SPLITS:
                hint = f" (rename it to {split.lower()})" if split.lower() in FOLDER_SPLITS else \
                    " (rename it to validation)" if split.lower() in ("val", "valid", "dev") else ""
                raise UserError(f"{root / name / split}: a split folder is named train, validation or test{hint}; "
                                f"or put the class's files directly in {root / name} to split by ratios")
            layout = "files" if split == "all" else "split folders"
            layout_of.setdefault(layout, root / name)
            if len(layout_of) > 1:
                raise UserError(f"{layout_of['files']} holds its files directly but {layout_of['split folders']} in "
                                f"split folders; lay out every class one way (<class>/<split>/<file> or <class>/<file>)")
            points = read_point_file(file, off_points, seed)
            splits.setdefault(split, []).append({"id": f"{name}/{'/'.join(relative)}", "points": points, "label": label})
    return splits, labels


FOLDER_SPLITS = ("train", "validation", "test")
"""The split folders a `<class>/<split>/` layout may use."""


def read_scanobjectnn_h5(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if "data" not in handle or "label" not in handle:
                raise UserError(f"{path}: a ScanObjectNN file holds datasets 'data' and 'label'; it has {sorted(handle)}")
            data, label = np.asarray(handle["data"]), np.asarray(handle["label"]).reshape(-1)
    except OSError as error:
        raise UserError(f"{path}: not a readable HDF5 file ({error})") from None
    if data.ndim != 3 or len(data) != len(label):
        raise UserError(f"{path}: 'data' must be (shapes, points, 3+) with one label per shape; got {data.shape} and {label.shape}")
    return [check_points(cloud, f"{path} (shape {i})") for i, cloud in enumerate(data)], label.astype(np.int64)


def read_points_npz(path: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Packed clouds: `points` (N, P, 3), `label` (N,), `split` (N,; 0 train, 1 test),
    `class_names` (K,), optional `name` (N,)."""
    try:
        data = np.load(path, allow_pickle=False)
        missing = [k for k in ("points", "label", "split", "class_names") if k not in data]
        if missing:
            raise UserError(f"{path}: the .npz lacks {missing}; it needs points, label, split (0 train / 1 test), class_names")
        points, label, split, class_names = data["points"], data["label"], data["split"], data["class_names"]
        names = data["name"] if "name" in data else np.array([f"{path.stem}:{i}" for i in range(len(points))])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:  # not a zip, truncated, or pickled members
        raise UserError(f"{path}: not a readable .npz ({error})") from None
    labels = [str(c) for c in np.atleast_1d(class_names)]
    if label.ndim != 1 or split.ndim != 1 or not len(points) == len(label) == len(split) == len(names):
        raise UserError(f"{path}: points, label, split (and name) need one entry per cloud; got lengths "
                        f"{len(points)}, {label.shape}, {split.shape}")
    if not len(points):
        raise UserError(f"{path}: no clouds (points is empty)")
    if label.dtype.kind not in "iu":
        raise UserError(f"{path}: label must hold integer class indices, got {label.dtype}")
    if label.min() < 0 or label.max() >= len(labels):
        raise UserError(f"{path}: labels must lie in 0..{len(labels) - 1} (class_names has {len(labels)})")
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for i in range(len(points)):
        if split[i] not in (0, 1):
            raise UserError(f"{path}: split[{i}] = {split[i]}; use 0 (train) or 1 (test)")
        splits["train" if split[i] == 0 else "test"].append(
            {"id": str(names[i]), "points": check_points(points[i], f"{path} (shape {i}, {names[i]})"), "label": int(label[i])})
    return splits, labels


def read_point_records(path: Path, records: list[tuple[int, dict]], labels: list[str] | None) -> list[dict]:
    """A card loader's records of one file -> clouds. A record holds `points` (N, 3+),
    `label` (a class name, or an index into the card's `labels`) and optionally `id`."""
    examples = []
    for number, record in records:
        where = f"{path}:{number}"
        missing = [key for key in ("points", "label") if key not in record]
        if missing:
            raise MissingField(where, f"the record has no {missing[0]!r}",
                               "each record needs points (an (N, 3+) array) and label", field=missing[0])
        label = record["label"]
        if labels is not None:
            label = parse_label(str(label), labels, where)
        elif isinstance(label, bool) or not isinstance(label, str | int):
            raise UserError(f"{where}: label {label!r} is neither a class name nor a class index")
        examples.append({"id": str(record.get("id", f"{path.name}:{number}")),
                         "points": check_points(record["points"], f"{where} (points)"), "label": label})
    return examples


# ----------------------------------------------------------------------------- sampling and augmentation


def choose_points(points: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` points: a random subset, or all plus repeats when the cloud is smaller."""
    if len(points) >= count:
        return points[rng.choice(len(points), size=count, replace=False)]
    extra = rng.choice(len(points), size=count - len(points), replace=True)
    return np.concatenate([points, points[extra]])


AXES = {"x": 0, "y": 1, "z": 2}


def augment(points: np.ndarray, rng: np.random.Generator, rotate_up: bool, up_axis: str,
            scale_range: tuple[float, float] = (2 / 3, 3 / 2), translate: float = 0.2) -> np.ndarray:
    """Point-BERT's training augmentation: per-axis random scale and translation; with
    `rotate_up`, first a random rotation about the up axis."""
    if rotate_up:
        angle = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(angle), np.sin(angle)
        a, b = [i for i in range(3) if i != AXES[up_axis]]
        rotation = np.eye(3)
        rotation[a, a], rotation[a, b], rotation[b, a], rotation[b, b] = c, -s, s, c
        points = points @ rotation.T
    scale = rng.uniform(*scale_range, size=(1, 3))
    shift = rng.uniform(-translate, translate, size=(1, 3))
    return (points * scale + shift).astype(np.float32)


# ----------------------------------------------------------------------------- demo data
# ModelNet-like synthetic shapes: each class is a primitive surface with random
# proportions, sampled with noise, partly occluded (points beyond a random plane
# removed, as a single scan would miss them) and placed in a random pose.

DEMO_SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "plane")


def _unit(rng, count):
    v = rng.normal(size=(count, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _shape_surface(shape: str, count: int, rng: np.random.Generator) -> np.ndarray:
    u, v = rng.random(count), rng.random(count)
    if shape == "sphere":
        return _unit(rng, count) * rng.uniform(0.8, 1.2, size=3)
    if shape == "cube":
        points = rng.uniform(-1, 1, size=(count, 3))
        face_axis = rng.integers(0, 3, size=count)
        points[np.arange(count), face_axis] = rng.choice([-1.0, 1.0], size=count)
        return points * rng.uniform(0.7, 1.3, size=3)
    if shape == "cylinder":
        radius, height = rng.uniform(0.4, 0.8), rng.uniform(1.0, 2.0)
        on_side = rng.random(count) < 0.75
        angle = 2 * np.pi * u
        r = np.where(on_side, radius, radius * np.sqrt(v))
        z = np.where(on_side, (v - 0.5) * height, np.sign(rng.random(count) - 0.5) * height / 2)
        return np.stack([r * np.cos(angle), r * np.sin(angle), z], axis=1)
    if shape == "cone":
        radius, height = rng.uniform(0.5, 1.0), rng.uniform(1.0, 2.0)
        t = np.sqrt(v)  # uniform over the lateral area
        angle = 2 * np.pi * u
        return np.stack([radius * t * np.cos(angle), radius * t * np.sin(angle), height * (0.5 - t)], axis=1)
    if shape == "torus":
        major, minor = rng.uniform(0.7, 1.0), rng.uniform(0.2, 0.35)
        theta, phi = 2 * np.pi * u, 2 * np.pi * v
        return np.stack([(major + minor * np.cos(phi)) * np.cos(theta), (major + minor * np.cos(phi)) * np.sin(theta),
                         minor * np.sin(phi)], axis=1)
    if shape == "plane":
        return np.stack([rng.uniform(-1, 1, count) * rng.uniform(0.7, 1.3), rng.uniform(-1, 1, count) * rng.uniform(0.7, 1.3),
                         rng.normal(0, 0.02, count)], axis=1)
    raise ValueError(f"unknown demo shape {shape!r}")


def random_pose(rng: np.random.Generator, max_tilt: float = 0.3) -> np.ndarray:
    """A rotation: any heading about the up (z) axis, tilted by up to `max_tilt` radians
    (ModelNet objects stand roughly upright, in any heading)."""
    yaw, tilt = rng.uniform(0, 2 * np.pi), rng.uniform(-max_tilt, max_tilt)
    c, s = np.cos(yaw), np.sin(yaw)
    heading = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    c, s = np.cos(tilt), np.sin(tilt)
    return heading @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def demo_cloud(shape: str, num_points: int, rng: np.random.Generator, noise: float = 0.02, occlusion: float = 0.25) -> np.ndarray:
    points = _shape_surface(shape, int(num_points * 1.4), rng)
    if rng.random() < 0.5:  # partial occlusion: drop up to `occlusion` of the shape beyond a plane
        direction = _unit(rng, 1)[0]
        depth = points @ direction
        points = points[depth < np.quantile(depth, 1 - rng.uniform(0, occlusion))]
    points = points[rng.permutation(len(points))[:num_points]]
    points = points + rng.normal(0, noise, size=points.shape)
    return (points @ random_pose(rng).T + rng.normal(0, 0.5, size=3)).astype(np.float32)


def demo_dataset(sizes: dict[str, int], shapes: tuple[str, ...], num_points: int, seed: int) -> dict[str, list[dict]]:
    splits = {}
    for offset, (split, count) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, offset])
        examples = []
        for i in range(count):
            label = i % len(shapes)
            examples.append({"id": f"{split}_{i:05d}_{shapes[label]}", "points": demo_cloud(shapes[label], num_points, rng), "label": label})
        splits[split] = examples
    return splits
