"""Video-text: CLIP loading, video readers and sampling, the frame-feature cache,
retrieval and caption metrics, the temporal adapter, and both demos learning."""

from __future__ import annotations

import base64
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peftlab.domains.video_text import data
from peftlab.domains.video_text.backbones import TINY_CONFIG, TINY_SEED, VideoCLIP, load_clip
from peftlab.pipelines import runner
from peftlab.pipelines.cli import main
from peftlab.shared import methods, text_metrics
from peftlab.shared.cards import read_card
from peftlab.shared.errors import UserError
from peftlab.shared.metrics import compute
from peftlab.shared.tasks import get_task
from peftlab.shared.text_metrics import (
    caption_bleu4,
    caption_tokens,
    cider,
    ptb_tokens,
    rouge_l,
    word_tokens,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def tiny_clip():
    return load_clip("tiny")


def _solid_frames(count: int, size: int = 32) -> np.ndarray:
    """Frame t is one flat colour that encodes t, so sampled indices can be read back."""
    frames = np.zeros((count, size, size, 3), dtype=np.uint8)
    for t in range(count):
        frames[t] = (10 * t + 5, 200 - 10 * t, 128)
    return frames


def _write_card(folder, header: dict, body: str = "test data") -> str:
    path = folder / "card.md"
    path.write_text("---\n" + yaml.safe_dump(header) + "---\n" + body + "\n")
    return str(path)


# ----------------------------------------------------------------------------- backbones


def test_tiny_clip_is_seeded_and_split_attention_equals_open_clip(tiny_clip):
    from open_clip.model import CLIP

    with torch.random.fork_rng():
        torch.manual_seed(TINY_SEED)
        reference = CLIP(**TINY_CONFIG).eval()
    assert load_clip("tiny").info["weights_sha256"] == tiny_clip.info["weights_sha256"]
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in tiny_clip.model.modules())
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tiny_clip.tokenizer(["a red square moves left", "a blue circle moves up", "x"])
    with torch.no_grad():
        torch.testing.assert_close(tiny_clip.model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiny_clip.model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, message", [
    ("ViT-B-32", "name the weights as MODEL:TAG"),
    ("ViT-B-32:nonsense-tag", "not a pretrained tag of ViT-B-32.*openai"),
    ("NoSuchNet:openai", "not an open_clip architecture"),
    ("ViT-B-32:/nowhere/model.bin", "does not exist"),
])
def test_clip_names_fail_clearly(name, message):
    with pytest.raises(UserError, match=message):
        load_clip(name)


def test_uncached_clip_tag_offline_names_where_it_looked(monkeypatch):
    from peftlab.domains.video_text import backbones

    monkeypatch.setenv("PEFTLAB_OFFLINE", "1")
    monkeypatch.setattr(backbones, "_cached_file", lambda config: (None, ["/hf-cache (timm/x)"]))
    with pytest.raises(UserError, match=r"not available offline \(PEFTLAB_OFFLINE is set\): no cached weights at /hf-cache"):
        load_clip("ViT-B-32:openai")


# ----------------------------------------------------------------------------- videos


def test_uniform_sampling_takes_segment_centres():
    assert data.uniform_indices(16, 4) == [2, 6, 10, 14]
    assert data.uniform_indices(8, 8) == list(range(8))
    assert data.uniform_indices(3, 5) == [0, 0, 1, 2, 2]  # shorter than asked: frames repeat in order


def test_video_file_and_frame_folder_decode_to_the_sampled_frames(tmp_path):
    from PIL import Image

    frames = _solid_frames(12)
    data.write_video(tmp_path / "clip.mp4", frames)
    folder = tmp_path / "clip_frames"
    folder.mkdir()
    for t, frame in enumerate(frames):  # names sort numerically: 2 before 10
        Image.fromarray(frame).save(folder / f"frame_{t}.png")
    expected = frames[data.uniform_indices(12, 4)]
    assert np.array_equal(data.decode_frames(folder, 4), expected)
    decoded = data.decode_frames(tmp_path / "clip.mp4", 4).astype(int)
    assert np.abs(decoded - expected).max() <= 6  # H.264 at crf 8 is near-lossless
    resized = data.resize_frames(data.decode_frames(folder, 4), 16)
    assert resized.shape == (4, 3, 16, 16) and resized.dtype == torch.uint8


def test_demo_videos_are_deterministic_and_captioned():
    first = data.demo_splits({"test": 48}, seed=0)
    again = data.demo_splits({"test": 48}, seed=0)
    assert first == again
    captions = [e["caption"] for e in first["test"]]
    assert len(set(captions)) == 48  # the test split holds every combination once
    rng = np.random.default_rng(7)
    video = data.render_demo_video(rng, ("red", "square", "left"), 16, 32)
    red = (video[..., 0] > 150) & (video[..., 1] < 100)
    columns = [np.nonzero(red[t])[1].mean() for t in (0, 15)]
    assert columns[1] < columns[0] - 5  # it moves left


def _video_folder(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("video0", "video1", "video2"):
        data.write_video(videos / f"{name}.mp4", _solid_frames(6))
    return videos


def test_msrvtt_json_and_csv_readers(tmp_path):
    videos = _video_folder(tmp_path)
    document = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "validate"},
                           {"video_id": "video2", "split": "test"}],
                "sentences": [{"video_id": "video0", "caption": "a cat"}, {"video_id": "video0", "caption": "a kitten"},
                              {"video_id": "video1", "caption": "a dog"}, {"video_id": "video2", "caption": "a bird"}]}
    (tmp_path / "msrvtt.json").write_text(json.dumps(document))
    splits = data.read_msrvtt_json(tmp_path / "msrvtt.json", videos, {})
    assert {s: [e["caption"] for e in examples] for s, examples in splits.items()} == {
        "train": ["a cat", "a kitten"], "validation": ["a dog"], "test": ["a bird"]}
    assert splits["train"][1]["id"] == "video0#1" and splits["train"][1]["video"] == str(videos / "video0.mp4")
    (tmp_path / "pairs.csv").write_text('clip,text\nvideo0.mp4,"a cat, sitting"\nvideo1,a dog\n')
    rows = data.read_caption_csv(tmp_path / "pairs.csv", videos, {"video": "clip", "caption": "text"})
    assert [(e["video"], e["caption"]) for e in rows] == [(str(videos / "video0.mp4"), "a cat, sitting"),
                                                          (str(videos / "video1.mp4"), "a dog")]
    # predict reads a table laid out like the training card's with that card's `fields`
    (tmp_path / "videos" / "pairs.csv").write_text((tmp_path / "pairs.csv").read_text())
    task = get_task("video-text-retrieval")
    predicted = task.read_inputs([tmp_path / "videos" / "pairs.csv"], task.options(), {"video": "clip", "caption": "text"})
    assert [(e["video"], e["caption"]) for e in predicted] == [(e["video"], e["caption"]) for e in rows]
    # A caption card splits whole videos; the caption task scores each video against all its captions.
    card = _write_card(tmp_path, {"name": "t", "domain": "video_text", "task": "video-caption", "format": "msrvtt_json",
                                  "files": {"annotations": "msrvtt.json"}, "video_root": "videos"})
    words = get_task("video-caption").options(caption_tokenizer="words")  # reading needs no Java
    dataset = get_task("video-caption").read(read_card(card), words)
    assert len(dataset.splits["train"]) == 2 and dataset.splits["test"][0]["references"] == ["a bird"]


