"""`medical-classify`: an image -> one of K classes (or, with `multi_label`, any of K
findings), on a timm ViT or ResNet, with the PEFT methods Dutt et al. compare.

The backbone's pooled features go to one linear layer (softmax cross-entropy; with
`multi_label`, one sigmoid/BCE logit per finding). Training images get timm's
augmentation for the backbone's data config (random resized crop, horizontal flip),
seeded from the loop's per-batch `rng`, so a resumed run sees the same crops;
evaluation images get timm's deterministic resize + centre crop.

With `augment=false` (training on the evaluation transform) and a method that leaves a
ViT's or ResNet's first stages frozen, those stages' outputs are computed once, not every
epoch (frozen-feature caching, `shared/feature_cache.py`).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peftlab.shared import io, methods, reports, requests
from peftlab.shared import metrics as metric_registry
from peftlab.shared.cards import Card
from peftlab.shared.data import (
    files_in_folder,
    hold_out_validation,
    in_several_splits_note,
    number_classes,
    ratio_split,
    split_ratios,
    table_rows,
    unknown_groups_note,
)
from peftlab.shared.errors import UserError
from peftlab.shared.feature_cache import (
    FeatureCache,
    in_training,
    output_bytes,
    plan,
    split_rows,
    stack_rows,
    unique_ids,
)
from peftlab.shared.folds import split_sources
from peftlab.shared.lazy import lazy_import
from peftlab.shared.loaders import loader_rows
from peftlab.shared.tasks import (
    SPLIT_KEYS,
    Dataset,
    FP32Head,
    describe_scores,
    file_identity,
    register_task,
)
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.nn import functional as F

from . import data
from .backbones import (
    backbone_names,
    backbone_stages,
    family,
    feature_width,
    load_backbone,
    staged_forward,
)

timm = lazy_import("timm")
skm = lazy_import("sklearn.metrics")


@dataclass
class MedicalImageOptions:
    image_size: int | None = field(default=None, metadata={"help": "input side in pixels; default: the backbone's pretrained size (224 for ResNet-50 / ViT-B)"})
    multi_label: bool = field(default=False, metadata={"help": "any number of findings per image (ChestX-ray14 style): sigmoid scores, BCE loss"})
    head_dropout: float = field(default=0.0, metadata={"help": "dropout before the linear head"})
    augment: bool = field(default=True, metadata={"help": "training augmentation (random resized crop + flips); false: evaluation transform in training too"})
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={"help": "random resized crop: range of the image area kept"})
    hflip: float = field(default=0.5, metadata={"help": "probability of a horizontal flip in training"})
    vflip: float = field(default=0.0, metadata={"help": "probability of a vertical flip in training (dermoscopy: 0.5; X-rays: 0)"})
    color_jitter: float = field(default=0.0, metadata={"help": "brightness/contrast/saturation jitter strength (0: none)"})
    batchnorm: str = field(default="update", metadata={"help": "BatchNorm running statistics in training: update (saved with the adapter) or frozen"})
    mean: list[float] | None = field(default=None, metadata={"help": "normalisation mean; default: the backbone's pretrained config"})
    std: list[float] | None = field(default=None, metadata={"help": "normalisation std; default: the backbone's pretrained config"})

    def __post_init__(self):
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {self.image_size}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.batchnorm not in ("update", "frozen"):
            raise ValueError(f"batchnorm must be update or frozen, got {self.batchnorm!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {value}")


@contextlib.contextmanager
def seeded_from(rng: np.random.Generator):
    """timm/torchvision transforms draw from torch's and Python's global RNGs; seed both
    from the batch's `rng` and restore them after, so augmentation is a pure function of
    (seed, epoch, batch) and nothing else sees the reseeding."""
    seed = int(rng.integers(2**31 - 1))
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


class ImageClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, info: dict, data_config: dict, options: MedicalImageOptions, num_labels: int):
        super().__init__()
        self.backbone = backbone
        self.backbone_info = info
        self.options = options
        self.data_config = data_config
        self.head = FP32Head(nn.Dropout(options.head_dropout), nn.Linear(feature_width(backbone), num_labels))
        self.eval_transform = timm.data.create_transform(**data_config, is_training=False)
        self.train_transform = timm.data.create_transform(
            **data_config, is_training=True, scale=tuple(options.crop_scale), hflip=options.hflip,
            vflip=options.vflip, color_jitter=options.color_jitter or None,
        ) if options.augment else self.eval_transform
        self.feature_cache: FeatureCache | None = None

    def network(self) -> nn.Module:
        """The timm model itself, unwrapped from the method."""
        return methods.network_of(self.backbone)

    def plan_feature_cache(self, train_examples: list[dict], budget_bytes: int) -> str:
        """Turn the cache on when the method leaves the backbone's first stages frozen and
        training images are the same every epoch; say what was decided and why."""
        self.feature_cache = None
        network = self.network()
        if backbone_stages(network) is None:
            return (f"feature cache: off (it runs timm's VisionTransformer and ResNet stage by stage; "
                    f"this backbone is {type(network).__name__})")
        frozen, reason, total = in_training(self, lambda: backbone_stages(network))
        varying = ("training images get a new random crop and flip each epoch: task.augment=true, the default; "
                   "task.augment=false trains on the evaluation transform and lets the cache work"
                   if self.options.augment else unique_ids(train_examples))
        hint = ("task.batchnorm=frozen keeps the statistics fixed" if reason and "BatchNorm" in reason else "")
        self.feature_cache, line = plan(frozen, reason, total, budget_bytes,
                                        lambda stages: self._stage_bytes(stages) * len(train_examples),
                                        worth_from=2, varying_inputs=varying, hint=hint)
        return line

    def _stage_bytes(self, stages: int) -> int:
        """Bytes of one image's output of the first `stages` stages."""
        network = self.network()
        blank = torch.zeros(1, *self.data_config["input_size"], device=next(network.parameters()).device)
        return output_bytes(network, lambda: staged_forward(network, blank, stop=stages))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.options.batchnorm == "frozen":
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def example_length(self, example) -> int:
        return 1  # every image is resized to the same input size

    def collate(self, examples, rng):
        images = [data.example_image(e) for e in examples]
        if rng is None:
            pixels = [self.eval_transform(image) for image in images]
        else:
            with seeded_from(rng):
                pixels = [self.train_transform(image) for image in images]
        batch: dict[str, Any] = {"pixels": torch.stack(pixels)}
        if rng is not None and self.feature_cache is not None:
            batch["cache_keys"] = [e["id"] for e in examples]
        if all("targets" in e for e in examples):
            batch["targets"] = torch.tensor([e["targets"] for e in examples], dtype=torch.float32)
        elif all(isinstance(e.get("label"), int | np.integer) for e in examples):
            batch["labels"] = torch.tensor([int(e["label"]) for e in examples])
        return batch

    def forward(self, batch) -> torch.Tensor:
        cache, keys = self.feature_cache, batch.get("cache_keys")
        if cache is None or keys is None or not self.training:
            return self.head(self.backbone(batch["pixels"]))
        network = self.network()
        prefix = cache.prefix(keys, lambda: staged_forward(network, batch["pixels"], stop=cache.stages),
                              split_rows, stack_rows)
        return self.head(staged_forward(network, prefix, start=cache.stages))

    def loss(self, logits, batch):
        if self.options.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), batch["targets"])
        return F.cross_entropy(logits.float(), batch["labels"])

    def scores(self, logits):
        if self.options.multi_label:
            return torch.sigmoid(logits.float())
        probabilities = torch.softmax(logits.float(), dim=-1)
        # Two classes: P(class 1), so binary metrics (AUROC) apply.
        return probabilities[:, 1] if probabilities.shape[1] == 2 else probabilities


