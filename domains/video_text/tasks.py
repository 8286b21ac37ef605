"""Video-text tasks on CLIP (+ a LLaMA-family causal LM for captions).

- `video-text-retrieval`: N frames sampled uniformly -> CLIP's image tower -> frame
  embeddings -> `frame_pool` (mean, or the temporal adapter before it) -> video
  embedding; caption -> CLIP's text tower -> text embedding. Trained with the
  symmetric InfoNCE loss at CLIP's own (learned, capped at 100) logit scale; in-batch
  pairs whose captions are the same text, or that share a video, count as positives
  (multi-positive InfoNCE), so duplicated captions are not pushed apart. Evaluated on
  the whole split's caption x video similarity matrix: t2v / v2t R@1, R@5, R@10, median
  and mean rank (`peftlab.shared.retrieval_metrics`). Primary: t2v_r1.
- `video-caption`: frozen CLIP frame features -> a trainable projector (the task head:
  per-dimension standardisation, 2-layer MLP per frame, learned frame positions, pooled in time to K tokens)
  -> K prefix embeddings for the causal LM, which the method (LoRA, the zero-init gated
  `llama_adapter`, ...) tunes. The prefix takes the place of K placeholder tokens in the
  prompt's input embeddings (as LLaVA splices its image tokens in), so training, greedy
  and beam-search generation and peft's prompt-learning wrappers all run through the
  usual token-id path. Loss on the caption's tokens only. Metrics: BLEU-4 (primary),
  ROUGE-L, CIDEr-D, each against all of a video's reference captions.

Frame features of a frozen image tower come from `features.FrameFeatureCache`; decoded
frames from a bounded memory cache (`data.FrameStore`).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peftlab.shared import causal_lm as clm
from peftlab.shared import io, requests
from peftlab.shared import metrics as metric_registry
from peftlab.shared.cards import Card
from peftlab.shared.data import (
    hold_out_validation,
    in_several_splits_note,
    ratio_split,
    split_ratios,
    table_rows,
)
from peftlab.shared.errors import UserError
from peftlab.shared.folds import split_sources
from peftlab.shared.loaders import loader_rows
from peftlab.shared.retrieval_metrics import (
    random_ranking_levels,
    text_to_video_ranks,
)
from peftlab.shared.tasks import SPLIT_KEYS, Dataset, register_task
from peftlab.shared.text_metrics import (
    JAVA_NEEDED,
    caption_bleu4,
    cider,
    ptb_tokens,
    rouge_l,
    word_tokens,
)
from torch import nn
from torch.nn import functional as F

from . import data
from .backbones import ClipBackbone, VideoCLIP, backbone_names, encode_frames, load_clip, unwrap
from .features import FrameFeatureCache, cache_directory

# ----------------------------------------------------------------------------- options


@dataclass
class VideoOptions:
    frames: int = field(default=8, metadata={"help": "frames sampled uniformly per video (segment centres)"})
    feature_cache: str = field(default="auto", metadata={"help": "frozen image-tower features on disk: auto (the peftlab cache folder, $PEFTLAB_CACHE or ~/.cache/peftlab), off, or a folder"})
    frame_cache_mb: float = field(default=1024, metadata={"help": "memory for decoded, resized frames kept between epochs (least recently used evicted)"})

    def __post_init__(self):
        if self.frames < 1:
            raise ValueError(f"frames must be >= 1, got {self.frames}")
        if self.frame_cache_mb < 0:
            raise ValueError(f"frame_cache_mb must be >= 0, got {self.frame_cache_mb}")


@dataclass
class RetrievalOptions(VideoOptions):
    max_text_tokens: int | None = field(default=None, metadata={
        "help": "caption tokens at most, start and end tokens included (CLIP4Clip: 32); a longer caption is cut and "
                "keeps its end token; default: the text tower's context (77 for CLIP)"})

    def __post_init__(self):
        super().__post_init__()
        if self.max_text_tokens is not None and self.max_text_tokens < 3:
            raise ValueError(f"max_text_tokens must be >= 3 (start, a word, end), got {self.max_text_tokens}")


CAPTION_TOKENIZERS = {"ptb": ptb_tokens, "words": word_tokens}
"""How caption metrics split captions into words (task.caption_tokenizer)."""


@dataclass
class CaptionOptions(VideoOptions):
    vision_backbone: str | None = field(default=None, metadata={"help": "CLIP for the frames (MODEL:TAG, MODEL:/path, tiny); default: tiny with the tiny LM, else ViT-B-32:openai"})
    prefix_length: int | None = field(default=None, metadata={"help": "visual prefix tokens K for the LM (default: one per frame)"})
    prompt: str = field(default="Caption:", metadata={"help": "text after the visual prefix; the caption follows it"})
    max_target_tokens: int = field(default=48, metadata={"help": "caption tokens trained on at most"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated at most"})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding, more = beam search"})
    caption_tokenizer: str = field(default="ptb", metadata={"help": "words of a caption for bleu4, rouge_l and cider: "
                                   "ptb = coco-caption's PTB tokeniser (needs Java; scores equal the papers' "
                                   "evaluator's), words = lower-cased words without punctuation (pure Python)"})

    def __post_init__(self):
        super().__post_init__()
        clm.GenerationOptions.checked(self)
        if self.caption_tokenizer not in CAPTION_TOKENIZERS:
            raise ValueError(f"caption_tokenizer must be one of {', '.join(CAPTION_TOKENIZERS)}, got {self.caption_tokenizer!r}")
        if self.prefix_length is not None and not 1 <= self.prefix_length <= self.frames:
            raise ValueError(f"prefix_length must be in 1..frames ({self.frames}), got {self.prefix_length}")


# ----------------------------------------------------------------------------- frames -> model inputs


class _VideoInputs(nn.Module):
    """Frames for a batch of videos: cached features when the image tower is frozen,
    else normalised pixels (the tower then runs in the model's forward)."""

    preprocess: dict
    options: VideoOptions

    def _init_video_inputs(self, clip: ClipBackbone, options: VideoOptions) -> None:
        self.preprocess = clip.preprocess
        self.options = options
        self.frame_store = data.FrameStore(options.frame_cache_mb)
        self.feature_cache = FrameFeatureCache(cache_directory(options.feature_cache), clip.info, options.frames,
                                               clip.preprocess)

    def visual_tower(self) -> nn.Module:
        raise NotImplementedError

    def vision_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.visual_tower().parameters())

    def pixels(self, videos: list[str], sent: dict | None = None) -> torch.Tensor:
        """`sent`: video key -> frames decoded from a request (`sent_frames`)."""
        sent = sent or {}
        frames = [self.frame_store.get(v, self.options.frames, self.preprocess, sent.get(v)) for v in videos]
        return data.normalise(torch.stack(frames), self.preprocess)

    @torch.no_grad()
    def encode_videos(self, videos: list[str], chunk: int = 16, sent: dict | None = None) -> torch.Tensor:
        """(videos, frames, dim) features of the frozen image tower, in evaluation mode."""
        visual = self.visual_tower()
        device = next(visual.parameters()).device
        was_training = visual.training
        visual.eval()
        try:
            parts = [encode_frames(visual, self.pixels(videos[i:i + chunk], sent).to(device))
                     for i in range(0, len(videos), chunk)]
        finally:
            visual.train(was_training)
        return torch.cat(parts)

    def frame_features(self, videos: list[str], sent: dict | None = None) -> torch.Tensor:
        """The frozen image tower's features of `videos`, from the cache where it has them."""
        return self.feature_cache.features(videos, lambda missing: self.encode_videos(missing, sent=sent))

    def video_inputs(self, videos: list[str], sent: dict | None = None) -> dict[str, torch.Tensor]:
        if self.vision_frozen():
            return {"frame_features": self.frame_features(videos, sent)}
        return {"pixels": self.pixels(videos, sent)}

    def example_length(self, example) -> int:
        return 1  # every video is the same number of frames of the same size


