"""Speech emotion data: audio files, `path,label[,speaker][,gender]` tables, splits that
keep speakers apart, and a deterministic synthetic demo.

Audio is read with soundfile (WAV, FLAC, OGG, MP3), mixed down to mono and resampled with
torchaudio to the backbone's rate. Every file is decoded once when a card is read, so a
corrupt, empty or silent file is reported before training starts (or counted and
skipped when the card says `on_bad_file: skip`); the decoded clips are kept in a
bounded cache for the training epochs.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
from peftlab.shared.data import (
    SPLITS,
    check_ratios,
    group_cell,
    header_column,
    label_cell,
    ratio_split,
    table_rows,
)
from peftlab.shared.errors import MissingField, UserError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
MIN_SECONDS = 0.1
"""Shorter clips give no frame after wav2vec 2.0's CNN (400-sample receptive field) and
carry no emotion to speak of; they count as bad files."""
SILENCE_PEAK = 1e-4
"""A clip whose peak amplitude is below this (-80 dBFS) is digital silence: a bad file."""


# --------------------------------------------------------------------------- audio
class BadAudio(Exception):
    """A file that cannot serve as an example; the message says why."""


def decode(path: Path) -> tuple[np.ndarray, int, int]:
    """-> (mono float32 waveform, sample rate, channels mixed into it). Raises BadAudio
    for unusable files."""
    try:
        waveform, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, OSError) as error:
        if not Path(path).is_file():
            raise BadAudio("file not found") from None
        raise BadAudio(f"not a readable WAV/FLAC/OGG/MP3 file ({str(error).splitlines()[0]})") from None
    channels = waveform.shape[1]
    waveform = waveform.mean(axis=1)  # mono mix-down
    if len(waveform) == 0:
        raise BadAudio("empty (no samples)")
    if not np.isfinite(waveform).all():
        raise BadAudio("contains NaN or infinite samples")
    if len(waveform) < MIN_SECONDS * rate:
        raise BadAudio(f"only {len(waveform) / rate:.3f} s long (minimum {MIN_SECONDS} s)")
    if np.abs(waveform).max() < SILENCE_PEAK:
        raise BadAudio("silent (peak below -80 dBFS)")
    return np.ascontiguousarray(waveform), int(rate), channels


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return waveform
    import torchaudio

    return torchaudio.functional.resample(torch.from_numpy(waveform), rate, target).numpy()


class AudioCache:
    """Decoded clips by path, least recently used evicted past a byte budget."""

    def __init__(self, budget_mb: float):
        self.budget = int(budget_mb * 2**20)
        self.used = 0
        self.clips: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()

    def get(self, path: str) -> tuple[np.ndarray, int]:
        if path in self.clips:
            self.clips.move_to_end(path)
            return self.clips[path]
        try:
            waveform, rate, _ = decode(Path(path))
        except BadAudio as error:  # it was fine when the card was read: the file changed since
            raise UserError(f"{path}: {error}") from None
        clip = (waveform, rate)
        self.put(path, clip)
        return clip

    def put(self, path: str, clip: tuple[np.ndarray, int]) -> None:
        size = clip[0].nbytes
        if size > self.budget:
            return
        self.clips[path] = clip
        self.used += size
        while self.used > self.budget:
            _, (evicted, _) = self.clips.popitem(last=False)
            self.used -= evicted.nbytes


CACHE = AudioCache(budget_mb=1024)
"""One per process; `SpeechEmotionOptions.audio_cache_mb` sets its budget."""


NOISE_SNR_DB = (10.0, 30.0)
MASK_SHARE = (0.10, 0.15)
MASK_FADE_SECONDS = 0.01


def augment_audio(waveform: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
    """PEFT-SER's training augmentation, on every clip: Gaussian noise at a signal-to-
    noise ratio drawn uniformly in 10-30 dB, then one span of 10-15 % of the clip
    silenced, faded in and out over 10 ms."""
    rms = float(np.sqrt(np.mean(np.square(waveform, dtype=np.float64))))
    snr = rng.uniform(*NOISE_SNR_DB)
    noisy = waveform + rng.normal(0.0, rms / 10 ** (snr / 20), size=len(waveform))
    width = int(rng.uniform(*MASK_SHARE) * len(waveform))
    if width > 0:
        start = int(rng.integers(0, len(waveform) - width + 1))
        gain = np.zeros(width)
        fade = min(int(MASK_FADE_SECONDS * rate), width // 2)
        if fade > 0:  # into and out of the silence, not a click
            gain[:fade] = np.linspace(1.0, 0.0, fade)
            gain[-fade:] = np.linspace(0.0, 1.0, fade)
        noisy[start:start + width] *= gain
    return noisy.astype(np.float32)


def crop(waveform: np.ndarray, max_samples: int, window: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """At most `max_samples` of a longer clip: a random window (from `rng`), the start
    or the centre."""
    if len(waveform) <= max_samples:
        return waveform
    if window == "random":
        start = int(rng.integers(0, len(waveform) - max_samples + 1))
    elif window == "start":
        start = 0
    else:
        start = (len(waveform) - max_samples) // 2
    return waveform[start:start + max_samples]


def audio_example(path: Path, on_bad_file: str | None = None, where: str | None = None) -> dict | None:
    """An unlabelled example for one audio file (decoded once to check it, then cached).
    `on_bad_file` is the card's setting (None: files given to predict, no card); `where`
    the table line that names the file."""
    try:
        waveform, rate, channels = decode(path)
    except BadAudio as error:
        if on_bad_file == "skip":
            return None
        card_hint = " (or set `on_bad_file: skip` in the card)" if on_bad_file is not None else ""
        raise UserError(f"{where + ': ' if where else ''}{path}: {error}; fix or remove the file{card_hint}") from None
    CACHE.put(str(path), (waveform, rate))
    return {"id": str(path), "path": str(path), "samples": len(waveform), "sample_rate": rate, "channels": channels}


def audio_files(paths: list[Path]) -> list[Path]:
    """Files as given; a folder stands for its audio files (sorted, recursively)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))  # not macOS ._x.wav
        elif path.suffix.lower() in AUDIO_SUFFIXES:
            found.append(path)
        else:
            raise UserError(f"{path}: not an audio file; speech-emotion reads {', '.join(AUDIO_SUFFIXES)} files, "
                            f"folders of them, or a CSV/TSV table of their paths")
    if not found:
        raise UserError(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return found


# --------------------------------------------------------------------------- tables
LABEL_FIX = "fix the cell, the card's `labels`, or map it with `label_map` (null drops the row)"

TABLE_FIELDS = ("path", "label", "speaker", "gender", "session")
"""Fields a table may name: `fields: {path: file, label: emotion, speaker: speaker_id}`.
`path` and `label` default to columns of those names; the others are optional."""


@dataclass
class TableRows:
    examples: list[dict]
    skipped: list[str]
    """`path: why` of each bad file skipped (card `on_bad_file: skip`)."""
    dropped: dict[str, int]
    """Rows left out by `label_map` (label cell mapped to null) -> count, by cell."""


def read_table(path: Path, audio_root: Path, fields: dict, labels: list[str] | None, label_map: dict | None,
               group_by: str | None, on_bad_file: str, labelled: bool = True,
               rows: list[tuple[int, list[str]]] | None = None) -> TableRows:
    """A CSV (or TSV, by suffix) with a header row; relative audio paths start at `audio_root`.
    Unlabelled (`peftlab predict`), a label column is not needed and not read. `rows`: a
    card loader's records of the file as a table."""
    if rows is None:
        rows = table_rows(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    if not rows:
        raise UserError(f"{path}: empty table; it needs a header row (e.g. path,label,speaker) and one row per clip")
    header = [h.strip() for h in rows[0][1]]
    columns = {}
    for key in TABLE_FIELDS:
        spec = fields.get(key, key)
        if isinstance(spec, int) and 0 <= spec < len(header):
            columns[key] = spec
        elif (index := header_column(header, spec, path)) is not None:
            columns[key] = index
        # prediction reads the audio alone: the card's speaker, gender and session columns may be absent there
        elif key == "path" or (labelled and key in ("label", *fields)):
            raise MissingField(str(path), f"column {spec!r} for fields.{key} is not in the header {header}", "fix `fields` in the card",
                               field=key)
    group_column = columns.get(group_by, None if group_by is None else header_column(header, group_by, path))
    if group_by is not None and group_column is None:
        raise UserError(f"{path}: the card's group_by {group_by!r} is neither a field ({', '.join(columns)}) nor a "
                        f"column of {header}; set group_by to one of them, or leave it out")
    examples, skipped, dropped = [], [], {}
    for number, cells in rows[1:]:
        where = f"{path}:{number}"
        if len(cells) != len(header):
            raise UserError(f"{where}: {len(cells)} columns, the header has {len(header)}")
        label_text = cells[columns["label"]].strip() if labelled else None
        if labelled and label_map and label_text in label_map:
            label_text = label_map[label_text]
            if label_text is None:  # mapped to null: not one of the classes studied
                dropped[cells[columns["label"]].strip()] = dropped.get(cells[columns["label"]].strip(), 0) + 1
                continue
        audio = Path(cells[columns["path"]].strip()).expanduser()
        if not audio.is_absolute():
            audio = audio_root / audio
        example = audio_example(audio, on_bad_file, where)
        if example is None:
            skipped.append(str(audio))
            continue
        example["id"] = cells[columns["path"]].strip()
        if labelled:
            example["label"] = label_cell(str(label_text), labels, where, LABEL_FIX)  # label_map may give numbers
        for key in ("speaker", "gender", "session"):
            if key in columns:
                example[key] = group_cell(cells[columns[key]], where) if key == "speaker" else cells[columns[key]].strip()
        if group_column is not None:
            example["group"] = cells[group_column].strip()
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no usable rows under the header")
    return TableRows(examples, skipped, dropped)


# --------------------------------------------------------------------------- splits
def speaker_split(examples: list[dict], ratios: dict[str, float], seed: int, where: str) -> dict[str, list[dict]]:
    """Whole speakers per split, so no voice is heard in two of them.

    Speakers are shuffled (seeded) and dealt by the ratios, every split with a positive
    ratio getting at least one speaker; the remainder goes to train (to the last split
    where train's ratio is 0, e.g. `{test: 1.0}` for a card to evaluate on).
    """
    check_ratios(ratios, where)
    speakers = sorted({e["speaker"] for e in examples})
    names = [n for n in ("validation", "test") if ratios.get(n, 0) > 0]
    wanted = names + (["train"] if ratios.get("train", 0) > 0 else [])  # the last one takes the remainder
    if len(speakers) < len(wanted):
        raise UserError(f"{where}: {len(speakers)} speaker(s) cannot be split speaker-independently into "
                        f"{', '.join(sorted(wanted, key=SPLITS.index))}; add speakers or give per-split files")
    order = list(np.random.default_rng(seed).permutation(speakers))
    assignment = {}
    for position, name in enumerate(wanted[:-1]):
        later = len(wanted) - position - 1  # splits still to get a speaker each
        count = min(max(1, int(round(ratios[name] * len(speakers)))), len(order) - later)
        for speaker in order[:count]:
            assignment[speaker] = name
        order = order[count:]
    for speaker in order:
        assignment[speaker] = wanted[-1]
    splits = {name: [] for name in sorted(wanted, key=SPLITS.index)}
    for example in examples:
        splits[assignment[example["speaker"]]].append(example)
    return splits


def hold_out_speakers(train: list[dict], validation_fraction: float, seed: int, where: str) -> dict[str, list[dict]]:
    """Train -> {train, validation}: a `validation_fraction` share (already checked to be
    in [0, 1)) held out for model selection, whole speakers at a time where every row
    names its speaker, else each emotion in proportion. A fraction of 0 holds out nothing
    and leaves no validation split (training keeps its last epoch's model)."""
    if validation_fraction == 0:
        return {"train": train}
    ratios = {"train": 1 - validation_fraction, "validation": validation_fraction}
    if all("speaker" in e for e in train):
        if len({e["speaker"] for e in train}) < 2:
            raise UserError(f"{where}: the training data has one speaker, too few to hold out whole speakers for "
                            f"validation; give a validation split or set splits.validation_fraction: 0")
        split = speaker_split(train, ratios, seed, where)
    else:
        split = ratio_split(train, ratios, seed, where=where)
    if not split.get("validation"):
        raise UserError(f"{where}: splits.validation_fraction={validation_fraction} of {len(train)} training clips "
                        f"holds out none; give a validation split, raise the fraction, or set it to 0")
    return {"train": split["train"], "validation": split["validation"]}


# --------------------------------------------------------------------------- demo
DEMO_LABELS = ["neutral", "happy", "angry", "sad"]
DEMO_RATE = 16000

# class -> (pitch factor, pitch slope over the clip, pitch wobble depth, loudness,
#           syllables per second, spectral tilt: harmonic h has amplitude h ** -tilt)
_DEMO_STYLE = {
    "neutral": (1.00, -0.05, 0.01, 0.25, 4.0, 1.2),
    "happy": (1.35, +0.30, 0.08, 0.45, 5.5, 1.0),
    "angry": (1.20, -0.30, 0.03, 0.80, 6.5, 0.6),
    "sad": (0.85, -0.15, 0.005, 0.10, 2.5, 1.8),
}
_VOWELS = [(730, 1090), (270, 2290), (530, 1840), (570, 840), (440, 1020), (300, 870)]
"""(F1, F2) in Hz of six vowels (Peterson & Barney 1952, adult male averages)."""


def synthesize(emotion: str, base_pitch: float, formant_scale: float, seconds: float,
               rng: np.random.Generator) -> np.ndarray:
    """One synthetic utterance: a harmonic source following a pitch contour, shaped into
    syllables, through two formant resonators, plus breath noise.

    The emotion sets the pitch level, slope and wobble, the loudness, the speaking rate
    and how bright the voice is; the speaker sets the base pitch and vocal-tract size.
    """
    from scipy import signal

    factor, slope, wobble, loudness, rate, tilt = _DEMO_STYLE[emotion]
    n = int(seconds * DEMO_RATE)
    t = np.arange(n) / DEMO_RATE
    jitter = lambda spread: 1 + spread * rng.uniform(-1, 1)  # noqa: E731
    pitch = base_pitch * factor * jitter(0.08) * (1 + slope * t / seconds)
    pitch *= 1 + wobble * np.sin(2 * np.pi * 5.0 * t + rng.uniform(0, 2 * np.pi))
    phase = 2 * np.pi * np.cumsum(pitch) / DEMO_RATE
    # sum over harmonics h of h^-tilt sin(h phase), below 4 kHz (no aliasing); sin(h phase)
    # by the recurrence sin((h+1)x) = 2 cos(x) sin(hx) - sin((h-1)x), far cheaper than sin
    twice_cos = 2 * np.cos(phase)
    previous, current = np.zeros(n), np.sin(phase)
    source = np.zeros(n)
    for h in range(1, int(4000 / pitch.min()) + 1):
        source += h**-tilt * current * (h * pitch < 4000)
        previous, current = current, twice_cos * current - previous
    # syllables: voiced bursts at the speaking rate, each with its own vowel
    syllable_rate = rate * jitter(0.12)
    envelope = np.clip(np.sin(np.pi * syllable_rate * t + rng.uniform(0, np.pi)), 0, None) ** 0.7
    syllable_index = np.floor(syllable_rate * t + rng.uniform(0, 1)).astype(int)
    voiced = np.zeros(n)
    for index in np.unique(syllable_index):
        part = syllable_index == index
        f1, f2 = _VOWELS[int(rng.integers(len(_VOWELS)))]
        shaped = source[part]
        for formant, bandwidth in ((f1 * formant_scale, 90.0), (f2 * formant_scale, 120.0)):
            radius = np.exp(-np.pi * bandwidth / DEMO_RATE)
            theta = 2 * np.pi * formant / DEMO_RATE
            shaped = signal.lfilter([1 - radius], [1, -2 * radius * np.cos(theta), radius**2], shaped)
        voiced[part] = shaped
    voiced *= envelope
    voiced /= np.abs(voiced).max() + 1e-9
    noise = rng.normal(0, 0.02, n) * (0.3 + envelope)
    waveform = loudness * jitter(0.2) * (voiced + noise)
    return np.clip(waveform, -1, 1).astype(np.float32)


def demo_speakers(count: int, seed: int) -> list[dict]:
    """Alternating female / male speakers, each with a base pitch and vocal-tract scale."""
    rng = np.random.default_rng(seed)
    speakers = []
    for index in range(count):
        gender = "female" if index % 2 == 0 else "male"
        pitch = rng.uniform(180, 240) if gender == "female" else rng.uniform(95, 140)
        scale = rng.uniform(1.05, 1.2) if gender == "female" else rng.uniform(0.9, 1.02)
        speakers.append({"speaker": f"spk{index:02d}", "gender": gender, "pitch": pitch, "scale": scale})
    return speakers


_DEMO_CACHE: dict[tuple, dict] = {}


def demo_splits(speakers: int, per_speaker: int, validation_speakers: int, test_speakers: int,
                seconds: float, seed: int) -> dict[str, list[dict]]:
    """Synthetic utterances, split by speaker: the last `test_speakers` speakers are the
    test split, the `validation_speakers` before them the validation split (both
    gender-balanced when even). Clip lengths vary by +-20 % around `seconds`."""
    if validation_speakers + test_speakers >= speakers:
        raise UserError(f"demo: {speakers} speakers leave none to train after {validation_speakers} validation and {test_speakers} test speakers")
    key = (speakers, per_speaker, validation_speakers, test_speakers, seconds, seed)
    if key not in _DEMO_CACHE:  # every contract test reads the demo card: generate once
        rng = np.random.default_rng(seed)
        examples = []
        for speaker in demo_speakers(speakers, seed):
            for number in range(per_speaker):
                emotion = DEMO_LABELS[number % len(DEMO_LABELS)]
                length = seconds * rng.uniform(0.8, 1.2)
                audio = synthesize(emotion, speaker["pitch"], speaker["scale"], length, rng)
                examples.append({"id": f"{speaker['speaker']}_{number:03d}_{emotion}", "audio": audio,
                                 "samples": len(audio), "sample_rate": DEMO_RATE,
                                 "label": DEMO_LABELS.index(emotion),
                                 "speaker": speaker["speaker"], "gender": speaker["gender"]})
        order = [s["speaker"] for s in demo_speakers(speakers, seed)]
        test = set(order[speakers - test_speakers:])
        validation = set(order[speakers - test_speakers - validation_speakers:speakers - test_speakers])
        _DEMO_CACHE[key] = {
            "train": [e for e in examples if e["speaker"] not in test | validation],
            "validation": [e for e in examples if e["speaker"] in validation],
            "test": [e for e in examples if e["speaker"] in test],
        }
    return {split: [dict(e) for e in rows] for split, rows in _DEMO_CACHE[key].items()}
