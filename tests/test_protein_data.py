"""Protein readers, cropping, bucketing and ESM-2 checkpoint loading."""

from __future__ import annotations

import argparse
import copy
import datetime

import numpy as np
import pytest
import torch
from conftest import read_task_data, write_task_card
from peftlab.domains.protein import backbones, data
from peftlab.domains.protein.tasks import crop
from peftlab.shared.data import BucketBatchSampler, ratio_split, subsample
from peftlab.shared.errors import MissingField, UserError


def test_fasta_reader_joins_lines_and_reports_bad_letters_with_line(tmp_path):
    path = tmp_path / "s.fasta"
    path.write_text(">a desc\nMKT\nayi\n>b\nMLL\n")
    assert data.read_fasta(path) == {"a": "MKTAYI", "b": "MLL"}
    path.write_text(">a\nMKT\n>b\nML1L\n")
    with pytest.raises(UserError, match=r"s.fasta:4: '1' is not an amino-acid letter \(record 'b'\)"):
        data.read_fasta(path)
    path.write_text(">a\nJ1KT\n")
    with pytest.raises(UserError, match=r"s.fasta:2: '1', 'J' are not amino-acid letters \(record 'a'\)"):
        data.read_fasta(path)
    path.write_text(">a\nMKT\n>b\n>c\nMLL\n")
    with pytest.raises(UserError, match=r"s.fasta:3 \(record 'b'\): empty sequence"):
        data.read_fasta(path)
    path.write_text(">a\nMKT\n>a\nMLL\n")
    with pytest.raises(UserError, match=r"s.fasta:3: duplicate FASTA id 'a' \(first at line 1\)"):
        data.read_fasta(path)
    # Windows-saved (byte-order mark, CRLF); a final '*' is the stop's mark, one inside a record is refused
    path.write_bytes(b"\xef\xbb\xbf>a\r\nMKT*\r\n>b\r\nML\r\nLV*\r\n")
    assert data.read_fasta(path) == {"a": "MKT", "b": "MLLV"}
    path.write_text(">a\nMKT*\nAYI\n")
    with pytest.raises(UserError, match=r"s.fasta:2: '\*' \(a stop\) inside record 'a'"):
        data.read_fasta(path)


def test_pairs_reader_names_missing_ids_and_bad_labels(tmp_path):
    sequences = {"a": "MKT", "b": "MLL"}
    path = tmp_path / "p.tsv"
    path.write_text("a\tb\t1\nb\tzz\t0\n")
    with pytest.raises(UserError, match=r"p.tsv:2: protein 'zz' is not in the FASTA file"):
        data.read_pairs(path, sequences, {}, ["no", "yes"])
    path.write_text("a\tb\tmaybe\n")
    with pytest.raises(UserError, match=r"p.tsv:1: label 'maybe' is not one of"):
        data.read_pairs(path, sequences, {}, ["no", "yes"])
    path.write_text("a\tb\t1.0\nb\ta\tno\n")
    labels = [e["label"] for e in data.read_pairs(path, sequences, {}, ["no", "yes"])]
    assert labels == [1, 0]