# ----------------------------------------------------------------------------- retrieval


class RetrievalModel(_VideoInputs):
    def __init__(self, clip: ClipBackbone, options: RetrievalOptions):
        super().__init__()
        self.backbone = VideoCLIP(clip, options.frames)
        self.head = nn.Module()  # nothing beyond CLIP: the method adapts the towers or the pooling
        self.backbone_info = clip.info
        self.tokenizer = clip.tokenizer
        self.context = int(clip.model.context_length)
        if options.max_text_tokens is not None and options.max_text_tokens > self.context:
            raise UserError(f"task.max_text_tokens is {options.max_text_tokens}, more than the text tower's context of "
                            f"{self.context} tokens; set task.max_text_tokens={self.context} (or lower), or "
                            f"task.max_text_tokens=null for the whole context")
        self.max_text_tokens = options.max_text_tokens
        self._init_video_inputs(clip, options)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Captions -> token ids at the text tower's context length, each cut to
        `max_text_tokens` (its end token kept) and zero-padded after: the causal text
        tower pools at the end token, so the padding after it changes nothing."""
        if self.max_text_tokens is None:
            return self.tokenizer(captions)
        tokens = self.tokenizer(captions, context_length=self.max_text_tokens)
        return F.pad(tokens, (0, self.context - tokens.shape[1]))

    def visual_tower(self) -> nn.Module:
        return unwrap(self.backbone).clip.visual

    def collate(self, examples, rng):
        """Training and evaluation batches are (video, caption) pairs; `peftlab predict` may
        also pass videos alone or captions (queries) alone, each embedded by its own tower."""
        videos = list(dict.fromkeys(e["video"] for e in examples if "video" in e))
        texted = [i for i, e in enumerate(examples) if "caption" in e]
        batch: dict = {"video_index": torch.tensor([videos.index(e["video"]) if "video" in e else -1 for e in examples]),
                       "text_rows": torch.tensor(texted, dtype=torch.long)}
        if texted:
            batch["text"] = self.tokenize([examples[i]["caption"] or "" for i in texted])
        if videos:
            batch.update(self.video_inputs(videos, sent_frames(examples)))
        if len(texted) == len(examples) and len(videos):
            # Positives: the caption's own video, and any video in the batch paired with the same text.
            captions = [" ".join((e["caption"] or "").lower().split()) for e in examples]
            positives = torch.zeros(len(examples), len(videos), dtype=torch.bool)
            for i, caption in enumerate(captions):
                for j, other in enumerate(captions):
                    if other == caption:
                        positives[i, batch["video_index"][j]] = True
            batch["positives"] = positives
        return batch

    def _embed(self, batch):
        return self.backbone(text=batch["text"], pixels=batch.get("pixels"), frame_features=batch.get("frame_features"))

    def forward(self, batch) -> torch.Tensor:
        """(captions, videos) similarity logits at CLIP's logit scale."""
        videos, texts, scale = self._embed(batch)
        return scale * texts @ videos.T

    def loss(self, logits, batch):
        logits = logits.float()
        positives = batch["positives"].to(logits.device)
        negative_infinity = torch.finfo(logits.dtype).min
        text_to_video = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positives, negative_infinity), 1)
        video_to_text = torch.logsumexp(logits, 0) - torch.logsumexp(logits.masked_fill(~positives, negative_infinity), 0)
        return (text_to_video.mean() + video_to_text.mean()) / 2

    def scores(self, logits):
        return torch.softmax(logits.float(), dim=-1)

    def predict(self, batch) -> list[dict[str, np.ndarray]]:
        """Per example, the embedding of its video (`video`), of its caption (`text`), or both.
        Each tower runs as in `VideoCLIP.forward`, so a pair's embeddings are those of its
        video and caption given alone."""
        clip = unwrap(self.backbone)
        rows: list[dict[str, np.ndarray]] = [{} for _ in batch["video_index"]]
        if "text" in batch:
            for row, text in zip(batch["text_rows"].tolist(), clip.encode_text(batch["text"]).float().cpu().numpy()):
                rows[row]["text"] = text
        if "frame_features" in batch or "pixels" in batch:
            features = batch.get("frame_features")
            videos = clip.encode_video(clip.encode_frames(batch["pixels"]) if features is None else features)
            videos = videos.float().cpu().numpy()
            for row, index in enumerate(batch["video_index"].tolist()):
                if index >= 0:
                    rows[row]["video"] = videos[index]
        return rows


