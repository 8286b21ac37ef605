"""medical-classify: formats, backbones, the domain's PEFT methods, BatchNorm round
trips, the demo's learning, and a real pretrained EfficientNet on real chest X-rays."""

from __future__ import annotations

import functools
import json
import random
import sys
from pathlib import Path

import numpy as np
import peftlab
import pytest
import test_methods_contract as contract  # the shared contract checks, reused on both tiny families
import timm
import torch
from peftlab.domains.medical_imaging import backbones, data
from peftlab.domains.medical_imaging.tasks import multi_label_metrics
from peftlab.pipelines import runner
from peftlab.shared import io, methods
from peftlab.shared.cards import read_card
from peftlab.shared.checkpoint import batchnorm_buffers
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import get_task
from PIL import Image
from sklearn.metrics import roc_auc_score

TASK = get_task("medical-classify")
DEMO_CARD = contract.demo_card_for("medical-classify")


@functools.cache
def _demo_examples():
    dataset = TASK.read(read_card(DEMO_CARD), TASK.options())
    return dataset.labels, dataset.splits["train"][:6]


def _setup(backbone: str):
    labels, examples = _demo_examples()
    torch.manual_seed(0)
    return TASK.build_model(backbone, labels, TASK.options()), examples


def _write_card(folder, header: str) -> str:
    path = folder / "card.md"
    path.write_text(f"---\nname: t\ndomain: medical_imaging\ntask: medical-classify\n{header}\n---\nTest data.\n")
    return str(path)


# ----------------------------------------------------------------------- methods on both families

@pytest.mark.parametrize(("backbone", "method", "options"), [
    ("tiny_resnet", "tsa", {}),
    ("tiny_resnet", "ssf", {}),
    ("tiny_resnet", "bitfit", {}),
    ("tiny_resnet", "lora", {}),
    ("tiny_resnet", "freeze_layers", {}),
    ("tiny_vit", "vpt", {}),
    ("tiny_vit", "vpt", {"deep": True, "num_tokens": 3}),
])
def test_method_contract_on_both_families(backbone, method, options, tmp_path):
    """The shared method contract (identity at init where declared, only method + head
    train, save -> load exact, merge == unmerged), plus BatchNorm statistics through
    the run's adapter folder, as `peftlab.load` restores them."""
    model, examples = _setup(backbone)
    assert methods.get_method(method).fits(model.backbone)
    contract.check_task_method(TASK, model, examples, method, options, tmp_path)


def test_domain_methods_fit_only_their_family():
    vit, _ = _setup("tiny_vit")
    resnet, _ = _setup("tiny_resnet")
    assert methods.get_method("vpt").fits(vit.backbone) and not methods.get_method("vpt").fits(resnet.backbone)
    assert methods.get_method("tsa").fits(resnet.backbone) and not methods.get_method("tsa").fits(vit.backbone)
    with pytest.raises(UserError, match="use `tsa`"):
        TASK.default_method_options("adapter", resnet)


def test_vpt_prompts_sit_after_cls_and_leave_pooling_alone():
    model, examples = _setup("tiny_vit")
    vit = model.backbone
    pixels = model.collate(examples, rng=None)["pixels"]
    seen = {}
    vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("tokens", a[0].shape[1]))
    adapted = methods.apply(vit, "vpt", num_tokens=5)
    vit.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final_norm", a[0].shape[1]))
    with torch.no_grad():
        out = adapted(pixels)
        patches = vit.patch_embed.num_patches
        assert seen["tokens"] == 1 + 5 + patches  # CLS, prompts, patches
        assert out.shape == (len(examples), vit.embed_dim)
        adapted.base_model.vpt.prompts.add_(1.0)  # the CLS output depends on the prompts
        assert not torch.allclose(adapted(pixels), out)
    assert seen["final_norm"] == 1 + patches  # prompts are taken out before the final norm and pooling


