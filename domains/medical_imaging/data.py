"""Medical image data: ImageFolder, MedMNIST `.npz`, `path,label[,group]` CSVs, DICOM,
and a deterministic generator of synthetic "lesion" images for the demo.

An example is a dict with `id`, `label` (class index) and either `path` (an image file,
read when batched) or `image` (a uint8 array, for data that arrives as arrays), plus
`group` when the card names a `group_by` attribute. Multi-label examples carry
`targets` (0/1 per class) and, as `label`, the names of their positive classes joined
by `|` (what predictions files show, and what subsampling stratifies on).

Every image becomes 3-channel RGB explicitly: grayscale is repeated over the
channels, RGBA is composited onto black (the background of X-rays and dermoscopy
borders), 16-bit and float images (and DICOM pixel data) are rescaled to 0-255 by
their own min and max.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from peftlab.shared.data import group_cell, header_column, label_cell, parse_label, table_rows
from peftlab.shared.errors import MissingField, UserError
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")
DICOM_SUFFIXES = (".dcm", ".dicom")
READABLE_SUFFIXES = IMAGE_SUFFIXES + DICOM_SUFFIXES
MULTI_LABEL_SEPARATOR = "|"


# ----------------------------------------------------------------------------- images -> RGB

def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) / (high - low) * 255.0).astype(np.uint8)


def array_to_rgb(array: np.ndarray, where: str = "image") -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> RGB image."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise UserError(f"{where}: image array has shape {array.shape}; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    if array.dtype != np.uint8:
        array = _rescale_to_uint8(array)
    if array.ndim == 2:
        return Image.fromarray(array).convert("RGB")
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, with the conversions spelled out (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return array_to_rgb(_rescale_to_uint8(np.asarray(image)))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV: PIL's standard conversions


def read_dicom(path: Path) -> Image.Image:
    try:
        import pydicom
    except ImportError:
        raise UserError(f"{path}: reading DICOM needs pydicom; install it with `pip install pydicom` "
                        f"(and `pylibjpeg` for compressed pixel data)") from None
    dataset = pydicom.dcmread(str(path))
    pixels = dataset.pixel_array
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[pixels.shape[0] // 2]  # a multi-frame series: its middle frame
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1 stores bright as low values
    return array_to_rgb(pixels, str(path))


def load_image(path: Path) -> Image.Image:
    """An image file -> RGB; an unreadable or truncated file is a UserError naming it."""
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return read_dicom(path)
        with Image.open(path) as image:
            image.load()  # decodes fully: a truncated file fails here, not mid-training
            return to_rgb(image)
    except UserError:
        raise
    except FileNotFoundError:
        raise UserError(f"{path}: image file not found; fix the path (or the card's image_root)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise UserError(f"{path}: unreadable or truncated image ({error}); replace the file") from None
    except Exception as error:  # pydicom raises its own error types for malformed files
        raise UserError(f"{path}: unreadable image ({type(error).__name__}: {error})") from None


def example_image(example: dict) -> Image.Image:
    if "image" in example:
        return array_to_rgb(example["image"], str(example.get("id", "image")))
    return load_image(Path(example["path"]))


def keep_readable(examples: list[dict], on_bad_file: str | None, where: str) -> tuple[list[dict], list[str]]:
    """Decode every file once, before training: a bad file fails now (naming it), or is
    skipped and counted when the card says `on_bad_file: skip` (None: files given to
    predict, with no card to say it)."""
    kept, bad = [], []
    for example in examples:
        if "path" not in example:
            kept.append(example)
            continue
        try:
            load_image(Path(example["path"]))
        except UserError as error:
            if "row" in example:  # a table's row: name its line too
                error = UserError(f"{example['row']}: {error}")
            if on_bad_file is None or "needs pydicom" in str(error):
                raise error from None
            if on_bad_file != "skip":
                raise UserError(f"{error}, or set `on_bad_file: skip` in the card to leave bad files out") from None
            bad.append(example["path"])
            continue
        kept.append(example)
    notes = []
    if bad:
        notes.append(f"{where}: skipped {len(bad)} unreadable image file(s) (on_bad_file: skip), e.g. {bad[0]}")
    return kept, notes


# ----------------------------------------------------------------------------------- labels

def multi_label_example(example: dict, positives: list[int], labels: list[str]) -> dict:
    targets = [0.0] * len(labels)
    for index in positives:
        targets[index] = 1.0
    example["targets"] = targets
    example["label"] = MULTI_LABEL_SEPARATOR.join(labels[i] for i in sorted(set(positives))) or "none"
    return example


def parse_multi_label(value: str, labels: list[str], where: str) -> list[int]:
    """`Effusion|Atelectasis` (names or indices, `|`-separated; empty or `none` = no finding)."""
    value = value.strip()
    if value.lower() in ("", "none", "no finding"):
        return []
    return [parse_label(part, labels, where) for part in value.split(MULTI_LABEL_SEPARATOR)]


# --------------------------------------------------------------------------------- readers

def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, hidden ones (`.ipynb_checkpoints/`, macOS `._x.png`) left out."""
    return [p for p in _visible_files(folder) if p.suffix.lower() in READABLE_SUFFIXES]