def similarity_matrix(examples, outputs) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> (videos, video index of each caption, (captions, videos) cosine similarities)."""
    first: dict[str, int] = {}
    for index, example in enumerate(examples):
        first.setdefault(example["video"], index)
    videos = list(first)
    video_embeddings = np.stack([outputs[first[v]]["video"] for v in videos])
    text_embeddings = np.stack([o["text"] for o in outputs])
    item_of_query = np.array([videos.index(e["video"]) for e in examples])
    return videos, item_of_query, text_embeddings @ video_embeddings.T


# ----------------------------------------------------------------------------- captioning


class VisualPrefix(nn.Module):
    """(batch, frames, clip dim) frame features -> (batch, K, LM width) prefix embeddings.

    The features are first standardised per dimension over the data (BatchNorm; its
    running statistics are saved with the head): CLIP embeddings share a large common
    component (the "cone"), and what tells videos apart is the small rest."""

    def __init__(self, clip_dim: int, width: int, frames: int, length: int):
        super().__init__()
        self.length = length
        self.standardise = nn.BatchNorm1d(clip_dim)
        self.project = nn.Sequential(nn.Linear(clip_dim, width), nn.GELU(), nn.Linear(width, width))
        self.position = nn.Parameter(torch.randn(frames, width) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        standardised = self.standardise(features.flatten(0, 1)).view_as(features)
        tokens = self.project(standardised) + self.position[: features.shape[1]].to(features.dtype)
        if tokens.shape[1] != self.length:  # average neighbouring frames down to K tokens
            tokens = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.length).transpose(1, 2)
        return tokens


class CaptionModel(_VideoInputs):
    def __init__(self, causal_lm: clm.CausalLM, clip: ClipBackbone, options: CaptionOptions):
        super().__init__()
        self.backbone = causal_lm.model
        self.tokenizer = causal_lm.tokenizer
        self.vision = clip.model.visual  # frozen: only its features are used
        for param in self.vision.parameters():
            param.requires_grad_(False)
        clip_dim = int(encode_frames(self.vision, torch.zeros(1, 1, 3, clip.preprocess["size"], clip.preprocess["size"])).shape[-1])
        length = options.prefix_length or options.frames
        self.head = VisualPrefix(clip_dim, causal_lm.model.config.hidden_size, options.frames, length)
        combined = hashlib.sha256((causal_lm.info["weights_sha256"] + clip.info["weights_sha256"]).encode()).hexdigest()
        self.backbone_info = {**causal_lm.info, "language_model_sha256": causal_lm.info["weights_sha256"],
                              "weights_sha256": combined, "vision": clip.info}
        self._init_video_inputs(clip, options)
        # The prompt: [bos] + K placeholders (their embeddings are replaced by the prefix) + the prompt text.
        start = clm.prompt_ids(self.tokenizer, "")
        self.prefix_start = len(start)
        self.prompt_ids = start + [self.tokenizer.pad_token_id] * length + clm.encode(self.tokenizer, options.prompt)
        self._prefix: torch.Tensor | None = None
        causal_lm.model.get_input_embeddings().register_forward_hook(self._splice_prefix)

    def visual_tower(self) -> nn.Module:
        return self.vision

    def _splice_prefix(self, module, args, output):
        prefix = self._prefix
        end = self.prefix_start + (0 if prefix is None else prefix.shape[1])
        if prefix is None or output.shape[1] < end:  # not ours, or a one-token decoding step
            return output
        if output.shape[0] != prefix.shape[0]:  # beam search repeats each row num_beams times
            prefix = prefix.repeat_interleave(output.shape[0] // prefix.shape[0], dim=0)
        return torch.cat([output[:, :self.prefix_start], prefix.to(output.dtype), output[:, end:]], dim=1)

    def collate(self, examples, rng):
        prompts = [list(self.prompt_ids) for _ in examples]
        batch: dict[str, Any] = {"prompts": prompts}
        if all(isinstance(e.get("label"), str) for e in examples):
            answers = [clm.answer_ids(self.tokenizer, e["label"], self.options.max_target_tokens) for e in examples]
            batch.update(clm.training_batch(self.tokenizer, prompts, answers))
        else:
            batch.update(clm.prompt_batch(self.tokenizer, prompts))
        batch["frame_features"] = self.frame_features([e["video"] for e in examples], sent_frames(examples))
        return batch

    def _with_prefix(self, batch, call):
        self._prefix = self.head(batch["frame_features"].to(next(self.head.parameters()).device))
        try:
            return call()
        finally:
            self._prefix = None

    def forward(self, batch) -> torch.Tensor:
        return self._with_prefix(batch, lambda: clm.lm_forward(self.backbone, batch["input_ids"], batch["attention_mask"])[0])

    def loss(self, logits, batch):
        return clm.answer_loss(logits, batch["labels"].to(logits.device))

    def scores(self, logits):
        return torch.softmax(logits.float(), dim=-1)

    def predict(self, batch) -> list[str]:
        options = clm.GenerationOptions.checked(self.options)
        texts = self._with_prefix(batch, lambda: clm.generate(self.backbone, self.tokenizer, batch["prompts"], options))
        return [t.strip() for t in texts]


# ----------------------------------------------------------------------------- method defaults

_TOWERS = r"clip\.(visual\.|text\.)?transformer\.resblocks\.\d+\."
_CLIP_LINEARS = _TOWERS + r"(attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(c_fc|c_proj))"
_CLIP_ATTENTION = _TOWERS + r"attn\.(q_proj|k_proj|v_proj|out_proj)"
RETRIEVAL_METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # Both towers: CLIP-LoRA and KAdaptation adapt the image and the text encoder alike.
    "lora": {"target_modules": _CLIP_LINEARS},
    "dora": {"target_modules": _CLIP_LINEARS},
    "loha": {"target_modules": _CLIP_LINEARS},
    # KAdaptation (He et al. 2023) puts its Kronecker-product update on the attention weights.
    "lokr": {"target_modules": _CLIP_ATTENTION},
    "vera": {"target_modules": _CLIP_LINEARS},
    "ia3": {"target_modules": _TOWERS + r"(attn\.(k_proj|v_proj)|mlp\.c_proj)", "feedforward_modules": ["mlp.c_proj"]},
    "ssf": {"target_modules": _CLIP_LINEARS},
    # Houlsby: after the attention output and after the feed-forward block, in both towers.
    "adapter": {"target_modules": _TOWERS + r"(attn\.out_proj|mlp\.c_proj)"},
    "parallel_adapter": {"target_modules": _TOWERS + r"mlp\.c_proj", "input_from": "c_fc", "scale": 4.0},
    "ln_tuning": {"target_modules": _TOWERS + r"ln_[12]"},
    # the last k blocks of the image tower (name the text tower's with blocks: clip.transformer.resblocks)
    "freeze_layers": {"blocks": "clip.visual.transformer.resblocks"},
}


# ----------------------------------------------------------------------------- tasks

DEMO_DEFAULTS = {"train": 480, "validation": 48, "test": 48, "seed": 0, "frames": 16, "size": 32}


class _VideoTextTask:
    domain = "video_text"
    named_classes = False  # captions, not classes
    formats = ("msrvtt_json", "csv", "demo")
    loader_format = "csv"
    card_keys = ("demo", "video_root")
    split_keys = (*SPLIT_KEYS, "validation_fraction")
    field_keys = ("video", "caption")

    def _read_pairs(self, card: Card, options: VideoOptions) -> tuple[dict[str, list[dict]], list[str]]:
        """(video, caption) pairs per split, and notes on what was held out; every video
        decoded once, so that `card validate` finds one that cannot be (a run otherwise
        meets it at its first evaluation, after an epoch of training)."""
        splits, notes = self._read_card_pairs(card)
        if card.format != "demo":
            features = cache_directory(options.feature_cache)  # with the frame features, where the user put them
            remembered = None if features is None else features / "decoded_videos"
            data.check_videos((e["video"] for examples in splits.values() for e in examples), options.frames, remembered)
        return splits, notes

    def _read_card_pairs(self, card: Card) -> tuple[dict[str, list[dict]], list[str]]:
        if card.format == "demo":
            demo = {**DEMO_DEFAULTS, **(card.option("demo") or {})}
            unknown = sorted(set(demo) - set(DEMO_DEFAULTS))
            if unknown:
                raise UserError(f"{card.card_path}: demo.{unknown[0]} is not a demo setting; valid: {', '.join(DEMO_DEFAULTS)}")
            sizes = {s: int(demo[s]) for s in ("train", "validation", "test") if int(demo[s]) > 0}
            return data.demo_splits(sizes, int(demo["seed"]), int(demo["frames"]), int(demo["size"])), []
        if card.format not in self.formats:
            raise UserError(f"{card.card_path}: {self.name} reads formats {', '.join(self.formats)}, not {card.format!r}")
        root = card.resolve(card.option("video_root"), "video_root") if card.option("video_root") else card.folder
        if not root.is_dir():
            raise UserError(f"{card.card_path}: video_root = {root} is not a folder; fix the path (relative paths start at {card.folder})")
        fields = card.fields or {}
        read_notes: list[str] = []

        def read(path: Path, rows=None) -> dict[str, list[dict]]:
            if card.format == "msrvtt_json":
                return data.read_msrvtt_json(path, root, fields, notes=read_notes)
            return {"all": data.read_caption_csv(path, root, fields, rows=rows)}

        per_split = split_sources(card, True, lambda: self._data_file(card), table_rows)
        if per_split:
            splits = {split: [e for examples in read(path, rows).values() for e in examples]
                      for split, (path, rows) in per_split.items()}
            splits, note = hold_out_validation(splits, card, "captions (whole videos)", group_of=lambda e: e["video_id"])
            return splits, read_notes + [n for n in (note, in_several_splits_note(splits, "video_id", "video", "captions")) if n]
        path = self._data_file(card)
        found = read(path, loader_rows(card, path))
        if set(found) != {"all"}:  # the file's own splits; validation from train's videos where it gives none
            if "ratios" in (card.splits or {}):
                raise UserError(f"{card.card_path}: splits.ratios: the annotations give every video a split; leave "
                                f"ratios out, or take `split` out of the file's videos to split by ratios")
            splits, note = hold_out_validation(found, card, "captions (whole videos)", group_of=lambda e: e["video_id"])
            return splits, read_notes + ([note] if note else [])
        spec = card.splits or {}
        ratios = split_ratios(card, "videos", "per-split files, or a split per video in MSR-VTT JSON")
        # whole videos go to one split, so no video is seen in training and in test
        return ratio_split(found["all"], ratios, int(spec.get("seed", 0)), group_of=lambda e: e["video_id"],
                           where=str(card.card_path)), read_notes

    def _data_file(self, card: Card) -> Path:
        for key in ("annotations", "data"):
            if card.files and key in card.files:
                return card.file(key)
        if card.path:
            path = card.resolve(card.path, "path")
            if not card.data_exists(path):
                raise UserError(f"{card.card_path}: path = {path} does not exist; fix the path (relative paths start at {card.folder})")
            return path
        raise UserError(f"{card.card_path}: set `files: {{annotations: captions.json}}` (or a CSV) or per-split `splits` files")

    def _read_input_files(self, paths, captions_are_inputs: bool, fields: dict) -> list[dict]:
        """`captions_are_inputs` (retrieval): CSV rows are (video, caption) pairs and text files
        hold queries; captioning needs only the videos (a CSV's captions are neither needed
        nor scored). Tables and JSON files are read with the run card's `fields`."""
        examples = []
        for path in map(Path, paths):
            suffix = path.suffix.lower()
            if suffix == ".json":  # every pair is embedded alike, so the videos' splits are not read
                pairs = data.read_msrvtt_json(path, path.parent, fields, read_splits=False)
                examples += [e for split in pairs.values() for e in split]
            elif suffix == ".csv":
                examples += data.read_caption_csv(path, path.parent, fields, labelled=captions_are_inputs)
            elif suffix == ".txt" and captions_are_inputs:
                examples += read_queries(path)
            elif captions_are_inputs and path.is_file() and suffix not in data.VIDEO_SUFFIXES:
                raise UserError(f"{path}: {self.name} predict reads caption files (MSR-VTT JSON, a video,caption CSV), "
                                f"text files of queries (.txt, one per line), videos ({', '.join(data.VIDEO_SUFFIXES)}) "
                                f"and frame folders")
            else:
                examples += data.video_inputs([path])
        for example in examples:
            example.pop("label", None)
        return examples


