"""`speech-emotion`: an utterance -> its emotion class, after PEFT-SER (Feng & Narayanan 2023).

The speech encoder stays frozen apart from the PEFT method. Its hidden states from every
layer are mixed by learned softmax weights, mean-pooled over the valid (unpadded)
frames, and a small MLP gives the class logits; the loss is cross-entropy, weighted by
inverse class frequency by default, and models are selected on UAR (unweighted average
recall = balanced accuracy). Accuracy is reported as the field's "weighted accuracy".

When a method leaves the encoder's first stages frozen (the CNN feature encoder always
is, apart from `full`), their outputs are computed once, not every epoch, as long as
training clips are not cropped at random and padding cannot change them (frozen-feature
caching, `shared/feature_cache.py`).
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peftlab.shared import methods, reports, requests
from peftlab.shared.cards import Card
from peftlab.shared.data import (
    check_validation_given,
    count_by_split,
    in_several_splits,
    is_unknown_group,
    number_classes,
    ratio_split,
    split_ratios,
    table_rows,
    unknown_groups_note,
    validation_fraction,
)
from peftlab.shared.errors import UserError
from peftlab.shared.feature_cache import FeatureCache, in_training, plan, unique_ids
from peftlab.shared.folds import split_sources
from peftlab.shared.loaders import loader_rows
from peftlab.shared.tasks import (
    SPLIT_KEYS,
    Dataset,
    FP32Head,
    describe_scores,
    file_identity,
    register_task,
)
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence

from . import data
from .backbones import SpeechEncoder, backbone_names, load_backbone


@dataclass
class SpeechEmotionOptions:
    max_seconds: float = field(default=6.0, metadata={"help": "longest audio the model sees; longer clips are cropped (see train_crop and eval_crop); Whisper takes at most 30"})
    train_crop: str = field(default="random", metadata={"help": "training window of clips longer than max_seconds: random (a new one each epoch) or start (the first max_seconds, as PEFT-SER)"})
    eval_crop: str = field(default="center", metadata={"help": "evaluation of clips longer than max_seconds: center (the middle window), start (the first max_seconds, as PEFT-SER) or full (the whole clip, up to the backbone's limit)"})
    augment: bool = field(default=False, metadata={"help": "PEFT-SER's training augmentation on every clip: Gaussian noise at "
                                                         "10-30 dB SNR and one silenced span of 10-15 % (new each epoch)"})
    class_weight: str = field(default="balanced", metadata={"help": "cross-entropy class weights: balanced (inverse training-split frequency, as PEFT-SER) or none"})
    head_hidden: int = field(default=256, metadata={"help": "hidden width of the MLP head"})
    head_dropout: float = field(default=0.1, metadata={"help": "dropout in the MLP head"})
    audio_cache_mb: float = field(default=1024, metadata={"help": "memory for decoded clips kept between epochs (least recently used evicted)"})
    class_counts: list[int] | None = field(default=None, init=False, metadata={"help": "set by the reader: training-split count per class, for class_weight=balanced"})

    def __post_init__(self):
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.train_crop not in ("random", "start"):
            raise ValueError(f"train_crop must be random or start, got {self.train_crop!r}")
        if self.eval_crop not in ("center", "start", "full"):
            raise ValueError(f"eval_crop must be center, start or full, got {self.eval_crop!r}")
        if self.class_weight not in ("balanced", "none"):
            raise ValueError(f"class_weight must be balanced or none, got {self.class_weight!r}")
        if self.head_hidden < 1:
            raise ValueError(f"head_hidden must be >= 1, got {self.head_hidden}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.audio_cache_mb < 0:
            raise ValueError(f"audio_cache_mb must be >= 0, got {self.audio_cache_mb}")


class EmotionHead(nn.Module):
    """Softmax-weighted sum of all hidden layers, masked mean pooling, MLP.

    Each layer's states are layer-normalised (no learned affine) before mixing, so the
    weights compare layers on one scale: Whisper's and wav2vec 2.0's intermediate states
    are far larger than their final, normalised ones. The layer weights start equal
    (zero logits) and train with the head, so they are saved with the run's adapter.
    """

    def __init__(self, num_states: int, width: int, hidden: int, classes: int, dropout: float):
        super().__init__()
        self.layer_logits = nn.Parameter(torch.zeros(num_states))
        self.mlp = FP32Head(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def layer_weights(self) -> torch.Tensor:
        return torch.softmax(self.layer_logits, dim=0)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (L + 1, B, T, D), mask (B, T) -> (B, D): the mean over valid frames only."""
        states = F.layer_norm(states, states.shape[-1:])
        mixed = torch.einsum("l,lbtd->btd", self.layer_weights().to(states.dtype), states)
        weights = mask.unsqueeze(-1).to(mixed.dtype)
        return (mixed * weights).sum(1) / weights.sum(1).clamp(min=1)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(states, mask))


