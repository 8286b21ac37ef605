"""Reasoning data: the public commonsense and math shapes, answer extraction, demo data.

Every record becomes one example: `id`, `dataset` (the record's `dataset` key, else the
shape's name, else the file's stem), `question` (the text the prompt shows), `choices`
(a list of option texts, or None), `answer` (the gold answer: an option letter,
`true`/`false`, an LLM-Adapters token such as `answer2`, or a number as text) and
`label` (the text the model is trained to write; for math it carries the rationale).

Commonsense shapes read: BoolQ (`question`, `passage`, `answer`|`label`), PIQA (`goal`,
`sol1`, `sol2`, `label`), SIQA (`context`, `question`, `answerA..C`, `label` 1-3),
HellaSwag (`ctx`|`ctx_a`, `endings`, `label`), WinoGrande (`sentence`, `option1`,
`option2`, `answer` 1-2), ARC and OBQA (`question.stem`, `question.choices`,
`answerKey`; or the Hugging Face form `question`, `choices.text/label`, `answerKey`),
LLM-Adapters' `commonsense_170k` (`instruction`, `answer`), and the unified form
(`question`, `choices`, `answer` as letter, 0-based index or option text).

Math shapes read: GSM8K (`question`, `answer` "... #### 72"), AQuA (`question`,
`options` "A)21", `rationale`, `correct`), SVAMP (`Body`, `Question`, `Equation`,
`Answer`), MAWPS (`sQuestion`, `lSolutions`), LLM-Adapters' math form (`instruction`,
`output`, `answer`) and the unified form (`question`, `answer`, optional `rationale`,
`choices`).
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path
from typing import Any

from peftlab.shared import io
from peftlab.shared.errors import MissingField, UserError

LETTERS = string.ascii_uppercase

# ----------------------------------------------------------------------------- reading


def read_jsonl(path: Path, kind: str, labelled: bool = True, records: list[tuple[int, Any]] | None = None) -> list[dict]:
    """JSON lines (or one JSON array) of a known shape -> examples; `kind` is commonsense or
    math. `records`: a card loader's records of the file, numbered, in place of its lines."""
    examples = []
    if records is None:
        records = json_records(path)
    for line, record in records:
        where = f"{path}:{line}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        examples.append(record_example(record, where, kind, labelled, dataset_of_file(path), f"{path.name}:{line}"))
    if not examples:
        raise UserError(f"{path}: no records; expected JSON lines of {kind} questions")
    return examples


def record_example(record: dict, where: str, kind: str, labelled: bool, dataset: str, default_id: str) -> dict:
    """One record of a known shape -> an example; the record's own `dataset` and `id`
    keys win over the ones given (the file's, its line)."""
    parse = commonsense_example if kind == "commonsense" else math_example
    example = parse(record, where, labelled)
    example.setdefault("dataset", record.get("dataset") or _shape_dataset(record) or dataset)
    example["dataset"] = str(example["dataset"]).lower()
    example["id"] = str(record.get("id", record.get("ID", default_id)))
    return example