TOP_VIDEOS = 10
"""How many of the given videos a query's prediction ranks."""


class RetrievalTask(_VideoTextTask):
    name = "video-text-retrieval"
    example_unit = "captions, each with its video"
    description = "caption <-> video retrieval with CLIP over uniformly sampled frames (CLIP4Clip / AGAdapter)"
    metrics = ("t2v_r1", "t2v_r5", "t2v_r10", "v2t_r1", "v2t_r5", "v2t_r10", "median_rank", "mean_rank",
               "v2t_median_rank", "v2t_mean_rank")
    primary_metric = "t2v_r1"
    options = RetrievalOptions

    def backbones(self) -> list[str]:
        return backbone_names()

    def read(self, card: Card, options) -> Dataset:
        splits, notes = self._read_pairs(card, options)
        return Dataset(splits, [], notes)

    def build_model(self, backbone: str, labels, options) -> RetrievalModel:
        return RetrievalModel(load_clip(backbone), options)

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        return dict(RETRIEVAL_METHOD_DEFAULTS.get(method, {}))

    def read_inputs(self, paths, options, fields) -> list[dict]:
        """Caption files (MSR-VTT JSON or a video,caption CSV: pairs), videos and frame
        folders (embedded alone), and text files of queries, one per line (embedded alone,
        and ranked against the videos given alone)."""
        return self._read_input_files(paths, captions_are_inputs=True, fields=fields or {})

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"queries": [TEXT, ...] or {ID: TEXT, ...}} and/or {"videos": [BASE64, ...] or
        {ID: BASE64, ...}} (encoded video files): each query's text embedding and each video's
        embedding (`text_embedding`, `video_embedding`; cosine ranks videos, e.g. against
        embeddings `peftlab predict RUN videos/` wrote). Sent together, each query also ranks
        the request's videos (`top_videos`), as predict does for files."""
        requests.only_fields(payload, ("queries", "videos"))
        if "queries" not in payload and "videos" not in payload:
            raise UserError('the request needs "queries" (texts), "videos" (base64 video files) or both')
        examples = request_videos(payload, options) if "videos" in payload else []
        for key, text in (requests.items(payload, "queries", "query texts") if "queries" in payload else []):
            if not isinstance(text, str):
                raise UserError(f"queries[{key}]: a query's text, not {type(text).__name__}")
            if not text.strip():
                raise UserError(f"queries[{key}]: empty query")
            examples.append({"id": key, "caption": text})
        return examples

    def compute_metrics(self, metric_names, examples, outputs) -> dict:
        _, item_of_query, similarity = similarity_matrix(examples, outputs)
        return metric_registry.compute(metric_names, item_of_query, similarity)

    def chance_levels(self, metric_names, train, scored) -> tuple[dict[str, float], str]:
        videos = len({e["video"] for e in scored})
        return random_ranking_levels(videos, metric_names), "a uniformly random ranking (expected values)"

    def describe(self, example, output, labels) -> dict:
        row = {"id": example["id"]}
        if "video" in example:
            row["video"] = example["video"]
        if "caption" in example:
            row["caption"] = example["caption"]
        if "video" in output and "text" in output:
            row["similarity"] = float(output["video"] @ output["text"])
        for kind in ("video", "text"):
            if kind in output:
                # each float32 as its shortest exact decimal: reading it back as float32 gives
                # the embedding itself, so similarities recomputed from the file are exact
                row[f"{kind}_embedding"] = [float(str(x)) for x in np.asarray(output[kind], dtype=np.float32)]
        return row

    def describe_predictions(self, examples, outputs, labels) -> list[dict]:
        """Each row as `describe` makes it; given videos alone and queries alone, each query
        also ranks those videos (`top_videos`, best first, with cosine similarities), which
        is a search of the given videos."""
        rows = [self.describe(e, o, labels) for e, o in zip(examples, outputs)]
        library = [i for i, e in enumerate(examples) if "caption" not in e]
        queries = [i for i, e in enumerate(examples) if "video" not in e]
        if library and queries:
            videos = np.stack([outputs[i]["video"] for i in library])
            for query in queries:
                similarity = videos @ outputs[query]["text"]
                order = np.argsort(-similarity, kind="stable")[:TOP_VIDEOS]
                rows[query]["top_videos"] = [{"id": examples[library[j]]["id"], "video": examples[library[j]]["video"],
                                              "similarity": float(similarity[j])} for j in order]
        return rows

    def write_report(self, split, examples, outputs, labels, directory) -> None:
        """retrieval-<split>.jsonl: per caption, the rank of its video and the top 5 videos."""
        videos, item_of_query, similarity = similarity_matrix(examples, outputs)
        ranks = text_to_video_ranks(item_of_query, similarity)
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :5]
        rows = [{"id": e["id"], "caption": e.get("caption"), "rank": int(r), "top5": [videos[j] for j in t]}
                for e, r, t in zip(examples, ranks, top)]
        io.write_jsonl(Path(directory) / f"retrieval-{split}.jsonl", rows)

    def card_template(self) -> str:
        return CARD_TEMPLATE.format(task=self.name)


