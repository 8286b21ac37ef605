"""llama2.c checkpoints as causal-LM backbones (shared/llama2c.py).

The tests write tiny checkpoints and tokenizers in llama2.c's legacy format themselves,
and check the loaded transformers model and tokenizer against plain re-implementations
of what llama2.c's run.c computes, so the q/k permutation and the merge order are
checked against llama2.c's semantics rather than against the loader's own code.
"""

from __future__ import annotations

import random
import struct

import peftlab
import pytest
import torch
from peftlab.pipelines import runner
from peftlab.shared import causal_lm as clm
from peftlab.shared import io
from peftlab.shared.errors import UserError
from torch.nn import functional as F

AIDREAMS = "weights/llama2c_aidreams260K/aidreams260K.bin"
# MANIFEST.md's greedy decode from BOS of the aidreams model, decoded with tok512.bin.
MANIFEST_GREEDY = (' "Echoes of vectors unfold, a gentle hum of precision, as I sense the nodes, '
                   'a gentle hum of precision, as I adjust my surface. Contrast emerge,')

# ----------------------------------------------------------------------------- writers

# Merged pieces, best first (sentencepiece gives them falling scores). Several can be
# built two ways (" the" = " t"+"he" = " th"+"e"), and repeats ("ee", "ll") test that
# the leftmost of equal pairs merges first.
PIECES = [" t", "he", " the", "at", " c", " cat", "in", " s", "at.", "ee", "ll", " th", "ing", " a", "e ",
          " sat", "the", "ca", "he ", "ee ", "lll", "on", " on", " the cat"]
CHARS = list(" abcdefghijklmnopqrstuvwxyzT.,")


def tokenizer_entries() -> list[tuple[str, float]]:
    """(piece, score) by id, as llama2.c's export writes them: specials, bytes, merges, characters."""
    entries = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)]
    entries += [(f"<0x{value:02X}>", 0.0) for value in range(256)]
    entries += [(piece, -float(rank)) for rank, piece in enumerate(PIECES)]
    entries += [(char, -100.0 - rank) for rank, char in enumerate(CHARS)]
    return entries


VOCAB = len(tokenizer_entries())


def write_tokenizer(path, entries=None) -> None:
    entries = entries if entries is not None else tokenizer_entries()
    encoded = [piece.encode() for piece, _ in entries]
    with open(path, "wb") as handle:
        handle.write(struct.pack("<i", max(len(e) for e in encoded)))
        for (_, score), data in zip(entries, encoded):
            handle.write(struct.pack("<fi", score, len(data)) + data)