# Method defaults per backbone family, in timm's module names. ViT blocks are
# `blocks.N` (a Sequential) with attn.qkv / attn.proj / mlp.fc1 / mlp.fc2; a ResNet has
# layer1..layer4 Sequentials of residual blocks with conv1..conv3.
_VIT_LINEARS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]
_VIT_DEFAULTS = {
    "lora": {"target_modules": _VIT_LINEARS, "blocks": "blocks"},
    "dora": {"target_modules": _VIT_LINEARS, "blocks": "blocks"},
    "loha": {"target_modules": _VIT_LINEARS, "blocks": "blocks"},
    "lokr": {"target_modules": _VIT_LINEARS, "blocks": "blocks"},
    "vera": {"target_modules": _VIT_LINEARS, "blocks": "blocks"},
    "ia3": {"target_modules": ["attn.qkv", "mlp.fc2"], "feedforward_modules": ["mlp.fc2"], "blocks": "blocks"},
    "ssf": {"blocks": "blocks"},
    "adapter": {"target_modules": ["attn.proj", "mlp.fc2"], "blocks": "blocks"},
    # He et al.: a scaled branch across the feed-forward block (fc1's input to fc2's output)
    "parallel_adapter": {"target_modules": ["mlp.fc2"], "input_from": "fc1", "blocks": "blocks", "scale": 4.0},
    "freeze_layers": {"blocks": "blocks"},
    # The blocks' own LayerNorms. Not the final `norm`: the core hands peft resolved
    # names, and peft matches them as suffixes, so "norm" would also catch the
    # Identity placeholders timm keeps at blocks.N.attn.norm.
    "ln_tuning": {"target_modules": r"blocks\.\d+\.norm[12]"},
}
_RESNET_CONVS = r"layer\d\.\d+\.conv\d"
_RESNET_DEFAULTS = {
    "lora": {"target_modules": _RESNET_CONVS, "blocks": "layer4"},
    "dora": {"target_modules": _RESNET_CONVS, "blocks": "layer4"},
    "loha": {"target_modules": _RESNET_CONVS, "blocks": "layer4"},
    "lokr": {"target_modules": _RESNET_CONVS, "blocks": "layer4"},
    "ia3": {"target_modules": _RESNET_CONVS, "blocks": "layer4"},
    "ssf": {"blocks": "layer4"},
    # freeze-layers on a ResNet: the last k residual blocks of its last stage, then
    # the pooling. Name another stage with `blocks: layer3` to go deeper.
    "freeze_layers": {"blocks": "layer4"},
}
_BLOCK_CONTAINERS = ("blocks", "stages", "layers", "features")