CAPTION_METRICS = {"bleu4": caption_bleu4, "rouge_l": rouge_l, "cider": cider}
"""Caption metrics against all of a video's references, as coco-caption computes them
(`bleu4` is its corpus-level Bleu_4, not the code-review tasks' smoothed sentence BLEU)."""


class CaptionTask(_VideoTextTask):
    name = "video-caption"
    example_unit = "captions, each with its video"
    held_out_example_unit = "videos, each with all its captions"  # generated once per video
    description = "video -> caption: frozen CLIP frame features as a prefix for a LoRA/LLaMA-Adapter-tuned causal LM (AGAdapter)"
    metrics = ("bleu4", "rouge_l", "cider")
    primary_metric = "bleu4"
    options = CaptionOptions

    def backbones(self) -> list[str]:
        return [*clm.TINY_PRESETS, "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-360M",
                "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", "meta-llama/Llama-2-7b-hf"]

    def read(self, card: Card, options: CaptionOptions) -> Dataset:
        if options.caption_tokenizer == "ptb" and shutil.which("java") is None:  # found now, not after training
            raise UserError(JAVA_NEEDED)
        splits, notes = self._read_pairs(card, options)
        # Training sees every (video, caption) pair; evaluation generates once per video and
        # scores it against all of that video's captions, tokenised as the options say
        # (scoring happens where only the examples reach).
        return Dataset({split: examples if split == "train" else
                        [{**e, "caption_tokenizer": options.caption_tokenizer} for e in group_by_video(examples)]
                        for split, examples in splits.items()}, [], notes)

    def build_model(self, backbone: str, labels, options: CaptionOptions) -> CaptionModel:
        vision = options.vision_backbone or ("tiny" if backbone in clm.TINY_PRESETS else "ViT-B-32:openai")
        causal_lm = clm.load_causal_lm(backbone)
        return CaptionModel(causal_lm, load_clip(vision), options)

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        return clm.default_method_options(method, model.backbone)

    def read_inputs(self, paths, options, fields) -> list[dict]:
        return self._read_input_files(paths, captions_are_inputs=False, fields=fields or {})

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"videos": [BASE64, ...]} or {"videos": {ID: BASE64, ...}}: encoded video files
        (MP4, WebM, AVI, ...), each captioned."""
        requests.only_fields(payload, ("videos",))
        return request_videos(payload, options)

    def applicable_metrics(self, dataset) -> tuple[str, ...]:
        return tuple(CAPTION_METRICS)

    def compute_metrics(self, metric_names, examples, outputs) -> dict:
        references = [e.get("references") or [e["label"]] for e in examples]
        tokenize = CAPTION_TOKENIZERS[examples[0].get("caption_tokenizer", "words") if examples else "words"]
        texts = sorted({text for refs in references for text in refs} | set(outputs))
        words_of = dict(zip(texts, tokenize(texts)))  # once for every metric: one Java process for PTB
        return {name: CAPTION_METRICS[name](references, list(outputs), lambda batch: [words_of[t] for t in batch])
                for name in metric_names}

    def describe(self, example, output, labels) -> dict:
        row = {"id": example["id"], "video": example["video"], "prediction": output}
        if "references" in example:
            row["references"] = example["references"]
        return row

    def card_template(self) -> str:
        return CARD_TEMPLATE.format(task=self.name)


def request_videos(payload: dict, options) -> list[dict]:
    """A request's "videos" (base64 video files) -> examples holding their sampled frames."""
    examples = []
    for key, value in requests.items(payload, "videos", "base64 video files"):
        where = f"videos[{key}]"
        examples.append({"id": key, "video_id": key, **data.uploaded_video(requests.base64_bytes(value, where),
                                                                         options.frames, where)})
    return examples


