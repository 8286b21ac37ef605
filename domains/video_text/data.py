"""Video-text data: caption files, videos (files or frame folders), frame sampling, and
the deterministic demo of coloured shapes moving in named directions.

- Formats: MSR-VTT-style JSON (`videos` with `video_id` [and `split`], `sentences` with
  `video_id` and `caption`) and a CSV with a `video,caption` header; several captions of
  one video are several rows. A video reference is a path (relative to the card's
  `video_root`), or an id that names `<id>.<ext>` or a folder of frames `<id>/` there.
  A missing or undecodable video stops with its name when the card is read (each is
  decoded then, once: `check_videos` remembers the videos that decoded).
- Decoding: PyAV (FFmpeg) for .mp4/.avi/.webm/.mkv/.mov/..., or a folder of frame images
  (sorted by name, numbers compared as numbers). `num_frames` frames are sampled
  uniformly: the centre frame of each of `num_frames` equal segments (repeats when the
  video is shorter). The same frames every time, so a frozen image tower's features can
  be cached. Frames are resized (shorter side, then centre crop; or squashed) to the
  CLIP input size and kept as uint8 in a bounded memory cache between epochs.
- Demo: `demo_splits` writes small MP4 files (PyAV, H.264) of a red/green/blue/yellow
  square/circle/triangle that starts near the centre and moves left/right/up/down
  towards the edge, with the caption "a red square moves left"; deterministic from the
  seed, written once into the peftlab cache folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from peftlab.shared import io
from peftlab.shared.data import header_column, table_rows
from peftlab.shared.errors import MissingField, UserError

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def cache_root() -> Path:
    """Where peftlab keeps what it can rebuild (demo videos, frame features):
    `$PEFTLAB_CACHE`, else `~/.cache/peftlab`."""
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab").expanduser()


# ----------------------------------------------------------------------------- frames


def uniform_indices(total: int, count: int) -> list[int]:
    """The centre frame of each of `count` equal segments of `total` frames."""
    if total < 1:
        raise ValueError("no frames")
    return [min(total - 1, int((index + 0.5) * total / count)) for index in range(count)]


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)


def decode_frames(path: str | Path, num_frames: int) -> np.ndarray:
    """`num_frames` uniformly sampled RGB frames, (frames, H, W, 3) uint8; UserError naming
    the video when it is missing or cannot be decoded."""
    path = Path(path)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise UserError(f"{path}: a frame folder with no images ({', '.join(FRAME_SUFFIXES)}); fix or remove it")
        from PIL import Image, UnidentifiedImageError

        frames = []
        for index in uniform_indices(len(files), num_frames):
            try:
                with Image.open(files[index]) as image:
                    frames.append(np.asarray(image.convert("RGB")))
            except (OSError, UnidentifiedImageError) as error:
                raise UserError(f"{files[index]}: not a readable image ({error}); fix or remove the frame") from None
        if len({f.shape for f in frames}) > 1:
            raise UserError(f"{path}: frames differ in size; a frame folder holds frames of one video")
        return np.stack(frames)
    if not path.is_file():
        raise UserError(f"{path}: video not found; fix the path or the card's video_root")
    return _decode_video(str(path), num_frames, str(path))


def _decode_video(source, num_frames: int, name: str) -> np.ndarray:
    """A video file's path or an open binary file -> `num_frames` sampled RGB frames;
    UserError starting with `name`."""
    import av

    try:
        with av.open(source) as container:
            if not container.streams.video:
                raise UserError(f"{name}: has no video stream; pass a video file or a folder of frames")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoded = list(container.decode(stream))
    except av.error.FFmpegError as error:
        raise UserError(f"{name}: cannot be decoded as a video ({type(error).__name__}: {error}); "
                        f"re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it") from None
    if not decoded:
        raise UserError(f"{name}: the video has no frames; re-encode or remove it")
    return np.stack([decoded[i].to_ndarray(format="rgb24") for i in uniform_indices(len(decoded), num_frames)])


UPLOADED = "upload:"
"""Prefix of the `video` key of a video sent in a request: the sha256 of its bytes follows."""


def uploaded_video(raw: bytes, num_frames: int, where: str) -> dict:
    """An encoded video sent to `peftlab serve` -> the `video` key (its content hash, so the
    feature cache recognises the same bytes sent again) and its sampled frames, decoded
    here, as from a file; errors name `where`."""
    from io import BytesIO

    frames = _decode_video(BytesIO(raw), num_frames, where)
    return {"video": UPLOADED + hashlib.sha256(raw).hexdigest(), "frames": frames}


def resize_frames(frames: np.ndarray, size: int, interpolation: str = "bicubic", mode: str = "shortest") -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, size, size) uint8, as CLIP preprocesses an image."""
    from torchvision.transforms.v2 import functional as TF

    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    method = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    if pixels.shape[-2:] == (size, size):
        return pixels.contiguous()
    if mode == "squash":
        return TF.resize(pixels, [size, size], interpolation=method, antialias=True)
    pixels = TF.resize(pixels, size, interpolation=method, antialias=True)
    return TF.center_crop(pixels, [size, size]).contiguous()