def test_csv_reader(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("Name,sequence,target\nx1,MKT,1\nx2,GGW,0\n")
    examples = data.read_sequence_csv(path, {"sequence": "sequence", "label": "target", "id": "Name"}, ["neg", "pos"])
    assert [(e["id"], e["seq"], e["label"]) for e in examples] == [("x1", "MKT", 1), ("x2", "GGW", 0)]
    path.write_text("Name,sequence,target\nx1,MK T,1\n")
    with pytest.raises(UserError, match=r"s.csv:2: ' ' is not an amino-acid letter"):
        data.read_sequence_csv(path, {"label": "target"}, None)
    path.write_text("Name,sequence,target\nx1,MKT,1\n")
    # a misspelt id column stopped nothing: the ids fell back to FILE:LINE
    with pytest.raises(UserError, match=r"s\.csv: column 'Nmae' for fields\.id not found; the header has \['Name'"):
        data.read_sequence_csv(path, {"label": "target", "id": "Nmae"}, None)
    # without fields.id, a column named `id` names the rows (else FILE:LINE does)
    path.write_text("sequence,id\nMKT,P12345\nGGW,Q99999\n")
    assert [e["id"] for e in data.read_sequence_csv(path, {}, None, labelled=False)] == ["P12345", "Q99999"]
    path.write_text("sequence\nMKT\n")
    assert [e["id"] for e in data.read_sequence_csv(path, {}, None, labelled=False)] == ["s.csv:2"]
    # columns by position: a first row that reads as a record is not silently taken for the header
    positional = {"id": 0, "sequence": 1, "label": 2}
    path.write_text("x1,MKT,pos\nx2,GGW,neg\n")
    with pytest.raises(UserError, match=r"s\.csv:1: the first row reads as a record \(x1,MKT,pos\), but a table's "
                                         r"first row is its header: add a header row"):
        data.read_sequence_csv(path, positional, ["neg", "pos"])
    # without the card's labels (class names are then any text) and unlabelled (predict) too
    for labels, labelled in ((None, True), (None, False)):
        with pytest.raises(UserError, match=r"s\.csv:1: the first row reads as a record"):
            data.read_sequence_csv(path, positional, labels, labelled=labelled)
    path.write_text("id,sequence,label\nx1,MKT,pos\n")  # "sequence" spells amino acids; "label" is no class
    for labels, labelled in ((["neg", "pos"], True), (None, True), (None, False)):
        assert [e["id"] for e in data.read_sequence_csv(path, positional, labels, labelled=labelled)] == ["x1"]


def test_class_codes_without_the_cards_labels_are_the_classes(tmp_path):
    """Label codes 1 and 2 with no `labels` in the card are two classes named by their codes
    (as images, clips and point clouds read them), not three with an empty class 0; names
    are kept and sorted."""
    rows = [f"{'MKT' * (1 + i % 5)}{'W' * (i % 2)},{1 + i % 2}" for i in range(40)]
    (tmp_path / "d.csv").write_text("sequence,label\n" + "\n".join(rows) + "\n")
    card = write_task_card(tmp_path, "protein-classify", "format: csv\nfiles: {data: d.csv}")
    dataset = read_task_data(card, "protein-classify")
    assert dataset.labels == ["1", "2"]
    assert {e["label"] for split in dataset.splits.values() for e in split} == {0, 1}
    assert any("labels ['1', '2'] are the label column's codes" in note for note in dataset.notes)
    (tmp_path / "d.csv").write_text("sequence,label\n" + "\n".join(
        row.replace(",1", ",toxic").replace(",2", ",benign") for row in rows) + "\n")
    assert read_task_data(card, "protein-classify").labels == ["benign", "toxic"]


def test_crop_policies():
    sequence = "ABCDEFGHIJ"
    assert crop(sequence, 4, "start", None) == "ABCD"
    assert crop(sequence, 4, "center", None) == "DEFG"
    windows = {crop(sequence, 4, "random", np.random.default_rng(s)) for s in range(30)}
    assert len(windows) > 1 and all(w in sequence for w in windows)
    assert crop("ABC", 4, "random", np.random.default_rng(0)) == "ABC"


def test_bucketing_pads_much_less_than_random_batches_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(30, 1000, size=800)
    sampler = BucketBatchSampler(lengths, 8, seed=3)
    sampler.set_epoch(1)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(800))
    padded = sum(len(b) * lengths[b].max() for b in batches)
    shuffled = rng.permutation(800)
    naive = sum(8 * lengths[shuffled[i:i + 8]].max() for i in range(0, 800, 8))
    assert padded < 0.6 * naive
    assert sampler.batches() == batches
    sampler.set_epoch(2)
    assert sampler.batches() != batches


def test_training_batches_are_never_a_single_example():
    # batch norm cannot train on one example: a pool ending in one ends in B-1 and 2
    for count in (9, 25, 401, 409, 801):
        sampler = BucketBatchSampler(np.arange(count), 8, seed=0)
        batches = sampler.batches()
        assert sorted(i for b in batches for i in b) == list(range(count))
        assert len(batches) == len(sampler) and min(map(len, batches)) == 2 and max(map(len, batches)) <= 8
    assert [len(b) for b in BucketBatchSampler(np.arange(3), 1, seed=0).batches()] == [1, 1, 1]


def test_ratio_split_keeps_every_class_in_proportion():
    # 3 classes x 12 (the audit's case: plain shuffling gave a test split without one class)
    examples = [{"id": i, "label": i % 3} for i in range(36)]
    for seed in range(20):
        splits = ratio_split(examples, {"train": 0.6, "validation": 0.2, "test": 0.2}, seed=seed)
        assert [len(splits[s]) for s in ("train", "validation", "test")] == [22, 7, 7]
        for split, share in (("train", 7.2), ("validation", 2.4), ("test", 2.4)):
            counts = np.bincount([e["label"] for e in splits[split]], minlength=3)
            assert np.all(np.abs(counts - share) < 1 + 1e-9), (seed, split, counts)
    other = ratio_split(examples, {"train": 0.6, "validation": 0.2, "test": 0.2}, seed=1)
    assert other["test"] != splits["test"]
    # data without classes (generated text) is split by a plain seeded permutation, as before
    text = [{"id": i, "label": f"answer {i}"} for i in range(50)]
    order = np.random.default_rng(4).permutation(50)
    split = ratio_split(text, {"train": 0.8, "test": 0.2}, seed=4)
    assert [e["id"] for e in split["test"]] == order[40:].tolist()


