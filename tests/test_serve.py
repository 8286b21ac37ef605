"""`peftlab serve` and `peftlab.load([...])`: many adapters on one backbone.

The served answers must be `Predictor.predict`'s: labels exactly, scores within 1e-5.
(The runs are fp32; a batch that mixes adapters pads and groups rows differently from
a single-run batch, which changes float summation order, never the computation, so the
difference is rounding: about 1e-7 here.) The LoRA weights are scrambled to large
random values first, so a row routed through the wrong adapter or head would differ
by far more than the tolerance.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import peftlab
import pytest
import torch
from peftlab.domains.protein.data import demo_sequences
from peftlab.pipelines.cli import main
from peftlab.pipelines.multi_adapter import MultiAdapter
from peftlab.pipelines.predictor import Predictor
from peftlab.shared import io as peftlab_io
from peftlab.shared.errors import UserError
from peftlab.shared.tasks import get_task

TOLERANCE = 1e-5
FAST = {"train.max_steps": 1, "train.epochs": 1, "train.batch_size": 4, "train.precision": "fp32",
        "eval.splits": ["test"], "data.limit": {"train": 8, "validation": 4, "test": 4}}


def make_run(root: Path, name: str, pipeline: str, method: str, seed: int) -> Path:
    run_dir = peftlab.run(pipeline, demo=True, method=method, out=root / name,
                          overrides={**FAST, "train.seed": seed})
    scramble_adapter(run_dir, seed)
    return run_dir


def scramble_adapter(run_dir: Path, seed: int) -> None:
    """Large random adapter and head weights: runs then disagree clearly on every input."""
    generator = torch.Generator().manual_seed(seed)
    for file in ("adapter_model.safetensors", "head.safetensors"):
        path = run_dir / "adapter" / file
        tensors = peftlab_io.load_tensors(path)
        scrambled = {k: v + 0.3 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                     for k, v in tensors.items()}
        peftlab_io.save_tensors(path, scrambled)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Four protein-classify runs on the tiny ESM-2: two LoRA (mixed batches), one IA3
    (switched on the shared backbone's IA3 model), one BitFit (its own model)."""
    root = tmp_path_factory.mktemp("serve-runs")
    return {name: make_run(root, name, "protein-classify", method, seed)
            for name, method, seed in [("lora_a", "lora", 1), ("lora_b", "lora", 2), ("ia3", "ia3", 3), ("bitfit", "bitfit", 4)]}


@pytest.fixture(scope="module")
def multi(runs):
    served = MultiAdapter([str(p) for p in runs.values()], max_batch=64, max_wait_ms=20)
    yield served
    served.close()


@pytest.fixture(scope="module")
def expected(runs):
    """Each run's own `Predictor.predict` on the query sequences."""
    rows = {}
    for name, run_dir in runs.items():
        rows[name] = Predictor(run_dir).predict(QUERIES)
    return rows


QUERIES = [{"id": e["id"], "seq": e["seq"]} for e in demo_sequences({"train": 0, "validation": 0, "test": 10}, 4, seed=7)["test"]]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
    for a, b in zip(got, want):
        assert a["scores"].keys() == b["scores"].keys()
        assert max(abs(a["scores"][k] - b["scores"][k]) for k in a["scores"]) <= TOLERANCE


def test_one_backbone_for_the_peft_runs_and_each_run_on_its_path(multi, runs):
    serving = {a["name"]: a["serving"] for a in multi.summary()}
    assert serving == {"lora_a": "mixed batches", "lora_b": "mixed batches", "ia3": "switched", "bitfit": "own model"}
    shared = {id(multi.get(n).predictor.model.backbone) for n in ("lora_a", "lora_b")}
    assert len(shared) == 1  # both LoRA runs call the very same backbone module
    assert multi.get("lora_a").engine is multi.get("lora_b").engine
    assert multi.get("ia3").engine is not multi.get("lora_a").engine  # peft cannot mix IA3 into a LoRA model
    # the two LoRA runs really differ (so a mix-up could not pass unnoticed)
    a = Predictor(runs["lora_a"]).predict(QUERIES[:3])
    b = Predictor(runs["lora_b"]).predict(QUERIES[:3])
    assert max(abs(a[0]["scores"][k] - b[0]["scores"][k]) for k in a[0]["scores"]) > 0.01