def test_tsa_adapts_every_3x3_conv_of_the_residual_blocks_and_folds_into_them():
    model, examples = _setup("tiny_resnet")
    adapted = methods.apply(model.backbone, "tsa")
    convs = {n.removesuffix(".tsa.weight") for n in adapted.method_parameters()}
    assert convs == {f"layer{i}.0.conv{j}" for i in range(1, 5) for j in (1, 2)}
    with torch.no_grad():
        for param in adapted.method_parameters().values():
            param.normal_(0, 0.1)
        pixels = model.collate(examples, rng=None)["pixels"]
        adapted.eval()
        before = adapted(pixels)
        torch.testing.assert_close(adapted.merge()(pixels), before, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- augmentation and resume

def test_training_augmentation_is_a_function_of_the_batch_rng_only():
    model, examples = _setup("tiny_vit")
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = model.collate(examples, np.random.default_rng([0, 1, 2]))["pixels"]
    torch.manual_seed(123)
    random.seed(123)  # global RNGs elsewhere must not matter
    again = model.collate(examples, np.random.default_rng([0, 1, 2]))["pixels"]
    other = model.collate(examples, np.random.default_rng([0, 1, 3]))["pixels"]
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.equal(first, other)
    evaluation = model.collate(examples, None)["pixels"]
    torch.testing.assert_close(evaluation, model.collate(examples, None)["pixels"], atol=0, rtol=0)
    torch.set_rng_state(torch_state)
    random.setstate(python_state)
    # collate leaves the global generators where they were
    model.collate(examples, np.random.default_rng(5))
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


# ----------------------------------------------------------------------------------- formats

def test_imagefolder_grayscale_rgba_and_split_folders(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("normal", "tumour"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                gray = Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8))
                gray.save(root / split / label / f"g{i}.png")
            rgba = Image.fromarray(rng.integers(0, 255, (20, 24, 4), dtype=np.uint8))
            rgba.save(root / split / label / "a.png")
    card = read_card(_write_card(tmp_path, "format: imagefolder\npath: images"))
    dataset = TASK.read(card, TASK.options())
    assert dataset.labels == ["normal", "tumour"]
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 8, "validation": 8, "test": 8}
    grayscale = next(e for e in dataset.splits["train"] if e["id"].endswith("g0.png"))
    image = data.example_image(grayscale)
    assert image.mode == "RGB" and image.size == (24, 20)
    gray = np.asarray(image)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    # RGBA is composited onto black: a fully transparent pixel becomes black
    transparent = Image.new("RGBA", (2, 2), (255, 255, 255, 0))
    assert np.asarray(data.to_rgb(transparent)).max() == 0
    # split folders named in any case (Train/, Val/, Test/, as Windows tools save them)
    for split, named in (("train", "Train"), ("val", "Val"), ("test", "TEST")):
        (root / split).rename(root / named)
    renamed = TASK.read(read_card(_write_card(tmp_path, "format: imagefolder\npath: images")), TASK.options())
    assert {k: len(v) for k, v in renamed.splits.items()} == {"train": 8, "validation": 8, "test": 8}
    assert renamed.labels == ["normal", "tumour"]


def test_imagefolder_leaves_hidden_folders_and_other_files_out(tmp_path):
    root = tmp_path / "images"
    for label in ("normal", "tumour", ".ipynb_checkpoints"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / label / f"x{i}.png")
    Image.new("RGB", (8, 8)).save(root / "normal" / "._x0.png")  # macOS metadata, not an image
    (root / "tumour" / "README.txt").write_text("scanned 2021\n")
    dataset = TASK.read(read_card(_write_card(tmp_path, "format: imagefolder\npath: images")), TASK.options())
    assert dataset.labels == ["normal", "tumour"]
    assert sum(len(v) for v in dataset.splits.values()) == 8
    assert any("1 file that is not an image was left out (e.g. tumour/README.txt)" in n for n in dataset.notes)
    # a link to an image that is not there is a missing image, not a file to pass over
    (root / "tumour" / "x9.png").symlink_to(tmp_path / "elsewhere" / "x9.png")
    with pytest.raises(UserError, match=r"tumour/x9\.png: a link to \S*elsewhere/x9\.png, which does not exist; fix or "
                                        r"remove the link$"):
        TASK.read(read_card(_write_card(tmp_path, "format: imagefolder\npath: images")), TASK.options())


def _image_table(folder, column: str, cells: list[str]) -> None:
    """img/<i>.png, one small image per cell, and data.csv: path,<column>."""
    (folder / "img").mkdir(exist_ok=True)
    for i in range(len(cells)):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / "img" / f"{i}.png")
    (folder / "data.csv").write_text("".join([f"path,{column}\n"] + [f"img/{i}.png,{c}\n" for i, c in enumerate(cells)]))