def test_a_split_of_ratio_zero_is_left_out():
    examples = [{"id": i, "label": i % 3, "group": i // 4} for i in range(60)]
    only_test = ratio_split(examples, {"train": 0.0, "validation": 0.0, "test": 1.0}, seed=0)
    assert list(only_test) == ["test"] and len(only_test["test"]) == 60
    grouped = ratio_split(examples, {"train": 0.99, "test": 0.0}, seed=3, group_of=lambda e: e["group"])
    assert list(grouped) == ["train"] and len(grouped["train"]) == 60


def test_grouped_ratio_splits_follow_the_ratios_and_leave_no_split_empty():
    """Each group drew its split at random before, so 10 videos at 0.8/0.1/0.1 came out
    7/1/2 or with an empty test split depending on the seed."""
    ratios = {"train": 0.8, "validation": 0.1, "test": 0.1}
    ten = [{"id": i, "video": i // 3} for i in range(30)]
    for seed in range(8):
        split = ratio_split(ten, ratios, seed, group_of=lambda e: e["video"])
        assert {name: len({e["video"] for e in part}) for name, part in split.items()} == {
            "train": 8, "validation": 1, "test": 1}
        assert sorted(e["id"] for part in split.values() for e in part) == list(range(30))
        assert all([e["id"] for e in part] == sorted(e["id"] for e in part) for part in split.values())
    # uneven groups: the shares are of examples, to within a group
    uneven = [{"id": i, "group": g} for i, g in enumerate(g for g in range(40) for _ in range(1 + g % 5))]
    split = ratio_split(uneven, ratios, seed=2, group_of=lambda e: e["group"])
    largest = 5
    for name, share in ratios.items():
        assert abs(len(split[name]) - share * len(uneven)) <= largest, (name, len(split[name]))
    # three groups for three splits: one each, whatever the seed
    three = [{"id": i, "group": i % 3} for i in range(9)]
    assert all(sorted(len(part) for part in ratio_split(three, ratios, seed, group_of=lambda e: e["group"]).values())
               == [3, 3, 3] for seed in range(8))


def test_ratio_split_and_stratified_subsample():
    examples = [{"id": i, "label": int(i % 10 == 0), "group": i % 7} for i in range(1000)]
    splits = ratio_split(examples, {"train": 0.8, "validation": 0.1, "test": 0.1}, seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [800, 100, 100]
    grouped = ratio_split(examples, {"train": 0.5, "test": 0.5}, seed=1, group_of=lambda e: e["group"])
    assert not {e["group"] for e in grouped["train"]} & {e["group"] for e in grouped["test"]}
    small = subsample(examples, 200, seed=0)
    assert len(small) == 200 and sum(e["label"] for e in small) == 20
    # fewer than one per class: the limit still holds (shares that round to 0 do not empty it)
    four = [{"id": i, "label": i % 4} for i in range(100)]
    assert [len(subsample(four, n, seed=0)) for n in (1, 2, 3, 5, 99)] == [1, 2, 3, 5, 99]
    assert sorted(e["label"] for e in subsample(four, 6, seed=0)) == [0, 0, 1, 1, 2, 3]


def _official_checkpoint(encoder) -> dict:
    """A file in the layout fair-esm releases: fairseq-prefixed keys, argparse config."""
    state = {f"encoder.sentence_encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["encoder.lm_head.bias"] = torch.zeros(33)
    cfg = argparse.Namespace(encoder_layers=encoder.num_layers, encoder_embed_dim=encoder.embed_dim,
                             encoder_attention_heads=encoder.attention_heads, token_dropout=True)
    return {"model": state, "cfg": {"model": cfg}}


def test_official_fair_esm_file_loads_with_weights_only(tmp_path):
    encoder, _ = backbones.load_backbone("tiny")
    path = tmp_path / "esm2_tiny.pt"
    torch.save(_official_checkpoint(encoder), path)
    loaded, info = backbones.load_backbone(str(path))
    tokens = encoder.tokenize(["MKTAYIAKQR", "MLL"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens), encoder.eval()(tokens), atol=0, rtol=0)
    assert info["weights_sha256"] == backbones.load_backbone("tiny")[1]["weights_sha256"]


def test_checkpoint_with_arbitrary_pickled_objects_is_refused(tmp_path):
    encoder, _ = backbones.load_backbone("tiny")
    checkpoint = _official_checkpoint(encoder)
    checkpoint["cfg"]["evil"] = datetime.date(2020, 1, 1)  # not a tensor or config: refused
    path = tmp_path / "bad.pt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="refused to load"):
        backbones.load_backbone(str(path))


def test_hugging_face_folder_maps_onto_fair_esm(tmp_path):
    from transformers import EsmConfig, EsmModel

    config = EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, position_embedding_type="rotary", token_dropout=True,
                       pad_token_id=1, mask_token_id=32, emb_layer_norm_before=False, layer_norm_eps=1e-5)
    torch.manual_seed(0)
    hf = EsmModel(config, add_pooling_layer=False).eval()
    hf.save_pretrained(tmp_path)
    encoder, info = backbones.load_backbone(str(tmp_path))
    tokens = encoder.tokenize(["MKTAYIAKQRQISFVKSHF", "MLLAVLY"])
    with torch.no_grad():
        ours = encoder.eval()(tokens)
        theirs = hf(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
    residues = tokens != 1
    assert (ours - theirs).abs()[residues].max() < 1e-4
    assert info["architecture"] == {"layers": 2, "width": 32, "heads": 4}


def test_unknown_and_offline_backbones_fail_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFTLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=r"unknown ESM-2 backbone 'esm3'.*esm2_t6_8M_UR50D"):
        backbones.load_backbone("esm3")
    with pytest.raises(UserError, match=r"'esm2_t6_8M_UR50D' is not available offline.*--backbone /path/to/esm2_t6_8M_UR50D.pt"):
        backbones.load_backbone("esm2_t6_8M_UR50D")


def test_tiny_backbone_is_the_same_every_build():
    first, info1 = backbones.load_backbone("tiny")
    second, info2 = backbones.load_backbone("tiny")
    assert info1["weights_sha256"] == info2["weights_sha256"]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_fused_attention_matches_fair_esm_eager_layers_with_padding_and_lora():
    from peftlab.shared import methods

    encoder, _ = backbones.load_backbone("tiny")
    encoder.eval()
    tokens = encoder.tokenize(["MKTAYIAKQRQISFVKSHFSRQLEERLG", "MLLAVLY", "GIWDTIKSMGKVFAGK"])
    residues = tokens != encoder.padding_idx
    with torch.no_grad():
        fused = encoder(tokens)
        encoder.attention = "eager"
        eager = encoder(tokens)
    assert (fused - eager).abs()[residues].max() < 1e-5
    # PEFT modules on the projections act the same on both paths
    adapted = methods.apply(encoder, "lora", target_modules=["k_proj", "v_proj", "out_proj"])
    with torch.no_grad():
        for param in adapted.method_parameters().values():
            param.add_(0.1 * torch.randn_like(param))
        encoder.attention = "eager"
        eager = adapted(tokens)
        encoder.attention = "sdpa"
        fused = adapted(tokens)
    assert (fused - eager).abs()[residues].max() < 1e-5


def _saved_bytes(run):
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.nbytes) or t, lambda t: t):
        out = run()
    return out, sum(sizes)


def test_bf16_attention_runs_each_sequence_in_fp32_and_keeps_half_the_bytes_for_backward():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16).to(torch.bfloat16).requires_grad_() for _ in range(3))
    keep = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    keep[1, ..., 30:] = False  # the second sequence is padded
    lengths = backbones.right_padded_lengths(~keep[:, 0, 0])
    assert lengths == (37, 30)
    grad = torch.randn(2, 4, 37, 16).to(torch.bfloat16)
    grad[1, :, 30:] = 0  # nothing downstream reads padded positions

    spans = ((0, 0, 37), (1, 0, 30))  # (batch row, first token, end token)
    out, kept = _saved_bytes(lambda: backbones.CPUFlashAttention.apply(q, k, v, spans, None))
    reference_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference, reference_kept = _saved_bytes(
        lambda: torch.nn.functional.scaled_dot_product_attention(*(t * 1 for t in reference_inputs), attn_mask=keep))
    real = keep[:, 0, 0, :, None].expand(2, 37, 4).transpose(1, 2)  # (batch, heads, tokens)
    assert out.dtype == torch.bfloat16 and torch.equal(out[real], reference.to(torch.bfloat16)[real])
    assert not out[1, :, 30:].any()  # padded query rows: zeros
    out.backward(grad)
    reference.backward(grad.float())
    for mine, theirs in zip((q, k, v), reference_inputs):
        assert mine.grad.dtype == torch.bfloat16
        torch.testing.assert_close(mine.grad.float(), theirs.grad, rtol=2e-2, atol=2e-2)
    assert kept < 0.6 * reference_kept


def test_attention_with_a_mask_that_is_not_right_padding_runs_batched_with_the_mask():
    torch.manual_seed(0)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, :3] = True  # left padding
    assert backbones.right_padded_lengths(padding) is None
    q, k, v = (torch.randn(2, 2, 9, 8, requires_grad=True) for _ in range(3))
    keep = ~padding[:, None, None, :]
    out = backbones.CPUFlashAttention.apply(q, k, v, None, keep)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(out, reference)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    for mine, theirs in zip(grads, torch.autograd.grad(reference.sum(), (q, k, v))):
        torch.testing.assert_close(mine, theirs)


