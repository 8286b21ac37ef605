"""`pointcloud-classify`: shape classification on Point-BERT (Yu et al. 2022), with
Point-PEFT (Tang et al. 2023) and the generic PEFT methods.

Clouds are normalised to the unit sphere, `num_points` are drawn per example (random in
training, a fixed subset at evaluation), and training augments with Point-BERT's
random per-axis scale and translation (plus, optionally, rotation about the up axis),
all drawn from the `rng` the training loop passes to `collate`. The head follows
Point-BERT's fine-tuning head: [CLS, max over patch tokens] -> MLP -> classes.
With `votes` > 1, evaluation averages the logits over that many copies of each cloud,
drawn as Point-BERT's voting test draws them (a random `num_points` of a farthest-point
pool of 1200 per 1024, each scaled and translated), as it reports on ModelNet40.

With `augment=false` (training on the fixed evaluation subset) and a method that leaves
the encoder's first stages frozen, those stages' outputs are computed once, not every
epoch (frozen-feature caching, `shared/feature_cache.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peftlab.shared import io, methods, requests
from peftlab.shared.cards import Card
from peftlab.shared.data import (
    count_by_split,
    files_in_folder,
    hold_out_validation,
    number_classes,
    ratio_split,
    split_ratios,
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
from peftlab.shared.loaders import loader_records
from peftlab.shared.tasks import SPLIT_KEYS, Dataset, FP32Head, describe_scores, register_task
from torch import nn
from torch.nn import functional as F

from . import data
from .backbones import PointBERT, backbone_names, farthest_point_sample, load_backbone

VOTE_SEED = 2023
"""Fixed, so test-time voting gives the same copies (and scores) on every evaluation."""


@dataclass
class PointCloudOptions:
    num_points: int = field(default=1024, metadata={"help": "points per cloud fed to the model (Point-BERT: 1024 on ModelNet40, 2048 on ScanObjectNN)"})
    num_group: int | None = field(default=None, metadata={"help": "patches per cloud (default: the backbone's, 64 for Point-BERT)"})
    group_size: int | None = field(default=None, metadata={"help": "points per patch (default: the backbone's, 32 for Point-BERT)"})
    num_heads: int | None = field(default=None, metadata={"help": "attention heads of a loaded checkpoint (not stored in the weights; default 6)"})
    augment: bool = field(default=True, metadata={"help": "training augmentation: a new random subset of points and random scale / shift (rotate_up: rotation) each epoch; "
                                                          "false: the fixed evaluation subset in training too (frozen-feature caching needs fixed inputs)"})
    rotate_up: bool = field(default=False, metadata={"help": "training augmentation: random rotation about the up axis"})
    up_axis: str = field(default="y", metadata={"help": "up axis for rotate_up: x, y (ModelNet40 resampled, ScanObjectNN) or z (raw ModelNet meshes)"})
    scale_low: float = field(default=2 / 3, metadata={"help": "training augmentation: smallest per-axis scale"})
    scale_high: float = field(default=3 / 2, metadata={"help": "training augmentation: largest per-axis scale"})
    translate: float = field(default=0.2, metadata={"help": "training augmentation: largest per-axis shift"})
    votes: int = field(default=1, metadata={"help": "test-time voting: evaluation averages the logits of this many copies, each a random "
                                                    "subset of a farthest-point pool, scaled and translated (Point-BERT's vote; 1 = off)"})
    eval_sampling: str = field(default="random", metadata={"help": "the points of an evaluated cloud: random (a seeded uniform subset) or fps "
                                                                    "(farthest-point sampling of the whole cloud, Point-BERT's test-time subset)"})
    off_points: int = field(default=8192, metadata={"help": "points sampled from each mesh surface (.off, .ply with faces) when reading"})
    head_hidden: int = field(default=256, metadata={"help": "hidden width of the classification head (Point-BERT: 256)"})
    head_dropout: float = field(default=0.5, metadata={"help": "dropout in the classification head (Point-BERT: 0.5)"})
    freeze_bn_stats: bool = field(default=True, metadata={"help": "keep the patch encoder's BatchNorm statistics as loaded (eval-mode BN) while training, "
                                                                  "so a frozen encoder stays exactly the pre-trained function; false updates them, as Point-BERT's full fine-tuning does"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cross-entropy label smoothing"})

    def __post_init__(self):
        if self.num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {self.num_points}")
        if self.up_axis not in data.AXES:
            raise ValueError(f"up_axis must be x, y or z, got {self.up_axis!r}")
        if not 0 < self.scale_low <= self.scale_high:
            raise ValueError(f"need 0 < scale_low <= scale_high, got {self.scale_low}, {self.scale_high}")
        if self.votes < 1:
            raise ValueError(f"votes must be >= 1, got {self.votes}")
        if self.eval_sampling not in ("random", "fps"):
            raise ValueError(f"eval_sampling must be random or fps, got {self.eval_sampling!r}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")


FPS_CACHE_BYTES = 256 * 2**20
VOTE_POOL = 1200 / 1024
"""Point-BERT's voting test draws each copy from a farthest-point pool this much larger."""


