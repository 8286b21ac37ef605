"""`peftlab merge RUN_DIR --export DIR`: the merged backbone in its own library's format.

Each export is loaded in a separate Python process that imports only the third-party
library (fair-esm, timm, transformers) and checks that peftlab was never imported; its
backbone outputs must equal the unmerged adapted backbone's within 1e-5. The LoRA
weights are scrambled to large values first, so merging changes the weights a lot.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from peftlab.pipelines.cli import main
from peftlab.pipelines.predictor import Predictor
from test_serve import make_run

TOLERANCE = 5e-5  # float32 merge (W + BA) vs the unmerged sum: rounding of ~1e-5 on logits of size ~10

LOADER = textwrap.dedent("""
    import argparse, json, sys
    import numpy as np, torch
    exports, inputs = sys.argv[1], np.load(sys.argv[2])
    outputs = {}
    with torch.inference_mode():
        namespace = {"EXPORT_DIR": exports + "/protein"}  # export.json's own instructions, run from elsewhere
        exec(json.load(open(exports + "/protein/export.json"))["load_without_peftlab"], namespace)
        model = namespace["model"]
        layers = model.num_layers
        outputs["protein"] = model.eval()(torch.from_numpy(inputs["protein"]), repr_layers=[layers])["representations"][layers]

        import timm
        model = timm.create_model("local-dir:" + exports + "/medical", pretrained=True).eval()
        outputs["medical"] = model(torch.from_numpy(inputs["medical"]))

        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained(exports + "/code").eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(exports + "/code")
        ids = tokenizer(["@@ -1 +1 @@\\n-a\\n+b"], return_tensors="pt")["input_ids"]
        assert ids.tolist() == inputs["code"].tolist(), "the exported tokenizer encodes differently"
        outputs["code"] = model(input_ids=ids).logits
    assert not [m for m in sys.modules if m.split(".")[0] == "peftlab"], "peftlab was imported"
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in outputs.items()})
""")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    return {"protein": make_run(root, "protein", "protein-classify", "lora", 1),
            "medical": make_run(root, "medical", "medical-classify", "lora", 2),
            "code": make_run(root, "code", "code-review-necessity", "lora", 3)}


def test_exports_load_without_peftlab_and_match_the_adapted_backbone(runs, tmp_path):
    exports = tmp_path / "exports"
    inputs, expected = {}, {}
    with torch.inference_mode():
        predictor = Predictor(runs["protein"])
        encoder = predictor.model.backbone.base_model
        inputs["protein"] = encoder.tokenize(["MKTAYIAKQRQISFVKSHF", "GAVLIW"]).numpy()
        residues = inputs["protein"] != encoder.padding_idx  # what padding positions hold is no model's output
        expected["protein"] = predictor.model.backbone(torch.from_numpy(inputs["protein"])).numpy()
        # through the command line: --out (a merged run) and --export together
        assert main(["merge", str(runs["protein"]), "--out", str(tmp_path / "merged"), "--export", str(exports / "protein")]) == 0
        assert json.loads((tmp_path / "merged" / "meta.json").read_text())["method"]["name"] == "full"

        predictor = Predictor(runs["medical"])
        inputs["medical"] = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).numpy()
        expected["medical"] = predictor.model.backbone(torch.from_numpy(inputs["medical"])).numpy()
        predictor.export(exports / "medical")

        predictor = Predictor(runs["code"])
        inputs["code"] = np.array([predictor.model.tokenizer("@@ -1 +1 @@\n-a\n+b")["input_ids"]])
        expected["code"] = predictor.model.backbone(input_ids=torch.from_numpy(inputs["code"])).logits.numpy()
        predictor.export(exports / "code")
    usage = json.loads((exports / "medical" / "export.json").read_text())["load_without_peftlab"]
    assert "timm.create_model('local-dir:' + EXPORT_DIR, pretrained=True)" in usage
    for name in ("protein", "medical", "code"):  # each has a task head (the necessity classifier too): named, not exported
        described = json.loads((exports / name / "export.json").read_text())
        assert described["not_included"].startswith(f"the task head ({runs[name] / 'adapter' / 'head.safetensors'}, ")
        assert not list((exports / name).glob("head*"))

    np.savez(tmp_path / "inputs.npz", **inputs)
    loaded = subprocess.run([sys.executable, "-c", LOADER, str(exports), str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz")],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    outputs = np.load(tmp_path / "out.npz")
    for name in ("protein", "medical", "code"):
        assert outputs[name].shape == expected[name].shape, name
        real = residues if name == "protein" else slice(None)
        assert np.abs(outputs[name][real] - expected[name][real]).max() <= TOLERANCE, name
    # the adapter mattered: the merged weights are not the base weights
    assert np.abs(outputs["medical"] - base_features(runs["medical"], inputs["medical"])).max() > 1e-3


def base_features(run_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """The backbone's output with the adapter switched off."""
    adapted = Predictor(run_dir).model.backbone
    with torch.inference_mode(), adapted.model.disable_adapter():
        return adapted(torch.from_numpy(pixels)).numpy()