class SpeechEmotionModel(nn.Module):
    def __init__(self, backbone: SpeechEncoder, info: dict, labels: list[str], options: SpeechEmotionOptions):
        super().__init__()
        self.backbone = backbone
        self.backbone_info = info
        self.options = options
        self.head = EmotionHead(backbone.num_states, backbone.width, options.head_hidden, len(labels), options.head_dropout)
        self.register_buffer("class_weights", _class_weights(options, len(labels)), persistent=False)
        limit = options.max_seconds if backbone.max_seconds is None else min(options.max_seconds, backbone.max_seconds)
        self.max_seconds = limit
        self.eval_seconds = limit if options.eval_crop != "full" else (backbone.max_seconds or math.inf)
        self.feature_cache: FeatureCache | None = None

    def plan_feature_cache(self, train_examples: list[dict], budget_bytes: int) -> str:
        """Turn the cache on when the method leaves the encoder's first stages frozen and
        each training clip reaches them the same way every epoch; say what was decided and why."""
        self.feature_cache = None
        encoder = self.encoder()
        frozen, reason, total = in_training(self, encoder.stages)
        lengths = [self.example_length(e) for e in train_examples]
        if self.options.augment:
            varying = "task.augment adds new noise and a new silenced span to every training clip each epoch"
        elif self.options.train_crop == "random" and any(e["samples"] / e["sample_rate"] > self.max_seconds
                                                       for e in train_examples):
            varying = (f"clips longer than task.max_seconds={self.max_seconds:g} get a new random window each epoch; "
                       f"a task.max_seconds above the longest clip keeps them whole, task.train_crop=start fixes the window")
        elif not encoder.padding_free and len(set(lengths)) > 1:
            varying = (f"the {encoder.family} encoder's features of a clip change with the padding its batch adds "
                       f"(Whisper's log-mel frames, a group-normalised CNN, or no attention mask), and the clips differ in length")
        else:
            varying = unique_ids(train_examples)

        def needed(stages: int) -> int:  # states kept: the frames, then the entry's and each frozen layer's output
            states = max(1, min(stages, encoder.num_layers + 2) - 1)
            frames = encoder.stage_frames(torch.tensor(self._encoder_input_lengths(lengths)), stages).sum().item()
            return int(frames) * states * encoder.width * 4

        # the CNN feature encoder alone is most of a frozen encoder's cost at these lengths
        self.feature_cache, line = plan(frozen, reason, total, budget_bytes, needed, varying_inputs=varying)
        return line

    def _encoder_input_lengths(self, samples: list[int]) -> list[int]:
        """Samples -> what `featurize` reports as lengths (mel frames for Whisper)."""
        encoder = self.encoder()
        return [n // encoder.extractor.hop_length for n in samples] if encoder.family == "whisper" else samples

    def encoder(self) -> SpeechEncoder:
        return methods.network_of(self.backbone)

    def example_length(self, example) -> int:
        """Samples at the backbone's rate after cropping: the cost that batches are bucketed by."""
        rate = self.encoder().sampling_rate
        return int(min(example["samples"] / example["sample_rate"], self.max_seconds) * rate)

    def waveform(self, example, rng: np.random.Generator | None) -> np.ndarray:
        """The example's clip, cropped (at its own rate, cheaper) and resampled to the backbone's."""
        if "audio" in example:
            audio, rate = example["audio"], example["sample_rate"]
        else:
            audio, rate = data.CACHE.get(example["path"])
        training = rng is not None
        seconds = self.max_seconds if training else self.eval_seconds
        max_samples = int(seconds * rate) if math.isfinite(seconds) else len(audio)
        if training:
            window = self.options.train_crop
        else:  # eval_crop=full keeps the centre of a clip longer than the backbone's own limit
            window = "start" if self.options.eval_crop == "start" else "center"
        audio = data.resample(data.crop(audio, max_samples, window, rng), rate, self.encoder().sampling_rate)
        if training and self.options.augment:
            audio = data.augment_audio(audio, self.encoder().sampling_rate, rng)
        return audio

    def collate(self, examples, rng):
        featurized = self.encoder().featurize([self.waveform(e, rng) for e in examples])
        batch: dict[str, Any] = {"inputs": featurized.inputs, "lengths": featurized.lengths}
        if rng is not None and self.feature_cache is not None:
            batch["cache_keys"] = [e["id"] for e in examples]
        if all(isinstance(e.get("label"), int) for e in examples):
            batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    def forward(self, batch) -> torch.Tensor:
        device = self.head.layer_logits.device
        inputs, lengths = batch["inputs"].to(device), batch["lengths"].to(device)
        cache, keys = self.feature_cache, batch.get("cache_keys")
        if cache is None or keys is None or not self.training:
            states, mask = self.backbone(inputs, lengths)
            return self.head(states, mask)
        frames = self.encoder().stage_frames(lengths, cache.stages).tolist()

        def compute() -> torch.Tensor:
            output = self.backbone(inputs, lengths, stop=cache.stages)
            return output[0] if isinstance(output, tuple) else output  # every stage frozen: the states

        def split(states: torch.Tensor) -> list[torch.Tensor]:  # each clip's valid frames, (states, T, D)
            return [states[:, row, :count] for row, count in enumerate(frames)]

        def join(rows: list[torch.Tensor]) -> torch.Tensor:  # zero-padded to the longest, as computed
            return pad_sequence([r.transpose(0, 1) for r in rows], batch_first=True).permute(2, 0, 1, 3)

        prefix = cache.prefix(keys, compute, split, join)
        states, mask = self.backbone(inputs, lengths, hidden=prefix, start=cache.stages)
        return self.head(states, mask)

    def loss(self, logits, batch):
        labels = batch["labels"].to(logits.device)
        return F.cross_entropy(logits.float(), labels, weight=self.class_weights)

    def scores(self, logits):
        probabilities = torch.softmax(logits.float(), dim=-1)
        # Two classes: report P(class 1), so binary metrics (AUROC, AUPR) apply.
        return probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities


def _class_weights(options: SpeechEmotionOptions, classes: int) -> torch.Tensor | None:
    """Inverse frequency, normalised to mean 1 over the classes present (sklearn's
    'balanced'); None (uniform) without counts, e.g. when a saved run predicts."""
    if options.class_weight == "none" or options.class_counts is None:
        return None
    counts = torch.tensor(options.class_counts, dtype=torch.float32)
    weights = torch.where(counts > 0, counts.sum() / (classes * counts.clamp(min=1)), torch.zeros(()))
    return weights


# --------------------------------------------------------------------------- method defaults
def _method_defaults(family: str, blocks: str, num_layers: int) -> dict[str, dict]:
    """PEFT-SER's choices: LoRA and adapters on each layer's feed-forward block.

    LoRA-style methods go on both feed-forward projections (pass
    `method.target_modules=[q_proj,v_proj]` for attention instead); `adapter` (Houlsby)
    follows the feed-forward output projection, and `parallel_adapter` is PEFT-SER's
    adapter, a scaled branch across the feed-forward block; SSF scales every Linear and
    LayerNorm in the transformer layers; `speech_prompt` puts fresh vectors before each layer.
    """
    if family == "whisper":
        feed_forward, second, key, value = ["fc1", "fc2"], ["fc2"], "self_attn.k_proj", "self_attn.v_proj"
    else:
        feed_forward = ["feed_forward.intermediate_dense", "feed_forward.output_dense"]
        second, key, value = ["feed_forward.output_dense"], "attention.k_proj", "attention.v_proj"
    first = feed_forward[0].rpartition(".")[2]
    low_rank = {"target_modules": feed_forward, "blocks": blocks}
    return {
        "lora": low_rank, "dora": low_rank, "loha": low_rank, "lokr": low_rank, "vera": low_rank,
        "ia3": {"target_modules": [key, value, *second], "feedforward_modules": second, "blocks": blocks},
        "adapter": {"target_modules": second, "blocks": blocks},
        # PEFT-SER's adapter: a branch across the feed-forward block, width 128, scale 0.1
        "parallel_adapter": {"target_modules": second, "input_from": first, "size": 128, "scale": 0.1, "blocks": blocks},
        "ssf": {"layers": list(range(num_layers)), "blocks": blocks},
        "speech_prompt": {"placement": "every_layer"},  # PEFT-SER's code: fresh prompts before each layer
        "freeze_layers": {"blocks": blocks},
    }


# --------------------------------------------------------------------------- the task
DEMO_DEFAULTS = {"speakers": 16, "per_speaker": 24, "validation_speakers": 2, "test_speakers": 4, "seconds": 1.0, "seed": 0}


def audio_format_notes(splits: dict[str, list[dict]]) -> list[str]:
    """What reading does to the clips beyond decoding them: resampling (noted where any
    clip is not at 16 kHz, the rate WavLM, wav2vec 2.0, HuBERT and Whisper take) and
    mixing multi-channel clips down to mono."""
    examples = [e for split in splits.values() for e in split]
    notes = []
    rates = Counter(e["sample_rate"] for e in examples)
    if set(rates) - {16000}:
        counts = ", ".join(f"{rate} Hz: {n}" for rate, n in sorted(rates.items()))
        notes.append(f"clips by sample rate ({counts}) are resampled to the encoder's sampling rate as they are read")
    multichannel = Counter(e["channels"] for e in examples if e.get("channels", 1) > 1)
    if multichannel:
        counts = ", ".join(f"{n} with {channels} channels" for channels, n in sorted(multichannel.items()))
        notes.append(f"{sum(multichannel.values())} clips ({counts}) are mixed down to mono (the channels' mean)")
    return notes


class SpeechEmotionTask:
    name = "speech-emotion"
    example_unit = "clips"
    domain = "speech_emotion"
    description = "utterance -> emotion on a frozen WavLM / wav2vec 2.0 / HuBERT / Whisper encoder (PEFT-SER)"
    metrics = ("uar", "accuracy", "macro_f1")
    primary_metric = "uar"
    formats = ("audio_csv", "demo")
    loader_format = "audio_csv"
    card_keys = ("demo", "on_bad_file", "label_map")
    split_keys = (*SPLIT_KEYS, "validation_fraction")
    field_keys = data.TABLE_FIELDS
    group_metrics = True
    """The card's `group_by` gives per-group metrics (e.g. UAR per gender) and their gap."""
    options = SpeechEmotionOptions

    def backbones(self) -> list[str]:
        return backbone_names()

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        encoder = model.encoder()
        return dict(_method_defaults(encoder.family, encoder.blocks_path, encoder.num_layers).get(method, {}))

    # ----------------------------------------------------------------------- reading
    def read(self, card: Card, options: SpeechEmotionOptions) -> Dataset:
        data.CACHE.budget = int(options.audio_cache_mb * 2**20)
        on_bad_file = card.option("on_bad_file", "error")
        if on_bad_file not in ("error", "skip"):
            raise UserError(f"{card.card_path}: on_bad_file must be error or skip, got {on_bad_file!r}")
        if card.format == "demo":
            splits, labels, notes = self._read_demo(card)
        elif card.format == "audio_csv":
            splits, labels, notes = self._read_tables(card, on_bad_file)
        else:
            raise UserError(f"{card.card_path}: speech-emotion reads formats {', '.join(self.formats)}, not {card.format!r}")
        counts = Counter(e["label"] for e in splits.get("train", []))
        options.class_counts = [counts.get(i, 0) for i in range(len(labels))]
        notes += audio_format_notes(splits)
        long, where = count_by_split(splits, lambda e: e["samples"] > options.max_seconds * e["sample_rate"])
        if long:
            notes.append(f"{long} clips ({where}) longer than max_seconds={options.max_seconds} are cropped "
                         f"({options.train_crop} window in training, {options.eval_crop} at evaluation)")
        return Dataset(splits, labels, notes)

    def _read_demo(self, card: Card):
        demo = {**DEMO_DEFAULTS, **(card.option("demo") or {})}
        unknown = sorted(set(demo) - set(DEMO_DEFAULTS))
        if unknown:
            raise UserError(f"{card.card_path}: demo.{unknown[0]} is not a demo setting; valid: {', '.join(DEMO_DEFAULTS)}")
        labels = card.labels or list(data.DEMO_LABELS)
        if labels != data.DEMO_LABELS:
            raise UserError(f"{card.card_path}: the demo generates the classes {data.DEMO_LABELS}; remove or fix `labels`")
        splits = data.demo_splits(int(demo["speakers"]), int(demo["per_speaker"]), int(demo["validation_speakers"]),
                                  int(demo["test_speakers"]), float(demo["seconds"]), int(demo["seed"]))
        if card.group_by is not None:
            if card.group_by not in ("gender", "speaker"):
                raise UserError(f"{card.card_path}: the demo can group by gender or speaker, not {card.group_by!r}")
            for split in splits.values():
                for example in split:
                    example["group"] = example[card.group_by]
        return splits, labels, []

    def _read_tables(self, card: Card, on_bad_file: str):
        label_map = card.option("label_map")
        if label_map is not None and not isinstance(label_map, dict):
            raise UserError(f"{card.card_path}: label_map maps label cells to class names, e.g. {{exc: happy, oth: null}}")
        audio_root = card.resolve(card.path, "path") if card.path else card.folder
        spec = dict(card.splits or {})
        read = lambda path, rows: data.read_table(path, audio_root, card.fields, card.labels, label_map,  # noqa: E731
                                                  card.group_by, on_bad_file, rows=rows)
        notes, skipped, dropped = [], [], Counter()
        sources = split_sources(card, True, lambda: card.file("data"),
                                lambda path: table_rows(path, "\t" if path.suffix.lower() == ".tsv" else ","))
        if sources:
            splits = {}
            for split, (path, rows) in sources.items():
                table = read(path, rows)
                splits[split], skipped = table.examples, skipped + table.skipped
                dropped.update(table.dropped)
            check_validation_given(card, "validation" in splits)
            folds = "fold_by" in spec
            if "validation" not in splits and "train" in splits:  # carved out of train, for model selection
                fraction = validation_fraction(card)
                splits.update(data.hold_out_speakers(splits["train"], fraction, int(spec.get("seed", 0)), str(card.card_path)))
                if "validation" in splits:
                    notes.append(_held_out_note(splits["validation"], fraction,
                                                "the data has no test split" if "test" not in splits else
                                                "the test fold is untouched" if folds else "test is untouched"))
            overlap = in_several_splits(splits, "speaker")
            if overlap:
                given = f"splits.fold_by: {spec['fold_by']}" if folds else "the split files"
                notes.append(f"speakers {overlap[:5]} are in more than one split ({given}): results are not "
                             f"speaker-independent")
        else:
            path = card.file("data")
            table = read(path, loader_rows(card, path))
            examples, skipped = table.examples, table.skipped
            dropped.update(table.dropped)
            ratios = split_ratios(card, "clips", "per-split files, or fold_by")
            seed, where = int(spec.get("seed", 0)), str(card.card_path)
            if all("speaker" in e for e in examples):
                splits = data.speaker_split(examples, ratios, seed, where)
                assert not in_several_splits(splits, "speaker"), "speaker-independent split leaked a speaker"
            else:
                splits = ratio_split(examples, ratios, seed, where=where)
                notes.append("the table names no speaker field: the split is by utterance, not speaker-independent")
        if skipped:
            notes.append(f"skipped {len(skipped)} bad audio file(s) (on_bad_file: skip), e.g. {skipped[0]}")
        if dropped:
            notes.insert(0, f"label_map leaves out {sum(dropped.values())} rows: "
                            + ", ".join(f"{count} {cell}" for cell, count in sorted(dropped.items())))
        every = [e for examples in splits.values() for e in examples]
        notes += [note for note in (unknown_groups_note(every, "speaker", "clips"), _two_genders_note(every)) if note]
        labels = card.labels
        if labels is None:
            labels = number_classes(splits, notes, str(card.card_path))
        return {k: splits[k] for k in ("train", "validation", "test") if k in splits}, labels, notes

    # ----------------------------------------------------------------------- model
    def build_model(self, backbone: str, labels: list[str], options: SpeechEmotionOptions) -> SpeechEmotionModel:
        encoder, info = load_backbone(backbone)
        if encoder.max_seconds is not None and options.max_seconds > encoder.max_seconds:
            raise UserError(f"task.max_seconds={options.max_seconds} is longer than {backbone!r} takes "
                            f"({encoder.max_seconds:.0f} s); set task.max_seconds to at most that")
        return SpeechEmotionModel(encoder, info, labels, options)

    def read_inputs(self, paths, options, fields) -> list[dict]:
        """Audio files, folders of them, and CSV/TSV tables of audio paths (relative to the
        table, in the columns the run's card named)."""
        examples = []
        for path in map(Path, paths):
            if path.suffix.lower() in (".csv", ".tsv"):
                examples += data.read_table(path, path.parent, fields, None, None, None, "error", labelled=False).examples
            else:
                examples += [data.audio_example(file) for file in data.audio_files([path])]
        return examples

    def input_notes(self, examples, options) -> list[str]:
        long = sum(e["samples"] / e["sample_rate"] > options.max_seconds for e in examples)
        if not long or options.eval_crop == "full":
            return []
        part = "centre" if options.eval_crop == "center" else "first"
        return [f"{long} clips are longer than task.max_seconds={options.max_seconds:g}: their {part} "
                f"{options.max_seconds:g} s is scored (task.eval_crop=full scores whole clips)"]

    def describe(self, example, scores, labels) -> dict:
        return {**file_identity(example), **describe_scores(scores, labels)}

    def rows_follow_examples(self, options) -> bool:
        return True

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"audio": [BASE64, ...]} or {"audio": {ID: BASE64, ...}}: encoded audio files
        (WAV, FLAC, OGG, MP3), checked and mixed down to mono as files are."""
        requests.only_fields(payload, ("audio",))
        examples = []
        for key, value in requests.items(payload, "audio", "base64 audio files"):
            raw = requests.base64_bytes(value, f"audio[{key}]")
            with tempfile.NamedTemporaryFile(suffix=".audio") as file:  # the file reader's checks, unchanged
                file.write(raw)
                file.flush()
                try:
                    waveform, rate, _ = data.decode(Path(file.name))
                except data.BadAudio as error:  # its message names our temporary file, which means nothing to the client
                    reason = str(error).replace(f"Error opening {file.name!r}: ", "")
                    raise UserError(f"audio[{key}]: {reason}") from None
            examples.append({"id": key, "audio": waveform, "sample_rate": rate, "samples": len(waveform)})
        return examples

    def export_backbone(self, model, directory: Path) -> str:
        """The transformers encoder and its feature extractor (`save_pretrained`), loaded
        by the encoder's own class: `AutoModel` would build Whisper's whole encoder-decoder
        and leave every weight of this encoder-only file random."""
        encoder = model.backbone
        encoder.network.save_pretrained(directory)
        encoder.extractor.save_pretrained(directory)
        network = type(encoder.network)
        return (f"import transformers\nfrom {network.__module__} import {network.__name__}\n"
                f"model = {network.__name__}.from_pretrained(EXPORT_DIR)\n"
                "extractor = transformers.AutoFeatureExtractor.from_pretrained(EXPORT_DIR)")

    def write_report(self, split: str, examples, outputs, labels: list[str], directory: Path) -> None:
        """`<split>_confusion.json` (counts and per-class recall) and `<split>_confusion.png`."""
        reports.write_confusion(split, examples, np.stack(outputs), labels, directory)

    def card_template(self) -> str:
        return CARD_TEMPLATE


def _two_genders_note(examples: list[dict]) -> str | None:
    """A note where the table gives one speaker two genders: a typo, most likely, that
    puts the speaker's clips under both in per-gender results."""
    genders: dict[str, set[str]] = {}
    for example in examples:
        if "gender" in example and "speaker" in example and not is_unknown_group(example["speaker"]):
            genders.setdefault(example["speaker"], set()).add(example["gender"])
    both = sorted(speaker for speaker, given in genders.items() if len(given) > 1)
    if not both:
        return None
    who = "1 speaker is" if len(both) == 1 else f"{len(both)} speakers are"
    return (f"{who} given more than one gender (e.g. {both[0]}: {', '.join(sorted(genders[both[0]]))}); their clips "
            f"count under each in per-gender results: fix the gender column")