def test_msrvtt_json_splits_lose_no_video_and_hold_out_validation_videos(tmp_path):
    """A file whose videos give train and test holds validation out of train's videos;
    videos without a split beside videos with one, an unknown split name, and ratios
    beside the file's splits are refused (each lost data or settings silently)."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for number in range(12):
        data.write_video(videos / f"video{number}.mp4", _solid_frames(4))

    def card_for(split_of: dict[int, str | None], **splits) -> str:
        document = {"videos": [{"video_id": f"video{n}", **({"split": split} if split else {})} for n, split in split_of.items()],
                    "sentences": [{"video_id": f"video{n}", "caption": f"clip {n} take {k}"} for n in split_of for k in range(2)]}
        (tmp_path / "msrvtt.json").write_text(json.dumps(document))
        header = {"name": "t", "domain": "video_text", "task": "video-text-retrieval", "format": "msrvtt_json",
                  "files": {"annotations": "msrvtt.json"}, "video_root": "videos", **({"splits": splits} if splits else {})}
        return _write_card(tmp_path, header)

    task = get_task("video-text-retrieval")
    card = card_for({n: "train" if n < 10 else "test" for n in range(12)}, validation_fraction=0.2, seed=3)
    dataset = task.read(read_card(card), task.options())
    by_split = {split: {e["video_id"] for e in examples} for split, examples in dataset.splits.items()}
    assert {split: len(ids) for split, ids in by_split.items()} == {"train": 8, "validation": 2, "test": 2}
    assert by_split["test"] == {"video10", "video11"} and not by_split["train"] & by_split["validation"]
    assert sum(len(examples) for examples in dataset.splits.values()) == 24  # every caption kept
    assert any(note.startswith("validation: 4 training captions (whole videos) held out") for note in dataset.notes)
    for split_of, message in [
        ({n: "train" if n < 8 else None for n in range(12)},
         r"msrvtt\.json: 4 of 12 videos have no `split` \(e\.g\. 'video8'\); give every video a split, or none"),
        ({n: "dev" if n == 5 else "train" for n in range(12)},
         r"msrvtt\.json: videos\[5\] has split 'dev'; a video's split is one of train, validate, validation, val, "
         r"test \(or leave `split` out of every video\)"),
    ]:
        with pytest.raises(UserError, match=message):
            task.read(read_card(card_for(split_of)), task.options())
    card = card_for({n: "train" if n < 10 else "test" for n in range(12)}, ratios={"train": 0.5, "test": 0.5})
    with pytest.raises(UserError, match=r"card\.md: splits\.ratios: the annotations give every video a split; leave ratios out"):
        task.read(read_card(card), task.options())


def _msrvtt_file(folder: Path, split_of: dict[str, str | None], keys=("video_id", "caption")) -> Path:
    """An MSR-VTT-style file listing `split_of`'s videos (a `split` where one is given), two captions each."""
    video_key, caption_key = keys
    document = {"videos": [{video_key: video, **({"split": split} if split else {})} for video, split in split_of.items()],
                "sentences": [{video_key: video, caption_key: f"{video} take {take}"} for video in split_of for take in (0, 1)]}
    path = folder / "msrvtt.json"
    path.write_text(json.dumps(document))
    return path


def test_msrvtt_json_split_refusals_are_one_exact_line(tmp_path):
    videos = _video_folder(tmp_path)
    annotations = str(tmp_path / "msrvtt.json")
    for split_of, message in [
        ({"video0": "train", "video1": None, "video2": None},
         f"{annotations}: 2 of 3 videos have no `split` (e.g. 'video1'); give every video a split, or none, so that "
         f"the card's splits.ratios split whole videos"),
        ({"video0": "train", "video1": "dev", "video2": "test"},
         f"{annotations}: videos[1] has split 'dev'; a video's split is one of train, validate, validation, val, test "
         f"(or leave `split` out of every video)"),
        # "all" once stood for "no split given" inside the reader; in a file it is no split name
        ({"video0": "train", "video1": "all", "video2": "test"},
         f"{annotations}: videos[1] has split 'all'; a video's split is one of train, validate, validation, val, test "
         f"(or leave `split` out of every video)"),
    ]:
        with pytest.raises(UserError) as refused:
            data.read_msrvtt_json(_msrvtt_file(tmp_path, split_of), videos, {})
        assert str(refused.value) == message
    # MSR-VTT's own names, and every video without a split: nothing is lost
    official = data.read_msrvtt_json(_msrvtt_file(tmp_path, {"video0": "train", "video1": "validate", "video2": "test"}),
                                     videos, {})
    assert {split: [e["id"] for e in examples] for split, examples in official.items()} == {
        "train": ["video0#0", "video0#1"], "validation": ["video1#0", "video1#1"], "test": ["video2#0", "video2#1"]}
    unsplit = data.read_msrvtt_json(_msrvtt_file(tmp_path, dict.fromkeys(["video0", "video1", "video2"])), videos, {})
    assert list(unsplit) == ["all"] and len(unsplit["all"]) == 6