def test_each_served_run_evaluates_as_its_own_predictor_does(multi, runs, tmp_path, monkeypatch):
    """`MultiAdapter.evaluate` runs a run's data through the shared backbone (mixed, switched
    or own model) and scores it as `peftlab eval` does: the metrics and prediction rows
    are the run's own, to float rounding."""
    submitted = []
    submit = multi.submit
    monkeypatch.setattr(multi, "submit", lambda name, examples: submitted.append(name) or submit(name, examples))
    for name, run_dir in runs.items():
        served = multi.evaluate(name, "test", predictions_file=tmp_path / f"{name}.jsonl")
        own = Predictor(run_dir).evaluate("test", predictions_file=tmp_path / f"{name}-own.jsonl")
        assert served.keys() == own.keys() and served["accuracy"] == own["accuracy"], name
        assert all(abs(served[k] - own[k]) <= TOLERANCE for k in own if isinstance(own[k], float)), name
        assert_same_rows(peftlab_io.read_jsonl(tmp_path / f"{name}.jsonl"), peftlab_io.read_jsonl(tmp_path / f"{name}-own.jsonl"))
    assert submitted == list(runs)  # through the served engines, not the predictors' own models
    with pytest.raises(UserError, match=r"split 'dev' is not in .*card\.md; it has "):
        multi.evaluate("lora_a", "dev")


def test_a_mixed_batch_gives_each_row_its_own_runs_answer(multi, expected):
    engine = multi.get("lora_a").engine
    before = engine.stats["mixed_batches"]
    # interleaved rows of two adapters, in one call: one backbone pass
    requests = [(multi.get("lora_a" if i % 2 else "lora_b"), q) for i, q in enumerate(QUERIES)]
    outputs = engine.outputs(requests)
    assert engine.stats["mixed_batches"] == before + 1 and engine.stats["most_adapters_in_a_batch"] == 2
    for (adapter, query), output in zip(requests, outputs):
        want = expected[adapter.name][QUERIES.index(query)]
        got = adapter.task.describe(query, output, adapter.predictor.labels)
        assert_same_rows([got], [want])


def test_a_cancelled_request_is_skipped_and_the_worker_keeps_serving(runs, expected):
    served = MultiAdapter([runs["lora_a"]], max_wait_ms=1000)  # a long window: both jobs wait in it
    try:
        gone = served.submit("lora_a", QUERIES[:2])
        kept = served.submit("lora_a", QUERIES[2:4])
        assert gone.cancel()  # as when a client disconnects
        assert_same_rows(served.describe("lora_a", QUERIES[2:4], kept.result(timeout=60)), expected["lora_a"][2:4])
        assert_same_rows(served.predict("lora_a", QUERIES[4:5]), expected["lora_a"][4:5])
        assert served.engines[next(iter(served.engines))].stats["examples"] == 3
    finally:
        served.close()


