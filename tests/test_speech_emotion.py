"""speech-emotion: backbones, padding, PEFT-SER's methods, audio I/O, splits, reports,
learning on the synthetic demo, and (with real assets) Whisper-base on Emo-DB."""

from __future__ import annotations

import copy
import json
import time

import numpy as np
import pytest
import soundfile
import torch
from conftest import REPO
from peftlab.domains.speech_emotion import backbones, data, wavlm_attention
from peftlab.domains.speech_emotion.tasks import SpeechEmotionOptions, SpeechEmotionTask
from peftlab.shared import methods
from peftlab.shared.cards import read_card
from peftlab.shared.errors import UserError
from test_methods_contract import test_task_model_contract as task_model_contract
from transformers.models.wavlm.modeling_wavlm import WavLMAttention

TASK = SpeechEmotionTask()
DEMO_CARD = REPO / "data_cards" / "speech-emotion-demo.md"
LABELS = data.DEMO_LABELS


def tone(seconds: float, rate: int, frequency: float = 220.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def model_for(backbone: str, **options):
    return TASK.build_model(backbone, LABELS, SpeechEmotionOptions(**options))


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread buys nothing, and on a shared
    machine OpenMP's spinning threads slow every small op many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("name", list(backbones.TINY_PRESETS))
def test_tiny_presets_are_seeded_and_respect_padding(name):
    """Same weights every build; a clip's pooled logits are the same alone or padded in a batch."""
    first, second = model_for(name, head_dropout=0.0), model_for(name, head_dropout=0.0)
    assert first.backbone_info["weights_sha256"] == second.backbone_info["weights_sha256"]
    assert first.backbone_info["family"] == backbones.TINY_PRESETS[name]
    first.eval()
    short = {"id": "a", "audio": tone(0.6, 16000), "samples": 9600, "sample_rate": 16000}
    long = {"id": "b", "audio": tone(1.0, 16000, 330.0), "samples": 16000, "sample_rate": 16000}
    with torch.no_grad():
        batch = first.collate([short, long], rng=None)
        alone = first(first.collate([short], rng=None))
        together = first(batch)
    # the frame mask comes from the sample lengths through the model's own length formula
    _, mask = first.backbone(batch["inputs"], batch["lengths"])
    per_sample = [9600 // 160, 16000 // 160] if name == "tiny_whisper" else [9600, 16000]  # mel frames or samples
    assert batch["lengths"].tolist() == per_sample
    expected = [30, 50] if name == "tiny_whisper" else [29, 49]  # 50 frames per second
    assert mask.sum(1).tolist() == expected == first.encoder().frame_lengths(batch["lengths"]).tolist()
    # Whisper's convolutions see one padded mel frame at the edge; the others are exact
    tolerance = 5e-2 if name == "tiny_whisper" else 1e-4
    torch.testing.assert_close(together[0], alone[0], atol=tolerance, rtol=0)


def test_whisper_on_actual_length_matches_transformers_at_30_seconds():
    """Our length-agnostic Whisper forward is transformers' own at its fixed 3000 frames."""
    encoder, _ = backbones.load_backbone("tiny_whisper")
    encoder.eval()
    features = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states, mask = encoder(features, torch.tensor([3000, 3000]))
        reference = encoder.network(features).last_hidden_state
    assert states.shape == (3, 2, 1500, 64) and mask.all()
    torch.testing.assert_close(states[-1], reference, atol=1e-5, rtol=1e-5)


def test_wavlm_attention_calls_its_projections_and_matches_transformers():
    encoder, _ = backbones.load_backbone("tiny_wavlm")
    encoder.eval()
    original = copy.deepcopy(encoder)
    for module in original.modules():
        if isinstance(module, wavlm_attention.ModuleCallingWavLMAttention):
            module.__class__ = WavLMAttention  # transformers' F.multi_head_attention_forward path
    featurized = encoder.featurize([tone(0.7, 16000), tone(1.0, 16000, 300.0)])
    with torch.no_grad():
        ours, _ = encoder(featurized.inputs, featurized.lengths)
        theirs, _ = original(featurized.inputs, featurized.lengths)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # so LoRA on WavLM's attention is not silently inert
    adapted = methods.apply(encoder, "lora", target_modules=["q_proj", "v_proj"], blocks=encoder.blocks_path)
    with torch.no_grad():
        for name, param in adapted.method_parameters().items():
            if "lora_B" in name:
                param.normal_()
        changed, _ = adapted(featurized.inputs, featurized.lengths)
    assert (changed[-1] - ours[-1]).abs().max() > 1e-2


def test_offline_unknown_backbone_names_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(UserError, match=r"'microsoft/wavlm-base-plus' is not available offline.*cache.*--backbone /path"):
        backbones.load_backbone("microsoft/wavlm-base-plus")
    with pytest.raises(UserError, match="unknown speech backbone 'wavlm'"):
        backbones.load_backbone("wavlm")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="needs config.json"):
        backbones.load_backbone(str(tmp_path / "folder"))


# --------------------------------------------------------------------------- methods
def test_speech_prompt_contract_and_placement(tmp_path):
    # the method contract (only prompt + head train, save -> load exact, no merge) on
    # the task's tiny model: the generic contract test lists methods before domains load
    task_model_contract("speech_prompt", "speech-emotion", tmp_path)
    for name in ("tiny_wav2vec2", "tiny_whisper"):
        model = model_for(name)
        model.eval()
        batch = model.collate([{"id": "a", "audio": tone(0.8, 16000), "samples": 12800, "sample_rate": 16000}], rng=None)
        with torch.no_grad():
            base_states, base_mask = model.backbone(batch["inputs"], batch["lengths"])
        model.backbone = methods.apply(model.backbone, "speech_prompt", length=5)
        assert set(model.backbone.method_parameters()) == {"speech_prompt.vectors"}
        with torch.no_grad():
            states, mask = model.backbone(batch["inputs"], batch["lengths"])
        # prompt positions are removed again: same frames, same mask, different context
        assert states.shape == base_states.shape and torch.equal(mask, base_mask)
        if name == "tiny_whisper":  # state 0 is the input frames themselves (wav2vec 2.0's
            torch.testing.assert_close(states[0], base_states[0])  # passed its positional conv)
        assert (states[-1] - base_states[-1]).abs().max() > 1e-4


def test_speech_prompt_every_layer_gives_each_layer_fresh_vectors():
    """PEFT-SER's code: each layer gets its own k vectors in front of its input (the
    task's default). The entry sees the audio alone, and a layer's vectors change that
    layer's output and the later ones, never the earlier ones."""
    for name in ("tiny_wavlm", "tiny_wav2vec2", "tiny_whisper"):
        model = model_for(name)
        model.eval()
        batch = model.collate([{"id": "a", "audio": tone(0.8, 16000), "samples": 12800, "sample_rate": 16000}], rng=None)
        with torch.no_grad():
            base_states, base_mask = model.backbone(batch["inputs"], batch["lengths"])
        options = TASK.default_method_options("speech_prompt", model)
        assert options == {"placement": "every_layer"}
        model.backbone = methods.apply(model.backbone, "speech_prompt", length=4, **options)
        encoder = model.encoder()
        vectors = encoder.speech_prompt.vectors
        assert vectors.shape == (encoder.num_layers, 4, encoder.width)
        assert sum(p.numel() for p in model.backbone.method_parameters().values()) == encoder.num_layers * 4 * encoder.width
        with torch.no_grad():
            states, mask = model.backbone(batch["inputs"], batch["lengths"])
            assert states.shape == base_states.shape and torch.equal(mask, base_mask)
            torch.testing.assert_close(states[0], base_states[0], rtol=0, atol=0)  # the entry: audio alone
            assert (states[1] - base_states[1]).abs().max() > 1e-4  # layer 0 sees its prompt
            vectors[1].copy_(torch.randn(vectors[1].shape, generator=torch.Generator().manual_seed(0)) * 5)
            moved, _ = model.backbone(batch["inputs"], batch["lengths"])
        assert torch.equal(moved[:2], states[:2])  # the entry and layer 0
        assert (moved[2] - states[2]).abs().max() > 1e-5  # layer 1 and on
    with pytest.raises(UserError, match="speech_prompt.: placement must be every_layer or input, got .deep."):
        methods.apply(model_for("tiny_wavlm").backbone, "speech_prompt", placement="deep")


def test_default_method_options_follow_peft_ser():
    for name, feed_forward in (("tiny_wavlm", "feed_forward.output_dense"), ("tiny_whisper", "fc2")):
        model = model_for(name)
        lora = TASK.default_method_options("lora", model)
        model.backbone = methods.apply(model.backbone, "lora", **lora)
        targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in model.backbone.method_parameters()}
        assert targets == ({"intermediate_dense", "output_dense"} if name == "tiny_wavlm" else {"fc1", "fc2"})
        assert TASK.default_method_options("adapter", model)["target_modules"] == [feed_forward]