def _conv_net_defaults(method: str, backbone: nn.Module) -> dict:
    """Other timm conv nets (EfficientNet, ConvNeXt, ...): their block container by name,
    and for the low-rank methods every ungrouped conv inside it."""
    blocks = next((b for b in _BLOCK_CONTAINERS if isinstance(getattr(backbone, b, None), nn.Sequential | nn.ModuleList)), None)
    if blocks is None:
        return {}
    if method in ("lora", "dora", "loha", "lokr", "ia3"):
        convs = [n for n, m in backbone.named_modules()
                 if n.startswith(f"{blocks}.") and isinstance(m, nn.Conv2d) and m.groups == 1]
        return {"target_modules": convs, "blocks": blocks} if convs else {"blocks": blocks}
    if method in ("ssf", "freeze_layers", "vera", "adapter", "parallel_adapter"):
        return {"blocks": blocks}
    return {}


PER_SPLIT_INSTEAD = {
    "imagefolder": "lay the folder out as path/train, path/val, path/test (class folders inside each), or use "
                   "format: csv with one table per split",
    "medmnist_npz": "the file's own train/val/test arrays are its splits (splits.ratios split a file with train only)",
}
"""Formats whose splits come from the data itself -> what a card does instead of per-split files."""


class MedicalClassifyTask:
    name = "medical-classify"
    example_unit = "images"
    domain = "medical_imaging"
    description = "medical image -> class (or findings, multi-label) on timm ViT / ResNet backbones (Dutt et al. 2023)"
    metrics = ("auroc", "accuracy", "balanced_accuracy", "macro_f1")
    primary_metric = "auroc"
    formats = ("imagefolder", "medmnist_npz", "csv", "demo")
    loader_format = "csv"
    card_keys = ("demo", "on_bad_file", "image_root")
    split_keys = (*SPLIT_KEYS, "validation_fraction")
    field_keys = ("image", "label", "group", "patient")
    group_metrics = True
    """The card's `group_by` gives per-group metrics (e.g. AUROC per sex) and the worst-group gap."""
    options = MedicalImageOptions

    def backbones(self) -> list[str]:
        return backbone_names()

    # ------------------------------------------------------------------------- reading

    def read(self, card: Card, options: MedicalImageOptions) -> Dataset:
        on_bad_file = card.option("on_bad_file", "error")
        if on_bad_file not in ("error", "skip"):
            raise UserError(f"{card.card_path}: on_bad_file must be error or skip, got {on_bad_file!r}")
        if card.format == "demo":
            return self._read_demo(card, options)
        labels = card.labels
        if options.multi_label and not labels and card.format != "medmnist_npz":
            raise UserError(f"{card.card_path}: multi-label data needs the card's `labels` (one name per finding)")
        if "patient" in (card.fields or {}) and card.format != "csv":
            raise UserError(f"{card.card_path}: fields.patient names a column of a csv table; format {card.format!r} "
                            f"has none (use format: csv, or drop fields.patient)")
        if card.group_by and card.format != "csv":
            raise UserError(f"{card.card_path}: group_by needs a per-image attribute; format {card.format!r} has none "
                            f"(use format: csv with a column named {card.group_by!r})")
        group_field = (card.fields or {}).get("group")
        if card.group_by and group_field is not None and group_field != card.group_by:
            raise UserError(f"{card.card_path}: group_by is {card.group_by!r} but fields.group names column "
                            f"{group_field!r}; name the group column once (group_by: {group_field})")
        given = [key for key in ("train", "validation", "test") if key in (card.splits or {})]
        if given and card.format in PER_SPLIT_INSTEAD:
            raise UserError(f"{card.card_path}: splits.{given[0]}: format {card.format} does not read per-split files; "
                            f"{PER_SPLIT_INSTEAD[card.format]}")
        notes: list[str] = []
        if card.format == "medmnist_npz":
            splits, labels = data.read_medmnist_npz(self._data_path(card), labels, options.multi_label)
            by_ratios = set(splits) == {"train"}
            if by_ratios:
                splits = self._ratio_split(card, splits["train"])
            elif "ratios" in (card.splits or {}):
                raise UserError(f"{card.card_path}: splits.ratios divide a file with train arrays only, but "
                                f"{self._data_path(card)} has {', '.join(splits)} arrays, which are its splits; "
                                f"remove splits.ratios")
        elif card.format == "imagefolder":
            splits, labels, by_ratios = self._read_imagefolder(card, labels, notes)
        else:
            splits, by_ratios = self._read_csv(card, labels, options)
            if labels is None:
                labels = number_classes(splits, notes, str(card.card_path))
        for split in list(splits):
            splits[split], skipped = data.keep_readable(splits[split], on_bad_file, f"{card.card_path} ({split})")
            notes += skipped
        unknown = unknown_groups_note([e for examples in splits.values() for e in examples], "patient", "images")
        notes += [unknown] if unknown else []
        if by_ratios:  # the ratios made every split the card asked for: a validation ratio of 0 (or none) means none
            return Dataset(splits, labels, notes)
        splits, note = hold_out_validation(splits, card, "images", group_of=self._by_patient(card))
        shared = in_several_splits_note(splits, "patient", "patient", "images") if "patient" in (card.fields or {}) else None
        return Dataset(splits, labels, notes + [n for n in (note, shared) if n])

    def _read_demo(self, card: Card, options: MedicalImageOptions) -> Dataset:
        demo = {"image_size": 32, "seed": 0, "train": 600, "validation": 150, "test": 300, **(card.option("demo") or {})}
        sizes = {s: int(demo[s]) for s in ("train", "validation", "test")}
        splits = data.demo_lesions(sizes, int(demo["image_size"]), int(demo["seed"]))
        if card.group_by:
            if card.group_by != "site":
                raise UserError(f"{card.card_path}: the demo data's only group attribute is 'site', not {card.group_by!r}")
            for examples in splits.values():
                for example in examples:
                    example["group"] = example["site"]
        return Dataset(splits, card.labels or list(data.DEMO_LABELS))

    def _data_path(self, card: Card) -> Path:
        if card.files and "data" in card.files:
            return card.file("data")
        if not card.path:
            raise UserError(f"{card.card_path}: set `path:` (or `files: {{data: ...}}`) to the {card.format} data, "
                            f"or give one file per split as `splits: {{train: ..., test: ...}}`")
        path = card.resolve(card.path, "path")
        if not path.exists():
            raise UserError(f"{card.card_path}: path = {path} does not exist; fix the path (relative paths start at {card.folder})")
        return path

    @staticmethod
    def _by_patient(card: Card):
        """With `fields.patient`, splits keep each patient's images together (ChestX-ray14
        has many images per patient: split by image, a patient is in train and test)."""
        return (lambda e: e["patient"]) if "patient" in (card.fields or {}) else None

    def _ratio_split(self, card: Card, examples: list[dict]) -> dict[str, list[dict]]:
        spec = card.splits or {}
        ratios = split_ratios(card, "images", "split folders, per-split files, an npz's arrays")
        return ratio_split(examples, ratios, int(spec.get("seed", 0)), self._by_patient(card), where=str(card.card_path))

    def _read_imagefolder(self, card: Card, labels, notes: list[str]):
        """-> the splits, the labels, and whether the card's ratios made the splits (not split folders)."""
        root = self._data_path(card)
        split_dirs = {"train": ["train"], "validation": ["validation", "val", "valid"], "test": ["test"]}
        folders = {folder.name.lower(): folder for folder in sorted(root.iterdir()) if folder.is_dir()} \
            if root.is_dir() else {}  # Train/ and Val/ too
        present = {split: next((folders[n] for n in names if n in folders), None) for split, names in split_dirs.items()}
        if present["train"] is not None:
            if "ratios" in (card.splits or {}):
                folders = ", ".join(f"{folder.name}/" for folder in present.values() if folder is not None)
                raise UserError(f"{card.card_path}: splits.ratios divide images that come unsplit, but {root} has split "
                                f"folders ({folders}); remove splits.ratios, or put the class folders directly in {root}")
            splits = {}
            for split, folder in present.items():
                if folder is not None:
                    splits[split], labels, skipped = data.read_imagefolder(folder, labels)
                    notes += skipped
            return splits, labels, False
        examples, labels, skipped = data.read_imagefolder(root, labels)
        notes += skipped
        return self._ratio_split(card, examples), labels, True

    def _read_csv(self, card: Card, labels, options: MedicalImageOptions) -> tuple[dict[str, list[dict]], bool]:
        """-> the splits, and whether the card's ratios made them (not its per-split files)."""
        image_root = card.resolve(card.option("image_root"), "image_root") if card.option("image_root") else card.folder

        def read(path: Path, rows=None) -> list[dict]:
            return data.read_image_csv(path, image_root, card.fields, labels, card.group_by, options.multi_label,
                                       rows=rows)

        per_split = {k: v for k, v in (card.splits or {}).items() if k in ("train", "validation", "test")}
        if per_split and "fold_by" not in card.splits:
            given = {"splits.ratios": "ratios" in card.splits, "path": bool(card.path), "files.data": "data" in (card.files or {})}
            ignored = [name for name, present in given.items() if present]
            if ignored:
                raise UserError(f"{card.card_path}: {ignored[0]} and splits.{next(iter(per_split))}: one table per "
                                f"split makes the splits; remove {ignored[0]}, or the per-split tables to split one "
                                f"table by ratios")
        sources = split_sources(card, True, lambda: self._data_path(card), table_rows)
        if sources:
            return {split: read(path, rows) for split, (path, rows) in sources.items()}, False
        path = self._data_path(card)
        return self._ratio_split(card, read(path, loader_rows(card, path))), True

    # ----------------------------------------------------------------------- the model

    def build_model(self, backbone: str, labels: list[str], options: MedicalImageOptions) -> ImageClassifier:
        model, info, data_config = load_backbone(backbone, options.image_size)
        if options.mean is not None:
            data_config["mean"] = tuple(options.mean)
        if options.std is not None:
            data_config["std"] = tuple(options.std)
        info["data_config"] = data_config
        return ImageClassifier(model, info, data_config, options, len(labels))

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        backbone = methods.network_of(model.backbone)
        kind = family(backbone)
        if kind == "vit":
            return dict(_VIT_DEFAULTS.get(method, {}))
        if kind == "resnet":
            if method in ("adapter", "parallel_adapter"):
                raise UserError(f"{method}: peftlab's bottleneck adapters act on token features (Linear / LayerNorm "
                                f"outputs); on a ResNet use `tsa` (residual 1x1-conv adapters) instead")
            return dict(_RESNET_DEFAULTS.get(method, {}))
        return _conv_net_defaults(method, backbone)

    # --------------------------------------------------------------------- predictions

    def read_inputs(self, paths, options: MedicalImageOptions, fields) -> list[dict]:
        """Images, folders of images, and CSV tables of image paths (relative to the table)."""
        files: list[Path] = []
        tables: list[dict] = []
        for path in map(Path, paths):
            if path.is_dir():
                files += files_in_folder(path, data.list_images, "image files", data.READABLE_SUFFIXES)
            elif path.suffix.lower() == ".csv":  # a table laid out like the training card's (its `fields`)
                tables += data.read_image_csv(path, path.parent, fields, None, None, options.multi_label, labelled=False)
            elif path.is_file():
                if path.suffix.lower() not in data.READABLE_SUFFIXES:
                    raise UserError(f"{path}: not an image file medical-classify reads "
                                    f"({', '.join(data.READABLE_SUFFIXES)}) or a .csv of image paths")
                files.append(path)
            else:
                raise UserError(f"{path}: no such file or folder")
        examples = [{"id": str(p), "path": str(p)} for p in files] + tables
        for example in examples:
            example["multi_label"] = options.multi_label
        return data.keep_readable(examples, None, "predict inputs")[0]

    def describe(self, example, scores, labels) -> dict:
        row = file_identity(example)
        if "targets" in example or example.get("multi_label"):
            row["scores"] = {label: float(s) for label, s in zip(labels, scores)}
            row["predicted_labels"] = [label for label, s in zip(labels, scores) if s >= 0.5]
            return row
        return {**row, **describe_scores(scores, labels)}

    # ------------------------------------------------------------- serving and export

    def rows_follow_examples(self, options) -> bool:
        return True

    def parse_request(self, payload: dict, options: MedicalImageOptions) -> list[dict]:
        """{"images": [BASE64, ...]} or {"images": {ID: BASE64, ...}}: encoded image files
        (PNG, JPEG, TIFF, BMP, ...), converted to RGB as files are."""
        requests.only_fields(payload, ("images",))
        examples = []
        for key, value in requests.items(payload, "images", "base64 image files"):
            where = f"images[{key}]"
            try:
                with Image.open(BytesIO(requests.base64_bytes(value, where))) as image:
                    image.load()
                    rgb = data.to_rgb(image)
            except UserError:
                raise
            except UnidentifiedImageError:  # Pillow's message names only its buffer: "<_io.BytesIO object at 0x...>"
                raise UserError(f"{where}: not a readable image file: the decoded bytes are in no image format Pillow "
                                f"reads (PNG, JPEG, TIFF, BMP, GIF, WebP, ...); send a whole image file, base64-encoded") from None
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                raise UserError(f"{where}: not a readable image file ({error})") from None
            examples.append({"id": key, "image": np.asarray(rgb), "multi_label": options.multi_label})
        return examples

    def export_backbone(self, model, directory: Path) -> str:
        """timm's own format (`timm.models.save_for_hf`: config.json + model.safetensors),
        which `timm.create_model("local-dir:DIR", pretrained=True)` loads."""
        backbone = model.backbone
        config, args = {}, {}
        if model.backbone_info.get("architecture") in ("tiny_vit", "tiny_resnet"):
            arch, args = _registered_equivalent(backbone)
            config = {"pretrained_cfg": {"architecture": arch}}
        timm.models.save_for_hf(backbone, str(directory), model_config=config, model_args=args,
                                safe_serialization=True, data_config=dict(model.data_config))
        return "import timm\nmodel = timm.create_model('local-dir:' + EXPORT_DIR, pretrained=True)"

    # ------------------------------------------------------------------------- metrics

    def applicable_metrics(self, dataset) -> tuple[str, ...]:
        multi_label = any("targets" in e for examples in dataset.splits.values() for e in examples)
        return tuple(_MULTI_LABEL) if multi_label else metric_registry.metrics_scoring("classes")

    def compute_metrics(self, metric_names, examples, outputs) -> dict:
        scores = np.stack(outputs)
        if all("targets" in e for e in examples):
            labels = np.array([e["targets"] for e in examples], dtype=int)
            compute = multi_label_metrics
        else:
            labels = np.array([e["label"] for e in examples])
            compute = metric_registry.compute
        result: dict[str, Any] = compute(metric_names, labels, scores)
        if all("group" in e for e in examples):
            result["by_group"] = metric_registry.compute_by_group(
                metric_names, labels, scores, [e["group"] for e in examples], compute_metrics=compute)
        return result

    def write_report(self, split, examples, outputs, labels, directory) -> None:
        """Multi-label: `<split>_per_finding.json`, each finding's AUROC, average precision
        and prevalence (the table ChestX-ray14 papers report). Single-label:
        `<split>_per_class.json` (each class against the rest) and the confusion matrix."""
        scores = np.stack(outputs)
        if all("targets" in e for e in examples):
            targets = np.array([e["targets"] for e in examples], dtype=int)
            io.write_json(Path(directory) / f"{split}_per_finding.json",
                          {name: reports.one_vs_rest(targets[:, k], scores[:, k]) for k, name in enumerate(labels)})
            return
        truth = np.array([e["label"] for e in examples])
        class_scores = scores if scores.ndim == 2 else np.stack([1 - scores, scores], axis=1)  # binary: P(class 1)
        io.write_json(Path(directory) / f"{split}_per_class.json",
                      {name: reports.one_vs_rest(truth == k, class_scores[:, k]) for k, name in enumerate(labels)})
        reports.write_confusion(split, examples, scores, labels, directory)

    def card_template(self) -> str:
        return CARD_TEMPLATE