def test_a_request_whose_client_leaves_is_dropped_before_it_runs(runs, expected):
    """A client that gives up (a timeout, a closed tab) no longer leaves its job to run:
    the waiting request sees the disconnect and cancels it, and the batching thread skips it."""
    import uvicorn
    from peftlab.pipelines.serve import create_app

    served = MultiAdapter([runs["lora_a"]], max_wait_ms=3000)  # a long batching window: requests wait in it
    sock = free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        body = json.dumps({"sequences": ["MKVLAAGIL"]}).encode()
        client = socket.create_connection(sock.getsockname())
        client.sendall(b"POST /predict/lora_a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(0.5)  # its job is queued in the window
        client.close()
        kept = served.submit("lora_a", QUERIES[:2])
        assert_same_rows(served.describe("lora_a", QUERIES[:2], kept.result(timeout=60)), expected["lora_a"][:2])
        assert served.get("lora_a").engine.stats["examples"] == 2  # the departed client's sequence never ran
    finally:
        server.should_exit = True
        thread.join(10)
        served.close()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def server(multi):
    """A real uvicorn server on a loopback port, in a thread."""
    import uvicorn
    from peftlab.pipelines.serve import create_app

    sock = free_socket()
    config = uvicorn.Config(create_app(multi), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


def post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_concurrent_http_requests_give_the_predictors_answers(server, expected, multi):
    jobs = []
    for round_ in range(3):
        for name in ("lora_a", "lora_b", "ia3", "bitfit"):
            start = (round_ * 3 + len(name)) % 7
            jobs.append((name, list(range(start, start + 3))))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        replies = list(pool.map(lambda job: post(f"{server}/predict/{job[0]}",
                                                 {"sequences": {QUERIES[i]["id"]: QUERIES[i]["seq"] for i in job[1]}}), jobs))
    for (name, indices), (status, body) in zip(jobs, replies):
        assert status == 200, body
        assert body["adapter"] == name and body["task"] == "protein-classify"
        assert_same_rows(body["predictions"], [expected[name][i] for i in indices])
    assert get(f"{server}/health") == {"status": "ok", "adapters": 4, "backbones": 1, "backbone_copies": 3}
    listed = {a["name"]: a for a in get(f"{server}/adapters")["adapters"]}
    assert set(listed) == {"lora_a", "lora_b", "ia3", "bitfit"}
    assert listed["lora_a"]["labels"] == ["family_0", "family_1", "family_2", "family_3"]
    assert listed["lora_a"]["backbone"] == "tiny" and listed["lora_a"]["method"] == "lora"
    assert listed["lora_a"]["request"] == '{"sequences": [SEQ, ...]} (ids "0", "1", ...) or {"sequences": {ID: SEQ, ...}}.'
    assert "accuracy" in listed["lora_a"]["metrics"]["test"]
    # clients see run names, not the server's folders
    assert listed["lora_a"]["run"] == multi.adapters["lora_a"].predictor.run_dir.name
    folder = str(multi.adapters["lora_a"].predictor.run_dir.parent.resolve())
    assert folder not in json.dumps(listed) and str(multi.adapters["lora_a"].predictor.run_dir) not in json.dumps(listed)


def test_a_backbone_given_as_a_local_path_is_listed_by_its_name(tmp_path):
    from peftlab.pipelines.multi_adapter import _public_name

    weights = tmp_path / "esm2_t6_8M_UR50D.pt"
    weights.write_bytes(b"")
    assert _public_name(str(weights)) == "esm2_t6_8M_UR50D.pt"
    assert _public_name("facebook/esm2_t6_8M_UR50D") == "facebook/esm2_t6_8M_UR50D" and _public_name(None) is None


@pytest.mark.parametrize("path, body, status, message", [
    ("/predict/nope", {"sequences": ["MKV"]}, 404, "no adapter named 'nope'; served: lora_a, lora_b, ia3, bitfit"),
    ("/predict/lora_a", b"{not json", 400, "not JSON"),
    ("/predict/lora_a", b'{"sequences": ["MKV"], "sequences": ["GGA"]}', 400,
     "the request body: an object names the key 'sequences' twice; keep the one meant"),
    ("/predict/lora_a", ["MKV"], 422, "must be a JSON object"),
    ("/predict/lora_a", {}, 422, "sequences: required"),
    ("/predict/lora_a", {"sequences": []}, 422, "sequences: empty"),
    ("/predict/lora_a", {"sequences": ["MKV"], "extra": 1}, 422, "extra: not a field"),
    ("/predict/lora_a", {"sequences": ["MK1V"]}, 422, "sequences[0]: '1' is not an amino-acid letter"),
    ("/predict/lora_a", {"sequences": {"p1": 5}}, 422, "sequences[p1]: expected a string"),
    ("/predict/lora_a", {"sequences": [""]}, 422, "sequences[0]: empty sequence"),
    ("/predict/lora_a", {"sequences": ["A"] * 1025}, 422, "send at most 1024"),
    ("/predict/bitfit", {"sequences": [["MKV"]]}, 422, "sequences[0]: expected a string"),
])
def test_bad_requests_get_a_4xx_naming_the_field(server, path, body, status, message):
    code, reply = post(server + path, body)
    assert code == status
    assert message in reply["error"]


def test_an_oversized_body_gets_413(multi):
    from peftlab.pipelines import serve
    from starlette.testclient import TestClient

    # in-process: over a socket the server answers before the client has sent it all
    reply = TestClient(serve.create_app(multi)).post("/predict/lora_a", content=b" " * (serve.MAX_BODY_BYTES + 1))
    assert reply.status_code == 413 and "send fewer inputs" in reply.json()["error"]


def test_python_api_load_of_a_list_serves_every_run(runs, expected):
    served = peftlab.load([f"first={runs['lora_a']}", runs["lora_b"]])
    try:
        assert isinstance(served, MultiAdapter) and served.names() == ["first", "lora_b"]
        assert_same_rows(served.predict("first", QUERIES[:4]), expected["lora_a"][:4])
        assert_same_rows(served.predict("lora_b", QUERIES[4:]), expected["lora_b"][4:])
        with pytest.raises(UserError, match="no adapter named 'x'; served: first, lora_b"):
            served.predict("x", QUERIES)
    finally:
        served.close()
    with pytest.raises(UserError, match="both be served as 'lora_a'; name them with NAME=RUN_DIR"):
        MultiAdapter([runs["lora_a"], runs["lora_a"]])


def test_a_multi_adapter_dropped_without_close_stops_its_threads_and_frees_its_models(runs, expected):
    """A notebook cell run twice left each earlier MultiAdapter's threads alive, and with
    them its backbones: the threads held the engines."""
    import gc
    import threading
    import weakref

    served = peftlab.load([runs["lora_a"], runs["lora_b"]])
    assert_same_rows(served.predict("lora_a", QUERIES[:2]), expected["lora_a"][:2])
    names = {f"peftlab-engine-{id(engine)}" for engine in served.engines.values()}
    assert names & {thread.name for thread in threading.enumerate()}
    backbone = weakref.ref(next(iter(served.engines.values())).backbone)
    del served
    gc.collect()
    for _ in range(100):  # the finalizer's stop reaches the thread at its next queue read
        if not names & {thread.name for thread in threading.enumerate()}:
            break
        threading.Event().wait(0.05)
    assert not names & {thread.name for thread in threading.enumerate()}
    assert backbone() is None


def test_the_multi_adapter_predicts_every_input_form_as_the_runs_own_predictor_does(runs, expected, tmp_path):
    """Files, one path alone, a generator, a data card, dicts without ids and the JSON
    request form: `peftlab.load([...]).predict` reads them as `peftlab.load(run).predict`."""
    own = Predictor(runs["lora_a"])
    fasta = tmp_path / "q.fasta"
    fasta.write_text("".join(f">{q['id']}\n{q['seq']}\n" for q in QUERIES[:3]))
    card = runs["lora_a"] / "card.md"
    with peftlab.load([f"a={runs['lora_a']}"]) as served:
        assert_same_rows(own.predict(fasta), expected["lora_a"][:3])  # one path, not a list of its letters
        assert_same_rows(own.predict(str(fasta)), expected["lora_a"][:3])
        assert_same_rows(served.predict("a", (path for path in [fasta])), expected["lora_a"][:3])
        by_card = served.predict("a", card, split="test")
        assert by_card == own.predict([card], split="test") and {row["split"] for row in by_card} == {"test"}
        no_ids = served.predict("a", [{"seq": q["seq"]} for q in QUERIES[:2]])
        assert [row["id"] for row in no_ids] == ["0", "1"]
        requested = served.predict_request("a", {"sequences": {q["id"]: q["seq"] for q in QUERIES[:2]}})
        assert_same_rows(requested, expected["lora_a"][:2])
        assert_same_rows(own.predict_request({"sequences": {q["id"]: q["seq"] for q in QUERIES[:2]}}), requested)
        with pytest.raises(UserError, match=r"sequences\[0\]: '1' is not an amino-acid letter"):
            own.predict_request({"sequences": ["MK1V"]})
        with pytest.raises(UserError, match="predict takes paths .* or example dicts, not int"):
            served.predict("a", [3])
        # scores that are not numbers (an input far outside the model's range) are refused, never a NaN row
        with pytest.raises(UserError, match="^p7: the model's scores for this input are not finite numbers"):
            own.rows([{"id": "p7", "seq": "MKV"}], [np.array([np.nan, 0.1, 0.2, 0.3])])


def test_a_failure_inside_the_server_is_json_and_deep_json_is_a_400(multi, monkeypatch):
    from peftlab.pipelines import serve
    from starlette.testclient import TestClient

    client = TestClient(serve.create_app(multi), raise_server_exceptions=False)
    deep = client.post("/predict/lora_a", content=b'{"sequences": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert deep.status_code == 400 and "nests JSON too deeply" in deep.json()["error"]
    monkeypatch.setattr(multi, "describe", lambda *args: 1 / 0)
    failed = client.post("/predict/lora_a", json={"sequences": ["MKV"]})
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal error (ZeroDivisionError); the server's log has the details"}


def test_health_counts_distinct_backbones_and_the_copies_in_memory(multi):
    """Four runs on the one tiny ESM-2: one backbone, held as three copies (the LoRA runs'
    shared model, the IA3 model beside it, BitFit's own). It once said "backbones": 3."""
    from peftlab.pipelines import serve
    from starlette.testclient import TestClient

    health = TestClient(serve.create_app(multi)).get("/health").json()
    assert health == {"status": "ok", "adapters": 4, "backbones": 1, "backbone_copies": 3}


@pytest.mark.parametrize("argument, message", [
    ("=runs/a", "=runs/a: the adapter name before '=' is empty; pass NAME=RUN_DIR or RUN_DIR alone"),
    ("a=", "a=: no run directory after '='; pass NAME=RUN_DIR or RUN_DIR alone"),
    ("a b=runs/a", "a b=runs/a: an adapter name may not contain '/', '?', '#', '%' or spaces; pass NAME=RUN_DIR"),
])
def test_a_bad_adapter_name_says_what_is_wrong_with_it(argument, message, capsys):
    with pytest.raises(UserError) as raised:
        MultiAdapter([argument])
    assert str(raised.value) == message
    assert main(["serve", argument, "--port", "0"]) == 2  # stops before the port and any run is touched
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def relabelled_run(run_dir: Path, task_name: str, out: Path) -> Path:
    """A copy of `run_dir` whose run.yaml names `task_name`: what serve's start-up check
    reads, without training a run of that task (a video-text demo run takes ~15 s)."""
    import shutil

    import yaml

    copy = Path(shutil.copytree(run_dir, out / task_name))
    config = yaml.safe_load((copy / "run.yaml").read_text())
    config.update(pipeline=task_name, task={"name": task_name})
    (copy / "run.yaml").write_text(yaml.safe_dump(config))
    return copy


def test_serve_refuses_a_task_with_no_json_form_before_any_backbone_loads(runs, tmp_path, monkeypatch, capsys):
    """A run whose task has no JSON request form (video captioning had none) would answer every
    request 422: `peftlab serve` refuses it at start-up, naming the run and task."""
    from peftlab.shared.tasks import list_tasks

    # every built-in task has a JSON form now: one without (a plugin's, say) is made here
    monkeypatch.delattr(type(get_task("video-caption")), "parse_request")
    unservable = [task for task in list_tasks() if not hasattr(task, "parse_request")]  # what serve parses with
    assert [task.name for task in unservable] == ["video-caption"]

    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone loaded before the run was refused")

    for task in [*unservable, get_task("protein-classify")]:
        monkeypatch.setattr(task, "build_model", no_backbone)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", no_backbone)
    for task in unservable:
        run_dir = relabelled_run(runs["lora_a"], task.name, tmp_path)
        message = (f"{run_dir}: task {task.name!r} cannot be served: it has no JSON request form, so every request "
                   f"would fail; predict on its files with `peftlab predict {run_dir} INPUT...` instead")
        # named after a servable run: that run's backbone must not load first
        assert main(["serve", str(runs["lora_a"]), f"x={run_dir}", "--port", "0"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
        with pytest.raises(UserError, match="cannot be served"):
            MultiAdapter([run_dir], json_requests=True)


def test_unreadable_media_in_a_request_say_what_is_wrong_in_words():
    """Pillow's message named its in-memory buffer ("cannot identify image file
    <_io.BytesIO object at 0x...>"), the audio reader a temporary file of the server's."""
    medical = get_task("medical-classify")
    with pytest.raises(UserError) as raised:
        medical.parse_request({"images": {"scan": b64(b"not an image")}}, medical.options(image_size=32))
    assert str(raised.value) == ("images[scan]: not a readable image file: the decoded bytes are in no image format "
                                 "Pillow reads (PNG, JPEG, TIFF, BMP, GIF, WebP, ...); send a whole image file, "
                                 "base64-encoded")
    speech = get_task("speech-emotion")
    with pytest.raises(UserError) as raised:
        speech.parse_request({"audio": [b64(b"not audio at all")]}, speech.options())
    assert str(raised.value) == "audio[0]: not a readable WAV/FLAC/OGG/MP3 file (Format not recognised.)"


# ------------------------------------------------------------- the natural JSON forms


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_medical_images_as_base64_predict_like_the_files(tmp_path):
    from PIL import Image

    run_dir = make_run(tmp_path, "med", "medical-classify", "lora", 5)
    rng = np.random.default_rng(0)
    files = []
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        shape = (40, 36, 3) if mode == "RGB" else (40, 36) if mode == "L" else (40, 36, 4)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)
        files.append(path)
    want = Predictor(run_dir).predict(files)
    served = MultiAdapter([run_dir])
    try:
        examples = served.parse_request("med", {"images": {str(p): b64(p.read_bytes()) for p in files}})
        got = served.describe("med", examples, served.submit("med", examples).result())
    finally:
        served.close()
    assert [r["id"] for r in got] == [str(p) for p in files]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want]
    assert all(abs(a["scores"][k] - b["scores"][k]) <= TOLERANCE for a, b in zip(got, want) for k in a["scores"])
    task = get_task("medical-classify")
    options = task.options(image_size=32)
    for bad, message in [({"images": ["%%%"]}, "images[0]: not valid base64"),
                         ({"images": [b64(b"not an image")]}, "images[0]: not a readable image file"),
                         ({"images": "abc"}, "images: required, a list")]:
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            task.parse_request(bad, options)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def test_speech_point_cloud_code_review_and_ppi_forms_read_as_their_files_do(tmp_path):
    # speech: a base64 WAV decodes to the waveform the file reader gives
    task = get_task("speech-emotion")
    clip = 0.5 * np.sin(np.linspace(0, 400, 8000)).astype(np.float32)
    (tmp_path / "a.wav").write_bytes(wav_bytes(clip, 16000))
    from peftlab.domains.speech_emotion import data as speech_data

    from_file, rate, _ = speech_data.decode(tmp_path / "a.wav")
    [example] = task.parse_request({"audio": {"a.wav": b64((tmp_path / "a.wav").read_bytes())}}, task.options())
    assert example["id"] == "a.wav" and example["sample_rate"] == rate == 16000
    assert np.array_equal(example["audio"], from_file) and example["samples"] == len(from_file)
    with pytest.raises(UserError, match=r"audio\[0\]: not a readable WAV/FLAC/OGG/MP3"):
        task.parse_request({"audio": [b64(b"RIFF....WAVEjunk")]}, task.options())
    with pytest.raises(UserError, match=r"audio\[0\]: silent"):
        task.parse_request({"audio": [b64(wav_bytes(np.zeros(8000, np.float32), 16000))]}, task.options())

    # point clouds: lists of [x, y, z]
    task = get_task("pointcloud-classify")
    cloud = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    [example] = task.parse_request({"points": [cloud.tolist()]}, task.options())
    assert np.array_equal(example["points"], cloud) and task.rows_follow_examples(task.options())
    assert not task.rows_follow_examples(task.options(votes=3))
    for bad, message in [({"points": [[[0, 0], [1, 1]]]}, r"points\[0\]: expected points of shape \(N, 3\+\)"),
                         ({"points": [[["a", 1, 2]]]}, r"points\[0\]: a cloud is a list of \[x, y, z\]"),
                         ({"points": {"c": [[True, 0, 1]] * 50}}, r"points\[c\]: a cloud is a list of \[x, y, z\]"),
                         ({"points": [[[0, 0, float("nan")], [1, 1, 1]]]}, r"points\[0\]: point 0 has a NaN")]:
        with pytest.raises(UserError, match=message):
            task.parse_request(bad, task.options())

    # code review: the CodeReviewer fields
    necessity, refine = get_task("code-review-necessity"), get_task("code-refine")
    assert necessity.parse_request({"inputs": [{"patch": "@@ -1 +1 @@\n-a\n+b"}]}, necessity.options()) == \
        [{"id": "0", "patch": "@@ -1 +1 @@\n-a\n+b"}]
    assert refine.parse_request({"inputs": {"r": {"old": "x = 1", "comment": "name it"}}}, refine.options()) == \
        [{"id": "r", "old": "x = 1", "comment": "name it"}]
    with pytest.raises(UserError, match=r"inputs\[0\]\.comment: required"):
        refine.parse_request({"inputs": [{"old": "x"}]}, refine.options())
    with pytest.raises(UserError, match=r"inputs\[0\]\.patch: expected a string"):
        necessity.parse_request({"inputs": [{"patch": 3}]}, necessity.options())
    with pytest.raises(UserError, match=r"inputs\[0\]\.msg: not a field of this request; use patch"):
        necessity.parse_request({"inputs": [{"patch": "x", "msg": "y"}]}, necessity.options())

    # protein pairs: raw sequences, or a FASTA and a pairs table as JSON
    ppi = get_task("protein-ppi")
    named = ppi.parse_request({"sequences": {"A": "MKV", "B": "GGA"}, "pairs": [["A", "B"]]}, ppi.options())
    assert named == [{"id": "A|B", "a": "A", "b": "B", "a_seq": "MKV", "b_seq": "GGA"}]  # as a pairs file names it
    raw = ppi.parse_request({"pairs": [["mkv*", "GGA"]]}, ppi.options())  # a final stop is dropped, as in FASTA
    assert raw[0]["a_seq"] == "MKV" and not ppi.rows_follow_examples(ppi.options())
    with pytest.raises(UserError, match=r"pairs\[0\]\[0\]: '\*' is not an amino-acid letter"):
        ppi.parse_request({"pairs": [["MK*V", "GGA"]]}, ppi.options())
    with pytest.raises(UserError, match=r"pairs\[0\]: 'C' is not an id in `sequences`"):
        ppi.parse_request({"sequences": {"A": "MKV"}, "pairs": [["A", "C"]]}, ppi.options())


def test_reasoning_questions_as_json_answer_like_a_jsonl_file(tmp_path):
    """A LoReFT run served: questions as text or as JSONL records generate what `predict`
    generates for the same records read from a file."""
    # seed 4: this scrambled random-init model writes text (with some seeds it ends at
    # once, and empty answers would match trivially)
    run_dir = make_run(tmp_path, "reft", "reasoning-commonsense", "loreft", 4)
    records = [{"id": "piqa", "goal": "Dry wet hands", "sol1": "use a towel", "sol2": "use water"},
               {"id": "arc", "question": "Which is a gas?", "choices": ["ice", "steam", "rock"]},
               {"id": "yesno", "question": "Is the sky blue?"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    want = Predictor(run_dir).predict([tmp_path / "q.jsonl"])
    served = MultiAdapter([run_dir])
    try:
        examples = served.parse_request("reft", {"questions": {r["id"]: r for r in records[:2]} | {"yesno": "Is the sky blue?"}})
        got = served.describe("reft", examples, served.submit("reft", examples).result())
    finally:
        served.close()
    assert [(r["id"], r["dataset"]) for r in got] == [("piqa", "piqa"), ("arc", "request"), ("yesno", "request")]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in want] and all(r["prediction"] for r in got)
    task = get_task("reasoning-commonsense")
    for bad, message in [({"questions": [3]}, r"questions\[0\]: a question's text or an object, not int"),
                         ({"questions": ["  "]}, r"questions\[0\]: empty question"),
                         ({"questions": [{"goal": "x"}]}, r"questions\[0\]: not a commonsense record peftlab knows"),
                         ({"question": ["x"]}, "question: not a field of this request; use questions")]:
        with pytest.raises(UserError, match=message):
            task.parse_request(bad, task.options())


def test_serve_command_answers_on_loopback(runs, capsys):
    """The real `peftlab serve` command: starts, answers /health, stops on SIGINT."""
    import os
    import signal
    import subprocess
    import sys

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    script = Path(sys.executable).parent / "peftlab"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "peftlab.pipelines.cli"]
    process = subprocess.Popen([*command, "serve", f"a={runs['lora_a']}", f"b={runs['lora_b']}", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.time() + 90
        while True:
            try:
                health = get(f"http://127.0.0.1:{port}/health")
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, process.stderr.read()[-2000:]
                assert time.time() < deadline, "peftlab serve did not come up"
                time.sleep(0.3)
        assert health == {"status": "ok", "adapters": 2, "backbones": 1, "backbone_copies": 1}
        status, body = post(f"http://127.0.0.1:{port}/predict/b", {"sequences": ["MKTAYIAK"]})
        assert status == 200 and body["predictions"][0]["id"] == "0"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    assert main(["serve", "/nonexistent/run"]) == 2
    assert "/nonexistent/run: no such run directory" in capsys.readouterr().err


def test_each_distinct_backbone_is_read_once_while_runs_load():
    """`shared_backbones()` (what MultiAdapter loads under): one real load per distinct
    argument set, equal but independent copies for the rest; nothing kept afterwards."""
    from peftlab.shared import backbone_cache

    calls = []

    @backbone_cache.load_once
    def load(name):
        calls.append(name)
        return torch.nn.Linear(2, 2)

    with backbone_cache.shared_backbones():
        first, second = load("a"), load("a")
        load("b")
    assert calls == ["a", "b"]
    assert first is not second and torch.equal(first.weight, second.weight)
    load("a")
    assert calls == ["a", "b", "a"]  # outside the block nothing is cached


def test_multi_adapter_reads_a_shared_backbone_once(runs, monkeypatch):
    """Four runs on the tiny ESM-2: the encoder is built once, the other runs copy it."""
    from peftlab.domains.protein import backbones

    reads = []

    class CountedEncoder(backbones.ESMEncoder):
        def __init__(self, *args, **kwargs):
            reads.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(backbones, "ESMEncoder", CountedEncoder)
    served = MultiAdapter([str(p) for p in runs.values()])
    try:
        assert len(reads) == 1
        assert sorted(served.names()) == sorted(runs)
    finally:
        served.close()


def test_a_busy_port_stops_serve_before_any_model_loads(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # the run directory does not exist: reaching the models would fail differently
        assert main(["serve", str(tmp_path / "no-run"), "--port", str(port)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: 127.0.0.1:{port}: cannot listen there (Address already in use); pick another --port or --host"]