# --------------------------------------------------------------------------- audio and cards
def write_corpus(root, rows, rate=22050):
    """rows: (file name, label, speaker, gender); a stereo tone per file."""
    lines = ["file,emotion,speaker_id,sex"]
    for index, (name, label, speaker, gender) in enumerate(rows):
        mono = tone(0.5 + 0.1 * (index % 3), rate, 200 + 20 * index)
        stereo = np.stack([mono, 0.5 * mono], axis=1)
        soundfile.write(root / name, stereo, rate)
        lines.append(f"{name},{label},{speaker},{gender}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def write_card(root, extra=""):
    card = root / "card.md"
    card.write_text(f"""---
name: toy
domain: speech_emotion
task: speech-emotion
format: audio_csv
files: {{data: labels.csv}}
fields: {{path: file, label: emotion, speaker: speaker_id, gender: sex}}
labels: [neutral, happy, angry, sad]
group_by: gender
{extra}
---
toy corpus
""")
    return read_card(card)


def toy_rows(speakers=6, per_speaker=4, suffix=".wav"):
    return [(f"s{s}_{i}{suffix if i % 2 else '.flac'}", LABELS[i % 4], f"s{s}", "female" if s % 2 else "male")
            for s in range(speakers) for i in range(per_speaker)]


def test_audio_csv_reads_resamples_and_splits_by_speaker(tmp_path):
    write_corpus(tmp_path, toy_rows())
    dataset = TASK.read(write_card(tmp_path, "splits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 3}"),
                        SpeechEmotionOptions())
    speakers = {split: {e["speaker"] for e in rows} for split, rows in dataset.splits.items()}
    assert all(speakers.values()) and not (speakers["train"] & speakers["test"]) \
        and not (speakers["train"] & speakers["validation"]) and not (speakers["validation"] & speakers["test"])
    example = dataset.splits["train"][0]
    assert example["sample_rate"] == 22050 and example["group"] in ("female", "male")
    total = sum(len(rows) for rows in dataset.splits.values())
    assert f"clips by sample rate (22050 Hz: {total}) are resampled to the encoder's sampling rate as they are read" \
        in dataset.notes
    assert f"{total} clips ({total} with 2 channels) are mixed down to mono (the channels' mean)" in dataset.notes
    # mono mix-down of (x, x/2) is 0.75 x; resampled to 16 kHz the tone keeps its pitch
    model = model_for("tiny_wav2vec2")
    waveform = model.waveform(example, rng=None)
    assert len(waveform) == pytest.approx(example["samples"] * 16000 / 22050, abs=1)
    spectrum = np.abs(np.fft.rfft(waveform))
    index = int(example["id"].split("_")[1].split(".")[0]) + 4 * int(example["speaker"][1:])
    assert np.fft.rfftfreq(len(waveform), 1 / 16000)[spectrum.argmax()] == pytest.approx(200 + 20 * index, abs=3)
    assert np.abs(waveform).max() == pytest.approx(0.75 * 0.3, rel=0.02)
    assert dataset.labels == LABELS and {e["label"] for e in dataset.splits["train"]} <= {0, 1, 2, 3}


def test_a_speaker_given_two_genders_is_noted(tmp_path):
    rows = toy_rows()
    rows[1] = (*rows[1][:3], "female" if rows[1][3] == "male" else "male")  # speaker s0's second clip
    write_corpus(tmp_path, rows)
    notes = TASK.read(write_card(tmp_path, "splits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 3}"),
                      SpeechEmotionOptions()).notes
    assert "1 speaker is given more than one gender (e.g. s0: female, male); their clips count under each in " \
           "per-gender results: fix the gender column" in notes
    write_corpus(tmp_path, toy_rows())
    assert not any("more than one gender" in note for note in TASK.read(write_card(tmp_path), SpeechEmotionOptions()).notes)


def test_clips_without_a_speaker_are_each_a_speaker_of_their_own(tmp_path):
    """Empty speaker cells are not one speaker "" whose clips move between splits as a
    block (half the corpus in one split); a note says the split cannot keep them apart."""
    rows = [(name, label, speaker if index % 2 else "", gender)
            for index, (name, label, speaker, gender) in enumerate(toy_rows(speakers=8))]
    write_corpus(tmp_path, rows)
    dataset = TASK.read(write_card(tmp_path, "splits: {ratios: {train: 0.5, validation: 0.25, test: 0.25}, seed: 0}"),
                        SpeechEmotionOptions())
    sizes = {split: len(examples) for split, examples in dataset.splits.items()}
    assert all(abs(sizes[split] - wanted) <= 2 for split, wanted in (("train", 16), ("validation", 8), ("test", 8))), sizes
    assert f"16 clips have an empty speaker cell (e.g. {tmp_path / 'labels.csv'}:2): each is split as a speaker of " \
           f"its own, so if some are one speaker's, they may be in train and test" in dataset.notes
    named = {split: {e["speaker"] for e in examples if not e["speaker"].startswith("(none")}
             for split, examples in dataset.splits.items()}
    assert not (named["train"] & named["test"]) and not (named["train"] & named["validation"])
    # a hold-out note names the speakers it held out and counts the clips without one
    from peftlab.domains.speech_emotion.tasks import _held_out_note
    from peftlab.shared.data import group_cell

    held_out = [{"speaker": group_cell(cell, f"t.csv:{i}")} for i, cell in enumerate(["s1", "", " ", "s0"])]
    assert _held_out_note(held_out, 0.25, "test is untouched") == (
        "validation: 4 training clips held out (speakers s0, s1, 2 clips without a speaker; "
        "splits.validation_fraction=0.25); test is untouched")


def test_card_validate_describes_the_crop_a_run_makes(tmp_path, capsys):
    """The recipe crops from the start (PEFT-SER's); validate said the task's defaults
    (random in training, center at evaluation), which no run used."""
    from peftlab.pipelines.cli import main

    write_corpus(tmp_path, toy_rows())
    soundfile.write(tmp_path / "long.wav", tone(7.0, 16000), 16000)
    with open(tmp_path / "labels.csv", "a") as table:
        table.write("long.wav,happy,s9,male\n")
    card = write_card(tmp_path, "splits: {ratios: {train: 0.6, validation: 0.2, test: 0.2}, seed: 3}").card_path
    assert main(["card", "validate", str(card)]) == 0
    notes = " ".join(json.loads(capsys.readouterr().out)["notes"])
    assert "cropped (start window in training, start at evaluation)" in notes
    assert main(["card", "validate", str(card), "task.train_crop=random"]) == 0
    assert "cropped (random window in training, start at evaluation)" in " ".join(json.loads(capsys.readouterr().out)["notes"])


def test_augmentation_adds_noise_at_10_to_30_db_and_silences_one_span():
    """task.augment (the recipe's, PEFT-SER's): every training clip gets Gaussian noise
    at 10-30 dB SNR and one span of 10-15 % silenced with 10 ms fades; evaluation clips
    are untouched, and the feature cache stays off (inputs change every epoch)."""
    clean = tone(2.0, 16000)
    rng = np.random.default_rng(0)
    for _ in range(20):
        noisy = data.augment_audio(clean, 16000, rng)
        silent = np.flatnonzero(noisy == 0.0)
        span = silent[-1] - silent[0] + 1 + 2 * 160  # the zeroed core and its two fades
        assert 0.10 * len(clean) - 2 <= span <= 0.15 * len(clean) + 2
        assert len(silent) == silent[-1] - silent[0] + 1  # one contiguous span
        keep = np.ones(len(clean), bool)
        keep[max(silent[0] - 160, 0):silent[-1] + 161] = False
        noise = noisy[keep] - clean[keep]
        snr = 20 * np.log10(np.sqrt(np.mean(clean ** 2)) / np.sqrt(np.mean(noise ** 2)))
        assert 9.5 <= snr <= 30.5
    model = model_for("tiny_wav2vec2", augment=True)
    example = {"id": "a", "audio": clean, "samples": len(clean), "sample_rate": 16000}
    np.testing.assert_array_equal(model.waveform(example, rng=None), clean)  # evaluation: as it is
    trained = model.waveform(example, rng=np.random.default_rng(1))
    assert trained.shape == clean.shape and not np.allclose(trained, clean)
    model.backbone = methods.apply(model.backbone, "lora", **TASK.default_method_options("lora", model))
    assert "feature cache: off (task.augment adds new noise" in model.plan_feature_cache([example], 2**30)
    fixed = model_for("tiny_wav2vec2")
    fixed.backbone = methods.apply(fixed.backbone, "lora", **TASK.default_method_options("lora", fixed))
    assert fixed.plan_feature_cache([example], 2**30).startswith("feature cache: on")


def test_session_folds(tmp_path):
    rows = toy_rows(speakers=4)
    write_corpus(tmp_path, rows)
    table = (tmp_path / "labels.csv").read_text().splitlines()
    table = [table[0] + ",session"] + [f"{line},{1 + int(line.split(',')[2][1:]) // 2}" for line in table[1:]]
    (tmp_path / "labels.csv").write_text("\n".join(table) + "\n")
    card = write_card(tmp_path, "splits: {fold_by: session, test: [2], seed: 0}").model_copy()
    card.fields = {**card.fields, "session": "session"}
    dataset = TASK.read(card, SpeechEmotionOptions())
    assert {e["session"] for e in dataset.splits["test"]} == {"2"}
    assert {e["speaker"] for e in dataset.splits["test"]} == {"s2", "s3"}
    assert len(dataset.splits["validation"]) > 0 and {e["session"] for e in dataset.splits["train"]} == {"1"}
    # another fold from the run's config (data.splits; `peftlab bench --folds test=1,2` runs each)
    from peftlab.pipelines.runner import with_split_overrides

    other = TASK.read(with_split_overrides(card, {"test": 1}, TASK), SpeechEmotionOptions())
    assert {e["session"] for e in other.splits["test"]} == {"1"} and {e["session"] for e in other.splits["train"]} == {"2"}
    assert card.splits["test"] == [2]  # the card itself is unchanged
    # one value, as `--folds test=1,2` gives it (a string) or a card writes it (`test: Ses05`): a fold, not a file
    single = TASK.read(with_split_overrides(card, {"test": "1"}, TASK), SpeechEmotionOptions())
    assert {split: len(e) for split, e in single.splits.items()} == {split: len(e) for split, e in other.splits.items()}
    assert {e["session"] for e in single.splits["test"]} == {"1"}
    assert any(note.startswith(f"validation: {len(single.splits['validation'])} training clips held out (speakers ")
               and note.endswith("the test fold is untouched") for note in single.notes), single.notes
    with pytest.raises(UserError, match=r"splits names session '2' for both test and validation"):
        TASK.read(with_split_overrides(card, {"validation": [2]}, TASK), SpeechEmotionOptions())
    with pytest.raises(UserError, match=r"data.splits.fold is not a split key speech-emotion reads"):
        with_split_overrides(card, {"fold": 1}, TASK)
    # a validation fold and a validation_fraction: the fraction held nothing out
    with pytest.raises(UserError, match=r"card\.md: splits\.validation_fraction holds validation out of train, but the "
                                        r"data gives a validation split; remove validation_fraction$"):
        TASK.read(with_split_overrides(card, {"test": [2], "validation": [1], "validation_fraction": 0.2}, TASK),
                  SpeechEmotionOptions())


def test_split_files_without_validation_hold_out_whole_training_speakers(tmp_path):
    write_corpus(tmp_path, toy_rows())
    header, *rows = (tmp_path / "labels.csv").read_text().splitlines()
    (tmp_path / "train.csv").write_text("\n".join([header] + [r for r in rows if r.split(",")[2] < "s4"]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([header] + [r for r in rows if r.split(",")[2] >= "s4"]) + "\n")
    card = write_card(tmp_path, "splits: {train: train.csv, test: test.csv, validation_fraction: 0.25, seed: 1}")
    dataset = TASK.read(card, SpeechEmotionOptions())
    speakers = {split: {e["speaker"] for e in examples} for split, examples in dataset.splits.items()}
    assert speakers["test"] == {"s4", "s5"} and len(dataset.splits["test"]) == 8  # test untouched
    assert len(speakers["validation"]) == 1 and speakers["validation"] | speakers["train"] == {"s0", "s1", "s2", "s3"}
    assert not speakers["validation"] & speakers["train"]
    (held,) = speakers["validation"]
    assert f"validation: 4 training clips held out (speakers {held}; splits.validation_fraction=0.25); test is untouched" \
        in dataset.notes
    one_speaker = write_card(tmp_path, "splits: {train: train.csv, test: test.csv}").model_copy()
    (tmp_path / "train.csv").write_text("\n".join([header] + [r for r in rows if r.split(",")[2] == "s0"]) + "\n")
    with pytest.raises(UserError, match=r"card\.md: the training data has one speaker.*validation_fraction: 0"):
        TASK.read(one_speaker, SpeechEmotionOptions())
    # validation_fraction: 0 keeps all of train and makes no validation split (it was an empty one: an error)
    everything = TASK.read(write_card(tmp_path, "splits: {train: train.csv, test: test.csv, validation_fraction: 0}"),
                           SpeechEmotionOptions())
    assert list(everything.splits) == ["train", "test"] and len(everything.splits["train"]) == 4
    # beside a validation file, or where the ratios divide one table, a fraction would be ignored
    for splits, message in (("{train: train.csv, validation: test.csv, test: test.csv, validation_fraction: 0.2}",
                             r"the data gives a validation split; remove validation_fraction$"),
                            ("{ratios: {train: 0.5, test: 0.5}, validation_fraction: 0.2}",
                             r"where the data comes split \(per-split files, or fold_by\); here splits\.ratios divide the clips")):
        with pytest.raises(UserError, match=r"card\.md: splits\.validation_fraction holds validation out of train.* " + message):
            TASK.read(write_card(tmp_path, f"splits: {splits}"), SpeechEmotionOptions())
    assert not any(note.startswith("validation:") for note in everything.notes)
    # two clips without speakers: a fraction too small to hold out one says so (it made an empty split)
    from peftlab.domains.speech_emotion.data import hold_out_speakers

    with pytest.raises(UserError, match=r"^card\.md: splits.validation_fraction=0.1 of 2 training clips holds out none; "
                                        r"give a validation split, raise the fraction, or set it to 0$"):
        hold_out_speakers([{"id": "a", "label": 0}, {"id": "b", "label": 1}], 0.1, 0, "card.md")


def test_a_card_of_test_clips_only_reads_as_the_test_split(tmp_path):
    # the card `peftlab eval RUN --data CARD` takes: no train split to hold validation out of
    write_corpus(tmp_path, toy_rows())
    for extra in ("splits: {test: labels.csv}", "splits: {test: labels.csv, validation_fraction: 0}",
                  "splits: {ratios: {test: 1.0}}"):  # every speaker, none moved to a train split
        dataset = TASK.read(write_card(tmp_path, extra), SpeechEmotionOptions())
        assert list(dataset.splits) == ["test"] and len(dataset.splits["test"]) == len(toy_rows())


@pytest.mark.parametrize("problem", ["corrupt", "empty", "silent"])
def test_bad_audio_names_the_file_or_is_skipped_and_counted(tmp_path, problem):
    write_corpus(tmp_path, toy_rows())
    bad = tmp_path / "s0_1.wav"
    if problem == "corrupt":
        bad.write_bytes(b"RIFF\x00\x00not really a wave file")
    elif problem == "empty":
        soundfile.write(bad, np.zeros(0, dtype=np.float32), 16000)
    else:
        soundfile.write(bad, np.zeros(16000, dtype=np.float32), 16000)
    with pytest.raises(UserError, match=r"\.csv:\d+: \S*s0_1\.wav: .*(readable|empty|silent).*on_bad_file: skip"):
        TASK.read(write_card(tmp_path), SpeechEmotionOptions())  # the table's line too, not only the file
    with pytest.raises(UserError, match=r"^\S*s0_1\.wav: .*(readable|empty|silent)[^`]*fix or remove the file$"):
        TASK.read_inputs([bad], SpeechEmotionOptions(), {})  # predict takes no card: no card setting to suggest
    dataset = TASK.read(write_card(tmp_path, "on_bad_file: skip"), SpeechEmotionOptions())
    assert sum(len(rows) for rows in dataset.splits.values()) == len(toy_rows()) - 1
    assert any("skipped 1 bad audio file" in note for note in dataset.notes)


def test_label_codes_without_labels_are_numbered_as_numbers(tmp_path):
    """Codes were read as names and sorted as text: with ten or more classes, "10" came
    before "2" (the other domains number codes in numeric order)."""
    rows = [(f"s{s}_{i}.wav", str(1 + (s * 4 + i) % 11), f"s{s}", "female") for s in range(6) for i in range(4)]
    write_corpus(tmp_path, rows)
    card = write_card(tmp_path).model_copy()
    card.labels = None
    dataset = TASK.read(card, SpeechEmotionOptions())
    assert dataset.labels == [str(code) for code in range(1, 12)]
    for example in (e for split in dataset.splits.values() for e in split):
        assert example["label"] == int(dict((r[0], r[1]) for r in rows)[example["id"]]) - 1
    assert any("codes, which do not run 0..10" in note for note in dataset.notes)


def test_label_map_to_numbers_reads_them_as_codes(tmp_path):
    """`label_map: {neutral: 0, ...}` maps to YAML numbers; reading them as label cells
    failed on `.strip()` with a traceback."""
    write_corpus(tmp_path, toy_rows())
    card = write_card(tmp_path, "label_map: {neutral: 0, happy: 1, angry: 2, sad: 3}").model_copy()
    card.labels = None
    dataset = TASK.read(card, SpeechEmotionOptions())
    assert dataset.labels == ["0", "1", "2", "3"]
    example = next(e for split in dataset.splits.values() for e in split if e["id"] == "s0_1.wav")
    assert example["label"] == LABELS.index("happy")


def test_unknown_label_and_missing_column_are_one_line_errors(tmp_path):
    rows = toy_rows()
    rows[3] = (rows[3][0], "bored", rows[3][2], rows[3][3])
    write_corpus(tmp_path, rows)
    with pytest.raises(UserError, match=r"labels.csv:5: label 'bored' is not one of"):
        TASK.read(write_card(tmp_path), SpeechEmotionOptions())
    dataset = TASK.read(write_card(tmp_path, "label_map: {bored: null}"), SpeechEmotionOptions())
    assert sum(len(r) for r in dataset.splits.values()) == len(rows) - 1
    assert "label_map leaves out 1 rows: 1 bored" in dataset.notes
    card = write_card(tmp_path).model_copy()
    card.fields = {"path": "file", "label": "mood"}
    with pytest.raises(UserError, match="column 'mood' for fields.label is not in the header"):
        TASK.read(card, SpeechEmotionOptions())


def test_crops_random_in_training_centre_or_full_at_evaluation():
    clip = np.arange(32000, dtype=np.float32)
    example = {"id": "x", "audio": clip, "samples": len(clip), "sample_rate": 16000}
    model = model_for("tiny_hubert", max_seconds=1.0)
    first = model.waveform(example, np.random.default_rng(1))
    again = model.waveform(example, np.random.default_rng(1))
    other = model.waveform(example, np.random.default_rng(2))
    assert len(first) == 16000 and np.array_equal(first, again) and not np.array_equal(first, other)
    assert np.array_equal(first, clip[int(first[0]):int(first[0]) + 16000])
    assert np.array_equal(model.waveform(example, None), clip[8000:24000])
    assert model.example_length(example) == 16000
    assert len(model_for("tiny_hubert", max_seconds=1.0, eval_crop="full").waveform(example, None)) == 32000
    # PEFT-SER keeps each clip's first max_seconds, in training and evaluation
    first_seconds = model_for("tiny_hubert", max_seconds=1.0, train_crop="start", eval_crop="start")
    assert np.array_equal(first_seconds.waveform(example, np.random.default_rng(1)), clip[:16000])
    assert np.array_equal(first_seconds.waveform(example, None), clip[:16000])
    with pytest.raises(ValueError, match="train_crop must be random or start"):
        SpeechEmotionOptions(train_crop="center")
    with pytest.raises(UserError, match="at most"):
        model_for("tiny_whisper", max_seconds=45)


def test_read_inputs_and_confusion_report(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(0.5, 16000), 16000)
    soundfile.write(tmp_path / "b.ogg", tone(0.5, 16000, 300), 16000)
    soundfile.write(tmp_path / "c.mp3", tone(0.5, 16000, 400), 16000, format="MP3")
    examples = TASK.read_inputs([tmp_path], SpeechEmotionOptions(), {})
    assert [e["id"] for e in examples] == [str(tmp_path / n) for n in ("a.wav", "b.ogg", "c.mp3")]
    assert all("label" not in e for e in examples)
    mp3 = data.decode(tmp_path / "c.mp3")[0]  # MP3 frames pad the clip a little; the tone itself survives
    assert 8000 <= len(mp3) <= 8000 + 2 * 1152 and abs(np.abs(mp3).max() - np.abs(tone(0.5, 16000, 400)).max()) < 0.05
    with pytest.raises(UserError, match="not an audio file"):
        TASK.read_inputs([tmp_path / "labels.txt"], SpeechEmotionOptions(), {})
    # a table of paths in the training card's columns (relative to the table), no label column needed
    (tmp_path / "list.csv").write_text("file,who\nb.ogg,s1\na.wav,s2\n")
    listed = TASK.read_inputs([tmp_path / "list.csv"], SpeechEmotionOptions(), {"path": "file", "speaker": "who"})
    assert [e["id"] for e in listed] == ["b.ogg", "a.wav"] and all("label" not in e for e in listed)
    assert listed[1]["path"] == examples[0]["path"] and listed[1]["samples"] == examples[0]["samples"]
    # the card's speaker, gender and session columns are not needed to predict: a list of paths will do
    (tmp_path / "paths.csv").write_text("file\nb.ogg\na.wav\n")
    bare = TASK.read_inputs([tmp_path / "paths.csv"], SpeechEmotionOptions(),
                            {"path": "file", "speaker": "who", "gender": "sex", "session": "ses"})
    assert [e["id"] for e in bare] == ["b.ogg", "a.wav"] and all("speaker" not in e for e in bare)
    with pytest.raises(UserError, match=r"paths\.csv: column 'clip' for fields\.path is not in the header \['file'\]"):
        TASK.read_inputs([tmp_path / "paths.csv"], SpeechEmotionOptions(), {"path": "clip"})
    # predict says which clips only a window of is scored
    assert TASK.input_notes(examples, SpeechEmotionOptions(max_seconds=0.4)) == [
        "3 clips are longer than task.max_seconds=0.4: their centre 0.4 s is scored (task.eval_crop=full scores whole clips)"]
    assert TASK.input_notes(examples, SpeechEmotionOptions(max_seconds=0.4, eval_crop="full")) == []
    assert TASK.input_notes(examples, SpeechEmotionOptions()) == []
    truth = [{"label": i} for i in (0, 0, 1, 2, 3, 3)]
    outputs = [np.eye(4)[i] for i in (0, 1, 1, 2, 3, 0)]
    TASK.write_report("test", truth, outputs, LABELS, tmp_path)
    report = json.loads((tmp_path / "test_confusion.json").read_text())
    assert report["counts"][0] == [1, 1, 0, 0] and report["counts"][3] == [1, 0, 0, 1]
    assert report["recall"][2] == [0, 0, 1, 0]
    assert (tmp_path / "test_confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_class_weights_are_inverse_frequency():
    options = SpeechEmotionOptions()
    options.class_counts = [30, 10, 0, 20]
    model = TASK.build_model("tiny", LABELS, options)
    assert model.class_weights.tolist() == pytest.approx([60 / 120, 60 / 40, 0.0, 60 / 80])
    assert TASK.build_model("tiny", LABELS, SpeechEmotionOptions(class_weight="none")).class_weights is None


# --------------------------------------------------------------------------- learning
def test_demo_learns_beyond_chance(tmp_path):
    """A short LoRA run on the tiny WavLM beats chance UAR (0.25) by at least 0.15 on
    held-out speakers."""
    from peftlab.pipelines import runner

    config = runner.build_config("speech-emotion", demo=True, overrides=[
        "train.epochs=8", "train.precision=fp32"])
    started = time.perf_counter()
    run_dir = runner.run(config, out=tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"demo: test UAR {metrics['test']['uar']:.3f} in {time.perf_counter() - started:.0f} s")
    assert metrics["test"]["uar"] >= 0.40
    assert set(metrics["test"]["by_group"]["groups"]) == {"female", "male"}
    assert (run_dir / "predictions" / "test_confusion.png").is_file()


# --------------------------------------------------------------------------- real assets
def _random_init_like(encoder: backbones.SpeechEncoder) -> backbones.SpeechEncoder:
    """The same Whisper architecture and feature extractor with random weights (a baseline)."""
    import transformers

    with torch.random.fork_rng():
        torch.manual_seed(0)
        network = transformers.WhisperForAudioClassification(encoder.network.config).encoder
    return backbones.SpeechEncoder("whisper", network, encoder.extractor)


def test_whisper_base_lora_on_emodb_beats_chance(real_assets, tmp_path, monkeypatch):
    """Real Whisper-base encoder + LoRA on the Emo-DB subset with a speaker-independent
    split: test UAR clearly above chance (1/7), reported beside the same run on a
    random-init encoder of the same shape; the cropped encoder agrees with the 30 s one."""
    from peftlab.domains.speech_emotion import tasks
    from peftlab.pipelines import runner

    weights = str(real_assets / "weights" / "whisper_base_encoder")
    encoder, _ = backbones.load_backbone(weights)
    encoder.eval()
    # 1. running on the clip's length instead of 30 s of padding changes little
    clips = [data.resample(*data.decode(real_assets / "datasets" / "emodb_subset" / "wav" / name)[:2], 16000)
             for name in ("03a01Fa.wav", "16b10Wb.wav")]
    featurized = encoder.featurize(clips)
    padded = encoder.extractor(clips, sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        states, _ = encoder(featurized.inputs, featurized.lengths)
        reference = encoder.network(padded, output_hidden_states=True).hidden_states
    frames = states.shape[2]
    pooled = [torch.nn.functional.cosine_similarity(states[i].mean(1), h[:, :frames].mean(1), dim=-1).min().item()
              for i, h in enumerate(reference)]
    assert min(pooled) > 0.9, pooled

    # 2. LoRA on the last 2 layers' feed-forward, 1 s training crops, 3 epochs
    # without the recipe's augmentation: fixed inputs let the frozen layers' features be cached
    overrides = ["train.epochs=3", "train.batch_size=8", "train.lr=2e-3", "train.precision=fp32",
                 "train.warmup_ratio=0.0", "method.layers=last_2", "task.max_seconds=1.0", "task.eval_crop=full",
                 "task.augment=false"]
    results = {}
    for label in ("whisper-base", "random-init"):
        if label == "random-init":
            real_loader = tasks.load_backbone
            monkeypatch.setattr(tasks, "load_backbone", lambda name, real_loader=real_loader: (
                lambda enc_info: (_random_init_like(enc_info[0]), {**enc_info[1], "source": "random-init"}))(real_loader(name)))
        config = runner.build_config("speech-emotion", backbone=weights, data=str(REPO / "data_cards" / "emodb-subset.md"),
                                     overrides=overrides)
        started = time.perf_counter()
        run_dir = runner.run(config, out=tmp_path / label)
        test = json.loads((run_dir / "metrics.json").read_text())["test"]
        gap = test["by_group"]["worst_group_gap"]["uar"]
        results[label] = test
        print(f"{label}: test UAR {test['uar']:.3f}, accuracy {test['accuracy']:.3f}, macro-F1 {test['macro_f1']:.3f}, "
              f"per-sex UAR {json.dumps({g: round(m['uar'], 3) for g, m in test['by_group']['groups'].items()})}, "
              f"gap {gap:.3f} ({time.perf_counter() - started:.0f} s)")
    assert results["whisper-base"]["uar"] >= 1 / 7 + 0.15
    assert results["whisper-base"]["uar"] > results["random-init"]["uar"]


def test_a_group_by_the_table_lacks_names_the_table_the_choices_and_the_fix(tmp_path):
    write_corpus(tmp_path, toy_rows())
    card = write_card(tmp_path)
    (tmp_path / "card.md").write_text((tmp_path / "card.md").read_text().replace("group_by: gender", "group_by: genderr"))
    with pytest.raises(UserError, match=r"labels\.csv: the card's group_by 'genderr' is neither a field \(path, label, "
                                        r"speaker, gender\) nor a column of .*; set group_by to one of them, or leave it out$"):
        TASK.read(read_card(tmp_path / "card.md"), SpeechEmotionOptions())
    assert card.group_by == "gender"