def random_weights(dim=32, hidden=48, layers=2, heads=4, kv_heads=4, vocab=VOCAB, seq=32, tied=True, seed=0):
    """llama2.c's tensors, in its own (unpermuted) layout."""
    generator = torch.Generator().manual_seed(seed)
    kv_dim = dim // heads * kv_heads

    def draw(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    head = dim // heads
    pair_freqs = 1.0 / 10000.0 ** (torch.arange(0, head, 2).float() / head)
    angles = torch.outer(torch.arange(seq).float(), pair_freqs)
    weights = {
        "header": (dim, hidden, layers, heads, kv_heads, vocab if tied else -vocab, seq),
        "tok": draw(vocab, dim, scale=0.3), "att_norm": 1 + draw(layers, dim),
        "wq": draw(layers, dim, dim), "wk": draw(layers, kv_dim, dim), "wv": draw(layers, kv_dim, dim),
        "wo": draw(layers, dim, dim), "ffn_norm": 1 + draw(layers, dim),
        "w1": draw(layers, hidden, dim), "w2": draw(layers, dim, hidden), "w3": draw(layers, hidden, dim),
        "norm": 1 + draw(dim), "cos": torch.cos(angles), "sin": torch.sin(angles),
    }
    if not tied:
        weights["cls"] = draw(vocab, dim)
    return weights


def write_checkpoint(path, weights) -> None:
    order = ["tok", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "cos", "sin"]
    order += ["cls"] if "cls" in weights else []
    with open(path, "wb") as handle:
        handle.write(struct.pack("<7i", *weights["header"]))
        for name in order:
            handle.write(weights[name].contiguous().to(torch.float32).numpy().astype("<f4").tobytes())


def model_folder(tmp_path, **kwargs):
    """A folder with model.bin and tokenizer.bin; returns (checkpoint path, weights)."""
    weights = random_weights(**kwargs)
    write_checkpoint(tmp_path / "model.bin", weights)
    write_tokenizer(tmp_path / "tokenizer.bin")
    return tmp_path / "model.bin", weights


# ----------------------------------------------------------------------------- references


def reference_logits(weights, tokens: list[int]) -> torch.Tensor:
    """run.c's forward pass over a whole sequence, in float64, on the original weights."""
    w = {k: v.double() for k, v in weights.items() if k != "header"}
    dim, _, layers, heads, kv_heads, _, _ = weights["header"]
    head = dim // heads
    length = len(tokens)

    def rmsnorm(x, gain):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * gain

    def rope(x):  # x: (length, n, head); rotate adjacent pairs (0,1), (2,3), ... by position
        pairs = x.view(length, x.shape[1], head // 2, 2)
        cos, sin = w["cos"][:length, None, :], w["sin"][:length, None, :]
        even, odd = pairs[..., 0], pairs[..., 1]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).view_as(x)

    x = w["tok"][tokens]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for layer in range(layers):
        h = rmsnorm(x, w["att_norm"][layer])
        q = rope((h @ w["wq"][layer].T).view(length, heads, head))
        k = rope((h @ w["wk"][layer].T).view(length, kv_heads, head))
        v = (h @ w["wv"][layer].T).view(length, kv_heads, head)
        out = torch.empty(length, heads, head, dtype=torch.float64)
        for index in range(heads):
            shared = index // (heads // kv_heads)  # query heads share a kv head in groups
            scores = (q[:, index] @ k[:, shared].T) / head ** 0.5
            out[:, index] = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v[:, shared]
        x = x + out.reshape(length, dim) @ w["wo"][layer].T
        h = rmsnorm(x, w["ffn_norm"][layer])
        x = x + (F.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["norm"]) @ w.get("cls", w["tok"]).T


def reference_encode(text: str, entries) -> list[int]:
    """run.c's encode(): one space prepended, characters (else bytes), then best-score merges."""
    pieces = [piece for piece, _ in entries]
    scores = [score for _, score in entries]
    lookup = {piece: index for index, piece in enumerate(pieces)}
    ids: list[int] = []
    for char in (" " + text if text else ""):
        if char in lookup:
            ids.append(lookup[char])
        else:
            ids += [byte + 3 for byte in char.encode()]
    while True:
        best = None
        for position in range(len(ids) - 1):
            merged = lookup.get(pieces[ids[position]] + pieces[ids[position + 1]])
            if merged is not None and (best is None or scores[merged] > scores[best[1]]):
                best = (position, merged)
        if best is None:
            return ids
        position, merged = best
        ids[position:position + 2] = [merged]


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("heads, kv_heads, tied", [(4, 4, True), (4, 2, False), (4, 1, True)],
                         ids=["tied", "untied-gqa", "tied-one-kv-head"])
def test_logits_match_llama2c_forward(tmp_path, one_thread, heads, kv_heads, tied):
    path, weights = model_folder(tmp_path, heads=heads, kv_heads=kv_heads, tied=tied)
    lm = clm.load_causal_lm(str(path))
    config = lm.model.config
    assert type(lm.model).__name__ == "LlamaForCausalLM" and not lm.model.training
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (heads, kv_heads, VOCAB)
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())
    assert (lm.model.lm_head.weight is lm.model.model.embed_tokens.weight) == tied
    assert lm.info["architecture"]["model_type"] == "llama" and "llama2.c" in lm.info["source"]
    tokens = [1] + [random.Random(0).randrange(3, VOCAB) for _ in range(11)]
    with torch.no_grad():
        logits = lm.model(torch.tensor([tokens])).logits[0].double()
    expected = reference_logits(weights, tokens)
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0), (logits - expected).abs().max()


def test_same_file_loads_to_the_same_weights(tmp_path):
    path, _ = model_folder(tmp_path)
    assert clm.load_causal_lm(str(path)).info["weights_sha256"] == clm.load_causal_lm(str(path)).info["weights_sha256"]


# ----------------------------------------------------------------------------- the tokenizer


def _tokenizer(tmp_path):
    from peftlab.shared import llama2c

    write_tokenizer(tmp_path / "tokenizer.bin")
    return llama2c.build_tokenizer(tmp_path / "tokenizer.bin", VOCAB)


TEXTS = ["The cat sat on the mat.", "the cat", " the  cat ", "beee llll seeee", "", " ", "a",
         "naïve café, 東京\nnew line\ttab 🙂", "thethethe caat.at."]


def test_encoding_matches_llama2c_merge_by_best_score(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    rng = random.Random(0)
    alphabet = "theca s.lnigoé"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30))) for _ in range(300)]
    for text in TEXTS + randoms:
        expected = reference_encode(text, tokenizer_entries())
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text