def test_a_method_that_cannot_merge_is_refused_naming_the_mergeable_ones(tmp_path, capsys):
    run_dir = make_run(tmp_path, "bottleneck", "protein-classify", "adapter", 4)
    assert main(["merge", str(run_dir), "--export", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "method 'adapter' cannot be merged into the backbone weights; mergeable methods: bitfit, dora," in error
    assert not (tmp_path / "out").exists()
    assert main(["merge", str(run_dir)]) == 2
    assert "merge needs --out DIR (a merged run), --export DIR (the merged backbone), or both" in capsys.readouterr().err


def test_an_unmergeable_method_is_refused_before_the_backbone_loads(tmp_path, capsys, monkeypatch):
    run_dir = make_run(tmp_path, "bottleneck", "protein-classify", "adapter", 4)

    def no_loading(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(Predictor, "__init__", no_loading)
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 2
    assert "method 'adapter' cannot be merged into the backbone weights" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_export_refuses_a_non_empty_folder(runs, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["merge", str(runs["protein"]), "--export", str(tmp_path / "taken")]) == 2
    assert "exists and is not empty; choose another --export" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("backbone", ["tiny_whisper", "tiny_wavlm"])
def test_a_speech_export_loads_every_weight_with_the_code_it_prints(tmp_path, backbone):
    """Whisper's export is encoder-only: `AutoModel` built the whole encoder-decoder and
    left every weight random, so the printed loader names the encoder's class."""
    import peftlab
    from safetensors.torch import load_file

    run_dir = peftlab.run("speech-emotion", demo=True, backbone=backbone, out=tmp_path / "run",
                          overrides={"train.max_steps": 1, "eval.splits": []})
    export = Predictor(run_dir).export(tmp_path / "export")
    namespace = {"EXPORT_DIR": str(export)}
    exec(json.loads((export / "export.json").read_text())["load_without_peftlab"], namespace)
    loaded = namespace["model"].state_dict()
    saved = load_file(str(export / "model.safetensors"))
    assert saved.keys() <= loaded.keys()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key


def test_a_failed_export_takes_the_merged_run_with_it(runs, tmp_path, monkeypatch, capsys):
    from peftlab.shared.errors import UserError

    def cannot_export(self, directory):
        raise UserError("this backbone has no export format")

    monkeypatch.setattr(Predictor, "export", cannot_export)
    merged = tmp_path / "merged"
    assert main(["merge", str(runs["protein"]), "--out", str(merged), "--export", str(tmp_path / "export")]) == 2
    assert "this backbone has no export format" in capsys.readouterr().err
    assert not merged.exists()  # a re-run is not refused with "merged exists"


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_merge_says_when_bf16_rounds_the_merged_weights(tmp_path, capsys, precision):
    run_dir = make_run(tmp_path, "lora", "protein-classify", "lora", 4)
    meta = json.loads((run_dir / "meta.json").read_text())
    (run_dir / "meta.json").write_text(json.dumps({**meta, "precision": precision}))
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    said = "note: the run computes in bf16, which rounds the merged weights as one" in capsys.readouterr().err
    assert said == (precision == "bf16")