class PointCloudClassifier(nn.Module):
    def __init__(self, backbone: PointBERT, info: dict, options: PointCloudOptions, num_labels: int):
        super().__init__()
        needed = max(backbone.config.num_group, backbone.config.group_size)
        if options.num_points < needed:
            raise UserError(f"task.num_points={options.num_points} is fewer than the {needed} points the patches need "
                            f"(num_group={backbone.config.num_group}, group_size={backbone.config.group_size}); raise task.num_points")
        self.backbone = backbone
        self.backbone_info = info
        self.options = options
        width = backbone.embed_dim
        self.head = FP32Head(nn.Linear(2 * width, options.head_hidden), nn.ReLU(inplace=True),
                               nn.Dropout(options.head_dropout), nn.Linear(options.head_hidden, num_labels))

        self.feature_cache: FeatureCache | None = None
        # FPS subsets of evaluated clouds, least recently used dropped past FPS_CACHE_BYTES
        self._fps_subsets: OrderedDict[tuple[bytes, int], np.ndarray] = OrderedDict()
        self._fps_bytes = 0

    def encoder(self) -> PointBERT:
        return methods.network_of(self.backbone)

    def plan_feature_cache(self, train_examples: list[dict], budget_bytes: int) -> str:
        """Turn the cache on when the method leaves the encoder's first stages frozen and
        training clouds are the same every epoch; say what was decided and why."""
        self.feature_cache = None
        encoder = self.encoder()
        frozen, reason, total = in_training(self, encoder.stages)
        varying = ("training clouds get a new random subset of points and a random scale and shift each epoch: "
                   "task.augment=true, the default; task.augment=false trains on the fixed evaluation subset and "
                   "lets the cache work" if self.options.augment else unique_ids(train_examples))
        hint = "task.freeze_bn_stats=true keeps the statistics fixed" if reason and "BatchNorm" in reason else ""
        blank = torch.zeros(1, self.options.num_points, 3, device=next(encoder.parameters()).device)
        self.feature_cache, line = plan(
            frozen, reason, total, budget_bytes,
            lambda stages: output_bytes(encoder, lambda: encoder(blank, stop=stages)) * len(train_examples),
            varying_inputs=varying, hint=hint)  # the patch embedding alone (FPS, kNN, mini-PointNet) is worth it
        return line

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.options.freeze_bn_stats:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def example_length(self, example) -> int:
        return 1  # every cloud costs the same: num_points points

    def _cloud(self, points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return data.normalize_to_unit_sphere(data.choose_points(points, self.options.num_points, rng))

    def _evaluation_cloud(self, example: dict) -> np.ndarray:
        """The fixed subset an example is evaluated on (and trained on without augmentation)."""
        points, count = example["points"], self.options.num_points
        if self.options.eval_sampling == "random" or len(points) <= count:
            return self._cloud(points, np.random.default_rng(0))
        return self._farthest_points(points, count)

    def _farthest_points(self, points: np.ndarray, count: int) -> np.ndarray:
        """A farthest-point sample of `count` points (all of a smaller cloud), normalised;
        computed once per cloud and count: every epoch evaluates the same clouds."""
        points = np.ascontiguousarray(points, dtype=np.float32)
        if len(points) <= count:
            return data.normalize_to_unit_sphere(points)
        key = (hashlib.blake2b(points.tobytes(), digest_size=16).digest(), count)  # the cloud itself, whatever its id
        if key in self._fps_subsets:
            self._fps_subsets.move_to_end(key)
            return self._fps_subsets[key]
        chosen = farthest_point_sample(torch.from_numpy(points)[None], count)[0]
        subset = self._fps_subsets[key] = data.normalize_to_unit_sphere(points[chosen.numpy()])
        self._fps_bytes += subset.nbytes
        while self._fps_bytes > FPS_CACHE_BYTES:  # predict on a stream of clouds stays bounded
            self._fps_bytes -= self._fps_subsets.popitem(last=False)[1].nbytes
        return subset

    def _vote_clouds(self, examples: list[dict], votes: int) -> list[np.ndarray]:
        """Point-BERT's voting copies, vote-major: a random `num_points` of each cloud's
        farthest-point pool (1200 per 1024 points), scaled and translated as in training;
        drawn from a fixed seed, so an evaluation repeats exactly."""
        o, rng = self.options, np.random.default_rng(VOTE_SEED)
        pool_size = round(o.num_points * VOTE_POOL)
        pools = [self._farthest_points(e["points"], pool_size) for e in examples]
        return [data.augment(data.choose_points(pool, o.num_points, rng), rng, False, o.up_axis,
                             (o.scale_low, o.scale_high), o.translate)
                for _ in range(votes) for pool in pools]

    def collate(self, examples, rng):
        o = self.options
        votes = 1
        if rng is not None and o.augment:  # training: random subset + augmentation
            clouds = [data.augment(self._cloud(e["points"], rng), rng, o.rotate_up, o.up_axis, (o.scale_low, o.scale_high), o.translate)
                      for e in examples]
        elif rng is None and o.votes > 1:  # evaluation with test-time voting
            votes = o.votes
            clouds = self._vote_clouds(examples, votes)
        else:  # evaluation (and training without augmentation): a fixed subset per example
            clouds = [self._evaluation_cloud(e) for e in examples]
        batch: dict[str, Any] = {"points": torch.from_numpy(np.stack(clouds)), "votes": votes}
        if rng is not None and self.feature_cache is not None:
            batch["cache_keys"] = [e["id"] for e in examples]
        if all("label" in e for e in examples):
            batch["labels"] = torch.tensor([int(e["label"]) for e in examples])
        return batch

    def forward(self, batch) -> torch.Tensor:
        # the core leaves batches on the CPU; follow the head wherever accelerate put the model
        points = batch["points"].to(self.head[0].weight.device)
        cache, keys = self.feature_cache, batch.get("cache_keys")
        if cache is None or keys is None or not self.training:
            tokens = self.backbone(points)
        else:
            prefix = cache.prefix(keys, lambda: self.backbone(points, stop=cache.stages), split_rows, stack_rows)
            tokens = self.backbone(points, hidden=prefix, start=cache.stages)
        features = torch.cat([tokens[:, 0], tokens[:, 1:].max(dim=1).values], dim=-1)
        logits = self.head(features)
        votes = batch.get("votes", 1)
        if votes > 1:  # (votes * B, K) -> the mean logits over the copies, as Point-BERT's vote
            logits = logits.float().reshape(votes, -1, logits.shape[-1]).mean(0)
        return logits

    def loss(self, logits, batch):
        return F.cross_entropy(logits.float(), batch["labels"].to(logits.device), label_smoothing=self.options.label_smoothing)

    def scores(self, logits):
        return torch.softmax(logits.float(), dim=-1)


# Point-BERT's module names (attn.qkv, attn.proj, mlp.fc1, mlp.fc2) for the generic methods.
_METHOD_DEFAULTS = {
    "lora": {"target_modules": ["qkv", "proj"]},
    "dora": {"target_modules": ["qkv", "proj"]},
    "loha": {"target_modules": ["qkv", "proj"]},
    "lokr": {"target_modules": ["qkv", "proj"]},
    "vera": {"target_modules": ["qkv"]},
    "ia3": {"target_modules": ["qkv", "fc2"], "feedforward_modules": ["fc2"]},
    "adapter": {"target_modules": ["attn.proj", "mlp.fc2"], "size": 16},
    "parallel_adapter": {"target_modules": ["mlp.fc2"], "input_from": "fc1", "size": 16, "scale": 4.0},
    "ssf": {"target_modules": r"(reduce_dim|norm|blocks\.blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))"},
    "freeze_layers": {"blocks": "blocks.blocks"},
}


SPLITS_OF_FORMAT = {
    "point_folder": ("train/ and test/ folders in each class folder",
                     "put train/ and test/ folders in each class folder (root/chair/train/...), or leave the splits "
                     "to splits.ratios"),
    "modelnet_off": ("train/ and test/ folders in each class folder",
                     "put train/ and test/ folders in each class folder, as ModelNet ships (root/chair/train/...)"),
    "modelnet_txt": ("the root's <name>_train.txt and <name>_test.txt lists",
                     "the root's <name>_train.txt and <name>_test.txt lists are its splits"),
    "points_npz": ("the file's `split` array", "the file's `split` array (0 train, 1 test) gives the splits"),
    "scanobjectnn_h5": ("one .h5 file per split", "name the .h5 files under `files: {train: ..., test: ...}`"),
}
"""Each format: where its splits come from, and what a card that names per-split files does instead."""


class PointCloudClassifyTask:
    name = "pointcloud-classify"
    example_unit = "point clouds"
    domain = "point_cloud"
    description = "3D shape classification on Point-BERT with Point-PEFT (point-prior prompt + geometry-aware adapter)"
    metrics = ("accuracy", "balanced_accuracy", "macro_f1")
    primary_metric = "accuracy"
    formats = ("modelnet_off", "modelnet_txt", "scanobjectnn_h5", "point_folder", "points_npz", "demo")
    loader_format = "point_records"  # records of points and label, one file or one per split
    card_keys = ("demo",)
    split_keys = (*SPLIT_KEYS, "shape_names", "validation_fraction")
    field_keys = ()
    options = PointCloudOptions

    def backbones(self) -> list[str]:
        return backbone_names()

    def default_method_options(self, method: str, model) -> dict[str, Any]:
        defaults = dict(_METHOD_DEFAULTS.get(method, {}))
        if method in ("geometry_adapter", "point_peft"):
            groups = model.backbone.config.num_group if isinstance(model.backbone, PointBERT) else 64
            # about a quarter of the patches as local groups, each of 8 tokens (fewer for tiny models)
            defaults.update(local_groups=max(2, groups // 4), local_size=min(8, groups))
        return defaults

    # --------------------------------------------------------------------------- data

    def read(self, card: Card, options: PointCloudOptions) -> Dataset:
        spec = dict(card.splits or {})
        seed = int(spec.get("seed", 0))
        if card.format == "demo":
            demo = {"shapes": list(data.DEMO_SHAPES), "num_points": 1024, "train": 480, "validation": 120, "test": 240,
                    "seed": 0, **(card.option("demo") or {})}
            shapes = tuple(demo["shapes"])
            unknown = sorted(set(shapes) - set(data.DEMO_SHAPES))
            if unknown:
                raise UserError(f"{card.card_path}: demo.shapes names {unknown[0]!r}; choose from {', '.join(data.DEMO_SHAPES)}")
            sizes = {s: int(demo[s]) for s in ("train", "validation", "test")}
            splits = data.demo_dataset(sizes, shapes, int(demo["num_points"]), int(demo["seed"]))
            return Dataset(splits, card.labels or list(shapes))
        notes: list[str] = []
        if "shape_names" in spec and (card.format != "modelnet_txt" or not isinstance(spec["shape_names"], str)):
            raise UserError(f"{card.card_path}: splits.shape_names names the class-list file of the modelnet_txt format "
                            f"(e.g. modelnet10_shape_names.txt); it got {spec['shape_names']!r} for format "
                            f"{card.format!r}: {'remove it' if card.format != 'modelnet_txt' else 'give a file name'}")
        given = [key for key in ("train", "validation", "test") if key in spec]
        if given and card.format in SPLITS_OF_FORMAT:
            raise UserError(f"{card.card_path}: splits.{given[0]}: format {card.format} does not read per-split files; "
                            f"{SPLITS_OF_FORMAT[card.format][1]}")
        if card.format == "points_npz":
            splits, labels = data.read_points_npz(card.file("data"))
        elif card.format == "modelnet_txt":
            splits, labels = data.read_modelnet_txt(card.file("root"), spec.get("shape_names", "modelnet40_shape_names.txt"))
        elif card.format in ("modelnet_off", "point_folder"):
            suffixes = (".off",) if card.format == "modelnet_off" else data.POINT_SUFFIXES
            splits, labels = data.read_point_folder(card.file("root"), suffixes, options.off_points, seed)
        elif card.format == "scanobjectnn_h5":
            splits, labels = self._read_h5(card)
        elif card.format == "point_records":
            splits = self._read_loader_files(card)
            labels = card.labels or number_classes(splits, notes, str(card.card_path))
        else:
            raise UserError(f"{card.card_path}: pointcloud-classify reads formats {', '.join(self.formats)}, not {card.format!r}")
        labels = self._order_labels(card, labels, splits)
        splits = self._arrange_splits(card, splits, seed, notes)
        small, where = count_by_split(splits, lambda e: len(e["points"]) < options.num_points)
        if small:
            notes.append(f"{small} clouds ({where}) have fewer than num_points={options.num_points} points; points are repeated to fill them")
        return Dataset(splits, labels, notes)

    def _read_h5(self, card: Card):
        splits = {}
        for split in ("train", "validation", "test"):
            if card.files and split in card.files:
                clouds, label = data.read_scanobjectnn_h5(card.file(split))
                splits[split] = [{"id": f"{split}:{i}", "points": c, "label": int(y)} for i, (c, y) in enumerate(zip(clouds, label))]
        if "train" not in splits:
            raise UserError(f"{card.card_path}: a scanobjectnn_h5 card names `files: {{train: ..., test: ...}}` (.h5 files)")
        count = 1 + max(e["label"] for s in splits.values() for e in s)
        return splits, card.labels or [str(i) for i in range(count)]

    def _read_loader_files(self, card: Card) -> dict[str, list[dict]]:
        """The card loader's clouds: one file per split, one file whose `fold_by` key names each
        cloud's split, or one file ('all') that ratios divide."""
        # point_records come from a loader only: split_sources reads them with it, never a file itself
        sources = split_sources(card, False, lambda: card.file("data"), lambda path: loader_records(card, path))
        if sources is None:
            path = card.file("data")
            return {"all": data.read_point_records(path, loader_records(card, path), card.labels)}
        return {split: data.read_point_records(path, records, card.labels) for split, (path, records) in sources.items()}

    def _order_labels(self, card: Card, labels: list[str], splits) -> list[str]:
        """The card's `labels` order is the class index order: classes are matched to the
        data's by name (as medical-classify's imagefolder does), and every example renumbered."""
        if card.labels is None:
            return labels
        if card.format == "scanobjectnn_h5":  # its files hold class indices only: the card names them
            return list(card.labels)
        if sorted(card.labels) != sorted(labels):
            raise UserError(f"{card.card_path}: `labels` {card.labels} differ from the data's classes {labels}; "
                            f"list the data's classes (in the order you want as class indices) or remove `labels`")
        index_in_card = [card.labels.index(name) for name in labels]
        for examples in splits.values():
            for example in examples:
                example["label"] = index_in_card[example["label"]]
        return list(card.labels)

    def _arrange_splits(self, card: Card, splits: dict[str, list[dict]], seed: int, notes: list[str]) -> dict[str, list[dict]]:
        """Official train/test kept; validation carved out of train by `validation_fraction`
        (stratified); data without splits ('all') divided by `ratios`, which give every split
        (a validation ratio of 0, or none, makes no validation split)."""
        spec = card.splits or {}
        comes_split = SPLITS_OF_FORMAT[card.format][0] if card.format in SPLITS_OF_FORMAT else "one file per split"
        if "all" in splits:
            ratios = split_ratios(card, "clouds", comes_split)
            return ratio_split(splits["all"], ratios, seed, where=str(card.card_path))
        if "ratios" in spec:
            raise UserError(f"{card.card_path}: splits.ratios divide clouds that come unsplit, but this {card.format} "
                            f"data comes split ({comes_split}); remove splits.ratios")
        splits, note = hold_out_validation(splits, card, "clouds")
        notes += [note] if note else []
        return splits

    # --------------------------------------------------------------------------- model

    def build_model(self, backbone: str, labels: list[str], options: PointCloudOptions) -> PointCloudClassifier:
        encoder, info = load_backbone(backbone, options.num_heads)
        if options.num_group or options.group_size:
            encoder.set_grouping(options.num_group, options.group_size)
            info["architecture"].update(num_group=encoder.config.num_group, group_size=encoder.config.group_size)
        return PointCloudClassifier(encoder, info, options, len(labels))

    def read_inputs(self, paths, options: PointCloudOptions, fields) -> list[dict]:
        """Point files, and folders of them (every point file inside, subfolders too, in sorted order)."""
        files = []
        for path in map(Path, paths):
            if path.is_dir():
                files += files_in_folder(path, data.list_point_files, "point files", data.POINT_SUFFIXES)
            else:
                files.append(path)
        return [{"id": str(p), "points": data.read_point_file(p, options.off_points)} for p in files]

    def input_notes(self, examples, options) -> list[str]:
        small = sum(len(e["points"]) < options.num_points for e in examples)
        clouds = "1 cloud has" if small == 1 else f"{small} clouds have"
        return [f"{clouds} fewer than task.num_points={options.num_points} points: some of their points "
                f"are repeated to fill"] if small else []

    def describe(self, example, scores, labels) -> dict:
        # two classes read as every binary task's line: the probability of labels[1]
        return {"id": example["id"], **describe_scores(scores[1] if len(labels) == 2 else scores, labels)}

    def rows_follow_examples(self, options: PointCloudOptions) -> bool:
        return options.votes == 1  # with votes, each example is several rows (its vote copies)

    def parse_request(self, payload: dict, options) -> list[dict]:
        """{"points": [CLOUD, ...]} or {"points": {ID: CLOUD, ...}}, a cloud being a list
        of [x, y, z] (extra columns ignored, as in files)."""
        requests.only_fields(payload, ("points",))
        examples = []
        for key, cloud in requests.items(payload, "points", "point lists [[x, y, z], ...]"):
            where = f"points[{key}]"
            try:
                values = np.asarray(cloud, dtype=object)
                if any(isinstance(v, bool) for v in values.flat):  # numpy would read JSON's true and false as 1 and 0
                    raise ValueError("true/false is not a coordinate")
                array = values.astype(np.float32)
            except (TypeError, ValueError):
                raise UserError(f"{where}: a cloud is a list of [x, y, z] number lists") from None
            examples.append({"id": key, "points": data.check_points(array, where)})
        return examples

    def export_backbone(self, model, directory: Path) -> str:
        """Point-BERT's own checkpoint layout: `Point-BERT.pth` with the encoder under
        `base_model` (official key names), and `config.json` with its transformer settings."""
        encoder = model.backbone
        with io.atomic_path(directory / "Point-BERT.pth") as tmp:
            torch.save({"base_model": {k: v.detach().clone().contiguous() for k, v in encoder.state_dict().items()}}, tmp)
        io.write_json(directory / "config.json", {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in dataclasses.asdict(encoder.config).items()})
        return ("import torch\nstate = torch.load(EXPORT_DIR + '/Point-BERT.pth', weights_only=True)['base_model']  "
                "# Point-BERT's PointTransformer(config).load_state_dict(state)")

    def write_report(self, split, examples, outputs, labels, directory) -> None:
        """`<split>_per_class_accuracy.json`: accuracy and count per class (mean class
        accuracy, Point-BERT's mAcc, is their mean and is `balanced_accuracy` in metrics)."""
        truth = np.array([e["label"] for e in examples])
        predicted = np.stack(outputs).argmax(axis=1)
        per_class = {}
        for index, label in enumerate(labels):
            members = truth == index
            per_class[label] = {"accuracy": float((predicted[members] == index).mean()) if members.any() else None,
                                "count": int(members.sum())}
        io.write_json(Path(directory) / f"{split}_per_class_accuracy.json", per_class)

    def card_template(self) -> str:
        return CARD_TEMPLATE


CARD_TEMPLATE = """---
name: my-point-clouds
domain: point_cloud
task: pointcloud-classify
format: modelnet_off             # or modelnet_txt, scanobjectnn_h5, point_folder, points_npz
files:
  root: ModelNet40               # <root>/<class>/{train,test}/*.off
splits: {validation_fraction: 0.1, seed: 0}   # class folders without train/ and test/: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0} instead
license: ""
source: ""
---
What the shapes are, how they were scanned or modelled, intended use, known biases.
"""

register_task(PointCloudClassifyTask())
