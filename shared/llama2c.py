"""llama2.c checkpoints (Karpathy's "legacy" export) as transformers LLaMA models.

llama2.c (github.com/karpathy/llama2c) trains small LLaMA models and writes them as one
flat binary file that its C runner reads with no library at all:

    header   7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len
    weights  float32, each tensor in PyTorch's (out, in) layout, stacked over layers:
             token embedding (vocab, dim)
             attention RMSNorm weights (layers, dim)
             wq (layers, dim, dim), wk (layers, kv_dim, dim), wv (layers, kv_dim, dim),
             wo (layers, dim, dim)
             FFN RMSNorm weights (layers, dim)
             w1 (layers, hidden, dim), w2 (layers, dim, hidden), w3 (layers, hidden, dim)
             final RMSNorm weight (dim)
             RoPE cos and sin tables (max_seq_len, head_dim / 2) each
             classifier (vocab, dim), only when vocab_size in the header is negative

A negative vocab_size is how the format says "the classifier is not the embedding".
Nothing else (no magic number, no version) marks the file, so a `.bin` file counts as
llama2.c when its header is self-consistent, and its size must then match the header
to the byte.

The tokenizer is a second file, `tokenizer.bin` or `tok<N>.bin` next to the checkpoint:

    int32 max_token_length, then per token: float32 score, int32 byte length, bytes

It is a sentencepiece BPE vocabulary with "▁" written back as a space: ids 0, 1, 2 are
<unk>, <s>, </s>, ids 3-258 the byte-fallback tokens "<0x00>".."<0xFF>", then the merged
pieces with their scores. llama2.c encodes by prepending one space, splitting the text
into characters (bytes for a character missing from the vocabulary), then merging the
adjacent pair whose concatenation has the best score until none is in the vocabulary.

This module rebuilds both as what the rest of peftlab loads from Hugging Face: a
`LlamaForCausalLM` in float32 and a `PreTrainedTokenizerFast` (bos <s>, eos </s>,
pad = eos), so every pipeline that calls `load_causal_lm` takes `--backbone model.bin`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peftlab.shared.errors import UserError

HEADER = struct.Struct("<7i")
FLOAT_BYTES = 4
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "▁"
"""What sentencepiece, and so Hugging Face's LLaMA tokenizers, write a space as."""
BYTE_TOKENS = {f"<0x{value:02X}>" for value in range(256)}
VERSIONED_MAGIC = 0x616B3432
"""The first uint32 of llama2.c's later export versions (1, 2), which this module does not read."""


# ----------------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class Header:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    """Negative when the classifier is stored separately from the embedding."""
    max_seq_len: int

    @property
    def vocab(self) -> int:
        return abs(self.vocab_size)

    @property
    def tied(self) -> bool:
        return self.vocab_size > 0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every float block of the file, in file order (the RoPE tables included)."""
        d, h, n = self.dim, self.hidden_dim, self.n_layers
        shapes = [
            ("tok_embeddings", (self.vocab, d)),
            ("attention_norm", (n, d)),
            ("wq", (n, d, d)),
            ("wk", (n, self.kv_dim, d)),
            ("wv", (n, self.kv_dim, d)),
            ("wo", (n, d, d)),
            ("ffn_norm", (n, d)),
            ("w1", (n, h, d)),
            ("w2", (n, d, h)),
            ("w3", (n, h, d)),
            ("norm", (d,)),
            ("freq_cis_real", (self.max_seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.max_seq_len, self.head_dim // 2)),
        ]
        if not self.tied:
            shapes.append(("output", (self.vocab, d)))
        return shapes

    def file_size(self) -> int:
        return HEADER.size + FLOAT_BYTES * sum(int(np.prod(shape)) for _, shape in self.tensor_shapes())

    def describe(self) -> str:
        return (f"dim {self.dim}, hidden_dim {self.hidden_dim}, {self.n_layers} layers, {self.n_heads} heads, "
                f"{self.n_kv_heads} kv heads, vocab {self.vocab} ({'tied' if self.tied else 'untied'} classifier), "
                f"max_seq_len {self.max_seq_len}")


def read_header(path: Path) -> Header | None:
    """The header of a llama2.c legacy checkpoint, or None when `path` does not start with one.

    The format has no magic number, so "is it llama2.c" can only mean "are these seven
    integers a model llama2.c could have written"; the bounds are far above any model a
    float32 single file holds and far below what random bytes (a zip, a pickle) give.
    """
    with open(path, "rb") as handle:
        raw = handle.read(HEADER.size)
    if len(raw) < HEADER.size:
        return None
    if struct.unpack_from("<I", raw)[0] == VERSIONED_MAGIC:
        raise UserError(f"{path}: a llama2.c export of version 1 or 2 (it starts with their magic number, 'ak42'); "
                        f"only the legacy format is read: re-export it with export.py --version 0")
    header = Header(*HEADER.unpack(raw))
    sizes_ok = (0 < header.dim <= 1 << 16 and 0 < header.hidden_dim <= 1 << 18 and 0 < header.n_layers <= 1024
                and 0 < header.n_kv_heads <= header.n_heads <= header.dim and 0 < header.vocab <= 1 << 22
                and 0 < header.max_seq_len <= 1 << 20)
    # Heads split the width evenly, query heads share kv heads evenly, and RoPE rotates
    # pairs of a head's dimensions: a header breaking any of these is not a model.
    shapes_ok = sizes_ok and (header.dim % header.n_heads == 0 and header.n_heads % header.n_kv_heads == 0
                              and header.head_dim % 2 == 0)
    return header if shapes_ok else None


def read_tensors(path: Path, header: Header) -> dict[str, torch.Tensor]:
    """The file's float blocks by llama2.c name; a size that does not match the header is a UserError."""
    expected, actual = header.file_size(), path.stat().st_size
    if actual != expected:
        damage = "truncated" if actual < expected else "extra bytes at the end"
        raise UserError(f"{path}: a llama2.c checkpoint with {header.describe()} is {expected:,} bytes, "
                        f"but the file is {actual:,} bytes ({damage}); re-export it (llama2.c export.py --version 0)")
    floats = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=HEADER.size).astype(np.float32, copy=False))
    tensors, offset = {}, 0
    for name, shape in header.tensor_shapes():
        count = int(np.prod(shape))
        tensors[name] = floats[offset:offset + count].view(shape)
        offset += count
    return tensors