@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_packed_layers_match_the_padded_batch_in_outputs_and_gradients(precision, monkeypatch):
    """On CPUs a right-padded batch runs its layers on packed tokens (no padding through
    projections, feed-forward or attention); real positions and LoRA gradients are the
    padded layout's."""
    from peftlab.shared import methods

    encoder, _ = backbones.load_backbone("tiny")
    adapted = methods.apply(copy.deepcopy(encoder), "lora", target_modules=["k_proj", "v_proj"])
    with torch.no_grad():
        for param in adapted.method_parameters().values():
            param.add_(0.1 * torch.randn_like(param, generator=torch.Generator().manual_seed(0)))
    tokens = encoder.tokenize(["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MLLAVLY", "GIWDTIKSMGKVFAGKLLAV"])
    residues = tokens != encoder.padding_idx
    packs = []
    original = backbones.ESMEncoder._packs
    monkeypatch.setattr(backbones.ESMEncoder, "_packs", lambda *a: packs.append(original(*a)) or packs[-1])

    def run():
        adapted.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            out = adapted(tokens)
        (out.float()[residues] ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in adapted.method_parameters().items()}

    packed, packed_grads = run()
    with torch.no_grad():  # inference keeps rows as inputs (peft's mixed-adapter batches need them)
        adapted(tokens)
    monkeypatch.setattr(backbones, "per_sequence_lengths", lambda mask, heads: None)
    padded, padded_grads = run()
    assert packs == [True, False]  # training packed, inference did not (the padded run never asks)
    assert not packed[~residues].any()  # padding comes back as zeros
    if precision == torch.float32:
        torch.testing.assert_close(packed[residues], padded[residues], rtol=0, atol=2e-6)
    else:  # the projections' bf16 GEMMs sum in another order over fewer rows
        torch.testing.assert_close(packed[residues].float(), padded[residues].float(), rtol=0.02, atol=0.02)
    for name in padded_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], rtol=0.05, atol=1e-3 if precision == torch.bfloat16 else 1e-5)


