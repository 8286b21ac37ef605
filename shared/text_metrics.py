"""Text-generation metrics over sacrebleu, registered in the core metrics registry.

Generation tasks compare generated strings with reference strings, so these metrics
take `(references, hypotheses)` (two equal-length lists of str) rather than the
`(y_true, scores)` arrays of the classification metrics; a task's `compute_metrics`
calls them through `metrics.get_metric(name).fn`. Values are fractions in [0, 1].

- `bleu4`: smoothed sentence-level BLEU-4 averaged over examples, computed as
  CodeReviewer's evaluator (Li et al. 2022, `evaluator/smooth_bleu.py`, which
  LLaMA-Reviewer reuses) computes it, so values compare with the papers' (x100 there):
  words split as NLTK's `wordpunct_tokenize` splits them, lower-cased, punctuation split
  again and NIST-normalised; add-1 smoothing of the matched and total n-gram counts for
  n >= 2 (Lin & Och 2004); the brevity penalty exp(1 - (r+1)/(c+1)) against the shortest
  reference. An empty hypothesis of an empty reference scores 1. CodeReviewer's
  review-comment figure also drops the words of its `stopwords.txt` first: a
  code-review-comment card's `bleu_stopwords: FILE` makes `bleu4` that figure, and
  `smooth_bleu4(references, hypotheses, stopwords=...)` computes it from a run's
  predictions (the list is not shipped here).
- `corpus_bleu4`: corpus-level BLEU-4 (sacrebleu defaults, unsmoothed), the WMT figure.
- `exact_match`: whitespace-normalised string equality (runs of whitespace collapse to
  one space, ends stripped), the code-refinement convention.
- `rouge_l`: coco-caption's ROUGE-L (`pycocoevalcap`, longest common subsequence,
  F-measure with beta = 1.2 from the best precision and best recall over the
  references, no stemming), averaged over examples, on the words `cider` uses.
- `cider`: CIDEr-D (Vedantam et al. 2015) from `pycocoevalcap`. Its idf comes from the
  evaluated split's references, as in coco-caption. Reported as pycocoevalcap returns it
  (papers print it x100); it can exceed 1.

`rouge_l`, `cider` and `caption_bleu4` (video captioning's `bleu4`: coco-caption's
corpus-level `Bleu_4`) also take several references per example (each reference a list
of strings), as captioning data has (MSR-VTT: 20 per video), and a `tokenize` function
(texts -> space-joined words): `ptb_tokens` is coco-caption's own tokenisation (Stanford
CoreNLP's PTBTokenizer, run with Java), so the scores equal coco-caption's, the figures
captioning papers print; `word_tokens` (the default) is pure Python: lower-cased, split
on anything that is not a letter, digit or apostrophe, a Chinese or Japanese character
a word.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from importlib import resources

import sacrebleu
from peftlab.shared.errors import UserError
from peftlab.shared.metrics import list_metrics, register_metric

TEXT_METRICS = ("bleu4", "corpus_bleu4", "exact_match", "rouge_l", "cider")


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def _check(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")


# NLTK's wordpunct_tokenize (runs of word characters, runs of other non-space
# characters): the units stop words are matched against.
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")
# CodeXGLUE's splitPuncts: every non-word, non-space character on its own.
_SPLIT_PUNCTS = re.compile(r"\w+|[^\w\s]")
# Then NIST mteval's tokenisation puts spaces around ASCII symbols, the underscore among
# them, so `foo_bar` is three tokens; its other rules only separate what is already apart.
_NIST_SYMBOL = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")


def _smooth_bleu_tokens(text: str, stopwords: frozenset[str]) -> list[str]:
    words = [w for w in _WORDPUNCT.findall(text) if w not in stopwords]
    split = " ".join(_SPLIT_PUNCTS.findall(" ".join(words).lower()))
    return _NIST_SYMBOL.sub(r" \1 ", split).split()


def _ngram_counts(tokens: list[str], order: int) -> Counter:
    return Counter(tuple(tokens[i:i + order]) for i in range(len(tokens) - order + 1))


def _smoothed_sentence_bleu(reference: list[str], hypothesis: list[str]) -> float:
    log_precision = 0.0
    for order in range(1, 5):
        reference_counts = _ngram_counts(reference, order)
        matched = sum(min(count, reference_counts[gram]) for gram, count in _ngram_counts(hypothesis, order).items())
        total = max(len(hypothesis) - order + 1, 0)
        add = 1 if order > 1 else 0
        # The tiny constant keeps log() finite where nothing matched, as in smooth_bleu.py.
        log_precision += math.log(matched + add + sys.float_info.min) - math.log(total + add + sys.float_info.min)
    brevity = min(0.0, 1 - (len(reference) + 1) / (len(hypothesis) + 1))
    return math.exp(log_precision / 4 + brevity)


def smooth_bleu4(references: Sequence[str], hypotheses: Sequence[str], stopwords: Iterable[str] = ()) -> float | None:
    """Mean over examples of CodeReviewer's smoothed sentence BLEU-4, as a fraction (see
    the module docstring); `stopwords` (case-sensitive words) are dropped from both sides
    first, as its `rmstop=True` does."""
    _check(references, hypotheses)
    if not references:
        return None
    stopwords = frozenset(stopwords)
    total = 0.0
    for reference, hypothesis in zip(references, hypotheses):
        total += _smoothed_sentence_bleu(_smooth_bleu_tokens(reference, stopwords), _smooth_bleu_tokens(hypothesis, stopwords))
    return total / len(references)


def corpus_bleu4(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
    _check(references, hypotheses)
    if not references:
        return None
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score / 100.0


def exact_match(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
    _check(references, hypotheses)
    if not references:
        return None
    same = sum(normalize_whitespace(r) == normalize_whitespace(h) for r, h in zip(references, hypotheses))
    return same / len(references)


def compute_text_metrics(names: Sequence[str], references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Each named text metric over the pairs (names must be text metrics)."""
    from peftlab.shared.metrics import get_metric

    unknown = [n for n in names if n not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a text metric; text metrics are {', '.join(TEXT_METRICS)}")
    return {name: get_metric(name).fn(references, hypotheses) for name in names}


# Registered once, on first import; a re-import of this module (e.g. importlib.reload
# in a notebook) finds them there and leaves them be.
_FUNCTIONS = {"bleu4": smooth_bleu4, "corpus_bleu4": corpus_bleu4, "exact_match": exact_match}
for _name, _fn in _FUNCTIONS.items():
    if _name not in list_metrics():
        register_metric(_name, _fn, scores="text")


# ----------------------------------------------------------------------------- captioning metrics


def reference_lists(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Each example's references as a list (a single string is one reference)."""
    return [[r] if isinstance(r, str) else list(r) for r in references]


Tokenize = Callable[[Sequence[str]], list[str]]
"""Caption texts -> their words, space-joined (`word_tokens`, `ptb_tokens`)."""


def _tokenized(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str],
               tokenize: Tokenize) -> tuple[list[list[str]], list[str]]:
    """Every reference and hypothesis tokenised in one call (one Java process for PTB)."""
    lists = reference_lists(references)
    words = iter(tokenize([text for refs in lists for text in refs] + list(hypotheses)))
    return [[next(words) for _ in refs] for refs in lists], [next(words) for _ in hypotheses]


def caption_bleu4(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str],
                  tokenize: Tokenize | None = None) -> float | None:
    """coco-caption's `Bleu_4`, the captioning papers' BLEU-4: corpus-level over all the
    examples (clipped n-gram matches summed before the ratio, no smoothing), each
    hypothesis against all its references, the brevity penalty from the closest
    reference length."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    _check(references, hypotheses)
    if not references:
        return None
    scorer = BleuScorer(n=4)
    for refs, hypothesis in zip(*_tokenized(references, hypotheses, tokenize or word_tokens)):
        scorer += (hypothesis, refs)
    scores, _ = scorer.compute_score(option="closest", verbose=0)  # verbose would print to stdout
    return float(scores[3])


# Chinese and Japanese write words without spaces: each ideograph or kana counts as a
# word, as sacrebleu's `zh` tokeniser splits Chinese.
_UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# letters of any script and digits, with apostrophes inside ("man's")
_CAPTION_WORD = re.compile(rf"[{_UNSPACED}]|[^\W_{_UNSPACED}]+(?:'[^\W_{_UNSPACED}]+)*")


def rouge_l(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str],
            tokenize: Tokenize | None = None) -> float | None:
    """Mean over examples of coco-caption's ROUGE-L (pycocoevalcap): the LCS F-measure with
    beta = 1.2, from the best precision and the best recall over the references. An
    empty caption scores 0 (coco-caption divides by zero there)."""
    from pycocoevalcap.rouge.rouge import Rouge

    _check(references, hypotheses)
    if not references:
        return None
    scorer, total = Rouge(), 0.0
    for refs, hypothesis in zip(*_tokenized(references, hypotheses, tokenize or word_tokens)):
        kept = [words for words in refs if words]
        total += scorer.calc_score([hypothesis], kept) if hypothesis and kept else 0.0
    return total / len(references)


def caption_tokens(text: str) -> str:
    """Lower-cased words (letters of any script, digits, apostrophes; each Chinese or
    Japanese character a word) joined by spaces: punctuation goes, as coco-caption's PTB
    tokeniser drops it."""
    return " ".join(_CAPTION_WORD.findall(text.lower()))


def word_tokens(texts: Sequence[str]) -> list[str]:
    """`caption_tokens` of each text: the pure-Python tokenisation."""
    return [caption_tokens(text) for text in texts]


PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                             "--", "...", ";"])
"""The tokens coco-caption drops from the PTB tokeniser's output. Its list is upper-case
and the tokeniser lower-cases, so brackets stay, as -lrb- and -rrb-, in coco-caption too."""

JAVA_NEEDED = ("coco-caption's PTB tokeniser (task.caption_tokenizer=ptb) runs on Java, and no `java` is on PATH: "
               "install a Java runtime (e.g. apt install default-jre-headless), or set task.caption_tokenizer=words")


def ptb_tokens(texts: Sequence[str]) -> list[str]:
    """coco-caption's tokenisation (pycocoevalcap's PTBTokenizer) of each text: the Stanford
    CoreNLP PTBTokenizer that pycocoevalcap ships, lower-casing, one text per line, then
    coco-caption's punctuation dropped. One Java process for all the texts."""
    if not texts:
        return []
    java = shutil.which("java")
    if java is None:
        raise UserError(JAVA_NEEDED)
    jar = resources.files("pycocoevalcap.tokenizer") / "stanford-corenlp-3.4.1.jar"
    lines = "\n".join(" ".join(text.split()) for text in texts)  # a line break inside a text would split it
    command = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
               "-encoding", "utf-8"]
    result = subprocess.run(command, input=lines.encode("utf-8"), capture_output=True, check=False)
    tokenized = result.stdout.decode("utf-8").split("\n")
    if result.returncode or len(tokenized) < len(texts):
        raise RuntimeError(f"the PTB tokeniser failed (exit {result.returncode}): {result.stderr.decode()[-500:]}")
    return [" ".join(word for word in line.split() if word not in PTB_PUNCTUATION) for line in tokenized[:len(texts)]]


def cider(references: Sequence[str | Sequence[str]], hypotheses: Sequence[str],
          tokenize: Tokenize | None = None) -> float | None:
    """Corpus CIDEr-D over the examples (pycocoevalcap)."""
    from pycocoevalcap.cider.cider import Cider

    _check(references, hypotheses)
    if not references:
        return None
    truth, produced = _tokenized(references, hypotheses, tokenize or word_tokens)
    score, _ = Cider().compute_score(dict(enumerate(truth)), {i: [h] for i, h in enumerate(produced)})
    return float(score)


for _name, _fn in {"rouge_l": rouge_l, "cider": cider}.items():
    if _name not in list_metrics():
        register_metric(_name, _fn, scores="text")