def to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder a q or k projection's output rows from llama2.c's RoPE layout to transformers'.

    llama2.c rotates adjacent pairs of each head's dimensions (0,1), (2,3), ...; transformers'
    LLaMA rotates dimension i with i + head_dim/2 ("rotate_half"). Moving each head's even
    rows to its first half and odd rows to its second half makes the two compute the same
    attention scores, since q.k is unchanged when q and k are permuted alike.
    """
    rows, columns = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


def build_model(header: Header, tensors: dict[str, torch.Tensor]):
    """A float32 `LlamaForCausalLM` in eval mode holding the checkpoint's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=header.vocab, hidden_size=header.dim, intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers, num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads, max_position_embeddings=header.max_seq_len,
        # llama2.c's model.py fixes both; the file does not store them.
        rms_norm_eps=1e-5, rope_theta=10000.0,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=header.tied, bos_token_id=1, eos_token_id=2,
        # No pad id in the config: transformers would make it the embedding's padding_idx,
        # and eos (the pad token) would then get no gradient when embeddings train.
    )
    state = {"model.embed_tokens.weight": tensors["tok_embeddings"], "model.norm.weight": tensors["norm"],
             "lm_head.weight": tensors["tok_embeddings"] if header.tied else tensors["output"]}
    for layer in range(header.n_layers):
        prefix = f"model.layers.{layer}."
        state.update({
            prefix + "input_layernorm.weight": tensors["attention_norm"][layer],
            prefix + "self_attn.q_proj.weight": to_rotate_half(tensors["wq"][layer], header.n_heads),
            prefix + "self_attn.k_proj.weight": to_rotate_half(tensors["wk"][layer], header.n_kv_heads),
            prefix + "self_attn.v_proj.weight": tensors["wv"][layer],
            prefix + "self_attn.o_proj.weight": tensors["wo"][layer],
            prefix + "post_attention_layernorm.weight": tensors["ffn_norm"][layer],
            # llama2.c's FFN is w2(silu(w1 x) * w3 x): w1 is the gate, w3 the up projection.
            prefix + "mlp.gate_proj.weight": tensors["w1"][layer],
            prefix + "mlp.up_proj.weight": tensors["w3"][layer],
            prefix + "mlp.down_proj.weight": tensors["w2"][layer],
        })
    # Construction draws random initial weights that load_state_dict overwrites; doing it
    # on a forked RNG leaves the caller's random stream (a run's seed) as it was.
    with torch.random.fork_rng():
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.to(torch.float32)
    model.eval()
    return model


# ----------------------------------------------------------------------------- the tokenizer


def find_tokenizer(checkpoint: Path) -> Path:
    """`tokenizer.bin` next to the checkpoint, else its one `tok*.bin` (llama2.c's names)."""
    folder = checkpoint.parent
    if (folder / "tokenizer.bin").is_file():
        return folder / "tokenizer.bin"
    candidates = sorted(p for p in folder.glob("tok*.bin") if p.is_file() and p.resolve() != checkpoint.resolve())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise UserError(f"{checkpoint}: no llama2.c tokenizer next to it; put the tokenizer file the model was "
                        f"trained with there as {folder / 'tokenizer.bin'}")
    raise UserError(f"{checkpoint}: several tokenizer files next to it ({', '.join(p.name for p in candidates)}); "
                    f"copy the one the model was trained with to {folder / 'tokenizer.bin'}")