def sent_frames(examples: list[dict]) -> dict[str, np.ndarray]:
    """Video key -> frames, for the videos of a batch that came in a request, not as files."""
    return {e["video"]: e["frames"] for e in examples if "frames" in e}


def read_queries(path: Path) -> list[dict]:
    """A text file of captions to search with, one per line (blank lines skipped); ids `FILE:LINE`,
    the file as given."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save the queries as UTF-8") from None
    queries = [{"id": f"{path}:{number}", "caption": line.strip()}
               for number, line in enumerate(lines, start=1) if line.strip()]
    if not queries:
        raise UserError(f"{path}: no queries; write one caption per line")
    return queries


def group_by_video(examples: list[dict]) -> list[dict]:
    """One example per video, its captions as `references` (the first is its `label`)."""
    grouped: dict[str, dict] = {}
    for example in examples:
        if example["video"] not in grouped:
            grouped[example["video"]] = {"id": example["video_id"], "video_id": example["video_id"],
                                         "video": example["video"], "label": example["label"], "references": []}
        grouped[example["video"]]["references"].append(example["label"])
    return list(grouped.values())


CARD_TEMPLATE = """---
name: my-video-text-data
domain: video_text
task: {task}
format: msrvtt_json               # msrvtt_json | csv (header video,caption; one row per caption)
files:
  annotations: captions.json      # {{"videos": [{{"video_id": "video0", "split": "train"}}], "sentences": [{{"video_id": "video0", "caption": "..."}}]}}
video_root: videos/               # video files <video_id>.mp4 (.avi, .webm, ...) or frame folders <video_id>/
fields: {{video: video_id, caption: caption}}
# splits: {{ratios: {{train: 0.8, validation: 0.1, test: 0.1}}, seed: 0}}   # only for videos that carry no `split` (whole videos per split)
# or one caption table per split (format: csv), without files.annotations: splits: {{train: train.csv, validation: valid.csv, test: test.csv}}; without validation, validation_fraction (0.1) of train's videos is held out
# or a column naming each row's split: splits: {{fold_by: set}} (cells train, validation, test), or its fold: {{fold_by: fold, test: [5]}} (the rest trains)
license: ""
source: ""
---
What the videos show, where they and their captions come from (who wrote the captions,
how many per video), intended use, known biases.
"""

register_task(RetrievalTask())
register_task(CaptionTask())