def test_short_sequences_on_many_threads_run_batched(monkeypatch):
    padding = torch.arange(40) >= torch.tensor([40, 12])[:, None]
    assert backbones.per_sequence_lengths(padding, heads=20) == (40, 12)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)  # 20 heads x 1 query block each: threads idle
    assert backbones.per_sequence_lengths(padding, heads=20) is None
    assert backbones.per_sequence_lengths(padding, heads=64) == (40, 12)


def test_group_by_protein_leaves_no_protein_in_two_splits(tmp_path):
    """Pairs split by their first protein alone still shared second proteins across
    splits (1774 of 2053 E. coli test pairs had a training protein)."""
    from peftlab.domains.protein.tasks import PPITask
    from peftlab.shared.cards import read_card

    rng = np.random.default_rng(0)
    names = [f"P{i}" for i in range(120)]
    (tmp_path / "seqs.fasta").write_text("".join(f">{n}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 40))}\n"
                                                 for n in names))
    pairs = {tuple(sorted(rng.choice(names, 2, replace=False))) for _ in range(600)}
    (tmp_path / "pairs.tsv").write_text("".join(f"{a}\t{b}\t{int(rng.random() < 0.3)}\n" for a, b in sorted(pairs)))
    card_text = ("---\nname: t\ndomain: protein\ntask: protein-ppi\nformat: fasta+pairs_tsv\n"
                 "files: {sequences: seqs.fasta, pairs: pairs.tsv}\nfields: {protein_a: 0, protein_b: 1, label: 2}\n"
                 "splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0, group_by_protein: true}\n---\n")
    (tmp_path / "card.md").write_text(card_text)
    dataset = PPITask().read(read_card(str(tmp_path / "card.md")), PPITask().options())
    proteins = {name: {p for e in split for p in (e["a"], e["b"])} for name, split in dataset.splits.items()}
    assert all(dataset.splits[name] for name in ("train", "validation", "test"))
    assert not proteins["train"] & proteins["test"]
    assert not proteins["train"] & proteins["validation"]
    assert not proteins["validation"] & proteins["test"]
    import re

    kept = sum(len(split) for split in dataset.splits.values())
    note = next(n for n in dataset.notes if n.startswith("group_by_protein"))
    dropped_train, dropped_validation = map(int, re.search(r"dropped (\d+) training and (\d+) validation", note).groups())
    assert dropped_train + dropped_validation == len(pairs) - kept > 0
    sizes = ", ".join(f"{len(dataset.splits[name])} {name}" for name in ("train", "validation", "test"))
    assert note.endswith(f"; {sizes} pairs remain")  # what a C3 split leaves, logged
    # given files whose validation pairs all share a protein with test: the split it empties is named
    (tmp_path / "train.tsv").write_text("P1\tP2\t1\nP3\tP4\t0\n")
    (tmp_path / "validation.tsv").write_text("P5\tP6\t1\n")
    (tmp_path / "test.tsv").write_text("P5\tP7\t0\nP8\tP9\t1\n")
    (tmp_path / "files.md").write_text(card_text.replace("pairs: pairs.tsv}", "pairs: pairs.tsv}").replace(
        "splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0,",
        "splits: {train: train.tsv, validation: validation.tsv, test: test.tsv,"))
    with pytest.raises(UserError, match=r"files\.md: splits\.group_by_protein left split 'validation' empty: every one "
                                        r"of its pairs shares a protein with a later split; give it pairs of other "
                                        r"proteins, or set group_by_protein: false$"):
        PPITask().read(read_card(str(tmp_path / "files.md")), PPITask().options())