def test_card_validate_takes_task_options_and_says_what_the_splits_leave_out(tmp_path, capsys):
    from peftlab.pipelines.cli import main

    _image_table(tmp_path, "finding", [["Effusion", "No Finding", "Effusion|Mass"][i % 3] for i in range(12)])
    card = _write_card(tmp_path, "format: csv\npath: data.csv\nlabels: [Effusion, Mass]\nfields: {label: finding}")
    assert main(["card", "validate", card]) == 2
    assert "label 'No Finding' reads as multi-label findings; set task.multi_label=true" in capsys.readouterr().err
    assert main(["card", "validate", card, "task.multi_label=true"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labels"] == ["Effusion", "Mass"] and sum(summary["splits"].values()) == 12
    assert main(["card", "validate", card, "train.lr=1"]) == 2
    assert "takes task options only" in capsys.readouterr().err
    # single-label: a class present in train only is named for the splits that lack it
    _image_table(tmp_path, "finding", ["Mass" if i == 0 else "Effusion" for i in range(12)])
    assert main(["card", "validate", card]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("the test split has no examples of Mass") for n in notes), notes


def test_csv_without_the_cards_labels_names_the_classes_from_the_column(tmp_path):
    _image_table(tmp_path, "diagnosis", [["pneumonia", "normal", "effusion"][i % 3] for i in range(9)])
    card = read_card(_write_card(tmp_path, "format: csv\npath: data.csv\nfields: {label: diagnosis}"))
    dataset = TASK.read(card, TASK.options())
    assert dataset.labels == ["effusion", "normal", "pneumonia"]
    by_id = {e["id"]: e["label"] for split in dataset.splits.values() for e in split}
    assert by_id["img/0.png"] == 2 and by_id["img/1.png"] == 1 and by_id["img/2.png"] == 0
    assert any("are the label column's names, sorted" in note for note in dataset.notes)
    # grades coded 1..3: read as indices they made a class "0" no image has
    _image_table(tmp_path, "diagnosis", [str(1 + i % 3) for i in range(9)])
    dataset = TASK.read(card, TASK.options())
    assert dataset.labels == ["1", "2", "3"]
    by_id = {e["id"]: e["label"] for split in dataset.splits.values() for e in split}
    assert by_id["img/0.png"] == 0 and by_id["img/1.png"] == 1 and by_id["img/2.png"] == 2
    assert "labels ['1', '2', '3'] are the label column's codes, which do not run 0..2: class i is the i-th code; " \
           "set the card's `labels` to choose their order" in dataset.notes
    _image_table(tmp_path, "diagnosis", [str(i % 3) for i in range(9)])  # indices from 0: kept as they are
    dataset = TASK.read(card, TASK.options())
    assert dataset.labels == ["0", "1", "2"] and not any("label column" in note for note in dataset.notes)
    assert {e["id"]: e["label"] for split in dataset.splits.values() for e in split}["img/2.png"] == 2
    (tmp_path / "data.csv").write_text("path,diagnosis\nimg/0.png,1\nimg/1.png,normal\n")
    with pytest.raises(UserError, match="mixes class names and indices"):
        TASK.read(card, TASK.options())


def test_group_gap_is_undefined_where_only_one_group_has_a_value():
    examples = [{"label": label, "group": group} for label, group in [(0, "F"), (0, "F"), (0, "M"), (1, "M")]]
    outputs = [np.array(0.4), np.array(0.3), np.array(0.4), np.array(0.8)]  # a binary task scores the positive class
    result = TASK.compute_metrics(["auroc", "accuracy"], examples, outputs)
    assert result["by_group"]["groups"]["F"]["auroc"] is None and result["by_group"]["groups"]["M"]["auroc"] == 1.0
    assert result["by_group"]["worst_group_gap"] == {"auroc": None, "accuracy": 0.0}


@pytest.mark.parametrize("fraction", [None, 0.25, 0])
def test_imagefolder_without_a_validation_folder_holds_out_training_images(tmp_path, fraction):
    """train/ and test/ only (a common layout): validation is carved out of train,
    stratified by class, so checkpoint selection never sees test images."""
    root = tmp_path / "images"
    for split, count in (("train", 20), ("test", 4)):
        for label in ("normal", "tumour"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                Image.new("L", (8, 8), i).save(root / split / label / f"{i}.png")
    header = "format: imagefolder\npath: images" + ("" if fraction is None else f"\nsplits: {{validation_fraction: {fraction}, seed: 1}}")
    dataset = TASK.read(read_card(_write_card(tmp_path, header)), TASK.options())
    held = {0.25: 5, None: 2, 0: 0}[fraction]  # per class, of 20
    sizes = {k: len(v) for k, v in dataset.splits.items()}
    assert sizes == ({"train": 40, "test": 8} if held == 0 else {"train": 40 - 2 * held, "validation": 2 * held, "test": 8})
    if held:
        validation = dataset.splits["validation"]
        assert sorted(e["label"] for e in validation) == [0] * held + [1] * held
        assert not {e["path"] for e in validation} & {e["path"] for e in dataset.splits["train"]}
        assert all("/train/" in e["path"] for e in validation)
        assert any(f"validation: {2 * held} training images held out" in note for note in dataset.notes)


def test_csv_with_groups_and_bad_files(tmp_path):
    (tmp_path / "img").mkdir()
    rows = ["path,label,sex"]
    for i in range(10):
        Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")
        rows.append(f"img/{i}.jpg,{['benign', 'malignant'][i % 2]},{'FM'[i % 2]}")
    (tmp_path / "img" / "broken.png").write_bytes(Image.new("RGB", (16, 16)).tobytes()[:40])
    rows.append("img/broken.png,benign,F")
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    header = ("format: csv\nfiles: {data: meta.csv}\nlabels: [benign, malignant]\ngroup_by: sex\n"
              "splits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 0}")
    card = read_card(_write_card(tmp_path, header))
    with pytest.raises(UserError, match=r"broken\.png: unreadable or truncated image.*on_bad_file: skip"):
        TASK.read(card, TASK.options())
    card = read_card(_write_card(tmp_path, header + "\non_bad_file: skip"))
    dataset = TASK.read(card, TASK.options())
    assert sum(len(v) for v in dataset.splits.values()) == 10
    assert any("skipped 1 unreadable" in note for note in dataset.notes)
    example = dataset.splits["train"][0]
    assert example["group"] in ("F", "M") and example["label"] in (0, 1)


def test_truncated_jpeg_is_a_user_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(UserError, match="cut.jpg: unreadable or truncated"):
        data.load_image(path)


def test_medmnist_npz_single_and_multi_label(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", 12), ("val", 4), ("test", 6)):
        arrays[f"{prefix}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(tmp_path / "single.npz", **arrays)
    card = read_card(_write_card(tmp_path, "format: medmnist_npz\npath: single.npz\nlabels: [normal, pneumonia]"))
    dataset = TASK.read(card, TASK.options())
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 12, "validation": 4, "test": 6}
    assert dataset.splits["validation"][1]["label"] == int(arrays["val_labels"][1, 0])

    for prefix in ("train", "val", "test"):
        arrays[f"{prefix}_labels"] = rng.integers(0, 2, (len(arrays[f"{prefix}_images"]), 3))
    np.savez(tmp_path / "multi.npz", **arrays)
    with pytest.raises(UserError, match="multi_label=true"):
        TASK.read(read_card(_write_card(tmp_path, "format: medmnist_npz\npath: multi.npz")), TASK.options())
    options = TASK.options(multi_label=True, image_size=32)
    card = read_card(_write_card(tmp_path, "format: medmnist_npz\npath: multi.npz\nlabels: [effusion, nodule, mass]"))
    dataset = TASK.read(card, options)
    example = dataset.splits["train"][0]
    assert example["targets"] == [float(v) for v in arrays["train_labels"][0]]
    model = TASK.build_model("tiny_vit", dataset.labels, options)
    batch = model.collate(dataset.splits["train"][:4], rng=None)
    outputs = model(batch)
    assert model.loss(outputs, batch).item() > 0
    scores = model.scores(outputs).detach().numpy()
    assert scores.shape == (4, 3) and ((scores > 0) & (scores < 1)).all()
    results = TASK.compute_metrics(["auroc", "accuracy", "macro_f1"], dataset.splits["train"][:4], list(scores))
    assert set(results) == {"auroc", "accuracy", "macro_f1"}
    # multi-label data has no per-image class to score MCC on: refused before training, not at its first evaluation
    assert "mcc" in TASK.applicable_metrics(TASK.read(card.model_copy(update={"path": "single.npz", "labels": None}), TASK.options()))
    config = runner.build_config("medical-classify", data=str(card.card_path), overrides=["eval.metrics=[auroc,mcc]"])
    with pytest.raises(UserError, match=r"^eval\.metrics: medical-classify cannot compute 'mcc' \(it scores class "
                                        r"predictions\); it computes auroc, accuracy, balanced_accuracy, macro_f1 \(and on "
                                        r"request f1, aupr\)$"):
        runner.run_metrics(config, TASK, card, dataset)

    # A finding neither present nor predicted has no F1 and leaves the mean (as a class absent
    # from both does in single-label macro F1); one predicted but absent counts 0.
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=float)
    right = targets * 0.9 + 0.05
    assert multi_label_metrics(["macro_f1"], targets, right)["macro_f1"] == 1.0
    false_alarm = right.copy()
    false_alarm[0, 2] = 0.9
    assert multi_label_metrics(["macro_f1"], targets, false_alarm)["macro_f1"] == pytest.approx(2 / 3)
    assert multi_label_metrics(["macro_f1"], np.zeros((2, 3)), np.zeros((2, 3)))["macro_f1"] is None
    # accuracy is MedMNIST's ACC: per finding, averaged (8 of 9 cells right), not subset accuracy (2 of 3 images)
    assert multi_label_metrics(["accuracy"], targets, false_alarm)["accuracy"] == pytest.approx(8 / 9)
    row = TASK.describe(example, scores[0], dataset.labels)
    assert set(row["scores"]) == {"effusion", "nodule", "mass"} and "predicted_labels" in row
    examples = dataset.splits["train"][:4]
    TASK.write_report("train", examples, list(scores), dataset.labels, tmp_path)
    per_finding = json.loads((tmp_path / "train_per_finding.json").read_text())
    assert list(per_finding) == ["effusion", "nodule", "mass"]
    for k, finding in enumerate(per_finding.values()):
        truth = np.array([e["targets"][k] for e in examples], dtype=int)
        assert finding["positives"] == truth.sum() and finding["count"] == 4
        if 0 < truth.sum() < 4:
            assert finding["auroc"] == pytest.approx(roc_auc_score(truth, scores[:, k]))
        else:
            assert finding["auroc"] is None


def test_dicom_without_pydicom_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    (tmp_path / "scan.dcm").write_bytes(b"\0" * 200)
    with pytest.raises(UserError, match=r"scan\.dcm: reading DICOM needs pydicom; install it"):
        data.load_image(tmp_path / "scan.dcm")


# --------------------------------------------------------------------------------- backbones

def test_offline_backbone_error_names_where_it_looked():
    with pytest.raises(UserError) as error:
        backbones.load_backbone("resnet50")
    message = str(error.value)
    assert "'resnet50' is not available offline" in message
    assert "Hugging Face cache" in message and "resnet50:/path/to/weights.pth" in message


def test_unknown_backbone_and_file_without_architecture(tmp_path):
    with pytest.raises(UserError, match="not a timm architecture"):
        backbones.load_backbone("resnet_5O")
    weights = tmp_path / "w.pth"
    torch.save({"a": torch.zeros(1)}, weights)
    with pytest.raises(UserError, match="say which timm architecture"):
        backbones.load_backbone(str(weights))
    with pytest.raises(UserError, match="do not fit timm architecture 'resnet18'"):
        backbones.load_backbone(f"resnet18:{weights}")


def test_torchvision_resnet_weights_load_by_name_and_compute_the_same_features(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so loading them is checked too
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "resnet18_torchvision.pth")
    model, info, config = backbones.load_backbone(f"resnet18:{tmp_path / 'resnet18_torchvision.pth'}", image_size=64)
    assert info["key_mapping"] == "by name" and info["family"] == "resnet"
    assert config["input_size"] == (3, 64, 64) and config["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    reference.fc = torch.nn.Identity()
    reference.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference(pixels), atol=1e-5, rtol=1e-5)


def test_weights_under_other_key_names_load_by_position_and_say_so_once(tmp_path, capsys):
    reference, _, _ = backbones.load_backbone("random-init:resnet18", image_size=32)
    tensors = [v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")]
    renamed = {f"layer_{i:03d}": tensor for i, tensor in enumerate(tensors)}  # another exporter's names
    torch.save(renamed, tmp_path / "exported.pth")
    for _ in range(2):  # as training, then evaluation, load it
        model, info, _ = backbones.load_backbone(f"resnet18:{tmp_path / 'exported.pth'}", image_size=32)
        assert info["key_mapping"] == "by position"
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.state_dict().items()
                   if not k.endswith("num_batches_tracked"))
    assert capsys.readouterr().err.count("so they were loaded by position") == 1


def test_random_init_only_by_explicit_name():
    model, info, _ = backbones.load_backbone("random-init:resnet18", image_size=32)
    again, _, _ = backbones.load_backbone("random-init:resnet18", image_size=32)
    assert info["source"].startswith("random-init")
    assert info["weights_sha256"] == io.tensors_fingerprint(again.state_dict())  # seeded: same weights each build


# ------------------------------------------------------------------------- runs, end to end

def test_demo_learns_reports_groups_and_predicts_files(tmp_path):
    """Three classes (chance: 1/3 accuracy, 0.5 AUROC). Three epochs of LoRA on the tiny
    ViT reach well above: accuracy >= 0.6 and AUROC >= 0.8 on the demo's test split."""
    run_dir = peftlab.run("medical-classify", demo=True, out=tmp_path / "run",
                          overrides={"train.epochs": 3, "data.limit": {"validation": 60, "test": 150}})
    results = json.loads((run_dir / "metrics.json").read_text())
    test = results["test"]
    assert test["accuracy"] >= 1 / 3 + 0.27, test
    assert test["auroc"] >= 0.8, test
    assert set(test["by_group"]["groups"]) == {"site_a", "site_b"}
    assert test["by_group"]["worst_group_gap"]["accuracy"] is not None
    per_class = json.loads((run_dir / "predictions" / "test_per_class.json").read_text())
    assert list(per_class) == ["nevus", "melanoma", "keratosis"]
    assert sum(c["positives"] for c in per_class.values()) == 150
    assert np.mean([c["auroc"] for c in per_class.values()]) == pytest.approx(test["auroc"])  # macro one-vs-rest
    confusion = json.loads((run_dir / "predictions" / "test_confusion.json").read_text())
    assert np.trace(confusion["counts"]) / 150 == pytest.approx(test["accuracy"])

    predictor = peftlab.load(run_dir)
    again = predictor.evaluate("test", predictions_file=str(tmp_path / "again" / "test.jsonl"))  # a str path too
    assert again["accuracy"] == test["accuracy"] and again["auroc"] == test["auroc"]
    assert all(type(group) is str for group in again["by_group"]["groups"])  # plain keys, not numpy strings
    assert (tmp_path / "again" / "test_confusion.json").is_file()
    folder = tmp_path / "inputs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for kind in range(3):
        Image.fromarray(data.demo_image(rng, 32, kind, darker=False)).save(folder / f"lesion{kind}.png")
    rows = predictor.predict([str(folder)])
    assert [r["id"].rsplit("/", 1)[-1] for r in rows] == ["lesion0.png", "lesion1.png", "lesion2.png"]
    assert all(set(r["scores"]) == {"nevus", "melanoma", "keratosis"} for r in rows)
    (tmp_path / "list.csv").write_text("path\ninputs/lesion2.png\ninputs/lesion0.png\n")  # paths from the table's folder
    listed = predictor.predict([str(tmp_path / "list.csv")])
    assert [r["id"] for r in listed] == ["inputs/lesion2.png", "inputs/lesion0.png"]
    # a table's cell is its id, and the file it names is `path`, as speech's table rows have it
    assert Path(listed[0]["path"]).resolve() == (folder / "lesion2.png").resolve() and "path" not in rows[0]
    assert listed[0]["scores"] == pytest.approx(rows[2]["scores"], abs=1e-5)
    single = predictor.predict([str(folder / "lesion1.png")])[0]  # alone, not batched: same up to float rounding
    assert single["prediction"] == rows[1]["prediction"]
    assert single["scores"] == pytest.approx(rows[1]["scores"], abs=1e-5)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(UserError, match=r"broken\.png: unreadable or truncated image .*replace the file$"):
        predictor.predict([str(folder / "broken.png")])  # predict takes no card: no card setting to suggest


def test_resnet_batchnorm_statistics_travel_with_the_adapter(tmp_path):
    run_dir = peftlab.run("medical-classify", demo=True, method="ssf", backbone="tiny_resnet", out=tmp_path / "run",
                          overrides={"train.max_steps": 4, "train.epochs": 1,
                                     "data.limit": {"train": 128, "validation": 30, "test": 60}})
    saved = io.load_tensors(run_dir / "adapter" / runner.BUFFERS_FILE)
    assert any(k.endswith("running_mean") for k in saved)
    fresh, _, _ = backbones.load_backbone("tiny_resnet")
    initial = batchnorm_buffers(fresh)
    moved = [k for k in saved if k.endswith("running_mean") and not torch.equal(saved[k], initial[k.removeprefix("model.")])]
    assert moved, "training did not move the BatchNorm statistics"
    predictor = peftlab.load(run_dir)
    restored = batchnorm_buffers(predictor.model.backbone)
    for key, value in saved.items():
        assert torch.equal(restored[key], value), key
    results = json.loads((run_dir / "metrics.json").read_text())
    assert predictor.evaluate("test")["auroc"] == results["test"]["auroc"]


# ------------------------------------------------------------------------ real weights, real data

@pytest.mark.parametrize("method", ["ssf", "bitfit"])
def test_real_efficientnet_lite0_on_pneumoniamnist(method, real_assets, tmp_path):
    """The real ImageNet EfficientNet-Lite0 file, through the user's local-weights path
    (keys differ from timm's, so it loads by position), fine-tuned on real chest X-rays.
    Balanced binary test split: chance is AUROC 0.5 / accuracy 0.5; we require AUROC
    >= 0.75 after two short epochs on 600 training images at 64 px. BatchNorm statistics
    stay ImageNet's (`batchnorm: frozen`): re-estimating them from 32-image X-ray batches
    costs ~0.08 AUROC here."""
    weights = real_assets / "weights/efficientnet_lite0_imagenet/efficientnet-lite0-57934424.pth"
    run_dir = peftlab.run("medical-classify", method=method, backbone=f"tf_efficientnet_lite0:{weights}",
                          data="data_cards/pneumoniamnist.md", out=tmp_path / "run",
                          overrides={"task.image_size": 64, "task.batchnorm": "frozen",
                                     "data.limit": {"train": 600, "validation": 100, "test": 468},
                                     "train.epochs": 2, "train.batch_size": 32, "train.lr": 3.0e-3,
                                     "train.precision": "fp32", "eval.splits": ["test"]})
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["backbone"]["key_mapping"] == "by position"
    assert meta["backbone"]["data_config"]["mean"] == [0.5, 0.5, 0.5]
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    assert test["auroc"] >= 0.75, test


def test_patient_field_keeps_each_patients_images_in_one_split(tmp_path):
    """ChestX-ray14 has many images per patient: split by image, a patient's scans are in
    train and test. With fields.patient, ratio splits and the validation hold-out move
    whole patients."""
    (tmp_path / "img").mkdir()
    rows = ["path,finding,patient"]
    for i in range(120):
        Image.new("L", (8, 8), i).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{['normal', 'effusion'][i % 2]},p{i // 6}")  # 20 patients, 6 images each
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")

    def patients(header):
        dataset = TASK.read(read_card(_write_card(tmp_path, header)), TASK.options())
        return {name: {e.get("patient", e["id"]) for e in split} for name, split in dataset.splits.items()}, dataset

    base = "format: csv\nlabels: [normal, effusion]\n"
    by_patient, dataset = patients(base + "path: data.csv\nfields: {label: finding, patient: patient}\n"
                                   "splits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 0}")
    names = list(by_patient)
    assert len(names) == 3 and all(not by_patient[a] & by_patient[b] for a in names for b in names if a < b)
    assert sum(len(v) for v in by_patient.values()) == 20
    # one table per split: validation is held out of train by whole patients too
    (tmp_path / "train.csv").write_text("\n".join(rows[:97]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(rows[:1] + rows[97:]) + "\n")
    by_patient, _ = patients(base + "fields: {label: finding, patient: patient}\n"
                             "splits: {train: train.csv, test: test.csv, validation_fraction: 0.25}")
    assert by_patient["validation"] and not by_patient["validation"] & by_patient["train"]
    with pytest.raises(UserError, match="fields.patient names a column of a csv table"):
        TASK.read(read_card(_write_card(tmp_path, "format: imagefolder\npath: img\nfields: {patient: p}")), TASK.options())
    # images without a patient are each a patient of their own, not one pooled patient "" that moves
    # between splits as a block (two thirds of the data in one split), and a note says so
    blanked = [row if i % 3 == 0 else row.rsplit(",", 1)[0] + "," for i, row in enumerate(rows[1:])]
    (tmp_path / "blank.csv").write_text("\n".join(rows[:1] + blanked) + "\n")
    by_patient, dataset = patients(base + "path: blank.csv\nfields: {label: finding, patient: patient}\n"
                                   "splits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 0}")
    sizes = {name: len(split) for name, split in dataset.splits.items()}
    assert sizes == {"train": 72, "validation": 24, "test": 24}, sizes
    assert f"80 images have an empty patient cell (e.g. {tmp_path / 'blank.csv'}:3): each is split as a patient " \
           f"of its own, so if some are one patient's, they may be in train and test" in dataset.notes
    # ratios that give validation 0 (or leave it out) make no validation split: nothing is held out of train
    for ratios in ("{train: 0.8, validation: 0, test: 0.2}", "{train: 0.8, test: 0.2}"):
        by_patient, dataset = patients(base + f"path: data.csv\nfields: {{label: finding, patient: patient}}\n"
                                       f"splits: {{ratios: {ratios}, seed: 0}}")
        assert set(by_patient) == {"train", "test"} and sum(len(v) for v in by_patient.values()) == 20
        assert not any(note.startswith("validation:") for note in dataset.notes)


@pytest.mark.parametrize("header, message", [
    ("format: imagefolder\npath: img\nsplits: {train: nope_train, test: nope_test}",
     r"card\.md: splits\.train: format imagefolder does not read per-split files; lay the folder out as path/train, "
     r"path/val, path/test \(class folders inside each\), or use format: csv with one table per split$"),
    ("format: medmnist_npz\npath: m.npz\nsplits: {ratios: {train: 0.5, validation: 0.5}, test: nope.npz, seed: 3}",
     r"card\.md: splits\.test: format medmnist_npz does not read per-split files; the file's own train/val/test "
     r"arrays are its splits \(splits\.ratios split a file with train only\)$"),
])
def test_per_split_files_are_refused_by_formats_that_split_themselves(tmp_path, header, message):
    """They were accepted, even naming missing files, and the data was split by the default ratios."""
    with pytest.raises(UserError, match=message):
        TASK.read(read_card(_write_card(tmp_path, header)), TASK.options())


def test_per_split_tables_still_work_for_csv(tmp_path):
    _image_table(tmp_path, "label", [["benign", "malignant"][i % 2] for i in range(20)])
    rows = (tmp_path / "data.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join(rows[:17]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join(rows[:1] + rows[17:]) + "\n")
    card = "format: csv\nlabels: [benign, malignant]\nsplits: {train: train.csv, test: test.csv, validation_fraction: 0.25}"
    dataset = TASK.read(read_card(_write_card(tmp_path, card)), TASK.options())
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 12, "test": 4, "validation": 4}
    # a whole table or ratios beside them would be ignored: refused
    for extra, named in (("path: data.csv", "path"), ("files: {data: data.csv}", "files.data")):
        with pytest.raises(UserError, match=rf"card\.md: {named} and splits\.train: one table per split makes the "
                                            rf"splits; remove {named}, or the per-split tables to split one table by ratios$"):
            TASK.read(read_card(_write_card(tmp_path, card + "\n" + extra)), TASK.options())
    with pytest.raises(UserError, match=r"card\.md: splits\.ratios and splits\.train: one table per split"):
        TASK.read(read_card(_write_card(tmp_path, card.replace("validation_fraction: 0.25", "ratios: {train: 1.0}"))),
                  TASK.options())


def test_a_validation_ratio_of_zero_makes_no_validation_split(tmp_path):
    """It held 10 % of train out as validation all the same (38 / 10 / 3 of 51 images);
    protein, speech and point clouds leave a split of ratio 0 out, as the README says."""
    _image_table(tmp_path, "label", [["benign", "malignant"][i % 2] for i in range(20)])
    base = "format: csv\npath: data.csv\nlabels: [benign, malignant]\n"
    for ratios in ("{train: 0.8, validation: 0, test: 0.2}", "{train: 0.8, test: 0.2}"):
        dataset = TASK.read(read_card(_write_card(tmp_path, base + f"splits: {{ratios: {ratios}, seed: 0}}")), TASK.options())
        assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 16, "test": 4}
        assert dataset.notes == []
    dataset = TASK.read(read_card(_write_card(tmp_path, base)), TASK.options())  # the default ratios: 0.8 / 0.1 / 0.1
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 16, "validation": 2, "test": 2}
    # a validation_fraction next to ratios would be ignored: refused
    with pytest.raises(UserError, match=r"card\.md: splits\.validation_fraction holds validation out of train where the "
                                        r"data comes split \(split folders, per-split files, an npz's arrays\); here "
                                        r"splits\.ratios divide the images: give validation its ratio there \(e\.g\. "
                                        r"ratios: \{train: 0\.8, validation: 0\.1, test: 0\.1\}\) and remove "
                                        r"validation_fraction$"):
        TASK.read(read_card(_write_card(tmp_path, base + "splits: {ratios: {train: 0.8, test: 0.2}, "
                                                         "validation_fraction: 0.1}")), TASK.options())

    # a MedMNIST file with train arrays only is split by the ratios, likewise
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 255, (20, 8, 8), dtype=np.uint8), "train_labels": np.arange(20).reshape(-1, 1) % 2}
    np.savez(tmp_path / "train_only.npz", **arrays)
    card = "format: medmnist_npz\npath: train_only.npz\nsplits: {ratios: {train: 0.7, validation: 0, test: 0.3}}"
    dataset = TASK.read(read_card(_write_card(tmp_path, card)), TASK.options())
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 14, "test": 6}
    # with train and test arrays but no val, validation_fraction of train is held out, as for split folders
    np.savez(tmp_path / "no_val.npz", **arrays, test_images=arrays["train_images"][:6], test_labels=arrays["train_labels"][:6])
    dataset = TASK.read(read_card(_write_card(tmp_path, "format: medmnist_npz\npath: no_val.npz")), TASK.options())
    assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 18, "test": 6, "validation": 2}
    assert dataset.notes == ["validation: 2 training images held out (splits.validation_fraction=0.1, seed 0); test is untouched"]
    with pytest.raises(UserError, match=r"card\.md: splits\.ratios divide a file with train arrays only, but \S*no_val\.npz "
                                        r"has train, test arrays, which are its splits; remove splits\.ratios$"):
        TASK.read(read_card(_write_card(tmp_path, "format: medmnist_npz\npath: no_val.npz\n"
                                                  "splits: {ratios: {train: 0.9, test: 0.1}}")), TASK.options())