def json_records(path: Path) -> list[tuple[int, Any]]:
    """The file's records, numbered: JSON lines by line, or a JSON array's items from 1."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise io.not_utf8(path, error, "save it as UTF-8") from None
    stripped = text.lstrip()
    if stripped.startswith("["):  # a JSON array, as SVAMP, MAWPS and AQuA ship in some releases
        try:
            return list(enumerate(io.user_json(text, path), start=1))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_number, io.user_json(line, f"{path}:{line_number}")))
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{line_number}: invalid JSON ({error.msg}); one JSON object per line") from None
    return records


_SHAPES = {  # distinguishing keys -> dataset name
    ("passage",): "boolq", ("goal", "sol1"): "piqa", ("context", "answerA"): "siqa", ("question_stem",): "obqa",
    ("endings",): "hellaswag", ("option1", "option2"): "winogrande",
    ("Body", "Question"): "svamp", ("sQuestion",): "mawps", ("options", "correct"): "aqua",
}


_SPLIT_WORDS = {"train", "training", "dev", "val", "valid", "validation", "test", "eval", "evaluation"}


def dataset_of_file(path: Path) -> str:
    """The dataset a file holds, by its name less split words: `ARC-Challenge-Test.jsonl`
    and `ARC-Challenge-Train.jsonl` are both `ARC-Challenge`, and so is
    `ARC-Challenge/test.json` (LLM-Adapters' layout). A record's own `dataset` key, where
    given, wins."""
    if path.stem.lower() in _SPLIT_WORDS and path.parent.name:
        return path.parent.name
    words = re.split(r"([-_.])", path.stem)
    while len(words) > 2 and words[-1].lower() in _SPLIT_WORDS:
        words = words[:-2]
    while len(words) > 2 and words[0].lower() in _SPLIT_WORDS:
        words = words[2:]
    return "".join(words)


def _shape_dataset(record: dict) -> str | None:
    for keys, name in _SHAPES.items():
        if all(k in record for k in keys):
            return name
    if isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return "gsm8k"
    return None


def _need(record: dict, key: str, where: str):
    if key not in record or record[key] is None:
        raise MissingField(where, f"missing field {key!r}", "see `peftlab card new TASK` for the accepted shapes")
    return record[key]


def _text(value, where: str, what: str) -> str:
    """A question's or option's text (`what` names it): str() would make null the text
    "None", and a blank one is nothing to answer or choose."""
    if value is None:
        raise UserError(f"{where}: {what} is null; give its text (or drop the line)")
    if isinstance(value, (dict, list, bool)):
        raise UserError(f"{where}: {what} is {json.dumps(value)[:40]}; expected text")
    text = str(value).strip()
    if not text:
        raise UserError(f"{where}: {what} is empty; fill it or drop the line")
    return text


def _field(record: dict, key: str, where: str) -> str:
    return _text(_need(record, key, where) if key not in record else record[key], where, f"field {key!r}")


def _options(choices: list, where: str) -> list[str]:
    return [_text(choice, where, f"choice {LETTERS[i]}") for i, choice in enumerate(choices)]


def _letter(index: int, count: int, where: str) -> str:
    if not 0 <= index < count:
        raise UserError(f"{where}: answer index {index} is out of range for {count} choices")
    return LETTERS[index]


def commonsense_example(record: dict, where: str, labelled: bool) -> dict:
    """One commonsense record of any supported shape -> an example."""
    question, choices, answer = _commonsense_fields(record, where, labelled)
    if choices is not None:
        if len(choices) < 2 or len(choices) > len(LETTERS):
            raise UserError(f"{where}: {len(choices)} choices; a multiple-choice question needs 2 to 26")
        choices = _options(choices, where)
    example: dict[str, Any] = {"question": question.strip(), "choices": choices}
    if answer is not None:
        example["answer"] = answer
        example["label"] = answer
    elif labelled:
        raise UserError(f"{where}: no answer; labelled data needs the gold answer")
    return example


def _commonsense_fields(r: dict, where: str, labelled: bool) -> tuple[str, list | None, str | None]:
    has = lambda *keys: all(k in r for k in keys)  # noqa: E731
    if has("passage", "question"):  # BoolQ (original: answer bool; SuperGLUE: label 1 = true)
        gold = r.get("answer", r.get("label"))
        answer = None if gold is None else ("true" if _truthy(gold, where) else "false")
        return f"{_field(r, 'passage', where)}\nQuestion: {_field(r, 'question', where)}?", None, answer
    if has("goal", "sol1", "sol2"):  # PIQA
        return _field(r, "goal", where), [r["sol1"], r["sol2"]], _indexed(r.get("label"), 2, 0, where)
    if has("context", "question", "answerA"):  # SIQA, labels 1..3
        choices = [r["answerA"], r["answerB"], r["answerC"]]
        question = f"{_field(r, 'context', where)} {_field(r, 'question', where)}"
        return question, choices, _indexed(r.get("label"), 3, 1, where)
    if "endings" in r:  # HellaSwag
        context = _text(r.get("ctx") or f"{r.get('ctx_a') or ''} {r.get('ctx_b') or ''}", where, "field 'ctx'")
        endings = _option_list(r["endings"], where, "endings")
        return f"How does it continue? {context}", endings, _indexed(r.get("label"), len(endings), 0, where)
    if has("sentence", "option1", "option2"):  # WinoGrande, answer 1..2
        return f"Fill in the blank: {_field(r, 'sentence', where)}", [r["option1"], r["option2"]], _indexed(r.get("answer"), 2, 1, where)
    if isinstance(r.get("question"), dict):  # ARC / OBQA official
        stem = _text(_need(r["question"], "stem", where), where, "field 'question.stem'")
        options = _need(r["question"], "choices", where)
        labels = [str(c.get("label")) for c in options]
        return stem, [c.get("text", "") for c in options], _keyed(r.get("answerKey"), labels, where)
    if isinstance(r.get("choices"), dict):  # ARC and OpenBookQA (its `question_stem`) on the Hugging Face hub
        if "text" not in r["choices"]:
            _unified_choices(r, where)  # {"A": "hammer", "B": "plum"}: refused as not a list
        labels = [str(label) for label in r["choices"].get("label", [])]
        question = _field(r, "question_stem" if "question_stem" in r else "question", where)
        return question, list(r["choices"].get("text", [])), _keyed(r.get("answerKey"), labels, where)
    if "instruction" in r:  # LLM-Adapters: the instruction already lists the options
        answer = r.get("answer")
        question = _field(r, "instruction", where) + (f"\n{r['input']}" if r.get("input") else "")
        return question, None, None if answer is None else str(answer).strip()
    if "question" in r:  # unified
        choices = _unified_choices(r, where)
        return _field(r, "question", where), choices, _unified_answer(r.get("answer"), choices, where)
    raise UserError(f"{where}: not a commonsense record peftlab knows (keys {sorted(r)[:6]}); "
                    f"use the unified form {{\"question\", \"choices\", \"answer\"}}")


def _option_list(options, where: str, key: str) -> list:
    """A record's options (`choices`, HellaSwag's `endings`, AQuA's `options`): a list of
    texts. An object's keys are not its options, so one is refused, not iterated."""
    if isinstance(options, dict):
        raise UserError(f"{where}: `{key}` is an object (keys {list(options)[:6]}); write the options as a list of "
                        f"texts, in the order the letters A, B, ... name them: \"{key}\": {json.dumps(list(options.values()))[:80]}")
    if not isinstance(options, list):
        raise UserError(f"{where}: `{key}` must be a list of option texts")
    return options


def _unified_choices(r: dict, where: str) -> list | None:
    choices = None if r.get("choices") is None else _option_list(r["choices"], where, "choices")
    if choices is not None and len(choices) < 2:
        raise UserError(f"{where}: `choices` lists {len(choices)} option(s); a multiple-choice question needs two "
                        f"or more (leave `choices` out for a true/false or free answer)")
    return choices


def _truthy(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise UserError(f"{where}: yes/no answer {value!r} is not true/false, yes/no or 1/0")


def _indexed(value, count: int, base: int, where: str) -> str | None:
    if value is None or value == "":
        return None
    try:
        index = int(value) - base
    except (TypeError, ValueError):
        raise UserError(f"{where}: answer {value!r} is not a number") from None
    return _letter(index, count, where)


def _keyed(key, labels: list[str], where: str) -> str | None:
    if key is None:
        return None
    if str(key) not in labels:
        raise UserError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return _letter(labels.index(str(key)), len(labels), where)


def _unified_answer(answer, choices: list | None, where: str) -> str | None:
    if answer is None:
        return None
    if choices is None:
        text = str(answer).strip()
        return text.lower() if text.lower() in ("true", "false") else text
    if isinstance(answer, bool):
        raise UserError(f"{where}: answer {answer!r} for a multiple-choice question; give a letter, index or option text")
    if isinstance(answer, int):
        return _letter(answer, len(choices), where)
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in LETTERS[:len(choices)]:
        return text.upper()
    if text in choices:
        return LETTERS[choices.index(text)]
    raise UserError(f"{where}: answer {answer!r} is neither a choice letter (A-{LETTERS[len(choices) - 1]}), "
                    f"a 0-based index nor one of the choices")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_CALCULATOR = re.compile(r"<<[^>]*>>")


def number_text(value, where: str) -> str:
    """A gold numeric answer as canonical text ("72", "0.5"), commas removed."""
    text = str(value).replace(",", "").strip()
    try:
        number = float(text)
    except ValueError:
        raise UserError(f"{where}: answer {value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise UserError(f"{where}: answer {value!r} is not a finite number")
    return str(int(number)) if number.is_integer() else repr(number)


def math_example(record: dict, where: str, labelled: bool) -> dict:
    """One math word problem of any supported shape -> an example."""
    r = record
    choices, rationale = None, ""
    if isinstance(r.get("answer"), str) and "####" in r["answer"]:  # GSM8K
        question = _field(r, "question", where)
        rationale, _, final = r["answer"].rpartition("####")
        rationale = _CALCULATOR.sub("", rationale).strip()
        answer = number_text(final, where)
    elif "options" in r and ("correct" in r or not labelled):  # AQuA
        question = _field(r, "question", where)
        choices = [re.sub(r"^[A-E]\)\s*", "", option) for option in _options(_option_list(r["options"], where, "options"), where)]
        rationale = str(r.get("rationale") or "").strip()
        answer = None if r.get("correct") is None else _unified_answer(str(r["correct"]), choices, where)
    elif "Body" in r:  # SVAMP
        question = f"{_field(r, 'Body', where)} {_field(r, 'Question', where)}"
        rationale = f"{r['Equation'].strip()} = {number_text(r['Answer'], where)}." if r.get("Equation") and "Answer" in r else ""
        answer = number_text(r["Answer"], where) if "Answer" in r else None
    elif "sQuestion" in r:  # MAWPS
        question = _field(r, "sQuestion", where)
        solutions = r.get("lSolutions") or []
        answer = number_text(solutions[0], where) if solutions else None
    elif "instruction" in r:  # LLM-Adapters math
        question = _field(r, "instruction", where) + (f"\n{r['input']}" if r.get("input") else "")
        rationale = str(r.get("output") or "").strip()
        gold = None if r.get("answer") is None else str(r["answer"]).strip()
        if gold is not None and len(gold) == 1 and gold.upper() in LETTERS:  # AQuA: the options are in the instruction
            choices = _inline_choices(question, where)
            answer = _letter_answer(gold, choices, where)
        else:
            answer = None if gold is None else number_text(gold, where)
    elif "question" in r:  # unified
        question = _field(r, "question", where)
        choices = _unified_choices(r, where)
        choices = None if choices is None else _options(choices, where)
        rationale = str(r.get("rationale") or "").strip()  # null: no rationale, not the text "None"
        gold = r.get("answer")
        answer = None if gold is None else (_unified_answer(gold, choices, where) if choices else number_text(gold, where))
    else:
        raise UserError(f"{where}: not a math record peftlab knows (keys {sorted(r)[:6]}); "
                        f"use the unified form {{\"question\", \"answer\"}} (+ optional \"rationale\")")
    example: dict[str, Any] = {"question": question.strip(), "choices": choices}
    if choices is not None and "instruction" in r:
        example["choices_in_question"] = True  # LLM-Adapters' prompt shows them inline; not twice
    if answer is None:
        if labelled:
            raise UserError(f"{where}: no answer; labelled data needs the gold answer")
        return example
    example["answer"] = answer
    # The target: the rationale where the data has one, then the answer in one fixed
    # phrase that extraction looks for first.
    final = f"The answer is {answer}."
    if rationale and final in rationale:  # LLM-Adapters' outputs end with the phrase already
        example["label"] = rationale
    else:
        example["label"] = f"{rationale} {final}" if rationale else final
    return example


def _inline_choices(question: str, where: str) -> list[str]:
    """AQuA's options as LLM-Adapters writes them, at the end of the instruction:
    "... Answer Choices: (A) 21 (B) 21.5 (C) 22 (D) 22.5 (E) 23"."""
    _, found, listed = question.rpartition("Answer Choices:")
    parts = re.split(r"\(([A-Z])\)\s*", listed)[1:] if found else []
    letters, texts = parts[0::2], [text.strip() for text in parts[1::2]]
    if len(letters) < 2 or "".join(letters) != LETTERS[:len(letters)]:
        raise UserError(f"{where}: the answer is an option letter, but the instruction does not end with its "
                        f"options as \"Answer Choices: (A) ... (B) ...\"; add them, or give the number")
    return texts


def _letter_answer(gold: str, choices: list[str], where: str) -> str:
    letter = gold.upper()
    if letter not in LETTERS[:len(choices)]:
        raise UserError(f"{where}: answer {gold!r} is not one of the options A-{LETTERS[len(choices) - 1]}")
    return letter


# ----------------------------------------------------------------------------- answer extraction


def extract_choice(text: str, example: dict) -> str | None:
    """The answer a commonsense generation gives, in the gold answer's vocabulary."""
    choices = example.get("choices")
    if choices:
        return _choice_letter(text, LETTERS[:len(choices)]) or _choice_text(text, choices)
    gold = str(example.get("answer", "true")).lower()
    if gold in ("true", "false"):
        match = re.search(r"\b(true|false|yes|no)\b", text.lower())
        return None if match is None else {"yes": "true", "no": "false"}.get(match.group(1), match.group(1))
    family = re.sub(r"\d+$", "", gold)
    if family != gold:  # LLM-Adapters tokens: answer1, solution2, option1, ending4
        match = re.search(rf"\b{re.escape(family)}\d+\b", text.lower())
        return None if match is None else match.group(0)
    return " ".join(text.split()) or None


def _choice_letter(text: str, valid: str) -> str | None:
    """The option letter a generation names, most explicit form first: after "answer"
    ("The answer is (b)", "Answer: C"), then in parentheses ("(B)", "B)"), then a capital
    standing alone that does not start a sentence's words ("A train leaves", "A plum is")."""
    either_case = rf"([{valid}{valid.lower()}])"  # a lower-case letter only where brackets mark it
    answer = r"(?i:answer)\W{0,3}(?:(?i:is)\W{0,3})?"
    for pattern in (rf"{answer}\({either_case}\)", rf"{answer}([{valid}])(?![A-Za-z])", rf"\({either_case}\)",
                    rf"(?<![A-Za-z]){either_case}\)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1).upper()
    # U+FFFD (bytes that decode to no character) is part of a broken token, not a boundary
    for match in re.finditer(rf"(?<![A-Za-z\ufffd])([{valid}])(?![A-Za-z\ufffd])", text):
        if not re.match(r" [a-z]", text[match.end():match.end() + 2]):  # "A plum": an article, not an option
            return match.group(1)
    return None


def _choice_text(text: str, choices: list[str]) -> str | None:
    """The one option a generation spells out. Numeric options (AQuA's "3", "4.5") are
    matched by the generation's final number, since a working that passes through "3" does
    not choose "3". Other options are matched as whole words ("23" is not "2"); an option
    found only inside a longer one found ("apple" in "apple pie") does not count, and a
    generation naming two options chooses none, rather than the first listed."""
    values = [_as_number(choice) for choice in choices]
    if all(value is not None for value in values):
        stated = extract_number(text)
        hits = [] if stated is None else [i for i, value in enumerate(values) if abs(value - float(stated)) <= 1e-3]
        return LETTERS[hits[0]] if len(hits) == 1 else None
    lowered = " ".join(text.lower().split())
    wanted = [" ".join(choice.lower().split()) for choice in choices]
    found = [i for i, option in enumerate(wanted) if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", lowered)]
    found = [i for i in found if not any(j != i and wanted[i] in wanted[j] and len(wanted[j]) > len(wanted[i])
                                         for j in found)]
    return LETTERS[found[0]] if len(found) == 1 else None


def _as_number(text: str) -> float | None:
    try:
        return float(number_text(text, "option"))
    except UserError:
        return None


def extract_number(text: str) -> str | None:
    """The final number of a math answer: the first after "answer is" (the result of an
    equation there: "the answer is 7 - 2 = 5" gives 5), else the last one of the text.
    A generation that runs on past its answer keeps it; a Unicode minus reads as one."""
    text = text.replace("\u2212", "-")
    parts = re.split(r"answer is", text, flags=re.IGNORECASE)
    stated = re.split(r"\.(?:\s|$)|\n", parts[-1], maxsplit=1)[0] if len(parts) > 1 else ""
    after = _NUMBER.findall(stated.rpartition("=")[2]) or _NUMBER.findall(stated)
    candidates = after[:1] or _NUMBER.findall(text)[-1:]
    if not candidates:
        return None
    try:
        return number_text(candidates[0], "generated text")
    except UserError:
        return None


def extract_math(text: str, example: dict) -> str | None:
    if example.get("choices"):
        return extract_choice(text, example)
    return extract_number(text)


def extract_as_pyreft(text: str, example: dict, numeric_task: bool) -> str | None:
    """What ReFT's evaluation (pyreft's examples/loreft, after LLM-Adapters) reads from a
    generation: commonsense, the whole generation (scored by exact match); math, the last
    number (thousands commas dropped), and for AQuA's options the first capital A-E
    anywhere in the text."""
    if not numeric_task:
        return text.strip()
    if example.get("choices"):
        letter = re.search(r"[A-E]", text)
        return letter.group(0) if letter else None
    numbers = re.findall(r"-?\d+\.?\d*", text.replace(",", ""))
    return numbers[-1] if numbers else None


def same_answer_as_pyreft(predicted: str | None, gold: str, numeric: bool) -> bool:
    """pyreft's comparison: numbers within 0.001, anything else exactly (case included)."""
    if predicted is None:
        return False
    if numeric:
        try:
            return abs(float(predicted) - float(gold)) <= 1e-3
        except ValueError:
            return False
    return predicted == str(gold).strip()


def same_answer(predicted: str | None, gold: str, numeric: bool) -> bool:
    if predicted is None:
        return False
    if numeric:
        try:
            return abs(float(predicted) - float(gold)) < 1e-3  # LLM-Adapters' tolerance
        except ValueError:
            return False
    return predicted.strip().lower() == gold.strip().lower()


# ----------------------------------------------------------------------------- demo data

# The demos are learnable by a tiny model trained from scratch on bytes in a few hundred
# steps: every template has a fixed length, so the numbers that decide the answer sit
# at fixed offsets from the answer, and each number is one byte-level token.
_UNITS = (("heavier", "kg"), ("longer", "cm"), ("older", "years"))


def demo_commonsense(sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Quantity comparisons in three shapes: yes/no (`demo_boolq`), two options
    (`demo_piqa`) and four options (`demo_arc`); the larger quantity is the answer."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        examples = []
        for index in range(size):
            shape = ("yesno", "two", "four")[index % 3]
            adjective, unit = rng.choice(_UNITS)
            if shape == "yesno":
                a, b = rng.sample(range(1, 10), 2)
                example = {"dataset": "demo_boolq", "question": f"Is {a} {unit} {adjective} than {b} {unit}?",
                           "choices": None, "answer": "true" if a > b else "false"}
            else:
                values = rng.sample(range(1, 10), 2 if shape == "two" else 4)
                example = {"dataset": "demo_piqa" if shape == "two" else "demo_arc",
                           "question": f"Which is {adjective}?", "choices": [f"{v} {unit}" for v in values],
                           "answer": LETTERS[values.index(max(values))]}
            example["label"] = example["answer"]
            example["id"] = f"{split}-{index}"
            examples.append(example)
        splits[split] = examples
    return splits


_PEOPLE = ["Ann", "Bob", "Cid", "Dee", "Eve", "Fay"]
_ITEMS = ["pens", "cups", "hats", "keys"]


def demo_math(sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """One-step word problems (add or take away, numbers 1-5) with the equation as rationale."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        examples = []
        for index in range(size):
            person, item = rng.choice(_PEOPLE), rng.choice(_ITEMS)
            a, b = rng.randint(1, 5), rng.randint(1, 5)
            if rng.random() < 0.5:
                question = f"{person} has {a} {item} and gets {b} more. How many {item} now?"
                equation, answer = f"{a} + {b} = {a + b}.", a + b
            else:
                a, b = max(a, b), min(a, b)
                question = f"{person} has {a} {item} and loses {b} of them. How many {item} now?"
                equation, answer = f"{a} - {b} = {a - b}.", a - b
            examples.append({"id": f"{split}-{index}", "dataset": "demo_math", "question": question, "choices": None,
                             "answer": str(answer), "label": f"{equation} The answer is {answer}."})
        splits[split] = examples
    return splits