def _visible_files(folder: Path) -> list[Path]:
    visible = [p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    broken = [p for p in visible if p.is_symlink() and not p.exists()]
    if broken:  # a missing image, as a table's path to a file that is not there is
        raise UserError(f"{broken[0]}: a link to {broken[0].readlink()}, which does not exist; fix or remove the link")
    return sorted(p for p in visible if p.is_file())


def read_imagefolder(root: Path, labels: list[str] | None) -> tuple[list[dict], list[str], list[str]]:
    """`root/<class>/<image>` (torchvision's ImageFolder layout) -> examples, labels and
    notes. Hidden folders are not classes; files that are not images are counted in a note."""
    if not root.is_dir():
        raise UserError(f"{root}: ImageFolder root does not exist or is not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise UserError(f"{root}: no class folders; ImageFolder expects root/<class>/<image files>")
    if labels is None:
        labels = found
    elif sorted(labels) != sorted(found):
        raise UserError(f"{root}: class folders {found} differ from the card's labels {labels}; make them the same names")
    examples, others = [], []
    for name in found:
        files = _visible_files(root / name)
        images = [p for p in files if p.suffix.lower() in READABLE_SUFFIXES]
        if not images:
            raise UserError(f"{root / name}: no image files ({', '.join(READABLE_SUFFIXES)}); "
                            f"remove the folder or add its images")
        others += [p for p in files if p.suffix.lower() not in READABLE_SUFFIXES]
        examples += [{"id": str(p.relative_to(root)), "path": str(p), "label": labels.index(name)} for p in images]
    which = "1 file that is not an image was" if len(others) == 1 else f"{len(others)} files that are not images were"
    notes = [f"{root}: {which} left out (e.g. {others[0].relative_to(root)})"] if others else []
    return examples, labels, notes


def read_medmnist_npz(path: Path, labels: list[str] | None, multi_label: bool) -> tuple[dict[str, list[dict]], list[str]]:
    """MedMNIST `.npz`: `{train,val,test}_images` (N, H, W[, C]) and `{split}_labels` (N, 1) or
    (N, K) multi-hot for multi-label sets such as ChestMNIST. `val` becomes `validation`."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable .npz archive ({error})") from None
    keys = set(archive.files)
    splits: dict[str, list[dict]] = {}
    for prefix, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        if f"{prefix}_images" not in keys:
            continue
        if f"{prefix}_labels" not in keys:
            raise UserError(f"{path}: has {prefix}_images but no {prefix}_labels")
        try:
            images, targets = archive[f"{prefix}_images"], archive[f"{prefix}_labels"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # a truncated or pickled member
            raise UserError(f"{path}: {prefix}_images / {prefix}_labels are unreadable ({error})") from None
        if images.dtype.kind == "f" and not np.isfinite(images).all():
            raise UserError(f"{path}: {prefix}_images holds NaN or infinite pixels (image "
                            f"{int(np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))[0])}); clean the array")
        if images.dtype.kind not in "uif" or targets.dtype.kind not in "uifb":
            raise UserError(f"{path}: {prefix}_images / {prefix}_labels must be numeric arrays, got {images.dtype} and {targets.dtype}")
        if not np.isfinite(targets.astype(np.float64)).all():
            raise UserError(f"{path}: {prefix}_labels holds NaN or infinite values")
        if len(images) != len(targets):
            raise UserError(f"{path}: {prefix}_images has {len(images)} images but {prefix}_labels has {len(targets)} rows")
        _check_image_stack(images, f"{path}: {prefix}_images")
        targets = targets.reshape(len(targets), -1)
        if multi_label:
            if labels is None:
                labels = [str(i) for i in range(targets.shape[1])]
            if targets.shape[1] != len(labels):
                raise UserError(f"{path}: {prefix}_labels has {targets.shape[1]} columns, the card names {len(labels)} labels")
        elif targets.shape[1] != 1:
            one_hot = set(np.unique(targets)) <= {0, 1} and (targets.sum(axis=1) == 1).all()
            raise UserError(f"{path}: {prefix}_labels has {targets.shape[1]} columns" + (
                f", one 1 per row (one-hot): save the class indices ({prefix}_labels.argmax(axis=1)) for single-label "
                f"data, or set task.multi_label=true if an image may have several findings" if one_hot else
                " (multi-label); set task.multi_label=true"))
        else:
            _check_class_indices(targets[:, 0], f"{path}: {prefix}_labels")
        examples = []
        for index in range(len(images)):
            example = {"id": f"{split}:{index}", "image": images[index]}
            if multi_label:
                examples.append(multi_label_example(example, list(np.flatnonzero(targets[index])), labels))
            else:
                example["label"] = int(targets[index, 0])
                examples.append(example)
        splits[split] = examples
    if not splits:
        raise UserError(f"{path}: no `train_images` / `val_images` / `test_images` arrays (MedMNIST layout); it has {sorted(keys)}")
    if not multi_label:
        count = 1 + max(e["label"] for examples in splits.values() for e in examples)
        labels = labels or [str(i) for i in range(count)]
        if count > len(labels):
            raise UserError(f"{path}: labels run from 0 to {count - 1}, the card names {len(labels)} labels")
    return splits, labels


def _check_image_stack(images: np.ndarray, where: str) -> None:
    """An array of images as MedMNIST stores them: (N, H, W) or channels-last (N, H, W, C)."""
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4)):
        return
    if images.ndim == 4 and images.shape[1] in (1, 3, 4):
        raise UserError(f"{where} has shape {images.shape}, channels first; MedMNIST stores (N, H, W, C): save "
                        f"np.transpose(images, (0, 2, 3, 1))")
    raise UserError(f"{where} has shape {images.shape}; expected (N, H, W) or (N, H, W, C) with C 1, 3 or 4")


def _check_class_indices(targets: np.ndarray, where: str) -> None:
    """Single-label targets are class indices: whole numbers from 0."""
    targets = targets.astype(np.float64)
    bad = np.flatnonzero((targets < 0) | (targets != np.round(targets)))
    if len(bad):
        others = f"; {len(bad)} rows are not" if len(bad) > 1 else ""
        raise UserError(f"{where}[{bad[0]}] is {targets[bad[0]].item():g}: labels are class indices 0, 1, ...{others}")


def read_image_csv(path: Path, image_root: Path, fields: dict, labels: list[str] | None, group_by: str | None,
                   multi_label: bool, labelled: bool = True, rows: list[tuple[int, list[str]]] | None = None) -> list[dict]:
    """CSV with a header: an image path column (relative to `image_root`), a label column,
    when the card sets `group_by`, that column as each example's group, and with
    `fields.patient`, that column as each example's patient (splits keep a patient's
    images together). `labelled=False` (images to predict on) reads the image column
    alone: the other columns serve training and evaluation, and a table of image paths
    need not have them. `rows`: a card loader's records of the file as a table."""
    rows = table_rows(path, ",") if rows is None else rows
    if not rows:
        raise UserError(f"{path}: empty CSV file")
    header = [h.strip() for h in rows[0][1]]

    def column(key: str, default: str) -> int:
        name = fields.get(key, default)
        if isinstance(name, int):
            return name
        index = header_column(header, name, path)
        if index is None:
            raise MissingField(str(path), f"column {name!r} for fields.{key} not found", f"the header has {header}", field=key)
        return index

    image_col = column("image", "path")
    label_col = column("label", "label") if labelled else None
    group_col = column("group", group_by) if group_by and labelled else None
    patient_col = column("patient", "") if "patient" in fields and labelled else None
    examples = []
    for number, cells in rows[1:]:
        if len(cells) != len(header):
            raise UserError(f"{path}:{number}: {len(cells)} columns, the header has {len(header)}")
        relative = cells[image_col].strip()
        if not relative:
            raise UserError(f"{path}:{number}: empty image path")
        example = {"id": relative, "path": str(image_root / relative), "row": f"{path}:{number}"}
        if group_col is not None:
            example["group"] = cells[group_col].strip()
        if patient_col is not None:
            example["patient"] = group_cell(cells[patient_col], f"{path}:{number}")
        if label_col is not None:
            where = f"{path}:{number}"
            if multi_label:
                multi_label_example(example, parse_multi_label(cells[label_col], labels, where), labels)
            else:
                value = cells[label_col].strip()
                if MULTI_LABEL_SEPARATOR in value or (value.lower() in ("none", "no finding") and value not in (labels or [])):
                    raise UserError(f"{where}: label {value!r} reads as multi-label findings; set task.multi_label=true "
                                    f"(in `peftlab run` and `peftlab card validate`), or fix the cell")
                # without the card's labels a name is kept; the task numbers the classes once all are read
                example["label"] = label_cell(value, labels, where)
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no data rows under the header")
    return examples


# ------------------------------------------------------------------------------- demo data
# Synthetic dermoscopy-like "lesions" on a skin texture. The class sets the lesion's
# shape and colour (round brown, irregular dark with blue-black spots, elongated tan
# with a streaked texture); size, position, rotation and hue jitter so that no single
# pixel tells the class. The group ("site_a" / "site_b", as if two hospitals) darkens
# site_b images, so per-group metrics have something to show.

DEMO_LABELS = ["nevus", "melanoma", "keratosis"]
DEMO_GROUPS = ["site_a", "site_b"]


def _skin(rng: np.random.Generator, size: int) -> np.ndarray:
    base = np.array([0.85, 0.66, 0.55]) + rng.normal(0, 0.04, 3)
    y, x = np.mgrid[0:size, 0:size] / size
    waves = sum(rng.normal(0, 0.03) * np.sin(2 * np.pi * (rng.uniform(1, 4) * x + rng.uniform(1, 4) * y + rng.uniform()))
                for _ in range(3))
    return base[None, None, :] + waves[..., None] + rng.normal(0, 0.03, (size, size, 3))


def _lesion_mask(rng: np.random.Generator, size: int, kind: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(float)
    cy, cx = size / 2 + rng.uniform(-size / 8, size / 8, 2)
    radius = size * rng.uniform(0.16, 0.26)
    if kind == 0:  # round, regular border
        return ((y - cy) ** 2 + (x - cx) ** 2) <= radius ** 2
    if kind == 1:  # irregular: union of offset discs
        mask = np.zeros((size, size), bool)
        for _ in range(4):
            oy, ox = rng.normal(0, radius * 0.45, 2)
            r = radius * rng.uniform(0.5, 0.85)
            mask |= ((y - cy - oy) ** 2 + (x - cx - ox) ** 2) <= r ** 2
        return mask
    angle = rng.uniform(0, np.pi)  # elongated ellipse at a random angle
    u = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    v = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    return (u / (radius * 1.5)) ** 2 + (v / (radius * 0.6)) ** 2 <= 1


_DEMO_COLOURS = {0: (0.45, 0.28, 0.18), 1: (0.22, 0.13, 0.12), 2: (0.66, 0.50, 0.33)}


def demo_image(rng: np.random.Generator, size: int, kind: int, darker: bool) -> np.ndarray:
    image = _skin(rng, size)
    mask = _lesion_mask(rng, size, kind)
    colour = np.array(_DEMO_COLOURS[kind]) + rng.normal(0, 0.05, 3)
    lesion = colour[None, None, :] + rng.normal(0, 0.04, (size, size, 3))
    if kind == 1:  # blue-black spots inside the lesion
        spots = rng.random((size, size)) < 0.12
        lesion[spots] = np.array([0.12, 0.12, 0.25])
    if kind == 2:  # streaked texture along one axis
        lesion += 0.06 * np.sin(np.arange(size) * rng.uniform(1.0, 2.0))[None, :, None]
    image[mask] = lesion[mask]
    if darker:
        image *= 0.7
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def demo_lesions(sizes: dict[str, int], image_size: int, seed: int) -> dict[str, list[dict]]:
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in sizes.items():
        examples = []
        for index in range(count):
            kind = int(rng.integers(len(DEMO_LABELS)))
            group = int(rng.integers(len(DEMO_GROUPS)))
            examples.append({"id": f"{split}:{index}", "image": demo_image(rng, image_size, kind, darker=group == 1),
                             "label": kind, "site": DEMO_GROUPS[group]})
        splits[split] = examples
    return splits
