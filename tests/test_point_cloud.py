"""Point-cloud domain: Point-BERT pieces, its checkpoint layout, Point-PEFT modules,
the formats, and learning on demo and real data."""

from __future__ import annotations

import copy
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import test_methods_contract as contract
import torch
from peftlab.domains.point_cloud import data
from peftlab.domains.point_cloud.backbones import (
    PRESETS,
    PointBERT,
    farthest_point_sample,
    knn,
    load_backbone,
)
from peftlab.pipelines import runner
from peftlab.pipelines.predictor import _left_out_notes
from peftlab.shared import methods
from peftlab.shared.errors import UserError

TASK = "pointcloud-classify"


# ----------------------------------------------------------------------------- FPS and kNN


def reference_fps(points: np.ndarray, count: int) -> list[int]:
    chosen = [0]
    for _ in range(count - 1):
        distance = [min(float(np.sum((p - points[c]) ** 2)) for c in chosen) for p in points]
        chosen.append(int(np.argmax(distance)))
    return chosen


def test_fps_and_knn_match_simple_reference():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(3, 40, 3)).astype(np.float32)
    fps = farthest_point_sample(torch.from_numpy(points), 7).numpy()
    for b in range(3):
        assert fps[b].tolist() == reference_fps(points[b], 7)
    queries = points[:, :5]
    found = knn(torch.from_numpy(queries), torch.from_numpy(points), 4).numpy()
    for b in range(3):
        for q in range(5):
            distances = np.linalg.norm(points[b] - queries[b, q], axis=1)
            assert found[b, q].tolist() == np.argsort(distances, kind="stable")[:4].tolist()


def test_patches_are_centred_and_output_has_cls_plus_groups():
    model, _ = load_backbone("tiny")
    points = torch.randn(2, 128, 3)
    patches, centers = model.group_divider(points)
    assert patches.shape == (2, 16, 16, 3) and centers.shape == (2, 16, 3)
    # the nearest point of every patch is its centre itself (FPS picks cloud points)
    assert torch.allclose(patches[:, :, 0], torch.zeros(2, 16, 3))
    model.eval()
    assert model(points).shape == (2, 17, 64)
    assert len(model.blocks.blocks) == 2 and model.blocks.blocks[0].attn.qkv.bias is None


# ----------------------------------------------------------------------------- official checkpoint


def test_official_checkpoint_layout_loads_key_by_key(tmp_path):
    torch.manual_seed(3)
    source = PointBERT(PRESETS["tiny"]).eval()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.cls_head_finetune.0.weight"] = torch.randn(256, 128)  # the released classifier: not the encoder
    path = tmp_path / "Point-BERT.pth"
    torch.save({"base_model": state, "epoch": 300}, path)
    loaded, info = load_backbone(str(path), num_heads=4)
    loaded.set_grouping(16, 16)  # patch counts are not weights: the checkpoint cannot tell them
    loaded.eval()
    report = info["load_report"]
    assert "blocks.blocks.1.attn.qkv.weight" in report["loaded"] and "cls_pos" in report["loaded"]
    assert report["ignored"] == ["cls_head_finetune.0.weight"] and report["missing"] == []
    assert info["architecture"]["depth"] == 2 and info["architecture"]["width"] == 64
    points = torch.randn(2, 256, 3)
    torch.testing.assert_close(loaded(points), source(points), atol=0, rtol=0)

    # pre-training files keep the encoder under transformer_q.
    torch.save({"base_model": {f"module.transformer_q.{k}": v for k, v in source.state_dict().items()}}, path)
    pretrained = load_backbone(str(path), num_heads=4)[0].eval()
    pretrained.set_grouping(16, 16)
    torch.testing.assert_close(pretrained(points), source(points), atol=0, rtol=0)

    broken = dict(state)
    broken["module.reduce_dim.bias"] = torch.zeros(3)
    torch.save({"base_model": broken}, path)
    with pytest.raises(UserError, match="does not fit Point-BERT"):
        load_backbone(str(path), num_heads=4)
    torch.save({"weights": state}, path)
    with pytest.raises(UserError, match="base_model"):
        load_backbone(str(path))


def test_named_backbone_without_weights_says_where_to_get_them():
    with pytest.raises(UserError, match="Point-BERT.pth"):
        load_backbone("point_bert")


# ----------------------------------------------------------------------------- Point-PEFT