def test_msrvtt_json_refuses_blank_captions_and_conflicting_splits_and_notes_uncaptioned_videos(tmp_path):
    """The CSV reader refuses an empty caption; the JSON reader refused neither null (read
    as the caption "None") nor "", and let a video's second `split` win unannounced."""
    videos = _video_folder(tmp_path)
    path = tmp_path / "msrvtt.json"
    listed = [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"}]
    for caption, what in [(None, "null"), ("  ", "empty"), (["a cat"], "not text (['a cat'])")]:
        path.write_text(json.dumps({"videos": listed, "sentences": [
            {"video_id": "video0", "caption": "a cat"}, {"video_id": "video1", "caption": caption}]}))
        with pytest.raises(UserError) as refused:
            data.read_msrvtt_json(path, videos, {})
        assert str(refused.value) == f"{path}: sentences[1] (video 'video1'): 'caption' is {what}; fill it or remove the sentence"
    twice = [*listed, {"video_id": "video2", "split": "train"}, {"video_id": "video0", "split": "test"}]
    path.write_text(json.dumps({"videos": twice, "sentences": [{"video_id": "video0", "caption": "a cat"}]}))
    with pytest.raises(UserError) as refused:
        data.read_msrvtt_json(path, videos, {})
    assert str(refused.value) == (f"{path}: videos[3] lists video 'video0' with split test, but videos[0] with split "
                                  f"train; a video belongs to one split: keep one of the two entries")
    # the same split twice (MSR-VTT's `validate` is `validation`) is one video; videos listed
    # without a caption are left out, and said so
    same = [*listed, {"video_id": "video2", "split": "validate"}, {"video_id": "video2", "split": "validation"},
            {"video_id": "video0", "split": "train"}]
    path.write_text(json.dumps({"videos": same, "sentences": [{"video_id": "video0", "caption": "a cat"}]}))
    notes: list[str] = []
    splits = data.read_msrvtt_json(path, videos, {}, notes=notes)
    assert {split: [e["id"] for e in examples] for split, examples in splits.items()} == {"train": ["video0#0"]}
    assert notes == ["msrvtt.json: 2 of the 3 videos listed have no captions (e.g. 'video1'); they are left out"]
    path.write_text('{"sentences": [{"video_id": "video0", "caption": "a cat", "caption": "a dog"}]}')
    with pytest.raises(UserError) as refused:  # json keeps the last value: "a dog", silently
        data.read_msrvtt_json(path, videos, {})
    assert str(refused.value) == f"{path}: an object names the key 'caption' twice; keep the one meant"
    card = _write_card(tmp_path, {"name": "t", "domain": "video_text", "task": "video-text-retrieval",
                                  "format": "msrvtt_json", "files": {"annotations": "msrvtt.json"}, "video_root": "videos"})
    path.write_text(json.dumps({"videos": listed, "sentences": [{"video_id": "video0", "caption": f"take {k}"}
                                                                for k in range(2)]}))
    task = get_task("video-text-retrieval")
    assert task.read(read_card(card), task.options()).notes[0] == (
        "msrvtt.json: 1 of the 2 videos listed has no captions (e.g. 'video1'); it is left out")


def test_msrvtt_json_file_splits_hold_out_whole_training_videos_for_validation(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    split_of = {f"video{n}": "train" if n < 20 else "test" for n in range(24)}
    for video in split_of:
        data.write_video(videos / f"{video}.mp4", _solid_frames(2, size=8))
    _msrvtt_file(tmp_path, split_of)
    task = get_task("video-text-retrieval")

    def read(**splits):
        header = {"name": "t", "domain": "video_text", "task": "video-text-retrieval", "format": "msrvtt_json",
                  "files": {"annotations": "msrvtt.json"}, "video_root": "videos", **({"splits": splits} if splits else {})}
        return task.read(read_card(_write_card(tmp_path, header)), task.options())

    held = read()  # validation_fraction defaults to 0.1: 2 of train's 20 videos, with both their captions
    videos_of = {split: [e["video_id"] for e in examples] for split, examples in held.splits.items()}
    assert {split: len(set(ids)) for split, ids in videos_of.items()} == {"train": 18, "validation": 2, "test": 4}
    assert {split: len(ids) for split, ids in videos_of.items()} == {"train": 36, "validation": 4, "test": 8}
    assert sorted(sum(videos_of.values(), [])) == sorted(v for v in split_of for _ in (0, 1))  # each caption once
    assert not set(videos_of["train"]) & set(videos_of["validation"])
    assert set(videos_of["test"]) == {"video20", "video21", "video22", "video23"}  # test untouched
    assert held.notes == ["validation: 4 training captions (whole videos) held out (splits.validation_fraction=0.1, "
                          "seed 0); test is untouched"]
    assert read(seed=1).splits["validation"] != held.splits["validation"]  # drawn with splits.seed
    none_held = read(validation_fraction=0)
    assert {split: len(examples) for split, examples in none_held.splits.items()} == {"train": 40, "test": 8}
    assert none_held.notes == []


def test_predict_reads_the_training_table_with_the_run_cards_fields(tmp_path, capsys):
    """The very table a run trained on, its columns mapped by the card's `fields`, is read
    by `peftlab predict RUN table.csv` as training read it: each row its own caption."""
    videos = _video_folder(tmp_path)
    table = videos / "pairs.csv"  # beside its videos, where predict looks for them
    pairs = [("video0", "a cat, sitting"), ("video1", "a dog"), ("video2", "a bird"), ("video0", "a kitten")]
    table.write_text("clip,text\n" + "".join(f'{video},"{caption}"\n' for video, caption in pairs))
    card = _write_card(tmp_path, {"name": "t", "domain": "video_text", "task": "video-text-retrieval", "format": "csv",
                                  "files": {"data": "videos/pairs.csv"}, "video_root": "videos",
                                  "fields": {"video": "clip", "caption": "text"}, "splits": {"ratios": {"train": 1.0}}})
    run_dir, predictions = tmp_path / "run", tmp_path / "predictions.jsonl"
    assert main(["run", "video-text-retrieval", "--demo", "--data", card, "--out", str(run_dir), "eval.splits=[train]",
                 "train.epochs=1", "task.frames=2", "task.feature_cache=off"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run_dir), str(table), "--out", str(predictions)]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [(row["id"], row["caption"]) for row in rows] == [
        ("video0#0", "a cat, sitting"), ("video1#0", "a dog"), ("video2#0", "a bird"), ("video0#1", "a kitten")]
    assert [Path(row["video"]).name for row in rows] == ["video0.mp4", "video1.mp4", "video2.mp4", "video0.mp4"]
    # a JSON file laid out as the card's fields say is read alike; predict embeds every
    # pair, so the videos' splits (a training matter) are not read and refuse nothing
    _msrvtt_file(videos, {"video0": "train", "video1": None}, keys=("clip", "text"))
    task = get_task("video-text-retrieval")
    from_json = task.read_inputs([videos / "msrvtt.json"], task.options(), {"video": "clip", "caption": "text"})
    assert [(e["id"], e["caption"]) for e in from_json] == [
        ("video0#0", "video0 take 0"), ("video0#1", "video0 take 1"), ("video1#0", "video1 take 0"),
        ("video1#1", "video1 take 1")]
    # captioning finds the videos in the mapped column too (and reads no label to score)
    captioned = get_task("video-caption").read_inputs([table], None, {"video": "clip", "caption": "text"})
    assert [(Path(e["video"]).name, "label" in e) for e in captioned] == [
        ("video0.mp4", False), ("video1.mp4", False), ("video2.mp4", False), ("video0.mp4", False)]


def test_missing_and_undecodable_videos_stop_with_their_name(tmp_path, capsys):
    videos = _video_folder(tmp_path)
    (videos / "broken.mp4").write_bytes(b"this is not a video" * 50)
    (tmp_path / "missing.csv").write_text("video,caption\nvideo0,a cat\nnot_there,a ghost\n")
    with pytest.raises(UserError, match=r"missing.csv:3: video 'not_there' not found"):
        data.read_caption_csv(tmp_path / "missing.csv", videos, {})
    with pytest.raises(UserError, match=r"broken.mp4: cannot be decoded as a video"):
        data.decode_frames(videos / "broken.mp4", 4)
    rows = "video,caption\n" + "".join(f"video{i % 3},caption {i}\n" for i in range(9)) + "broken,a broken one\n"
    (tmp_path / "broken.csv").write_text(rows)
    card = _write_card(tmp_path, {"name": "t", "domain": "video_text", "task": "video-text-retrieval", "format": "csv",
                                  "files": {"data": "broken.csv"}, "video_root": "videos",
                                  "splits": {"ratios": {"train": 1.0}}})
    out = tmp_path / "run"
    code = main(["run", "video-text-retrieval", "--demo", "--data", card, "--out", str(out),
                 "eval.splits=[train]", "train.epochs=1", "train.batch_size=16", "task.feature_cache=off"])
    # (the progress bar, cut short, shares the terminal line the error starts on)
    errors = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert code == 2 and len(errors) == 1 and "broken.mp4: cannot be decoded" in errors[0], errors
    assert not out.exists()  # nothing half-written


def test_card_validate_decodes_every_video_once_and_names_one_that_cannot_be(tmp_path, capsys, monkeypatch):
    """Training decodes a validation video only at the first evaluation: reading the card
    decodes each video, so `card validate` (and the run, before training) names a broken
    one. A video that decoded is remembered by its path, size and modification time, so
    validating and then running does not decode it twice."""
    monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path / "cache"))
    videos = _video_folder(tmp_path)
    whole = (videos / "video2.mp4").read_bytes()
    (videos / "video2.mp4").write_bytes(whole[:len(whole) // 3])  # a download cut short
    (tmp_path / "pairs.csv").write_text("video,caption\n" + "".join(f"video{i % 3},caption {i}\n" for i in range(9)))
    card = _write_card(tmp_path, {"name": "t", "domain": "video_text", "task": "video-text-retrieval", "format": "csv",
                                  "files": {"data": "pairs.csv"}, "video_root": "videos",
                                  "splits": {"ratios": {"train": 0.67, "test": 0.33}}})
    assert main(["card", "validate", card]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {videos / 'video2.mp4'}: cannot be decoded as a video ("), errors
    assert errors[0].endswith("re-encode it (e.g. ffmpeg -i in -c:v libx264 out.mp4) or remove it")
    (videos / "video2.mp4").write_bytes(whole)
    decoded = []
    decode = data.decode_frames
    monkeypatch.setattr(data, "decode_frames", lambda video, count: decoded.append(Path(video).name) or decode(video, count))
    for overrides, expected in [([], ["video0.mp4", "video1.mp4", "video2.mp4"]), ([], []),
                                (["task.frames=2"], ["video0.mp4", "video1.mp4", "video2.mp4"]),  # frames of a folder differ
                                (["task.feature_cache=off"], ["video0.mp4", "video1.mp4", "video2.mp4"])]:
        decoded.clear()
        assert main(["card", "validate", card, *overrides]) == 0, capsys.readouterr().err
        assert sorted(decoded) == expected
    data.write_video(videos / "video1.mp4", _solid_frames(3))  # changed since: decoded again
    decoded.clear()
    assert main(["card", "validate", card]) == 0 and decoded == ["video1.mp4"]
    # remembered with the frame features, in the folder the user names for them
    decoded.clear()
    assert main(["card", "validate", card, f"task.feature_cache={tmp_path / 'mine'}"]) == 0 and len(decoded) == 3
    assert len(list((tmp_path / "mine" / "decoded_videos").iterdir())) == 3
    # a cache that cannot be written (a file in its way) remembers nothing, and reading goes on
    (tmp_path / "blocked").write_text("")
    assert main(["card", "validate", card, f"task.feature_cache={tmp_path / 'blocked' / 'cache'}"]) == 0, \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- feature cache


def test_frame_feature_cache_equals_fresh_features_and_is_reused(tmp_path):
    task = get_task("video-text-retrieval")
    options = task.options(frames=4, feature_cache=str(tmp_path / "features"))
    examples = data.demo_splits({"train": 12}, seed=0)["train"]
    model = task.build_model("tiny", [], options)
    model.backbone = methods.apply(model.backbone, "temporal_adapter")  # the image tower stays frozen
    assert model.vision_frozen()
    first = model.collate(examples, rng=None)["frame_features"]
    with torch.no_grad():
        fresh = model.backbone.base_model.encode_frames(model.pixels([e["video"] for e in examples]))
    torch.testing.assert_close(first, fresh, atol=1e-6, rtol=1e-6)
    assert model.feature_cache.stats["encoded"] == 12
    decoded = model.frame_store.decoded
    for _epoch in range(2):  # later epochs: no decoding, no encoding
        for start in range(0, 12, 4):
            model.collate(examples[start:start + 4], rng=None)
    assert model.feature_cache.stats["encoded"] == 12 and model.frame_store.decoded == decoded
    # Another run (or method) on the same backbone and frames reads the files back.
    other = task.build_model("tiny", [], options)
    other.backbone = methods.apply(other.backbone, "lora", target_modules=r"clip\.transformer\.resblocks\.\d+\.mlp\.c_fc")
    assert other.vision_frozen()
    assert torch.equal(other.collate(examples, rng=None)["frame_features"], first)
    assert other.feature_cache.stats == {"encoded": 0, "from_disk": 12, "from_memory": 0}
    # A method inside the image tower makes it trainable: pixels, no cache.
    tuned = task.build_model("tiny", [], options)
    tuned.backbone = methods.apply(tuned.backbone, "lora", **task.default_method_options("lora", tuned))
    assert not tuned.vision_frozen() and "pixels" in tuned.collate(examples[:2], rng=None)
    # Another frame count is another cache folder.
    four, eight = (task.build_model("tiny", [], task.options(frames=f, feature_cache=str(tmp_path))) for f in (4, 8))
    assert four.feature_cache.directory != eight.feature_cache.directory


# ----------------------------------------------------------------------------- metrics


def test_retrieval_metrics_on_a_hand_computed_matrix():
    # captions 0, 1 -> video 0; caption 2 -> video 1; caption 3 -> video 2
    video_of_caption = np.array([0, 0, 1, 2])
    similarity = np.array([[0.9, 0.1, 0.2],    # rank 1
                           [0.3, 0.8, 0.1],    # rank 2
                           [0.5, 0.5, 0.1],    # tie with video 0: counts against, rank 2
                           [0.7, 0.6, 0.2]])   # rank 3
    names = ["t2v_r1", "t2v_r5", "median_rank", "mean_rank", "v2t_r1", "v2t_median_rank", "v2t_mean_rank"]
    result = compute(names, video_of_caption, similarity)
    # v2t, down each video's column: video 0's best caption (0, 0.9) ranks 1; video 1's
    # caption 2 (0.5) is beaten by 0.8 and 0.6: rank 3; video 2's caption 3 (0.2) ties caption 0: rank 2.
    assert result == {"t2v_r1": 0.25, "t2v_r5": 1.0, "median_rank": 2.0, "mean_rank": 2.0,
                      "v2t_r1": 1 / 3, "v2t_median_rank": 2.0, "v2t_mean_rank": 2.0}
    constant = compute(["t2v_r1", "median_rank"], video_of_caption, np.zeros((4, 3)))
    assert constant == {"t2v_r1": 0.0, "median_rank": 3.0}  # a constant scorer is never rewarded by ties


def test_random_ranking_levels_are_what_random_similarities_score_on_average():
    from peftlab.shared.retrieval_metrics import RETRIEVAL_METRICS, random_ranking_levels

    video_of_caption = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5])  # 1 to 4 captions per video
    levels = random_ranking_levels(6, RETRIEVAL_METRICS)
    rng = np.random.default_rng(0)
    draws = [compute(list(RETRIEVAL_METRICS), video_of_caption, rng.random((12, 6))) for _ in range(4000)]
    for name in ("t2v_r1", "t2v_r5", "v2t_r1", "v2t_r5", "mean_rank", "v2t_mean_rank"):
        assert np.mean([d[name] for d in draws]) == pytest.approx(levels[name], abs=0.02), name
    # uniform ranks 1..6 both ways, however many captions each video has
    assert [levels[name] for name in ("t2v_r1", "v2t_r1", "v2t_r5", "t2v_r10", "median_rank", "v2t_median_rank")] == \
        pytest.approx([1 / 6, 1 / 6, 5 / 6, 1.0, 3.5, 3.5])


def test_video_to_text_ranks_each_videos_caption_group_by_its_best_caption():
    """CLIP4Clip's multi-sentence v2t: for a video, each video's captions are one candidate
    scored by the best of them; the other videos' extra captions do not push it down."""
    from peftlab.shared.retrieval_metrics import video_to_text_ranks

    video_of_caption = np.array([0, 0, 1, 1])
    similarity = np.array([[0.7, 0.0],    # video 0's captions against videos 0 and 1
                           [0.1, 0.0],
                           [0.95, 0.5],   # video 1's captions: both beat video 0's best for video 0
                           [0.9, 0.6]])
    # video 0: one group (video 1's, best 0.95) above its best 0.7: rank 2, where ranking
    # all captions would give 3; video 1: its best 0.6 above video 0's group (0.0): rank 1
    assert video_to_text_ranks(video_of_caption, similarity).tolist() == [2, 1]
    assert compute(["v2t_r1", "v2t_mean_rank"], video_of_caption, similarity) == {"v2t_r1": 0.5, "v2t_mean_rank": 1.5}


def test_caption_metrics():
    import sacrebleu

    # coco-caption's Bleu_4 is corpus-level and unsmoothed: with one reference each, sacrebleu's corpus BLEU
    references = ["a red square moves left", "a blue circle moves up slowly", "the green triangle moves down"]
    hypotheses = ["a red square moves right", "a blue circle goes up", "green triangle moves down fast"]
    corpus = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="none", smooth_method="none").score / 100
    assert caption_bleu4(references, hypotheses) == pytest.approx(corpus, abs=1e-8)
    # not a mean of sentence scores: "a blue circle goes up" has no 4-gram match, which zeroes only its sentence
    assert corpus > 0 and sacrebleu.sentence_bleu(hypotheses[1], [references[1]], smooth_method="none").score == 0
    # each hypothesis against all its references, on lower-cased words without punctuation
    assert caption_bleu4([["a cat sits", "a red circle moves left"]], ["A red circle, moves left!"]) == pytest.approx(1.0)
    assert caption_tokens("Café très—bien! A man's car_park") == "café très bien a man's car park"
    assert rouge_l(["a b c d"], ["a b x d"]) == pytest.approx(0.75)  # LCS 3 of 4 both ways
    assert rouge_l([["zzz", "a b c d"]], ["a b c d"]) == pytest.approx(1.0)
    # coco-caption's F-measure: recall weighs beta = 1.2 times precision; no stemming
    assert rouge_l(["a man plays guitars"], ["a man playing guitar"]) == pytest.approx(0.5)
    assert rouge_l(["a b c d"], ["a b"]) == pytest.approx(2.44 * 0.5 / (0.5 + 1.44))  # P 1, R 1/2
    # the best precision and the best recall are taken over the references separately
    assert rouge_l([["a b", "a b x y z w"]], ["a b x"]) == pytest.approx(2.44 * 1 * 1 / (1 + 1.44))
    assert rouge_l(["a cat"], [""]) == 0.0 and rouge_l(["a cat"], ["!!"]) == 0.0  # no words: 0, not a crash
    # words of every script count; Chinese and Japanese, written without spaces, count a character as a word
    assert caption_tokens("一只猫在睡觉。ねこ!") == "一 只 猫 在 睡 觉 ね こ"
    assert rouge_l(["一只猫在睡觉"], ["一只狗在睡觉"]) == pytest.approx(5 / 6)
    # on the same words it is pycocoevalcap's Rouge, exactly
    from pycocoevalcap.rouge.rouge import Rouge

    truth = {0: ["the cats were running quickly", "a cat runs"], 1: ["dont stop x y 3 14"]}
    produced = {0: ["a cat runs quick"], 1: ["don't stop x_y 3.14"]}
    coco, _ = Rouge().compute_score(truth, {k: [caption_tokens(v[0])] for k, v in produced.items()})
    assert rouge_l(list(truth.values()), [v[0] for v in produced.values()]) == pytest.approx(coco, abs=1e-12)
    references = ["a red square moves left", "a blue circle moves up", "a green triangle moves down"]
    perfect, constant = cider(references, references), cider(references, [references[0]] * 3)
    assert perfect > constant > 0


needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="coco-caption's PTB tokeniser runs on Java")