def test_ratios_on_split_folders_are_refused(tmp_path):
    """They were ignored: the folders made the splits."""
    for split in ("train", "test"):
        (tmp_path / "images" / split / "normal").mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "images" / split / "normal" / "0.png")
    card = "format: imagefolder\npath: images\nsplits: {ratios: {train: 0.5, test: 0.5}}"
    with pytest.raises(UserError, match=rf"card\.md: splits\.ratios divide images that come unsplit, but "
                                        rf"{tmp_path / 'images'} has split folders \(train/, test/\); remove "
                                        rf"splits\.ratios, or put the class folders directly in {tmp_path / 'images'}$"):
        TASK.read(read_card(_write_card(tmp_path, card)), TASK.options())


def test_imagefolder_labels_in_any_order_are_matched_by_name(tmp_path):
    """The card's `labels` order is the class index order (as for point clouds)."""
    for label in ("benign", "malignant", "normal"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), i).save(tmp_path / "images" / label / f"{i}.png")
    card = "format: imagefolder\npath: images\nlabels: [normal, malignant, benign]\nsplits: {ratios: {test: 1.0}}"
    dataset = TASK.read(read_card(_write_card(tmp_path, card)), TASK.options())
    assert dataset.labels == ["normal", "malignant", "benign"]
    assert sorted((e["id"], e["label"]) for e in dataset.splits["test"]) == [
        ("benign/0.png", 2), ("benign/1.png", 2), ("malignant/0.png", 1), ("malignant/1.png", 1),
        ("normal/0.png", 0), ("normal/1.png", 0)]