@pytest.mark.parametrize("method", ["point_prior_prompt", "geometry_adapter", "point_peft"])
def test_point_peft_methods_obey_the_method_contract(method, tmp_path):
    # the shared contract, run here because the contract module lists methods before
    # the domains register theirs
    contract.test_task_model_contract(method, TASK, tmp_path)


def test_geometry_adapter_starts_as_base_and_prompts_leave_output_shape():
    base, _ = load_backbone("tiny")
    base.eval()
    points = torch.randn(3, 200, 3)
    adapted = methods.apply(copy.deepcopy(base), "point_peft", prompt_tokens=5, local_groups=4, local_size=4)
    assert adapted(points).shape == base(points).shape
    gated = methods.apply(copy.deepcopy(base), "geometry_adapter", local_groups=4, local_size=4)
    torch.testing.assert_close(gated(points), base(points), atol=0, rtol=0)
    with pytest.raises(UserError, match="does not fit"):
        methods.apply(torch.nn.Linear(3, 3), "point_peft")


def test_prompt_memory_bank_caches_training_features_then_stays_fixed():
    backbone, _ = load_backbone("tiny")
    adapted = methods.apply(backbone, "point_prior_prompt", prompt_tokens=4, memory_size=5, memory_topk=2)
    prompt = adapted.base_model.prompt
    points = torch.randn(3, 128, 3)
    adapted.eval()
    before = adapted(points)
    adapted.train()
    adapted(points)
    assert int(prompt.memory_count) == 3
    adapted(torch.randn(4, 128, 3))
    bank = prompt.memory.clone()
    assert int(prompt.memory_count) == 5
    adapted(torch.randn(4, 128, 3))
    assert torch.equal(prompt.memory, bank)  # full: fixed from now on
    adapted.eval()
    assert not torch.allclose(adapted(points), before)  # the bank now enhances the prompts


# ----------------------------------------------------------------------------- formats


def test_off_reader_samples_the_surface_by_area_and_rejects_bad_meshes(tmp_path):
    # a 2 x 1 rectangle (quad, fan-triangulated) and a 1 x 1 square far away: 2/3 of the area is the rectangle
    off = tmp_path / "mesh.off"
    off.write_text("OFF8 2 0\n0 0 0\n2 0 0\n2 1 0\n0 1 0\n10 0 5\n11 0 5\n11 1 5\n10 1 5\n4 0 1 2 3\n4 4 5 6 7\n")
    points = data.read_point_file(off, off_points=6000)
    assert points.shape == (6000, 3)
    on_rectangle = points[:, 2] == 0
    assert abs(on_rectangle.mean() - 2 / 3) < 0.03
    assert points[on_rectangle, 0].min() >= 0 and points[on_rectangle, 0].max() <= 2
    (tmp_path / "flat.off").write_text("OFF\n3 1 0\n0 0 0\n1 1 1\n2 2 2\n3 0 1 2\n")
    with pytest.raises(UserError, match="flat.off.*zero surface area"):
        data.read_point_file(tmp_path / "flat.off")
    (tmp_path / "empty.off").write_text("OFF\n0 0 0\n")
    with pytest.raises(UserError, match="empty.off.*empty mesh"):
        data.read_point_file(tmp_path / "empty.off")
    (tmp_path / "bad.off").write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n")
    with pytest.raises(UserError, match="bad.off:6.*out of range"):
        data.read_point_file(tmp_path / "bad.off")


def test_ply_ascii_and_binary_and_npy_round_trip(tmp_path):
    points = np.random.default_rng(1).normal(size=(20, 3)).astype(np.float32)
    header = "ply\nformat {fmt} 1.0\ncomment test\nelement vertex 20\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nelement face 0\nproperty list uchar int vertex_indices\nend_header\n"
    (tmp_path / "a.ply").write_text(header.format(fmt="ascii") + "".join(f"{x} {y} {z} 7\n" for x, y, z in points.tolist()))
    np.testing.assert_allclose(data.read_point_file(tmp_path / "a.ply"), points, rtol=1e-6)
    body = b"".join(struct.pack("<fffB", *p, 7) for p in points.tolist())
    (tmp_path / "b.ply").write_bytes(header.format(fmt="binary_little_endian").encode() + body)
    np.testing.assert_array_equal(data.read_point_file(tmp_path / "b.ply"), points)
    np.save(tmp_path / "c.npy", np.concatenate([points, points], axis=1))
    np.testing.assert_array_equal(data.read_point_file(tmp_path / "c.npy"), points)
    points[4, 1] = np.nan
    np.save(tmp_path / "nan.npy", points)
    with pytest.raises(UserError, match="nan.npy: point 4 has a NaN"):
        data.read_point_file(tmp_path / "nan.npy")