# Captions with what tokenisers disagree on: contractions and possessives, hyphens,
# decimals, brackets, quotes, symbols, a missing space, non-ASCII letters.
TRICKY_REFERENCES = [
    ["A man's playing a guitar.", "a man is playing the guitar on stage", "someone plays guitar"],
    ["The kids don't want to go, they're tired & hungry!", "kids can't sleep"],
    ["a woman in a t-shirt is cooking (pasta) on a 3.5-inch pan", "a lady cooks pasta"],
    ['people say "hello" -- and leave...', "the boys' toys are on the table; 50% of them"],
    ["a café owner pours coffee", "cartoon characters are talking.a dog runs"],
]
DEMO_CAPTIONS = {"name": "t", "domain": "video_text", "task": "video-caption", "format": "demo",
                 "demo": {"train": 2, "validation": 2, "test": 2}}
TRICKY_HYPOTHESES = ["a man is playing a guitar .", "the kids do not want to go", "a woman in a t shirt is cooking pasta",
                     "people say hello and leave", "a cafe owner pours coffee"]


@needs_java
def test_ptb_tokens_are_coco_captions_tokenisation():
    assert ptb_tokens(["A man's playing a guitar.", "The kids don't want to go, they're tired & hungry!",
                       "a woman in a t-shirt is cooking (pasta) on a 3.5-inch pan", "", "Café très—bien"]) == [
        "a man 's playing a guitar", "the kids do n't want to go they 're tired & hungry",
        "a woman in a t-shirt is cooking -lrb- pasta -rrb- on a 3.5-inch pan", "", "café très bien"]
    assert word_tokens(["A man's playing a guitar."]) == ["a man's playing a guitar"]  # what ptb changes
    assert ptb_tokens([]) == []