def _held_out_note(validation: list[dict], fraction: float, test: str) -> str:
    given = [str(e["speaker"]) for e in validation if "speaker" in e]
    speakers = sorted({s for s in given if not is_unknown_group(s)})
    unnamed = len(given) - sum(s in speakers for s in given)  # clips whose speaker cell was empty
    whose = ", ".join(filter(None, [f"speakers {', '.join(speakers)}" if speakers else "",
                                    f"{unnamed} clip{'s' if unnamed > 1 else ''} without a speaker" if unnamed else ""]))
    whose = whose or "no speakers named in the table"
    return f"validation: {len(validation)} training clips held out ({whose}; splits.validation_fraction={fraction}); {test}"


CARD_TEMPLATE = """---
name: my-emotion-corpus
domain: speech_emotion
task: speech-emotion
format: audio_csv
path: .                         # where relative audio paths start (relative to this card)
files:
  data: labels.csv              # header row; one clip per row (.tsv for tab-separated)
fields: {path: path, label: label, speaker: speaker, gender: gender}   # speaker/gender optional
labels: [neutral, happy, angry, sad]
# label_map: {excited: happy, frustrated: null}   # rename cells; null drops the row
splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}  # by speaker when a speaker field is given
# splits: {fold_by: session, test: [5]}           # IEMOCAP-style session fold (a session column); fold_by: set if cells name the split
# or one table per split, without files.data: splits: {train: train.csv, validation: valid.csv, test: test.csv}; without validation, validation_fraction (0.1) of train's speakers are held out
group_by: gender                # per-group metrics and the recall gap between groups
on_bad_file: error              # or skip: corrupt/empty/silent files are counted and left out
license: ""
source: ""
---
Who speaks, in which language, acted or natural emotion, how labels were agreed,
recording conditions, intended use, known biases (e.g. speakers per gender).
"""

register_task(SpeechEmotionTask())