def test_mesh_ply_is_sampled_over_its_faces_as_off_is(tmp_path):
    corners = [(x, y, z) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    vertices = "".join(f"{x} {y} {z}\n" for x, y, z in corners)
    faces = "".join(f"4 {' '.join(map(str, q))}\n" for q in quads)
    (tmp_path / "cube.off").write_text(f"OFF\n8 6 0\n{vertices}{faces}")
    header = ("ply\nformat {fmt} 1.0\nelement vertex 8\nproperty float x\nproperty float y\nproperty float z\n"
              "element face {count}\nproperty list uchar int vertex_indices\nend_header\n")
    (tmp_path / "quads.ply").write_text(header.format(fmt="ascii", count=6) + vertices + faces)
    triangles = [(q[0], q[k], q[k + 1]) for q in quads for k in (1, 2)]
    corner_bytes = b"".join(struct.pack("<fff", *c) for c in corners)
    (tmp_path / "triangles.ply").write_bytes(header.format(fmt="binary_little_endian", count=12).encode() + corner_bytes
                                             + b"".join(struct.pack("<Biii", 3, *t) for t in triangles))
    mixed = [quads[0], *triangles[2:]]  # one quad first, then triangles: faces of different sizes
    (tmp_path / "mixed.ply").write_bytes(header.format(fmt="binary_little_endian", count=11).encode() + corner_bytes
                                         + b"".join(struct.pack(f"<B{len(f)}i", len(f), *f) for f in mixed))
    expected = data.read_point_file(tmp_path / "cube.off", 512, seed=3)
    for name in ("quads.ply", "triangles.ply", "mixed.ply"):
        points = data.read_point_file(tmp_path / name, 512, seed=3)
        assert points.shape == (512, 3) and np.allclose(np.abs(points).max(axis=1), 1)  # on the surface, not corners
        np.testing.assert_allclose(points, expected, rtol=1e-6)
    (tmp_path / "bad.ply").write_text(header.format(fmt="ascii", count=1) + vertices + "3 0 1 9\n")
    with pytest.raises(UserError, match=r"bad.ply: face 1: vertex index out of range 0..7"):
        data.read_point_file(tmp_path / "bad.ply")


def test_predict_notes_clouds_smaller_than_num_points():
    from peftlab.shared.tasks import get_task

    task = get_task(TASK)
    options = task.options(num_points=64)
    examples = [{"id": "a", "points": np.zeros((10, 3))}, {"id": "b", "points": np.zeros((64, 3))}]
    assert task.input_notes(examples, options) == [
        "1 cloud has fewer than task.num_points=64 points: some of their points are repeated to fill"]
    assert task.input_notes(examples[1:], options) == []


def _card(tmp_path, header: str):
    from peftlab.shared.cards import read_card

    path = tmp_path / "card.md"
    path.write_text(f"---\nname: t\ndomain: point_cloud\ntask: {TASK}\n{header}\n---\nbody\n")
    return read_card(path)


def _task():
    from peftlab.shared.tasks import get_task

    task = get_task(TASK)
    return task, task.options(num_points=64)


def test_modelnet_txt_and_scanobjectnn_h5_cards(tmp_path):
    import h5py

    root = tmp_path / "modelnet40_normal_resampled"
    rng = np.random.default_rng(2)
    (root / "chair").mkdir(parents=True)
    (root / "lamp").mkdir()
    (root / "modelnet40_shape_names.txt").write_text("chair\nlamp\n")
    ids = {"train": ["chair_0001", "chair_0002", "lamp_0001", "lamp_0002"], "test": ["chair_0003", "lamp_0003"]}
    for split, names in ids.items():
        (root / f"modelnet40_{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            rows = rng.normal(size=(30, 6))
            (root / name.rsplit("_", 1)[0] / f"{name}.txt").write_text("\n".join(",".join(f"{v:.6f}" for v in r) for r in rows))
    task, options = _task()
    dataset = task.read(_card(tmp_path, f"format: modelnet_txt\nfiles: {{root: {root}}}\nsplits: {{validation_fraction: 0.5, seed: 0}}"), options)
    assert dataset.labels == ["chair", "lamp"]
    assert [len(dataset.splits[s]) for s in ("train", "validation", "test")] == [2, 2, 2]
    assert dataset.splits["test"][1]["points"].shape == (30, 3) and dataset.splits["test"][1]["label"] == 1
    # the card's `labels` order is the class index order, matched to the data's classes by name
    reordered = task.read(_card(tmp_path, f"format: modelnet_txt\nfiles: {{root: {root}}}\nlabels: [lamp, chair]"), options)
    assert reordered.labels == ["lamp", "chair"]
    assert [(e["id"], e["label"]) for e in reordered.splits["test"]] == [("chair_0003", 1), ("lamp_0003", 0)]
    with pytest.raises(UserError, match=r"card\.md: `labels` \['chair', 'sofa'\] differ from the data's classes "
                                        r"\['chair', 'lamp'\]; list the data's classes \(in the order you want as class "
                                        r"indices\) or remove `labels`$"):
        task.read(_card(tmp_path, f"format: modelnet_txt\nfiles: {{root: {root}}}\nlabels: [chair, sofa]"), options)

    clouds = rng.normal(size=(6, 50, 3)).astype(np.float32)
    for split in ("train", "test"):
        with h5py.File(tmp_path / f"{split}.h5", "w") as handle:
            handle["data"], handle["label"] = clouds, np.array([0, 1, 2, 0, 1, 2]).reshape(-1, 1)
    card = _card(tmp_path, f"format: scanobjectnn_h5\nfiles: {{train: {tmp_path}/train.h5, test: {tmp_path}/test.h5}}\nlabels: [bag, bin, box]")
    dataset = task.read(card, options)
    np.testing.assert_array_equal(dataset.splits["test"][4]["points"], clouds[4])
    clouds[2, 7, 0] = np.inf
    with h5py.File(tmp_path / "test.h5", "w") as handle:
        handle["data"], handle["label"] = clouds, np.zeros(6)
    with pytest.raises(UserError, match=r"test.h5 \(shape 2\): point 7"):
        task.read(card, options)


def test_normalisation_and_training_augmentation_come_from_the_rng():
    cloud = np.random.default_rng(0).normal(size=(300, 3)).astype(np.float32) * 40 + 7
    unit = data.normalize_to_unit_sphere(cloud)
    np.testing.assert_allclose(unit.mean(0), 0, atol=1e-5)
    assert np.linalg.norm(unit, axis=1).max() == pytest.approx(1, abs=1e-6)
    for scale in (1e36, 1e-43):  # finite float32 whose sums overflow or whose spans underflow: the same shape
        np.testing.assert_allclose(data.normalize_to_unit_sphere((cloud - 7) * np.float32(scale)),
                                   data.normalize_to_unit_sphere(cloud - 7), atol=1e-5 if scale > 1 else 0.05)
    task, options = _task()
    model = task.build_model("tiny", ["a", "b"], options)
    examples = [{"id": "x", "points": cloud, "label": 1}]
    one, two = (model.collate(examples, np.random.default_rng(5))["points"] for _ in range(2))
    assert torch.equal(one, two) and not torch.equal(one, model.collate(examples, np.random.default_rng(6))["points"])
    evaluation = model.collate(examples, None)["points"]
    assert torch.equal(evaluation, model.collate(examples, None)["points"])
    assert torch.linalg.norm(evaluation[0], dim=1).max() <= 1 + 1e-5


# ----------------------------------------------------------------------------- learning


def test_demo_pipeline_learns_writes_per_class_accuracy_and_predicts(tmp_path, capsys):
    """Point-PEFT on the random tiny backbone, a short demo run: test accuracy beats
    chance (1/6) by at least 0.2."""
    config = runner.build_config(TASK, demo=True, overrides=[
        "train.epochs=5",
        "data.limit.train=240", "data.limit.validation=60", "data.limit.test=120"])
    run_dir = runner.run(config, out=tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 1 / 6 + 0.2, metrics["test"]
    assert set(metrics["test"]) >= {"accuracy", "balanced_accuracy"}
    per_class = json.loads((run_dir / "predictions" / "test_per_class_accuracy.json").read_text())
    assert sorted(per_class) == sorted(["sphere", "cube", "cylinder", "cone", "torus", "plane"])
    assert sum(c["count"] for c in per_class.values()) == 120

    from peftlab.pipelines.predictor import Predictor

    cloud = data.demo_cloud("torus", 400, np.random.default_rng(9))
    np.save(tmp_path / "torus.npy", cloud)
    (tmp_path / "torus.txt").write_text("\n".join(",".join(map(str, p)) for p in cloud.tolist()))
    rows = Predictor(run_dir).predict([tmp_path / "torus.npy", tmp_path / "torus.txt"])
    assert [r["id"] for r in rows] == [str(tmp_path / "torus.npy"), str(tmp_path / "torus.txt")]
    assert rows[0]["prediction"] == rows[1]["prediction"]
    assert sum(rows[0]["scores"].values()) == pytest.approx(1, abs=1e-5)

    # a folder, as medical and speech predict take (it was "file does not exist"): its point files, sorted
    from peftlab.pipelines.cli import main

    folder = tmp_path / "clouds"
    (folder / "more").mkdir(parents=True)
    for name in ("b.npy", "a.txt", "more/c.npy"):
        (folder / name).write_bytes((tmp_path / f"torus{Path(name).suffix}").read_bytes())
    (folder / "notes.md").write_text("not a cloud")
    assert main(["predict", str(run_dir), str(folder), "--out", str(tmp_path / "folder.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "folder.jsonl").read_text().splitlines()]
    assert [line["id"] for line in lines] == [str(folder / "a.txt"), str(folder / "b.npy"), str(folder / "more/c.npy")]
    assert {line["prediction"] for line in lines} == {rows[0]["prediction"]}
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(tmp_path / "gone"), "--out", str(tmp_path / "gone.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path / 'gone'}: no such file or folder"]
    assert not (tmp_path / "gone.jsonl").exists()


def test_real_modelnet10_subset_beats_chance(real_assets, tmp_path, monkeypatch):
    """Real ModelNet10 shapes (1200 x 1024 points), the `tiny` Point-BERT trained from
    scratch (no Point-BERT weights exist offline) for a short run: test accuracy beats
    chance (0.1) by at least 0.25."""
    monkeypatch.setenv("PEFTLAB_REAL_ASSETS", str(real_assets))
    started = time.perf_counter()
    config = runner.build_config(TASK, method="full", backbone="tiny", overrides=[
        "train.epochs=4", "train.lr=1e-3", "train.batch_size=16", "train.warmup_ratio=0.1", "train.weight_decay=0.05",
        "task.num_points=256", "task.freeze_bn_stats=false", "task.head_dropout=0.1",
        "data.limit.test=200"])
    run_dir = runner.run(config, out=tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print("modelnet10-subset:", metrics["test"], f"{time.perf_counter() - started:.0f}s")
    assert metrics["test"]["accuracy"] >= 0.1 + 0.25, metrics["test"]


def test_memory_bank_is_saved_with_the_adapter_and_restored(tmp_path):
    import peftlab
    from peftlab.shared import io

    run_dir = peftlab.run("pointcloud-classify", demo=True, method="point_prior_prompt", out=tmp_path / "run",
                          overrides={"method.memory_size": 16, "train.max_steps": 3,
                                     "data.limit": {"train": 64, "validation": 16, "test": 16}})
    saved = io.load_tensors(run_dir / "adapter" / "adapter_model.safetensors")
    assert int(saved["prompt.memory_count"]) == 16 and saved["prompt.memory"].abs().sum() > 0
    predictor = peftlab.load(run_dir)
    restored = predictor.model.backbone.method_buffers()
    assert torch.equal(restored["prompt.memory"], saved["prompt.memory"])
    assert predictor.evaluate("test") == json.loads((run_dir / "metrics.json").read_text())["test"]


def test_test_time_voting_averages_logits_over_point_berts_vote_copies(monkeypatch):
    """votes=3: each copy is a random num_points of the cloud's farthest-point pool (1200
    per 1024), scaled and translated as in training; the prediction is the mean of the
    copies' logits, and the same evaluation draws the same copies."""
    from peftlab.domains.point_cloud import tasks as point_tasks
    from peftlab.domains.point_cloud.backbones import farthest_point_sample
    from peftlab.shared.cards import read_card
    from peftlab.shared.tasks import get_task

    task = get_task("pointcloud-classify")
    options = task.options(votes=3, num_points=64)
    dataset = task.read(read_card(contract.demo_card_for("pointcloud-classify")), options)
    model = task.build_model("tiny", dataset.labels, options).eval()
    examples = dataset.splits["test"][:4]
    batch = model.collate(examples, rng=None)
    assert batch["points"].shape == (3 * len(examples), 64, 3) and batch["votes"] == 3
    assert torch.equal(model.collate(examples, rng=None)["points"], batch["points"])  # repeatable
    with torch.no_grad():
        voted = model(batch)
        per_copy = model({"points": batch["points"], "votes": 1}).float()
    assert voted.shape == (len(examples), len(dataset.labels))
    torch.testing.assert_close(voted, per_copy.reshape(3, len(examples), -1).mean(0))

    # without the scale and shift, each copy is 64 distinct points of the 75-point pool
    points = np.ascontiguousarray(examples[0]["points"], dtype=np.float32)
    chosen = farthest_point_sample(torch.from_numpy(points)[None], 75)[0].numpy()
    pool = {tuple(p) for p in data.normalize_to_unit_sphere(points[chosen])}
    monkeypatch.setattr(point_tasks.data, "augment", lambda cloud, *args: cloud)
    plain = model.collate(examples, rng=None)["points"].numpy().reshape(3, len(examples), 64, 3)
    for vote in plain[:, 0]:
        rows = {tuple(p) for p in vote}
        assert len(rows) == 64 and rows <= pool
    assert {tuple(p) for p in plain[0, 0]} != {tuple(p) for p in plain[1, 0]}  # each copy drawn afresh
    assert not np.allclose(plain, batch["points"].numpy().reshape(plain.shape))  # and then scaled and shifted


def test_fps_evaluation_subsets_cover_the_shape_as_point_berts_test_does():
    """A dense blob with a sparse shell: a uniform subset is nearly all blob, farthest-point
    sampling reaches the shell; the subset is fixed, whatever the example's id."""
    from peftlab.domains.point_cloud.backbones import farthest_point_sample
    from peftlab.shared.tasks import get_task

    task = get_task("pointcloud-classify")
    rng = np.random.default_rng(0)
    shell = rng.normal(size=(100, 3))
    shell /= np.linalg.norm(shell, axis=1, keepdims=True)
    points = np.concatenate([0.01 * rng.normal(size=(4000, 3)), shell]).astype(np.float32)

    def subset(sampling, example_id="cloud"):
        model = task.build_model("tiny", ["a", "b"], task.options(num_points=128, eval_sampling=sampling))
        return model.collate([{"id": example_id, "points": points, "label": 0}], rng=None)["points"][0].numpy()

    def on_shell(cloud):  # after normalisation the shell stays the outermost points
        radius = np.linalg.norm(cloud - cloud.mean(0), axis=1)
        return int((radius > 0.5 * radius.max()).sum())

    uniform, fps = subset("random"), subset("fps")
    assert on_shell(uniform) < 10 and on_shell(fps) >= 90
    chosen = farthest_point_sample(torch.from_numpy(points)[None], 128)[0].numpy()
    np.testing.assert_array_equal(fps, data.normalize_to_unit_sphere(points[chosen]))
    np.testing.assert_array_equal(subset("fps", example_id="other"), fps)
    with pytest.raises(ValueError, match="eval_sampling must be random or fps"):
        task.options(eval_sampling="grid")


def test_deep_prompts_give_each_of_the_first_blocks_its_own_tokens():
    """prompt_blocks=N (the released code: 6): block i < N sees its own prompts, the
    blocks after them see none; a block's tokens change that block's output and the
    later ones, never the earlier ones."""
    backbone, _ = load_backbone("tiny")  # 2 blocks
    points = torch.randn(2, 200, 3)
    one = methods.apply(copy.deepcopy(backbone), "point_prior_prompt", prompt_tokens=3, prompt_blocks=1).base_model.eval()
    assert one.prompt.tokens.shape == (1, 3, one.embed_dim)
    groups = one.config.num_group
    with torch.no_grad():
        after_block_0 = one(points, stop=3)[0]
        after_block_1 = one(points, stop=4)[0]
        assert after_block_0.shape[1] == 1 + 3 + groups and after_block_1.shape[1] == 1 + groups  # dropped
        # block 1 without prompts: exactly block 1 run on block 0's CLS and patch tokens
        x, pos, centers = one(points, stop=3)
        keep = torch.cat([x[:, :1], x[:, 4:]], 1), torch.cat([pos[:, :1], pos[:, 4:]], 1)
        torch.testing.assert_close(after_block_1, one.blocks(keep[0], keep[1], centers, start=1, stop=2), atol=0, rtol=0)

    two = methods.apply(copy.deepcopy(backbone), "point_prior_prompt", prompt_tokens=3, prompt_blocks=2).base_model.eval()
    with torch.no_grad():
        before = [two(points, stop=3)[0], two(points)]
        two.prompt.tokens[1].add_(torch.randn_like(two.prompt.tokens[1]))
        after = [two(points, stop=3)[0], two(points)]
    assert torch.equal(before[0], after[0])  # block 0 does not see block 1's tokens
    assert (before[1] - after[1]).abs().max() > 1e-4
    with pytest.raises(UserError, match="prompt_blocks is 3, but this Point-BERT has 2 blocks"):
        methods.apply(copy.deepcopy(backbone), "point_peft", prompt_blocks=3)


@pytest.mark.parametrize("header, message", [
    ("format: point_folder\nfiles: {root: clouds}\nsplits: {train: clouds/Sphere/train, test: missing.npz}",
     r"card\.md: splits\.train: format point_folder does not read per-split files; put train/ and test/ folders in "
     r"each class folder \(root/chair/train/\.\.\.\), or leave the splits to splits\.ratios$"),
    ("format: points_npz\nfiles: {data: c.npz}\nsplits: {ratios: {train: 0.5, test: 0.5}, test: nothing.txt}",
     r"card\.md: splits\.test: format points_npz does not read per-split files; the file's `split` array"),
    ("format: scanobjectnn_h5\nfiles: {train: t.h5}\nsplits: {validation: v.h5}",
     r"card\.md: splits\.validation: format scanobjectnn_h5 does not read per-split files; name the \.h5 files under"),
])
def test_per_split_files_are_refused_where_the_format_gives_its_splits(tmp_path, header, message):
    """They were accepted, even naming missing files, and the data was split by ratios."""
    task, options = _task()
    with pytest.raises(UserError, match=message):
        task.read(_card(tmp_path, header), options)


def test_predict_reads_a_folder_of_point_files_in_sorted_order(tmp_path):
    """A folder (as medical and speech predict take) was "file does not exist"."""
    task, options = _task()
    rng = np.random.default_rng(0)
    (tmp_path / "clouds" / "more").mkdir(parents=True)
    (tmp_path / "clouds" / ".ipynb_checkpoints").mkdir()
    clouds = {name: rng.normal(size=(32, 3)).astype(np.float32) for name in ("b.npy", "a.npy", "more/c.npy")}
    for name, cloud in clouds.items():
        np.save(tmp_path / "clouds" / name, cloud)
    np.save(tmp_path / "clouds" / ".ipynb_checkpoints" / "a.npy", clouds["a.npy"])
    (tmp_path / "clouds" / "notes.md").write_text("not a cloud")
    examples = task.read_inputs([tmp_path / "clouds", tmp_path / "clouds" / "a.npy"], options, {})
    names = [Path(e["id"]).relative_to(tmp_path / "clouds").as_posix() for e in examples]
    assert names == ["a.npy", "b.npy", "more/c.npy", "a.npy"]
    for name, example in zip(names, examples):
        np.testing.assert_array_equal(example["points"], clouds[name])
    # the README beside the clouds is said to be left out; the hidden copy is not counted
    assert _left_out_notes([tmp_path / "clouds", tmp_path / "clouds" / "a.npy"], examples, TASK) == [
        f"1 file in {tmp_path / 'clouds'} left out: not pointcloud-classify inputs (e.g. notes.md)"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no point files \(\.npy, \.ply, \.off, \.txt\) in this folder$"):
        task.read_inputs([tmp_path / "empty"], options, {})
    with pytest.raises(UserError, match=r"gone\.npy: file does not exist$"):
        task.read_inputs([tmp_path / "gone.npy"], options, {})


def _point_folder(root: Path, classes: dict[str, int], split_folders: tuple[str, ...] = ()) -> None:
    """`root/<class>/[<split>/]<i>.npy`: `classes[name]` clouds per class (per split folder)."""
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        for folder in split_folders or ("",):
            (root / name / folder).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                np.save(root / name / folder / f"{index}.npy", rng.normal(size=(16, 3)).astype(np.float32))


def test_point_folder_splits_follow_the_card_exactly(tmp_path):
    """A validation ratio of 0 (or none) is no validation split; settings the data's layout
    would ignore are refused."""
    task, options = _task()
    _point_folder(tmp_path / "flat", {"Sphere": 10, "cube": 10, "cylinder": 10})
    for ratios in ("{train: 0.8, validation: 0, test: 0.2}", "{train: 0.8, test: 0.2}"):
        dataset = task.read(_card(tmp_path, f"format: point_folder\nfiles: {{root: flat}}\nsplits: {{ratios: {ratios}}}"), options)
        assert {split: len(examples) for split, examples in dataset.splits.items()} == {"train": 24, "test": 6}
    dataset = task.read(_card(tmp_path, "format: point_folder\nfiles: {root: flat}"), options)
    assert {split: len(examples) for split, examples in dataset.splits.items()} == {"train": 24, "validation": 3, "test": 3}
    with pytest.raises(UserError, match=r"card\.md: splits\.validation_fraction holds validation out of train where the "
                                        r"data comes split \(train/ and test/ folders in each class folder\); here "
                                        r"splits\.ratios divide the clouds: give validation its ratio there \(e\.g\. "
                                        r"ratios: \{train: 0\.8, validation: 0\.1, test: 0\.1\}\) and remove "
                                        r"validation_fraction$"):
        task.read(_card(tmp_path, "format: point_folder\nfiles: {root: flat}\nsplits: {validation_fraction: 0}"), options)

    _point_folder(tmp_path / "split", {"Sphere": 5, "cube": 5}, ("train", "test"))
    # what macOS and Jupyter leave beside the data is not data (nor a split folder)
    (tmp_path / "split" / "cube" / "train" / "._0.npy").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "split" / "cube" / ".ipynb_checkpoints").mkdir()
    np.save(tmp_path / "split" / "cube" / ".ipynb_checkpoints" / "0-checkpoint.npy", np.zeros((16, 3), np.float32))
    dataset = task.read(_card(tmp_path, "format: point_folder\nfiles: {root: split}\nsplits: {validation_fraction: 0.4}"), options)
    assert {split: len(examples) for split, examples in dataset.splits.items()} == {"train": 6, "test": 10, "validation": 4}
    assert dataset.notes[0] == "validation: 4 training clouds held out (splits.validation_fraction=0.4, seed 0); test is untouched"
    with pytest.raises(UserError, match=r"card\.md: splits\.ratios divide clouds that come unsplit, but this point_folder "
                                        r"data comes split \(train/ and test/ folders in each class folder\); remove "
                                        r"splits\.ratios$"):
        task.read(_card(tmp_path, "format: point_folder\nfiles: {root: split}\nsplits: {ratios: {train: 0.5, test: 0.5}}"), options)


def test_point_folder_labels_in_any_order_are_matched_by_name(tmp_path):
    """They had to follow the sorted folder order (upper case first: Sphere, cube, cylinder);
    as medical imagefolder does, the card's order is the class index order."""
    task, options = _task()
    _point_folder(tmp_path / "split", {"Sphere": 2, "cube": 2, "cylinder": 2}, ("train", "test"))
    card = "format: point_folder\nfiles: {root: split}\nsplits: {validation_fraction: 0}\n"
    dataset = task.read(_card(tmp_path, card + "labels: [cube, cylinder, Sphere]"), options)
    assert dataset.labels == ["cube", "cylinder", "Sphere"]
    assert [(e["id"], e["label"]) for e in dataset.splits["test"]] == [
        ("Sphere/test/0.npy", 2), ("Sphere/test/1.npy", 2), ("cube/test/0.npy", 0), ("cube/test/1.npy", 0),
        ("cylinder/test/0.npy", 1), ("cylinder/test/1.npy", 1)]
    assert task.read(_card(tmp_path, card), options).labels == ["Sphere", "cube", "cylinder"]
    with pytest.raises(UserError, match=r"`labels` \['cube', 'cylinder', 'sphere'\] differ from the data's classes "
                                        r"\['Sphere', 'cube', 'cylinder'\]"):
        task.read(_card(tmp_path, card + "labels: [cube, cylinder, sphere]"), options)


def test_a_head_count_that_does_not_divide_the_width_names_the_option_and_its_values():
    from peftlab.domains.point_cloud.backbones import Attention

    with pytest.raises(UserError, match=r"^Point-BERT width 64 is not divisible by 6 heads; set task\.num_heads to the "
                                        r"checkpoint's head count \(one of 1, 2, 4, 8, 16; a peftlab export's "
                                        r"config\.json says it\)$"):
        Attention(64, 6)
    assert Attention(64, 4).num_heads == 4


def test_a_two_class_prediction_line_reads_as_every_binary_task_s():
    """`score`, the probability of labels[1], named by `positive_class`, as images, clips and
    protein pairs print it; three classes keep one score per class."""
    task, _ = _task()
    row = task.describe({"id": "c.npy"}, np.array([0.25, 0.75]), ["plane", "chair"])
    assert row == {"id": "c.npy", "score": 0.75, "positive_class": "chair", "prediction": "chair"}
    row = task.describe({"id": "c.npy"}, np.array([0.5, 0.2, 0.3]), ["plane", "chair", "lamp"])
    assert row == {"id": "c.npy", "scores": {"plane": 0.5, "chair": 0.2, "lamp": 0.3}, "prediction": "plane"}