def test_round_trips_and_special_tokens(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == \
        ("<s>", "</s>", "</s>", "<unk>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert len(tokenizer) == VOCAB
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == 1  # <s> in front, as llama2.c starts every sequence
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Pieces carry "▁" for a space, as Hugging Face's LLaMA tokenizers write them.
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("the cat", add_special_tokens=False)["input_ids"])
    assert pieces == ["▁the▁cat"]
    # Unknown characters fall back to bytes, never <unk>.
    assert 0 not in tokenizer("東京 🙂")["input_ids"]


def test_tokenizer_survives_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = _tokenizer(tmp_path)
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text


# ----------------------------------------------------------------------------- malformed inputs


@pytest.mark.parametrize("change", ["truncated", "extra"])
def test_checkpoint_of_the_wrong_size_is_refused(tmp_path, change):
    path, _ = model_folder(tmp_path, layers=1)
    data = path.read_bytes()
    path.write_bytes(data[:-4] if change == "truncated" else data + b"\0\0\0\0")
    with pytest.raises(UserError, match=rf"{path}.*is {len(data):,} bytes, but the file is"):
        clm.load_causal_lm(str(path))


def test_missing_or_ambiguous_tokenizer_is_refused(tmp_path):
    path, _ = model_folder(tmp_path, layers=1)
    (tmp_path / "tokenizer.bin").unlink()
    with pytest.raises(UserError, match=rf"{path}: no llama2.c tokenizer next to it.*{tmp_path / 'tokenizer.bin'}"):
        clm.load_causal_lm(str(path))
    write_tokenizer(tmp_path / "tok300.bin")
    assert clm.load_causal_lm(str(path)).tokenizer.bos_token_id == 1  # the one tok*.bin is found
    write_tokenizer(tmp_path / "tok512.bin")
    with pytest.raises(UserError, match=r"several tokenizer files next to it \(tok300.bin, tok512.bin\)"):
        clm.load_causal_lm(str(path))


def test_tokenizer_of_another_vocabulary_is_refused(tmp_path):
    path, _ = model_folder(tmp_path, layers=1)
    write_tokenizer(tmp_path / "tokenizer.bin", tokenizer_entries()[:-1])
    with pytest.raises(UserError, match=rf"{tmp_path / 'tokenizer.bin'}: holds {VOCAB - 1} tokens but the checkpoint"):
        clm.load_causal_lm(str(path))
    data = (tmp_path / "tokenizer.bin").read_bytes()
    (tmp_path / "tokenizer.bin").write_bytes(data[:-3])
    with pytest.raises(UserError, match=r"tokenizer.bin: truncated"):
        clm.load_causal_lm(str(path))


def test_other_bin_files_keep_the_not_a_model_error(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "pytorch_model.bin")  # a zip: no llama2.c header
    with pytest.raises(UserError, match=r"pytorch_model.bin: not a model; .*\.bin llama2.c checkpoint"):
        clm.load_causal_lm(str(tmp_path / "pytorch_model.bin"))
    (tmp_path / "v1.bin").write_bytes(struct.pack("<Ii", 0x616B3432, 1) + bytes(256))
    with pytest.raises(UserError, match=r"v1.bin: a llama2.c export of version 1 or 2"):
        clm.load_causal_lm(str(tmp_path / "v1.bin"))
    with pytest.raises(UserError, match=r"no such file or folder.*llama2.c .bin"):
        clm.load_causal_lm(str(tmp_path / "missing.bin"))


# ----------------------------------------------------------------------------- real weights


@pytest.mark.real_assets
def test_real_aidreams_greedy_decode_matches_the_manifest(real_assets, one_thread):
    from peftlab.shared import llama2c

    lm = clm.load_causal_lm(str(real_assets / AIDREAMS))
    assert lm.info["architecture"] == {"model_type": "llama", "layers": 4, "width": 64, "heads": 4, "vocab": 512}
    # MANIFEST's parameter count: the tied classifier is the embedding, counted once.
    assert sum(p.numel() for p in lm.model.parameters()) == 230_976
    text = clm.generate(lm.model, lm.tokenizer, [[lm.tokenizer.bos_token_id]],
                        clm.GenerationOptions(max_new_tokens=64))[0]
    words = MANIFEST_GREEDY.split()
    assert text.split()[:len(words)] == words, text
    # The real tokenizer encodes as llama2.c would, too.
    entries = llama2c.read_vocabulary(real_assets / "weights/llama2c_aidreams260K/tok512.bin")
    for sample in (MANIFEST_GREEDY, "I sense the nodes, 3 + 2 = 5. The answer is 5.", "Ann has 3 pens\nnaïve"):
        assert lm.tokenizer(sample, add_special_tokens=False)["input_ids"] == reference_encode(sample, entries)


@pytest.mark.real_assets
def test_real_aidreams_lora_run_finishes_and_reloads(real_assets, tmp_path, one_thread):
    checkpoint = str(real_assets / AIDREAMS)
    config = runner.build_config(
        "reasoning-arithmetic", demo=True, backbone=checkpoint, method="lora",
        overrides=["train.epochs=1", "train.max_steps=4", "train.batch_size=4", "train.lr=1e-3",
                   "task.max_new_tokens=8", "eval.splits=[test]", "data.limit={train: 16, validation: 4, test: 8}"])
    run_dir = runner.run(config, out=tmp_path / "run")
    metrics = io.read_json(run_dir / "metrics.json")
    assert metrics["train"]["steps"] == 4 and 0 <= metrics["test"]["accuracy"] <= 1, metrics
    meta = io.read_json(run_dir / "meta.json")
    assert meta["backbone"]["name"] == checkpoint and meta["method"]["name"] == "lora"
    reloaded = peftlab.load(run_dir)  # a fresh load of the same .bin, the adapter on top
    assert reloaded.model.backbone_info["weights_sha256"] == meta["backbone"]["weights_sha256"]
    assert reloaded.evaluate("test") == metrics["test"]