@needs_java
def test_caption_metrics_on_ptb_tokens_equal_coco_captions_evaluator():
    """pycocoevalcap's own pipeline: its PTBTokenizer, then Bleu(4), Rouge and Cider."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    truth = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in enumerate(TRICKY_REFERENCES)})
    produced = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(TRICKY_HYPOTHESES)})
    bleu, _ = Bleu(4).compute_score(truth, produced, verbose=0)
    assert caption_bleu4(TRICKY_REFERENCES, TRICKY_HYPOTHESES, ptb_tokens) == pytest.approx(bleu[3], abs=1e-12)
    assert cider(TRICKY_REFERENCES, TRICKY_HYPOTHESES, ptb_tokens) == \
        pytest.approx(Cider().compute_score(truth, produced)[0], abs=1e-12)
    assert rouge_l(TRICKY_REFERENCES, TRICKY_HYPOTHESES, ptb_tokens) == \
        pytest.approx(Rouge().compute_score(truth, produced)[0], abs=1e-12)
    # the pure-Python words differ on these captions: the option matters
    assert cider(TRICKY_REFERENCES, TRICKY_HYPOTHESES) != pytest.approx(Cider().compute_score(truth, produced)[0])


@needs_java
def test_caption_task_scores_with_the_tokeniser_its_options_name(tmp_path):
    task = get_task("video-caption")
    examples = [{"id": str(i), "video": f"v{i}", "references": refs} for i, refs in enumerate(TRICKY_REFERENCES)]
    for name, tokenize in (("ptb", ptb_tokens), ("words", word_tokens)):
        stamped = [{**e, "caption_tokenizer": name} for e in examples]
        expected = {"bleu4": caption_bleu4(TRICKY_REFERENCES, TRICKY_HYPOTHESES, tokenize),
                    "rouge_l": rouge_l(TRICKY_REFERENCES, TRICKY_HYPOTHESES, tokenize),
                    "cider": cider(TRICKY_REFERENCES, TRICKY_HYPOTHESES, tokenize)}
        assert task.compute_metrics(["bleu4", "rouge_l", "cider"], stamped, TRICKY_HYPOTHESES) == expected
    # read stamps the evaluated splits with the option
    splits = task.read(read_card(_write_card(tmp_path, DEMO_CAPTIONS)),
                       task.options(caption_tokenizer="words")).splits
    assert {e["caption_tokenizer"] for e in splits["test"] + splits["validation"]} == {"words"}


def test_ptb_without_java_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    card = read_card(_write_card(tmp_path, DEMO_CAPTIONS))
    message = (r"coco-caption's PTB tokeniser \(task\.caption_tokenizer=ptb\) runs on Java, and no `java` is on PATH: "
               r"install a Java runtime \(e\.g\. apt install default-jre-headless\), or set task\.caption_tokenizer=words$")
    with pytest.raises(UserError, match=message):
        get_task("video-caption").read(card, get_task("video-caption").options())
    with pytest.raises(UserError, match=message):
        text_metrics.ptb_tokens(["a caption"])
    with pytest.raises(ValueError, match=r"caption_tokenizer must be one of ptb, words, got 'nltk'"):
        get_task("video-caption").options(caption_tokenizer="nltk")


# ----------------------------------------------------------------------------- methods


def test_temporal_adapter_starts_as_mean_pooling_and_learns_frame_order(tiny_clip):
    torch.manual_seed(0)
    base = VideoCLIP(tiny_clip, num_frames=4)
    adapted = methods.apply(VideoCLIP(load_clip("tiny"), num_frames=4), "temporal_adapter")
    frames = torch.randn(2, 4, base.embed_dim)
    reversed_frames = frames.flip(1)
    with torch.no_grad():
        torch.testing.assert_close(adapted.base_model.encode_video(frames), base.encode_video(frames), atol=0, rtol=0)
        torch.testing.assert_close(base.encode_video(reversed_frames), base.encode_video(frames))  # mean: order-blind
        for param in adapted.method_parameters().values():
            param.add_(torch.randn_like(param) * 0.1)
        forward, backward = adapted.base_model.encode_video(frames), adapted.base_model.encode_video(reversed_frames)
    assert (forward - backward).abs().max() > 1e-3  # the adapter sees the order of the frames


def test_caption_prefix_is_spliced_into_greedy_and_beam_generation(tmp_path):
    task = get_task("video-caption")
    options = task.options(frames=4, feature_cache="off", max_new_tokens=6)
    model = task.build_model("tiny", [], options)
    model.eval()
    examples = data.demo_splits({"validation": 3}, seed=0)["validation"]
    batch = model.collate(examples, rng=None)
    with torch.no_grad():
        logits = model(batch)
        shuffled = dict(batch, frame_features=batch["frame_features"].flip(0))
        assert not torch.allclose(model(shuffled)[0], logits[0])  # the video changes what the LM sees
        together = model.predict(batch)
        one_by_one = [model.predict(model.collate([e], rng=None))[0] for e in examples]
        model.options.num_beams = 2
        beams = model.predict(batch)
    assert together == one_by_one and len(beams) == 3 and all(isinstance(b, str) for b in beams)


# ----------------------------------------------------------------------------- demos


def _demo_run(pipeline, tmp_path, sizes, overrides):
    card = read_card(runner.cfg.resolve_card_path(runner.cfg.read_recipe(pipeline)["demo"]["data"]["card"]))
    header = {k: v for k, v in card.model_dump().items()
              if v is not None and k not in ("card_path", "body", "text", "fields")}
    header["demo"] = {**card.option("demo"), **sizes}
    small = _write_card(tmp_path, header, "smaller demo for tests")
    config = runner.build_config(pipeline, demo=True, data=small, overrides=["eval.splits=[test]", *overrides])
    run_dir = runner.run(config, out=tmp_path / "run")
    results = json.loads((run_dir / "metrics.json").read_text())["test"]
    task = get_task(pipeline)
    return results, task.read(read_card(small), runner.cfg.build_task_options(task, config.task_options))


def test_retrieval_demo_beats_chance_and_the_run_is_reusable(tmp_path, capsys):
    # 48 test videos, one per caption: chance R@1 is 1/48 (about 0.02).
    # 10 epochs: at 6 the margin over chance hung on the tiny CLIP's random init (R@1 0.04
    # to 0.17 as its draws changed); from 10 it held at 0.17 or more over train seeds 0-2
    results, dataset = _demo_run("video-text-retrieval", tmp_path, {"train": 288, "validation": 24, "test": 48},
                                 ["train.epochs=10"])
    chance = 1 / len(dataset.splits["test"])
    assert results["t2v_r1"] >= chance + 0.1 and results["v2t_r1"] >= chance + 0.1, results
    assert results["median_rank"] <= 6, results
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test"] == results  # exactly
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("video,caption\n" + "".join(f"{e['video']},{e['caption']}\n" for e in dataset.splits["test"][:3]))
    from peftlab.pipelines.predictor import load

    predictor = load(run_dir)
    rows = predictor.predict([str(pairs)])
    assert [r["caption"] for r in rows] == [e["caption"] for e in dataset.splits["test"][:3]]
    for row in rows:  # the embeddings are written exactly: read back as float32, they give the similarity
        video, text = (np.asarray(row[f"{kind}_embedding"], dtype=np.float32) for kind in ("video", "text"))
        assert row["similarity"] == float(video @ text)

    # A search: 12 videos given alone and their captions as queries, one per line; each
    # tower embeds its inputs alone as it does in a pair, and each query ranks the videos.
    library = dataset.splits["test"][:12]
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"{e['caption']}\n\n" for e in library))  # blank lines are skipped
    searched = predictor.predict([*(e["video"] for e in library), str(queries)])
    videos, found = searched[:12], searched[12:]
    assert all("text_embedding" not in r and "similarity" not in r for r in videos)
    assert [r["id"] for r in found] == [f"{queries}:{2 * k + 1}" for k in range(12)]  # FILE:LINE, the path as given
    assert [r["caption"] for r in found] == [e["caption"] for e in library]
    for pair, video, query in zip(rows, videos, found):
        assert video["video_embedding"] == pytest.approx(pair["video_embedding"], abs=1e-5)
        assert query["text_embedding"] == pytest.approx(pair["text_embedding"], abs=1e-5)
    ranks = []
    for query, example in zip(found, library):
        top = query["top_videos"]
        assert len(top) == 10 and [t["similarity"] for t in top] == sorted((t["similarity"] for t in top), reverse=True)
        embedding = {v["video"]: v["video_embedding"] for v in videos}[top[0]["video"]]
        assert top[0]["similarity"] == pytest.approx(np.dot(embedding, query["text_embedding"]), abs=1e-5)
        ranked = [t["video"] for t in top]
        ranks.append(ranked.index(example["video"]) + 1 if example["video"] in ranked else 12)
    assert np.mean(ranks) <= 4.5, ranks
    notes = tmp_path / "notes.rtf"
    notes.write_text("a caption")
    with pytest.raises(UserError, match=r"notes.rtf: .*text files of queries \(.txt"):
        predictor.predict([str(notes)])

    # served: queries get the text embeddings predict gives; videos sent as base64 files get
    # predict's video embeddings, and each query ranks them as predict ranks videos given alone
    from peftlab.pipelines.multi_adapter import MultiAdapter

    body = {"queries": {f"q{k}": e["caption"] for k, e in enumerate(library[:4])},
            "videos": {f"v{k}": b64(Path(e["video"]).read_bytes()) for k, e in enumerate(library[:6])}}
    with MultiAdapter([f"clips={run_dir}"]) as multi:
        served = multi.predict_request("clips", body)
        only_queries = multi.predict_request("clips", {"queries": body["queries"]})
        assert multi.summary()[0]["request"].startswith('{"queries": [TEXT, ...] or {ID: TEXT, ...}} and/or {"videos"')
        for bad, message in (({"queries": [""]}, r"queries\[0\]: empty query"),
                             ({"queries": [3]}, r"queries\[0\]: a query's text, not int"),
                             ({}, r'the request needs "queries" \(texts\), "videos" \(base64 video files\) or both'),
                             ({"videos": ["x.mp4"]}, r"videos\[0\]: not valid base64"),
                             ({"videos": {"clip": b64(b"not a video")}}, r"videos\[clip\]: cannot be decoded as a video"),
                             ({"clips": []}, "clips: not a field")):
            with pytest.raises(UserError, match=message):
                multi.predict_request("clips", bad)
    sent_videos, sent_queries = served[:6], served[6:]
    assert [r["id"] for r in sent_videos] == [f"v{k}" for k in range(6)]
    assert [r["id"] for r in sent_queries] == [r["id"] for r in only_queries] == ["q0", "q1", "q2", "q3"]
    for row, video in zip(sent_videos, videos):
        assert row["video"].startswith("upload:") and "text_embedding" not in row
        assert row["video_embedding"] == pytest.approx(video["video_embedding"], abs=1e-5)
    for row, alone, query in zip(sent_queries, only_queries, found):
        assert row["text_embedding"] == pytest.approx(query["text_embedding"], abs=1e-5)
        assert alone["text_embedding"] == row["text_embedding"] and "top_videos" not in alone
        similarity = {v["id"]: float(np.dot(v["video_embedding"], row["text_embedding"])) for v in sent_videos}
        expected = sorted(similarity, key=lambda key: -similarity[key])
        assert [t["id"] for t in row["top_videos"]] == expected
        assert [t["similarity"] for t in row["top_videos"]] == pytest.approx([similarity[k] for k in expected], abs=1e-5)


def test_caption_demo_beats_the_best_constant_caption(tmp_path):
    results, dataset = _demo_run("video-caption", tmp_path, {"train": 480, "validation": 24, "test": 48},
                                 ["train.epochs=8", "task.frames=4"])
    references = [e["references"] for e in dataset.splits["test"]]
    train_captions = Counter(e["label"] for e in dataset.splits["train"])
    baseline = max(caption_bleu4(references, [caption] * len(references)) for caption in train_captions)
    assert results["bleu4"] >= baseline + 0.1, (results, baseline)
    # served: videos sent as base64 files are captioned as predict captions the files
    from peftlab.pipelines.multi_adapter import MultiAdapter
    from peftlab.pipelines.predictor import load

    videos = [e["video"] for e in dataset.splits["test"][:3]]
    from_files = load(tmp_path / "run").predict(videos)
    with MultiAdapter([f"captions={tmp_path / 'run'}"]) as multi:
        served = multi.predict_request("captions", {"videos": [b64(Path(v).read_bytes()) for v in videos]})
        with pytest.raises(UserError, match=r"videos\[0\]: cannot be decoded as a video"):
            multi.predict_request("captions", {"videos": [b64(b"not a video")]})
    assert [r["id"] for r in served] == ["0", "1", "2"]
    assert [r["prediction"] for r in served] == [r["prediction"] for r in from_files]


def test_caption_recipe_pairs_the_tiny_language_model_with_the_tiny_clip():
    """`run video-caption --backbone tiny` must not reach for ViT-B-32 (a download) by recipe."""
    from peftlab.pipelines import config as cfg

    task = get_task("video-caption")
    recipe = {k: v for k, v in cfg.read_recipe("video-caption")["task"].items() if k != "name"}
    model = task.build_model("tiny", [], cfg.build_task_options(task, recipe))
    assert model.backbone_info["vision"]["name"] == "tiny"


def test_max_text_tokens_cuts_captions_as_clip4clip_does():
    """task.max_text_tokens=N (CLIP4Clip: 32): a caption keeps its first N - 2 word
    tokens and its end token, so its embedding is that of the cut caption; shorter
    captions embed as without the cap (zero padding after the end token changes nothing)."""
    task = get_task("video-text-retrieval")
    capped = task.build_model("tiny", [], task.options(max_text_tokens=6))
    whole = task.build_model("tiny", [], task.options())
    long_caption, cut = "a red ball rolls across the green table slowly", "a red ball rolls"
    tokens = capped.tokenize([long_caption, "a cat"])
    assert tokens.shape[1] == TINY_CONFIG["text_cfg"]["context_length"]
    assert torch.equal(tokens[0], whole.tokenize([cut])[0]) and torch.equal(tokens[1], whole.tokenize(["a cat"])[0])
    clip = whole.backbone.clip
    with torch.no_grad():
        embed = lambda t: clip.encode_text(t)  # noqa: E731
        assert torch.equal(embed(tokens[:1]), embed(whole.tokenize([cut])))
        assert not torch.allclose(embed(tokens[:1]), embed(whole.tokenize([long_caption])))
    with pytest.raises(UserError, match=r"task.max_text_tokens is 99, more than the text tower's context of 77 tokens; "
                                        r"set task.max_text_tokens=77 \(or lower\), or task.max_text_tokens=null for "
                                        r"the whole context$"):
        task.build_model("tiny", [], task.options(max_text_tokens=99))
    with pytest.raises(ValueError, match="max_text_tokens must be >= 3"):
        task.options(max_text_tokens=2)
    assert runner.build_config("video-text-retrieval").task["max_text_tokens"] == 32


def test_a_users_card_runs_on_the_tiny_clip_at_the_recipes_caption_length(tmp_path, capsys):
    """`--backbone tiny` is the first offline check of one's own card: the tiny text tower
    has CLIP's context (it had 16 tokens), so the recipe's max_text_tokens (32) fits it."""
    assert TINY_CONFIG["text_cfg"]["context_length"] == 77
    _video_folder(tmp_path)
    rows = "".join(f"video{i % 3},a clip numbered {i} with a caption longer than thirty-two tokens " + "word " * 30 + "\n"
                   for i in range(6))
    (tmp_path / "pairs.csv").write_text("video,caption\n" + rows)
    card = _write_card(tmp_path, {"name": "t", "domain": "video_text", "task": "video-text-retrieval", "format": "csv",
                                  "files": {"data": "pairs.csv"}, "video_root": "videos",
                                  "splits": {"ratios": {"train": 0.67, "test": 0.33}}})
    out = tmp_path / "run"
    code = main(["run", "video-text-retrieval", "--data", card, "--backbone", "tiny", "--out", str(out),
                 "eval.splits=[test]", "train.epochs=1", "task.frames=2", "task.feature_cache=off"])
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load((out / "run.yaml").read_text())["task"]["max_text_tokens"] == 32
    model = get_task("video-text-retrieval").build_model("tiny", [], get_task("video-text-retrieval").options(max_text_tokens=32))
    tokens = model.tokenize([rows.splitlines()[0]])
    assert tokens.shape == (1, 77) and int((tokens[0] != 0).sum()) == 32  # cut at 32, its end token kept


def test_predict_says_which_files_in_a_folder_it_leaves_out(tmp_path):
    """A folder's stray files were passed over without a word; a frame folder's frames are
    read as part of their video, not left out."""
    from peftlab.pipelines.predictor import _left_out_notes
    from PIL import Image

    folder = tmp_path / "videos"
    for name in ("clip0", "clip1"):
        (folder / name).mkdir(parents=True)
        for index in range(3):
            Image.new("RGB", (8, 8)).save(folder / name / f"{index}.png")
    (folder / "captions.txt").write_text("not a video")
    (folder / "extra" / "deeper").mkdir(parents=True)
    (folder / "extra" / "deeper" / "note.md").write_text("x")
    examples = data.video_inputs([folder])
    assert [e["video_id"] for e in examples] == ["clip0", "clip1"]
    assert _left_out_notes([folder], examples, "video-text-retrieval") == [
        f"2 files in {folder} left out: not video-text-retrieval inputs (e.g. captions.txt)"]
    frames = data.video_inputs([folder / "clip0"])  # one frame folder given: its frames are the video
    assert _left_out_notes([folder / "clip0"], frames, "video-text-retrieval") == []
    # a file given itself is read, though inside a folder given too; a folder given twice is noted once
    assert _left_out_notes([folder / "captions.txt", folder, folder], examples, "video-text-retrieval") == [
        f"1 file in {folder} left out: not video-text-retrieval inputs (e.g. extra/deeper/note.md)"]