def test_repeated_pairs_are_one_example_and_never_cross_splits(tmp_path):
    """D-SCRIPT's ecoli_test.tsv lists 3,761 pairs twice: split at random, 606 of 2,200
    test pairs were copies of training pairs. A pair (in either order: the model reads
    it symmetrically) is one example; a pair given both labels is left out."""
    from peftlab.domains.protein.tasks import PPITask
    from peftlab.shared.cards import read_card

    rng = np.random.default_rng(1)
    names = [f"P{i}" for i in range(60)]
    (tmp_path / "seqs.fasta").write_text("".join(f">{n}\n{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 30))}\n"
                                                 for n in names))
    pairs = sorted({tuple(sorted(rng.choice(names, 2, replace=False))) for _ in range(300)})
    lines = [f"{a}\t{b}\t{int(rng.random() < 0.3)}" for a, b in pairs]
    copies = [line for line in lines[:80]] + ["\t".join([b, a, y]) for a, b, y in (x.split("\t") for x in lines[80:120])]
    a, b, y = lines[120].split("\t")
    conflict = [f"{a}\t{b}\t{1 - int(y)}"]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines + copies + conflict) + "\n")
    card_text = ("---\nname: t\ndomain: protein\ntask: protein-ppi\nformat: fasta+pairs_tsv\n"
                 "files: {sequences: seqs.fasta, pairs: pairs.tsv}\nfields: {protein_a: 0, protein_b: 1, label: 2}\n"
                 "splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}\n---\n")
    (tmp_path / "card.md").write_text(card_text)
    dataset = PPITask().read(read_card(str(tmp_path / "card.md")), PPITask().options())
    keys = [tuple(sorted((e["a"], e["b"]))) for split in dataset.splits.values() for e in split]
    assert len(keys) == len(set(keys)) == len(pairs) - 1  # each pair once, the conflicting one out
    assert tuple(sorted((a, b))) not in keys
    assert any("120 repeated pairs (the same two proteins, in either order) left out" in n for n in dataset.notes)
    assert any("2 lines of 1 pairs listed with both labels left out" in n for n in dataset.notes)
    # one file per split: a pair in test and train stays in test only
    (tmp_path / "train.tsv").write_text("\n".join(lines[:200]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(lines[150:]) + "\n")
    (tmp_path / "card.md").write_text(card_text.replace("pairs: pairs.tsv", "").replace(
        "splits: {ratios: {train: 0.8, validation: 0.1, test: 0.1}, seed: 0}", "splits: {train: train.tsv, test: test.tsv}"))
    dataset = PPITask().read(read_card(str(tmp_path / "card.md")), PPITask().options())
    train = {tuple(sorted((e["a"], e["b"]))) for e in dataset.splits["train"] + dataset.splits["validation"]}
    test = {tuple(sorted((e["a"], e["b"]))) for e in dataset.splits["test"]}
    assert len(test) == len(lines) - 150 and not train & test


def test_a_pairs_file_never_loses_its_first_pair_to_header_detection(tmp_path):
    sequences = {"P1": "MKT", "P2": "GAV", "P3": "LIW"}
    pairs = tmp_path / "pairs.tsv"
    # the first pair names a protein the FASTA lacks: an error naming it, not a dropped "header"
    pairs.write_text("PX\tP2\t1\nP1\tP3\t0\n")
    with pytest.raises(UserError, match=r"pairs.tsv:1: protein 'PX' is not in the FASTA file"):
        data.read_pairs(pairs, sequences, {}, None)
    # label first, proteins after, no header: the first row is a pair
    pairs.write_text("1\tP1\tP2\n0\tP2\tP3\n")
    examples = data.read_pairs(pairs, sequences, {"protein_a": 1, "protein_b": 2, "label": 0}, None)
    assert [(e["a"], e["b"], e["label"]) for e in examples] == [("P1", "P2", 1), ("P2", "P3", 0)]
    # a real header still is one, by position or by name
    pairs.write_text("first\tsecond\tinteracts\nP1\tP2\t1\n")
    assert len(data.read_pairs(pairs, sequences, {}, None)) == 1
    named = data.read_pairs(pairs, sequences, {"protein_a": "second", "protein_b": "first", "label": "interacts"}, None)
    assert [(e["a"], e["b"]) for e in named] == [("P2", "P1")]
    # predict reads pairs without using labels, but a label cell still marks the first row as a pair
    pairs.write_text("PX\tP2\t1\nP1\tP3\t0\n")
    with pytest.raises(UserError, match=r"pairs.tsv:1: protein 'PX' is not in the FASTA file"):
        data.read_pairs(pairs, sequences, {}, None, labelled=False)
    # a row in another delimiter is one cell: not a header, and the error says what the row lacks
    pairs.write_text("P1,P2,1\n")
    with pytest.raises(UserError, match=r"pairs.tsv:1: expected 2 tab-separated columns, found 1"):
        data.read_pairs(pairs, sequences, {}, None, labelled=False)
    # a labelled read of unlabelled pairs names the missing label as such (predict on a card then says
    # to give unlabelled pairs as files)
    pairs.write_text("P1\tP2\n")
    with pytest.raises(MissingField, match=r"pairs.tsv:1: expected 3 tab-separated columns, found 2: the pair has no "
                                           r"label; add its label \(fields.label is column 2\)$") as missing:
        data.read_pairs(pairs, sequences, {}, None)
    assert missing.value.field == "label"


def test_predict_reads_tables_with_the_training_cards_columns(tmp_path):
    """A run trained on a CSV whose card maps `sequence` and `label` to other columns
    predicts on a file with those same columns; it looked for `sequence` and stopped."""
    import peftlab

    rng = np.random.default_rng(0)
    rows_text = ["peptide,activity"] + [f"{''.join(rng.choice(list('ACDEFGHIKLMNPQRSTVWY'), 12))},{i % 2}" for i in range(24)]
    (tmp_path / "train.csv").write_text("\n".join(rows_text) + "\n")
    card = tmp_path / "card.md"
    card.write_text("---\nname: renamed\ndomain: protein\ntask: protein-classify\nformat: csv\nfiles: {data: train.csv}\n"
                    "fields: {sequence: peptide, label: activity}\nlabels: [inactive, active]\n---\n")
    run_dir = peftlab.run("protein-classify", data=str(card), backbone="tiny", out=tmp_path / "run",
                          overrides={"train.epochs": 1})
    (tmp_path / "new.csv").write_text("peptide\nMKTAYIAKQR\nGGGWWWKKKL\n")
    rows = peftlab.load(run_dir).predict([str(tmp_path / "new.csv")])
    assert [r["prediction"] in ("inactive", "active") for r in rows] == [True, True]
    assert rows[0]["positive_class"] == "active" and rows[0]["score"] != rows[1]["score"]
    # the id column a card names is not needed to predict: rows are then named FILE:LINE
    (tmp_path / "card.md").write_text(card.read_text().replace("label: activity}", "label: activity, id: name}"))
    (tmp_path / "train.csv").write_text("\n".join(f"{row},{'name' if i == 0 else f'p{i}'}" for i, row in enumerate(rows_text)) + "\n")
    named_run = peftlab.run("protein-classify", data=str(card), backbone="tiny", out=tmp_path / "named",
                            overrides={"train.epochs": 1})
    named = peftlab.load(named_run).predict([str(tmp_path / "new.csv")])
    assert [r["id"] for r in named] == ["new.csv:2", "new.csv:3"]
    (tmp_path / "other.csv").write_text("sequence\nMKTAYIAKQR\n")
    with pytest.raises(UserError, match=r"other\.csv: column 'peptide' for fields\.sequence not found; predict reads "
                                        r"inputs with the run's card, \S*card\.md \(fields \{'sequence': 'peptide', "
                                        r"'label': 'activity'\}\): name the columns so in the input$"):
        peftlab.load(run_dir).predict([str(tmp_path / "other.csv")])


def test_predict_names_the_default_columns_when_the_run_card_maps_none(tmp_path):
    """The reader's own advice ("fix `fields` in the card") would point at a card predict
    does not take; predict says the run's card reads the default names instead."""
    import peftlab

    run_dir = peftlab.run("protein-classify", demo=True, out=tmp_path / "run", overrides={"train.epochs": 1})
    (tmp_path / "new.csv").write_text("peptide\nMKTAYIAKQR\n")
    with pytest.raises(UserError, match=r"new\.csv: column 'sequence' for fields\.sequence not found; predict reads "
                                        r"inputs with the run's card, \S*card\.md \(the default field names\)"):
        peftlab.load(run_dir).predict([str(tmp_path / "new.csv")])
    # a card is read with its targets, as in training; unlabelled data goes as files
    (tmp_path / "unlabelled.md").write_text("---\nname: u\ndomain: protein\ntask: protein-classify\nformat: csv\n"
                                            "splits: {test: new.csv}\n---\n")
    (tmp_path / "new.csv").write_text("sequence\nMKTAYIAKQR\n")
    with pytest.raises(UserError, match=r"new\.csv: column 'label' for fields\.label not found; predict reads a card's "
                                        r"data as training does, targets included: give unlabelled data as files"):
        peftlab.load(run_dir).predict([str(tmp_path / "unlabelled.md")])
    assert len(peftlab.load(run_dir).predict([str(tmp_path / "new.csv")])) == 1


def test_crop_notes_say_which_splits_hold_the_long_sequences(tmp_path):
    """Read at evaluation, "3 sequences are cropped" left open whether the test split had any."""
    from peftlab.pipelines import runner
    from peftlab.shared.tasks import get_task

    (tmp_path / "train.csv").write_text("sequence,label\n" + "".join(f"MKV{'A' * (i % 5)},{i % 2}\n" for i in range(20)))
    (tmp_path / "test.csv").write_text("sequence,label\nMKVAAAAAAAAAAAA,0\nMKV,1\nMKVLLLLLLLLLLLLLL,1\n")
    card = tmp_path / "card.md"
    card.write_text("---\nname: c\ndomain: protein\ntask: protein-classify\nformat: csv\nlabels: [a, b]\n"
                    "splits: {train: train.csv, test: test.csv, validation_fraction: 0}\n---\n")
    task = get_task("protein-classify")
    options = runner.cfg.build_task_options(task, {"max_length": 10})
    notes = task.read(runner.load_card(str(card), task), options).notes
    assert notes == ["2 sequences (test 2) are longer than 10 residues, cropped (random in training, start at evaluation)"]
    assert task.read(runner.load_card(str(card), task), runner.cfg.build_task_options(task, {})).notes == []


def test_nucleotide_only_sequences_and_shared_ids_are_noted(tmp_path):
    """A, C, G and T are amino acids too, so a DNA file reads without error: a note asks.
    Ids given to two rows would name two prediction lines alike."""
    rows = ["id,sequence,label"] + [f"p{i % 9},{'ACGT' * (1 + i % 3)}{'TTGCA'[i % 5]},{i % 2}" for i in range(20)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    card = write_task_card(tmp_path, "protein-classify", "format: csv\nfiles: {data: d.csv}\nlabels: [a, b]")
    notes = read_task_data(card, "protein-classify").notes
    assert f"{card}: every sequence holds only A, C, G, T (N): if these are DNA, translate them to protein first; " \
           f"ESM-2 reads amino acids" in notes
    assert f"{card}: 9 ids are given to more than one row (e.g. 'p0'); their prediction lines share it" in notes
    (tmp_path / "d.csv").write_text("\n".join(rows[:1] + [f"u{i}{row}".replace("ACGT", "MKWV" if i == 5 else "ACGT", 1)
                                                         for i, row in enumerate(rows[1:])]) + "\n")
    assert not any("DNA" in note or "more than one row" in note for note in read_task_data(card, "protein-classify").notes)