class FrameStore:
    """Sampled, resized frames by (video, count, size); least recently used evicted past
    a byte budget, so later epochs do not decode again."""

    def __init__(self, budget_mb: float = 1024):
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.frames: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.decoded = 0
        """How many videos were decoded (tests read it)."""

    def get(self, video: str, num_frames: int, preprocess: dict, decoded: np.ndarray | None = None) -> torch.Tensor:
        """`decoded`: the sampled frames of a video sent in a request (no file to decode)."""
        key = (video, num_frames, preprocess["size"], preprocess.get("interpolation"), preprocess.get("resize_mode"))
        if key in self.frames:
            self.frames.move_to_end(key)
            return self.frames[key]
        frames = resize_frames(decode_frames(video, num_frames) if decoded is None else decoded, preprocess["size"],
                               preprocess.get("interpolation", "bicubic"), preprocess.get("resize_mode", "shortest"))
        self.decoded += 1
        size = frames.numel()
        if size <= self.budget:
            self.frames[key] = frames
            self.used += size
            while self.used > self.budget:
                _, evicted = self.frames.popitem(last=False)
                self.used -= evicted.numel()
        return frames


def normalise(frames: torch.Tensor, preprocess: dict) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, scaled to [0, 1] and standardised with CLIP's mean/std."""
    mean = torch.tensor(preprocess["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(preprocess["std"], dtype=torch.float32).view(3, 1, 1)
    return (frames.float() / 255.0 - mean) / std


def check_videos(videos, num_frames: int, directory: Path | None) -> None:
    """Decode each video as training will, so that one that cannot be decoded stops
    `card validate` and the run before training rather than at the first evaluation. A
    video decoded here is remembered by its fingerprint under `directory` (None: not
    remembered), so a run after `card validate`, and every later run, decodes nothing
    twice; only the first read of a video pays for a decode that training repeats."""
    for video in dict.fromkeys(videos):
        marker = None if directory is None else directory / f"{video_fingerprint(video)}-{num_frames}"
        if marker is not None and marker.is_file():
            continue
        decode_frames(video, num_frames)
        if marker is not None:
            try:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
            except OSError:  # a cache folder that cannot be written: decoded again next time, nothing worse
                pass


def video_fingerprint(video: str) -> str:
    """Identity of a video's content for the feature cache: path, size and modification
    time of the file (or of each frame in a folder); a video sent in a request, its bytes' hash."""
    if video.startswith(UPLOADED):
        return video.removeprefix(UPLOADED)[:32]
    path = Path(video).resolve()
    if path.is_dir():
        parts = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in frame_files(path)]
    else:
        stat = path.stat()
        parts = [f"{stat.st_size}:{stat.st_mtime_ns}"]
    return hashlib.sha256("|".join([str(path), *parts]).encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------- readers


def find_video(root: Path, reference: str, where: str) -> Path:
    """A video reference -> an existing file or frame folder under `root`."""
    reference = reference.strip()
    if not reference:
        raise UserError(f"{where}: empty video reference; fill the video cell")
    direct = Path(reference).expanduser()
    direct = direct if direct.is_absolute() else root / direct
    if direct.is_file() or (direct.is_dir() and frame_files(direct)):
        return direct
    for suffix in VIDEO_SUFFIXES:
        candidate = root / f"{reference}{suffix}"
        if candidate.is_file():
            return candidate
    if direct.is_dir():
        raise UserError(f"{where}: video {reference!r}: folder {direct} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
    raise UserError(f"{where}: video {reference!r} not found (looked for {direct}, {root / reference}.mp4 and the other "
                    f"video suffixes); fix the reference or the card's video_root (a table given to "
                    f"`peftlab predict` has its videos looked for beside it)")


def _pair(video_id: str, path: Path, caption: str, index: int) -> dict:
    return {"id": f"{video_id}#{index}", "video_id": video_id, "video": str(path), "caption": caption, "label": caption}


MSRVTT_SPLITS = {"train": "train", "validate": "validation", "validation": "validation", "val": "validation",
                 "test": "test"}
"""A video's `split` in an MSR-VTT-style file (MSR-VTT's own: train / validate / test) -> peftlab's split."""


def _split_words(split: str | None) -> str:
    return f"split {split}" if split else "no split"


def read_msrvtt_json(path: Path, video_root: Path, fields: dict, read_splits: bool = True,
                     notes: list[str] | None = None) -> dict[str, list[dict]]:
    """MSR-VTT-style JSON -> examples per split (`split` of each video: train / validate
    or validation / test), or under "all" when videos carry no split or `read_splits` is
    False (`peftlab predict` embeds every pair alike). `notes` (where given) counts the
    listed videos that have no captions."""
    try:
        document = io.user_json(Path(path).read_text(encoding="utf-8-sig"), path)
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    video_key, caption_key = str(fields.get("video", "video_id")), str(fields.get("caption", "caption"))
    if not isinstance(document, dict) or not isinstance(document.get("sentences"), list):
        raise UserError(f"{path}: an MSR-VTT-style file is an object with a `sentences` list "
                        f"({{{video_key!r}: ..., {caption_key!r}: ...}}) and optionally `videos`")
    split_of: dict[str, str | None] = {}  # every listed video; None where it gives no split
    listed_at: dict[str, int] = {}
    for number, video in enumerate(document.get("videos") or []):
        if not isinstance(video, dict) or video_key not in video:
            raise UserError(f"{path}: videos[{number}] has no {video_key!r}")
        split = video.get("split") if read_splits and "split" in video else None
        if split is not None and (not isinstance(split, str) or split not in MSRVTT_SPLITS):
            raise UserError(f"{path}: videos[{number}] has split {split!r}; a video's split is one of "
                            f"{', '.join(MSRVTT_SPLITS)} (or leave `split` out of every video)")
        video_id, split = str(video[video_key]), None if split is None else MSRVTT_SPLITS[split]
        if video_id in split_of and split_of[video_id] != split:  # the last would win unannounced
            first = listed_at[video_id]
            raise UserError(f"{path}: videos[{number}] lists video {video_id!r} with {_split_words(split)}, but "
                            f"videos[{first}] with {_split_words(split_of[video_id])}; a video belongs to one "
                            f"split: keep one of the two entries")
        split_of[video_id] = split
        listed_at.setdefault(video_id, number)
    # Videos with a split beside videos without one: which split the latter belong to is
    # unknowable, and dropping them would lose their captions unannounced.
    unsplit = [video for video, split in split_of.items() if split is None]
    if unsplit and len(unsplit) < len(split_of):
        raise UserError(f"{path}: {len(unsplit)} of {len(split_of)} videos have no `split` (e.g. {unsplit[0]!r}); give "
                        f"every video a split, or none, so that the card's splits.ratios split whole videos")
    splits: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    found: dict[str, Path] = {}
    for number, sentence in enumerate(document["sentences"]):
        if not isinstance(sentence, dict) or video_key not in sentence or caption_key not in sentence:
            raise UserError(f"{path}: sentences[{number}] needs {video_key!r} and {caption_key!r}")
        video_id, caption = str(sentence[video_key]), sentence[caption_key]
        if not isinstance(caption, str) or not caption.strip():  # str() would make null the caption "None"
            what = "null" if caption is None else "empty" if isinstance(caption, str) else f"not text ({caption!r:.40})"
            raise UserError(f"{path}: sentences[{number}] (video {video_id!r}): {caption_key!r} is {what}; "
                            f"fill it or remove the sentence")
        caption = caption.strip()
        if split_of and video_id not in split_of:
            raise UserError(f"{path}: sentences[{number}] names video {video_id!r}, which `videos` does not list")
        if video_id not in found:
            found[video_id] = find_video(video_root, video_id, f"{path}: sentences[{number}]")
        index = counts.get(video_id, 0)
        counts[video_id] = index + 1
        splits.setdefault(split_of.get(video_id) or "all", []).append(_pair(video_id, found[video_id], caption, index))
    if not splits:
        raise UserError(f"{path}: no sentences")
    uncaptioned = [video for video in split_of if video not in counts]
    if uncaptioned and notes is not None:
        one = len(uncaptioned) == 1
        notes.append(f"{path.name}: {len(uncaptioned)} of the {len(split_of)} videos listed {'has' if one else 'have'} no "
                     f"captions (e.g. {uncaptioned[0]!r}); {'it is' if one else 'they are'} left out")
    return splits


def read_caption_csv(path: Path, video_root: Path, fields: dict, labelled: bool = True,
                     rows: list[tuple[int, list[str]]] | None = None) -> list[dict]:
    """A CSV with a header naming a video column and a caption column (`video,caption`).
    `rows`: a card loader's records of the file as a table."""
    rows = table_rows(path) if rows is None else rows
    if not rows:
        raise UserError(f"{path}: empty; a header `video,caption` then one row per caption")
    header = [cell.strip() for cell in rows[0][1]]
    video_column, caption_column = str(fields.get("video", "video")), str(fields.get("caption", "caption"))
    needed = [video_column] + ([caption_column] if labelled else [])
    video_index, caption_index = header_column(header, video_column, path), header_column(header, caption_column, path)
    missing = [c for c, index in ((video_column, video_index), (caption_column, caption_index))
               if c in needed and index is None]
    if missing:
        raise MissingField(f"{path}:1", f"no column {missing[0]!r} in the header {header}",
                           "name it, or map it with the card's `fields: {video: ..., caption: ...}`",
                           field="video" if missing[0] == video_column else "caption")
    examples, counts, found = [], {}, {}
    for number, cells in rows[1:]:
        where = f"{path}:{number}"
        if len(cells) != len(header):
            raise UserError(f"{where}: {len(cells)} cells, the header has {len(header)}; quote captions that hold commas")
        reference = cells[video_index].strip()
        if reference not in found:
            found[reference] = find_video(video_root, reference, where)
        video_id = reference
        index = counts.get(video_id, 0)
        counts[video_id] = index + 1
        caption = cells[caption_index].strip() if caption_index is not None else ""
        if labelled and not caption:
            raise UserError(f"{where}: empty caption; fill it or remove the row")
        example = _pair(video_id, found[reference], caption, index)
        if not labelled:
            example.pop("label")
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no rows after the header")
    return examples


def video_inputs(paths: list[Path]) -> list[dict]:
    """Video files and frame folders (a folder of videos stands for its videos) ->
    unlabelled examples, for `peftlab predict`."""
    examples = []
    for path in paths:
        if path.is_dir() and not frame_files(path):
            inner = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES or (p.is_dir() and frame_files(p)))
            if not inner:
                raise UserError(f"{path}: no videos ({', '.join(VIDEO_SUFFIXES)}) or frame folders in this folder")
            examples += [{"id": p.stem, "video_id": p.stem, "video": str(p)} for p in inner]
        elif path.is_dir() or path.suffix.lower() in VIDEO_SUFFIXES:
            examples.append({"id": path.stem, "video_id": path.stem, "video": str(path)})
        elif not path.exists():
            raise UserError(f"{path}: no such file or folder")
        else:
            raise UserError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES)}), a frame folder, or a caption CSV/JSON")
    return examples