def _registered_equivalent(backbone: nn.Module) -> tuple[str, dict]:
    """A tiny preset as a registered timm architecture plus the arguments that shape it."""
    if family(backbone) == "vit":
        block = backbone.blocks[0]
        return "vit_tiny_patch16_224", {
            "img_size": list(backbone.patch_embed.img_size), "patch_size": list(backbone.patch_embed.patch_size),
            "embed_dim": backbone.embed_dim, "depth": len(backbone.blocks), "num_heads": block.attn.num_heads,
            "mlp_ratio": block.mlp.fc1.out_features / backbone.embed_dim}
    stages = [getattr(backbone, f"layer{i}") for i in range(1, 5)]
    return "resnet18", {"layers": [len(s) for s in stages], "channels": [s[-1].conv2.out_channels for s in stages],
                        "stem_width": backbone.conv1.out_channels}


_MULTI_LABEL = {
    # MedMNIST's ACC (its evaluator's multi-label branch, ChestMNIST): each finding's
    # accuracy, averaged over findings; not scikit-learn's subset accuracy (every finding
    # of an image right), which reads far lower (0.52 against 0.96 on one split).
    "accuracy": lambda y, s: float(np.mean(y == (s >= 0.5))),
    # A finding neither present nor predicted in the split has no F1 (0/0) and is left out
    # of the mean, as a class absent from both is in single-label macro F1; one predicted
    # but absent scores 0.
    "macro_f1": lambda y, s: skm.f1_score(y, s >= 0.5, average="macro", zero_division=np.nan),
    "f1": lambda y, s: skm.f1_score(y, s >= 0.5, average="macro", zero_division=np.nan),
    # Per finding, averaged over findings that have both outcomes in the split
    # (the ChestX-ray14 convention for AUROC).
    "balanced_accuracy": lambda y, s: _per_finding(skm.balanced_accuracy_score, y, s >= 0.5),
    "auroc": lambda y, s: _per_finding(skm.roc_auc_score, y, s),
    "aupr": lambda y, s: _per_finding(skm.average_precision_score, y, s),
}