def test_predict_reads_a_plain_table_of_image_paths(tmp_path, capsys):
    """The run's card named a patient column and a group column, which prediction never
    uses; a table of image paths alone was refused for lacking them."""
    from peftlab.pipelines.cli import main

    (tmp_path / "img").mkdir()
    rows = ["path,finding,patient,sex"]
    for i in range(24):
        Image.new("L", (8, 8), i * 10).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{['normal', 'effusion'][i % 2]},p{i // 2},{'FM'[i % 2]}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    card = _write_card(tmp_path, "format: csv\npath: data.csv\nlabels: [normal, effusion]\ngroup_by: sex\n"
                                 "fields: {label: finding, patient: patient}")
    run_dir = peftlab.run("medical-classify", backbone="tiny_vit", data=card, out=tmp_path / "run",
                          overrides={"train.max_steps": 1, "train.epochs": 1, "task.image_size": 16})
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "paths.csv").write_text("path\n../img/3.png\n../img/0.png\n")
    assert main(["predict", str(run_dir), str(tmp_path / "new" / "paths.csv"), "--out", str(tmp_path / "out.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(line["id"], line["path"]) for line in lines] == [("../img/3.png", str(tmp_path / "new" / "../img/3.png")),
                                                              ("../img/0.png", str(tmp_path / "new" / "../img/0.png"))]
    assert all(set(line) == {"id", "path", "score", "positive_class", "prediction"} for line in lines)
    (tmp_path / "empty").mkdir()  # a folder with no image predicts nothing: said, not silent
    assert main(["predict", str(run_dir), str(tmp_path / "empty"), "--out", str(tmp_path / "none.jsonl")]) == 2
    assert "empty: no image files (.png, " in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()
    # the column the input itself needs is still asked for, in one line
    (tmp_path / "new" / "ids.csv").write_text("image\n../img/3.png\n")
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(tmp_path / "new" / "ids.csv"), "--out", str(tmp_path / "ids.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'new' / 'ids.csv'}: column 'path' for fields.image not found; predict reads inputs with the "
        f"run's card, {run_dir / 'card.md'} (fields {{'label': 'finding', 'patient': 'patient'}}): name the columns so "
        f"in the input"]
    assert not (tmp_path / "ids.jsonl").exists()