# ----------------------------------------------------------------------------- demo

DEMO_COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 235), "yellow": (240, 215, 40)}
DEMO_SHAPES = ("square", "circle", "triangle")
DEMO_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DEMO_COMBINATIONS = [(c, s, d) for c in DEMO_COLOURS for s in DEMO_SHAPES for d in DEMO_DIRECTIONS]
DEMO_VERSION = 2
"""Part of the demo folder's name: bump it when the generator changes, so old files are not reused."""


def demo_caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moves {direction}"


def _draw(frame: np.ndarray, shape: str, cx: float, cy: float, radius: float, colour) -> None:
    size = frame.shape[0]
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        mask = (np.abs(xs - cx) <= radius * 0.9) & (np.abs(ys - cy) <= radius * 0.9)
    elif shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
    else:  # an upward triangle: apex on top, base at the bottom
        top, bottom = cy - radius, cy + radius * 0.8
        half_width = (ys - top) / (bottom - top) * radius
        mask = (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= half_width)
    frame[mask] = colour


def render_demo_video(rng: np.random.Generator, combination, frames: int, size: int) -> np.ndarray:
    """(frames, size, size, 3) uint8: the shape starts near the centre and moves towards
    the named edge at a random speed, over a noisy dark background."""
    colour, shape, direction = combination
    dx, dy = DEMO_DIRECTIONS[direction]
    radius = size * rng.uniform(0.17, 0.21)
    start = size / 2 + rng.uniform(-0.06, 0.06, size=2) * size
    travel = size * rng.uniform(0.3, 0.38)
    base = rng.integers(15, 45)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        frame = np.clip(base + rng.normal(0, 4, size=(size, size, 3)), 0, 255).astype(np.uint8)
        progress = t / max(frames - 1, 1)
        _draw(frame, shape, start[0] + dx * travel * progress, start[1] + dy * travel * progress, radius,
              DEMO_COLOURS[colour])
        video[t] = frame
    return video


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> None:
    """Frames -> an H.264 MP4 (near-lossless), written to a temporary name and renamed."""
    import av

    with io.atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv444p"  # no chroma subsampling: colours stay sharp on tiny frames
            stream.options = {"crf": "8", "preset": "veryfast"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


def demo_splits(sizes: dict[str, int], seed: int, frames: int = 16, size: int = 32) -> dict[str, list[dict]]:
    """Demo examples per split (one caption per video), their MP4s written on first use.
    Each split cycles through the 48 colour x shape x direction combinations in a seeded
    order, so a split of 48 holds each once."""
    folder = cache_root() / "demo" / "video_text" / f"v{DEMO_VERSION}-seed{seed}-{frames}f-{size}px"
    splits = {}
    for split, count in sizes.items():
        order = np.random.default_rng([seed, _SPLIT_CODES[split]]).permutation(len(DEMO_COMBINATIONS))
        examples = []
        for index in range(count):
            combination = DEMO_COMBINATIONS[order[index % len(order)]]
            path = folder / f"{split}-{index:05d}.mp4"
            if not path.is_file():
                rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
                write_video(path, render_demo_video(rng, combination, frames, size))
            video_id = f"{split}-{index:05d}"
            examples.append(_pair(video_id, path, demo_caption(*combination), 0))
        splits[split] = examples
    return splits