def read_vocabulary(path: Path) -> list[tuple[str, float]]:
    """(piece, score) per token id, as the file stores them (a space is still a space)."""
    data = path.read_bytes()
    if len(data) < 4:
        raise UserError(f"{path}: not a llama2.c tokenizer file (shorter than its 4-byte header)")
    offset, vocabulary = 4, []
    while offset < len(data):
        if offset + 8 > len(data):
            raise UserError(f"{path}: truncated llama2.c tokenizer file (token {len(vocabulary)} is cut off)")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if length < 0 or offset + length > len(data):
            raise UserError(f"{path}: truncated or corrupt llama2.c tokenizer file (token {len(vocabulary)} "
                            f"claims {length} bytes)")
        try:
            piece = data[offset:offset + length].decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}: token {len(vocabulary)} is not UTF-8; not a llama2.c tokenizer file") from None
        vocabulary.append((piece, score))
        offset += length
    return vocabulary


def derive_merges(vocab: dict[str, int], scores: list[float], unmergeable: set[str]) -> list[tuple[str, str]]:
    """BPE merges that reproduce merging by best score, best first.

    A BPE model applies the earliest-listed merge among the adjacent pairs present;
    llama2.c merges the pair whose concatenation scores best. So every way of writing a
    piece as two pieces of the vocabulary becomes a merge, ranked by the merged piece's
    score. Pieces with equal scores are ordered by id; sentencepiece gives merged pieces
    distinct scores, so that tie-break does not arise in practice.
    """
    ranked = []
    for piece, index in vocab.items():
        if piece in unmergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in unmergeable and right not in unmergeable:
                ranked.append((-scores[index], index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_tokenizer(path: Path, vocab_size: int | None = None):
    """A `PreTrainedTokenizerFast` that encodes and decodes as llama2.c does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = read_vocabulary(path)
    if vocab_size is not None and len(vocabulary) != vocab_size:
        raise UserError(f"{path}: holds {len(vocabulary)} tokens but the checkpoint's vocabulary has {vocab_size}; "
                        f"put the tokenizer the model was trained with next to it")
    if len(vocabulary) < 3:
        raise UserError(f"{path}: holds {len(vocabulary)} tokens; a llama2.c tokenizer starts with <unk>, <s>, </s>")
    # llama2.c fixes ids 0-2 as unk, bos, eos whatever text the file gives them (its
    # exporter writes "\n<s>\n"); use the names Hugging Face's LLaMA tokenizers use.
    pieces = [UNK, BOS, EOS] + [piece.replace(" ", SPACE) for piece, _ in vocabulary[3:]]
    scores = [score for _, score in vocabulary]
    vocab: dict[str, int] = {}
    for index, piece in enumerate(pieces):
        if piece in vocab:
            raise UserError(f"{path}: token {index} ({piece!r}) repeats token {vocab[piece]}; not a llama2.c tokenizer")
        vocab[piece] = index
    # Byte tokens stand for bytes, not for the text "<0x41>", and specials never merge.
    unmergeable = {UNK, BOS, EOS} | BYTE_TOKENS
    merges = derive_merges(vocab, scores, unmergeable)

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True))
    # llama2.c prepends one space to non-empty text (sentencepiece's dummy prefix) and its
    # pieces carry spaces, written "▁" here as in HF's LLaMA tokenizers. A normalizer and
    # no pre-tokenizer keep the text one sequence, so pieces can span words as in llama2.c.
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    # Decoding undoes each step: "▁" back to spaces, byte tokens back to bytes (joined into
    # UTF-8 characters), then the one prepended space is dropped.
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    # The specials match as whole tokens in text, and are never normalized or merged.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in (UNK, BOS, EOS)])
    # llama2.c starts every sequence with <s>; transformers adds it through the post-processor.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    # pad = eos: padded positions are masked out, so any id serves, and LLaMA has no pad.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- both


def load(path: Path, header: Header | None = None):
    """(model, tokenizer, source) for the llama2.c checkpoint at `path`."""
    header = header or read_header(path)
    if header is None:
        raise UserError(f"{path}: not a llama2.c checkpoint (its first 28 bytes are not a model header)")
    tensors = read_tensors(path, header)  # the size check first: a damaged file says so before anything else
    tokenizer_path = find_tokenizer(path)
    tokenizer = build_tokenizer(tokenizer_path, header.vocab)
    model = build_model(header, tensors)
    return model, tokenizer, f"llama2.c checkpoint {path} (tokenizer {tokenizer_path.name})"