def _per_finding(fn, y, s):
    values = [fn(y[:, k], s[:, k]) for k in range(y.shape[1]) if len(np.unique(y[:, k])) == 2]
    return float(np.mean(values)) if values else None


def multi_label_metrics(names, targets: np.ndarray, scores: np.ndarray) -> dict:
    result = {}
    for name in names:  # each one of _MULTI_LABEL (runner.run_metrics)
        value = _MULTI_LABEL[name](targets, scores) if len(targets) else None
        result[name] = None if value is None or np.isnan(value) else float(value)
    return result


CARD_TEMPLATE = """---
name: my-image-dataset
domain: medical_imaging
task: medical-classify
format: csv                       # csv | imagefolder | medmnist_npz
files:
  data: metadata.csv              # header row: path,label[,group]
fields: {image: path, label: label, group: sex}   # patient: PATIENT_COLUMN keeps a patient's images in one split
image_root: images/               # image paths are relative to this (default: the card's folder)
labels: [benign, malignant]       # label cells hold these names or their indices
group_by: sex                     # optional: per-group metrics and the worst-group gap
splits: {ratios: {train: 0.7, validation: 0.1, test: 0.2}, seed: 0}
# or one table per split, without files.data: splits: {train: train.csv, validation: valid.csv, test: test.csv}; without validation, validation_fraction (0.1) of train is held out
# or a column naming each row's split: splits: {fold_by: set} (cells train, validation, test), or its fold: {fold_by: fold, test: [5]} (the rest trains)
on_bad_file: error                # or skip: leave unreadable images out (counted in the run log)
license: ""
source: ""
---
What the images are (modality, body part, resolution), how labels were assigned,
who is in the data (sites, scanners, demographics), intended use, known biases.
"""

register_task(MedicalClassifyTask())
