"""LoReFT / DiReFT and the reasoning pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from peftlab.domains.reasoning import data
from peftlab.domains.reasoning.tasks import render_prompt
from peftlab.pipelines import config as cfg
from peftlab.pipelines import runner
from peftlab.pipelines.cli import main
from peftlab.pipelines.predictor import load
from peftlab.shared import causal_lm as clm
from peftlab.shared import io, methods
from peftlab.shared.cards import read_card
from peftlab.shared.errors import UserError
from peftlab.shared.methods.reft import LoReFTIntervention, intervention_count, prompt_lengths
from peftlab.shared.tasks import get_task

# ----------------------------------------------------------------------------- LoReFT / DiReFT


def _batch(tokenizer):
    prompts = [clm.prompt_ids(tokenizer, "Question: is a plum a fruit?\nAnswer: "), clm.prompt_ids(tokenizer, "Hi")]
    answers = [clm.answer_ids(tokenizer, "true", 8), clm.answer_ids(tokenizer, "a longer answer", 32)]
    return clm.training_batch(tokenizer, prompts, answers)


def _logits(model, batch):
    logits, _ = clm.lm_forward(model, batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_lengths"])
    return logits


@pytest.mark.parametrize("tie_positions, tie_layers", [(True, False), (False, False), (True, True), (False, True)])
def test_reft_parameter_count_matches_the_formula(tie_positions, tie_layers):
    for method in ("loreft", "direft"):
        lm = clm.tiny_causal_lm()
        width, layers, rank = lm.model.config.hidden_size, lm.model.config.num_hidden_layers, 4
        adapted = methods.apply(lm.model, method, rank=rank, tie_positions=tie_positions, tie_layers=tie_layers)
        options = adapted.options
        expected = intervention_count(options, layers) * (2 * rank * width + rank)
        assert adapted.parameter_counts()["method"] == expected
        assert intervention_count(options, layers) == (1 if tie_layers else layers) * (1 if tie_positions else 2)


@pytest.mark.parametrize("pipeline", ["reasoning-commonsense", "reasoning-arithmetic"])
def test_the_recipes_loreft_has_the_papers_parameter_share(pipeline):
    """ReFT reports LoReFT at 0.031 % of LLaMA-7B (32 layers, width 4096, 6.74 B
    parameters): rank 8, one intervention per layer for both windows (pyreft's
    --share_weights). The count formula is checked against real models above."""
    from peftlab.shared.methods.reft import ReftOptions

    config = runner.build_config(pipeline, demo=False, overrides=[])
    options = ReftOptions(**config.method_options)
    count = intervention_count(options, 32) * (2 * options.rank * 4096 + options.rank)
    assert round(100 * count / 6_738_415_616, 3) == 0.031


def test_loreft_rotation_keeps_orthonormal_rows_through_training():
    lm = clm.tiny_causal_lm()
    adapted = methods.apply(lm.model, "loreft", rank=4)
    batch = _batch(lm.tokenizer)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=0.05)
    before = [m.rotate.weight.detach().clone() for m in adapted.modules() if isinstance(m, LoReFTIntervention)]
    for _ in range(5):
        loss = clm.answer_loss(_logits(adapted, batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rotations = [m.rotate.weight.detach() for m in adapted.modules() if isinstance(m, LoReFTIntervention)]
    assert any(not torch.allclose(a, b) for a, b in zip(before, rotations)), "R must learn"
    for rotation in rotations:
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), atol=1e-5, rtol=0)


def test_loreft_rotation_starts_on_random_directions():
    """pyreft initialises R orthogonally at random; a Cayley map of a small matrix would
    start near the identity, putting most of R on hidden dimensions 0..r-1."""
    torch.manual_seed(0)
    first, second = LoReFTIntervention(256, 4), LoReFTIntervention(256, 4)
    for intervention in (first, second):
        rotation = intervention.rotate.weight.detach()
        torch.testing.assert_close(rotation @ rotation.T, torch.eye(4), atol=1e-5, rtol=0)
        assert (rotation ** 2).sum(dim=0).max() < 0.25  # no hidden dimension holds much of it
    overlap = first.rotate.weight.detach() @ second.rotate.weight.detach().T
    assert overlap.abs().max() < 0.5  # two draws span different subspaces


def test_loreft_is_not_identity_at_init_but_is_when_w_equals_r():
    lm = clm.tiny_causal_lm()
    batch = _batch(lm.tokenizer)
    base = _logits(lm.model, batch).detach()
    adapted = methods.apply(lm.model, "loreft", rank=4)
    assert not methods.get_method("loreft").identity_at_init
    assert (_logits(adapted, batch) - base).abs().max() > 1e-3
    for module in adapted.modules():
        if isinstance(module, LoReFTIntervention):
            module.make_identity()
    torch.testing.assert_close(_logits(adapted, batch), base, atol=1e-5, rtol=0)


def test_loreft_edit_keeps_fp32_precision_under_bf16_autocast():
    """W h + b and R h nearly cancel once W is near R; in bf16 their difference was
    mostly rounding error (the edit, not the model, decides what LoReFT learns)."""
    torch.manual_seed(0)
    intervention = LoReFTIntervention(width=256, rank=4)
    intervention.make_identity()
    with torch.no_grad():
        intervention.learned_source.weight.add_(1e-3 * torch.randn(4, 256))
    hidden = 10 * torch.randn(32, 256)
    with torch.no_grad():
        exact = intervention.double()(hidden.double())
        intervention.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            edit = intervention(hidden)
    assert edit.dtype == torch.float32
    assert ((edit.double() - exact).norm() / exact.norm()).item() < 1e-4


def test_direft_starts_as_the_base_model():
    lm = clm.tiny_causal_lm()
    batch = _batch(lm.tokenizer)
    base = _logits(lm.model, batch).detach()
    adapted = methods.apply(lm.model, "direft", rank=4, tie_positions=False)
    torch.testing.assert_close(_logits(adapted, batch), base, atol=0, rtol=0)


def test_interventions_touch_only_the_chosen_prompt_positions():
    """Layer 1 only, last position only: the states before that position must not change."""
    lm = clm.tiny_causal_lm()
    batch = _batch(lm.tokenizer)
    base = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    adapted = methods.apply(lm.model, "loreft", rank=4, layers=[1], first_positions=0, last_positions=1)
    with torch.no_grad(), prompt_lengths(adapted, batch["prompt_lengths"]):
        edited = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    changed = (edited.hidden_states[2] - base.hidden_states[2]).abs().amax(-1) > 1e-6  # output of layer 1
    expected = torch.zeros_like(changed)
    for row, length in enumerate(batch["prompt_lengths"].tolist()):
        expected[row, length - 1] = True
    assert torch.equal(changed, expected)
    # layer 0's output is untouched everywhere
    torch.testing.assert_close(edited.hidden_states[1], base.hidden_states[1], atol=0, rtol=0)


def test_short_prompts_split_their_positions_as_pyreft_does():
    """Windows of 7 and 7 on prompts of 10 and 9 tokens: each takes at most half the prompt."""
    from peftlab.shared.methods.reft import Interventions

    where = Interventions(first=7, last=7)
    mask = torch.tensor([[1] * 10 + [0] * 2, [0] * 3 + [1] * 9, [1] * 12])  # right-, left-padded, full
    where.locate(None, (), {"attention_mask": mask})

    def columns(row_mask):
        return [i for i, on in enumerate(row_mask.tolist()) if on]

    assert columns(where.first_mask[0]) == [0, 1, 2, 3, 4] and columns(where.last_mask[0]) == [5, 6, 7, 8, 9]
    assert columns(where.first_mask[1]) == [3, 4, 5, 6] and columns(where.last_mask[1]) == [8, 9, 10, 11]  # 7 unedited
    assert columns(where.first_mask[2]) == [0, 1, 2, 3, 4, 5] and columns(where.last_mask[2]) == [6, 7, 8, 9, 10, 11]


def test_generation_edits_the_prompt_once_with_left_padding():
    """Batched left-padded generation equals generating each prompt alone."""
    lm = clm.tiny_causal_lm()
    torch.manual_seed(0)
    adapted = methods.apply(lm.model, "loreft", rank=4, first_positions=1, last_positions=2)
    prompts = [clm.prompt_ids(lm.tokenizer, "Is a cat an animal? "), clm.prompt_ids(lm.tokenizer, "Hi ")]
    options = clm.GenerationOptions(max_new_tokens=6)
    together = clm.generate(adapted, lm.tokenizer, prompts, options)
    alone = [clm.generate(adapted, lm.tokenizer, [p], options)[0] for p in prompts]
    assert together == alone


@pytest.mark.parametrize("method", ["loreft", "direft"])
def test_reft_learns_to_answer_from_the_prompt_with_frozen_weights(method):
    """The cue is the prompt's last token; the answer letter follows from it. Frozen
    weights, edits at the last position only: chance is 1/4, the method must reach 1."""
    lm = clm.tiny_causal_lm("tiny-steerable")
    adapted = methods.apply(lm.model, method, rank=4, first_positions=0, last_positions=1)
    tokenizer = lm.tokenizer
    prompts = [clm.prompt_ids(tokenizer, f"Pick {digit}") for digit in range(4)]
    answers = [clm.answer_ids(tokenizer, letter, 1) for letter in "ABCD"]
    batch = clm.training_batch(tokenizer, prompts, answers)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(80):
        loss = clm.answer_loss(_logits(adapted, batch), batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert clm.generate(adapted, tokenizer, prompts, clm.GenerationOptions(max_new_tokens=1)) == list("ABCD")
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if "reft_interventions" not in n)


def test_reft_options_are_checked():
    lm = clm.tiny_causal_lm()
    with pytest.raises(UserError, match="rank must be >= 1"):
        methods.apply(lm.model, "loreft", rank=0)
    with pytest.raises(UserError, match="no position would be edited"):
        methods.apply(clm.tiny_causal_lm().model, "loreft", first_positions=0, last_positions=0)
    with pytest.raises(UserError, match="exceeds the hidden width"):
        methods.apply(clm.tiny_causal_lm().model, "loreft", rank=65)


def test_reft_adapter_saves_and_reloads_exactly(tmp_path):
    lm = clm.tiny_causal_lm()
    batch = _batch(lm.tokenizer)
    adapted = methods.apply(lm.model, "loreft", rank=4, tie_positions=False)
    with torch.no_grad():
        for param in adapted.method_parameters().values():
            param.add_(0.01 * torch.randn_like(param))
    expected = _logits(adapted, batch).detach()
    adapted.save(tmp_path / "adapter")
    reloaded = methods.load_adapter(clm.tiny_causal_lm().model, tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, batch), expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------- readers


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_commonsense_reader_normalises_every_public_shape(tmp_path):
    records = [
        {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
        {"goal": "open a jar", "sol1": "twist the lid", "sol2": "freeze it", "label": 0},
        {"context": "Ann helped.", "question": "How does Ann feel?", "answerA": "bad", "answerB": "good", "answerC": "sad", "label": "2"},
        {"ctx": "A man sits", "endings": ["a", "b", "c", "d"], "label": 3},
        {"sentence": "The cup fell because _ was slippery.", "option1": "cup", "option2": "table", "answer": "1"},
        {"id": "Mercury_1", "question": {"stem": "Which is a metal?", "choices": [{"label": "A", "text": "iron"}, {"label": "B", "text": "wood"}]}, "answerKey": "A"},
        {"question": "Which is a gas?", "choices": {"text": ["air", "rock", "ice"], "label": ["1", "2", "3"]}, "answerKey": "1"},
        {"id": "7-980", "question_stem": "The sun is responsible for",  # OpenBookQA on the Hugging Face hub
         "choices": {"text": ["puppies", "night", "cold", "plants sprouting"], "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
        {"instruction": "Please choose: ... Answer format: answer1/answer2", "answer": "answer2"},
        {"question": "Which one is a fruit?", "choices": ["hammer", "plum"], "answer": "plum", "dataset": "mine"},
    ]
    path = _write(tmp_path / "arc_easy.jsonl", records)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # saved with a byte-order mark, as Windows tools do
    examples = data.read_jsonl(path, "commonsense")
    answers = [e["answer"] for e in examples]
    assert answers == ["true", "A", "B", "D", "A", "A", "A", "D", "answer2", "B"]
    assert [e["dataset"] for e in examples] == ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_easy",
                                                "arc_easy", "obqa", "arc_easy", "mine"]
    assert examples[7]["question"].startswith("The sun is responsible for") and len(examples[7]["choices"]) == 4
    assert examples[1]["choices"] == ["twist the lid", "freeze it"]
    assert examples[5]["id"] == "Mercury_1"


@pytest.mark.parametrize("relative, dataset", [
    ("ARC-Challenge-Test.jsonl", "arc-challenge"), ("ARC-Challenge-Train.jsonl", "arc-challenge"),
    ("ARC-Easy/test.json", "arc-easy"), ("train_questions.jsonl", "questions"), ("obqa.dev.jsonl", "obqa"),
    ("my-corpus/test.jsonl", "my-corpus"), ("my-data.jsonl", "my-data")])
def test_a_record_without_dataset_or_shape_is_grouped_by_its_file_name_less_split_words(tmp_path, relative, dataset):
    path = tmp_path / relative
    path.parent.mkdir(exist_ok=True)
    _write(path, [{"id": "Mercury_1", "question": {"stem": "Which is a metal?", "choices": [
        {"label": "A", "text": "iron"}, {"label": "B", "text": "wood"}]}, "answerKey": "A"}])
    (example,) = data.read_jsonl(path, "commonsense")
    assert example["dataset"] == dataset


def test_math_reader_normalises_every_public_shape(tmp_path):
    records = [
        {"question": "Natalia sold 48 clips...", "answer": "She sold 48/2 = <<48/2=24>>24 in May.\n#### 1,072"},
        {"question": "A car goes?", "options": ["A)21", "B)22", "C)23"], "rationale": "Because.", "correct": "B"},
        {"Body": "Ann has 3 pens.", "Question": "How many pens?", "Equation": "( 3.0 + 0.0 )", "Answer": 3.0},
        {"sQuestion": "Tom had 5 cats.", "lSolutions": [5.0]},
        {"instruction": "Add 2 and 2.", "output": "2 + 2 = 4. The answer is 4.", "answer": "4"},
        {"question": "1 + 1?", "answer": 2, "rationale": "1 + 1 = 2."},
    ]
    examples = data.read_jsonl(_write(tmp_path / "m.jsonl", records), "math")
    assert [e["answer"] for e in examples] == ["1072", "B", "3", "5", "4", "2"]
    assert [e["dataset"] for e in examples[:4]] == ["gsm8k", "aqua", "svamp", "mawps"]
    assert examples[0]["label"] == "She sold 48/2 = 24 in May. The answer is 1072."
    assert examples[1]["choices"] == ["21", "22", "23"]
    assert examples[4]["label"] == "2 + 2 = 4. The answer is 4."


def test_llm_adapters_aqua_is_scored_by_its_option_letter(tmp_path):
    """LLM-Adapters' (and pyreft's) AQuA file writes the options inside the instruction and
    the gold as a letter: the options are read from there, shown once in the prompt, and a
    generation ending "The answer is A." is right under both scorings."""
    instruction = "What is 1/5 of 1? Answer Choices: (A) 0.2 (B) 0.4 (C) 5 (D) 1000 (E) 1"
    path = _write(tmp_path / "aqua.jsonl", [
        {"instruction": instruction, "input": "", "output": "1/5 = 0.2. The answer is A.", "answer": "A"},
        {"instruction": instruction, "input": "", "output": "Since 5 > 1. The answer is E.", "answer": "e"}])
    first, second = data.read_jsonl(path, "math")
    assert first["choices"] == second["choices"] == ["0.2", "0.4", "5", "1000", "1"]
    assert (first["answer"], second["answer"]) == ("A", "E") and first["label"] == "1/5 = 0.2. The answer is A."
    math = get_task("reasoning-arithmetic")
    for scoring in ("lenient", "pyreft"):
        assert math.is_right(first["label"], {**first, "scoring": scoring})
        assert math.is_right(second["label"], {**second, "scoring": scoring})
        assert not math.is_right(first["label"], {**second, "scoring": scoring})
    scores = math.compute_metrics(["accuracy"], [first, second], [first["label"], "The answer is 1000."])
    assert scores["accuracy"] == 0.5
    tokenizer = clm.load_causal_lm("tiny").tokenizer
    options = math.options(**{k: v for k, v in runner.build_config("reasoning-arithmetic").task.items() if k != "name"})
    prompt = tokenizer.decode(render_prompt(tokenizer, options, first)[len(clm.prompt_ids(tokenizer, "")):])
    assert prompt.count("(A) 0.2") == 1 and f"### Instruction:\n{instruction}\n\n### Response:" in prompt


@pytest.mark.parametrize("instruction, answer, message", [
    ("What is 1/5 of 1?", "A", r"aqua\.jsonl:1: the answer is an option letter, but the instruction does not end "
                               r"with its options as \"Answer Choices: \(A\) \.\.\. \(B\) \.\.\.\""),
    ("Pick. Answer Choices: (A) 1 (B) 2", "C", r"aqua\.jsonl:1: answer 'C' is not one of the options A-B"),
])
def test_llm_adapters_letter_answers_need_their_options(tmp_path, instruction, answer, message):
    path = _write(tmp_path / "aqua.jsonl", [{"instruction": instruction, "answer": answer}])
    with pytest.raises(UserError, match=message):
        data.read_jsonl(path, "math")


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', r"bad\.jsonl:1: answer 'C' is neither"),
    ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 5}', r"bad\.jsonl:1: answer index 5 is out of range"),
    ('{"question": "q", "choices": ["a", "b"]}', r"bad\.jsonl:1: no answer"),
    ('{"foo": 1}', r"bad\.jsonl:1: not a commonsense record"),
    ('{"question": "q", "choices": [], "answer": "A"}', r"bad\.jsonl:1: `choices` lists 0 option\(s\); a multiple-choice "
                                                        r"question needs two or more \(leave `choices` out"),
    ('{"question": "q", "answer": "maybe", "passage": "p"}', r"bad\.jsonl:1: yes/no answer 'maybe'"),
    ('not json', r"bad\.jsonl:1: invalid JSON"),
    ('{"question": null, "choices": ["a", "b"], "answer": "A"}',
     r"^\S*bad\.jsonl:1: field 'question' is null; give its text \(or drop the line\)$"),
    ('{"question": " ", "answer": "true"}', r"^\S*bad\.jsonl:1: field 'question' is empty; fill it or drop the line$"),
    ('{"question": "q", "choices": ["hammer", null], "answer": "A"}',
     r"^\S*bad\.jsonl:1: choice B is null; give its text \(or drop the line\)$"),
    ('{"question": "q", "choices": ["hammer", ""], "answer": "A"}', r"bad\.jsonl:1: choice B is empty"),
    ('{"goal": "g", "sol1": "a", "sol2": null, "label": 0}', r"bad\.jsonl:1: choice B is null"),
    ('{"question": "q", "passage": null, "answer": true}', r"bad\.jsonl:1: field 'passage' is null"),
    ('{"question": "q", "choices": {"A": "hammer", "B": "plum"}, "answer": "B"}',
     r"^\S*bad\.jsonl:1: `choices` is an object \(keys \['A', 'B'\]\); write the options as a list of texts, in the "
     r"order the letters A, B, \.\.\. name them: \"choices\": \[\"hammer\", \"plum\"\]$"),
    # HellaSwag's endings as an object: its keys were read as the options
    ('{"ctx": "A man sits.", "endings": {"a": "he sits", "b": "he runs"}, "label": 1}',
     r"^\S*bad\.jsonl:1: `endings` is an object \(keys \['a', 'b'\]\); write the options as a list of texts"),
])
def test_commonsense_reader_names_the_line_and_the_fix(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        data.read_jsonl(path, "commonsense")


def test_math_reader_refuses_non_numbers(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "seven"}, ])
    with pytest.raises(UserError, match=r"bad\.jsonl:1: answer 'seven' is not a number"):
        data.read_jsonl(path, "math")
    path = _write(tmp_path / "nan.jsonl", [{"question": "q", "answer": "nan"}])
    with pytest.raises(UserError, match="not a finite number"):
        data.read_jsonl(path, "math")


@pytest.mark.parametrize("record, message", [
    ({"question": None, "answer": 12}, r"^\S*bad\.jsonl:1: field 'question' is null; give its text \(or drop the line\)$"),
    ({"question": "  ", "answer": 12}, r"^\S*bad\.jsonl:1: field 'question' is empty; fill it or drop the line$"),
    ({"question": None, "answer": "5 + 7 = 12\n#### 12"}, r"bad\.jsonl:1: field 'question' is null"),
    ({"Body": None, "Question": "How many?", "Answer": 3}, r"bad\.jsonl:1: field 'Body' is null"),
    ({"question": "q", "options": ["A)1", None], "correct": "A"}, r"bad\.jsonl:1: choice B is null"),
    ({"question": "q", "choices": {"A": "1", "B": "2"}, "answer": "B"}, r"bad\.jsonl:1: `choices` is an object"),
    ({"question": "q", "options": {"A": "1", "B": "2"}, "correct": "A"},  # AQuA's: its keys were read as the options
     r"bad\.jsonl:1: `options` is an object \(keys \['A', 'B'\]\); write the options as a list"),
])
def test_math_reader_refuses_null_and_blank_text(tmp_path, record, message):
    with pytest.raises(UserError, match=message):
        data.read_jsonl(_write(tmp_path / "bad.jsonl", [record]), "math")


@pytest.mark.parametrize("text, where", [
    ('{"question": "7 + 5?", "answer": 12}\n{"question": "1 + 1?", "answer": 2, "answer": 3}\n', "m.jsonl:2"),
    ('[\n {"question": "7 + 5?", "answer": 12, "answer": 13}\n]', "m.jsonl"),  # a JSON array, as SVAMP ships
])
def test_a_key_given_twice_is_refused_not_read_as_its_last_value(tmp_path, text, where):
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    with pytest.raises(UserError) as refused:
        data.read_jsonl(path, "math")
    assert str(refused.value) == f"{tmp_path}/{where}: an object names the key 'answer' twice; keep the one meant"


def test_a_null_rationale_is_no_rationale(tmp_path):
    (example,) = data.read_jsonl(_write(tmp_path / "m.jsonl", [{"question": "7 + 5?", "answer": 12, "rationale": None}]), "math")
    assert example["label"] == "The answer is 12."


@pytest.mark.parametrize("task, line, message", [
    ("reasoning-arithmetic", '{"question": null}', r"^\S*q\.jsonl:2: field 'question' is null; give its text"),
    ("reasoning-commonsense", '{"question": "Pick", "choices": ["a", null]}', r"^\S*q\.jsonl:2: choice B is null"),
])
def test_predict_refuses_a_null_question_or_choice(tmp_path, task, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Is a plum a fruit?"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        get_task(task).read_inputs([path], None, {})


@pytest.mark.parametrize("text, example, expected", [
    ("B", {"choices": ["x", "y"]}, "B"),
    ("The answer is (A) because", {"choices": ["x", "y"]}, "A"),
    ("I think plum", {"choices": ["hammer", "plum"]}, "B"),
    ("Z", {"choices": ["x", "y"]}, None),
    ("A train leaves at noon. The answer is B.", {"choices": ["x", "y"]}, "B"),  # "A" is an article
    ("A plum is a fruit, so B", {"choices": ["x", "y"]}, "B"),
    ("the answer is (b)", {"choices": ["x", "y"]}, "B"),
    ("Answer: C, since", {"choices": ["x", "y", "z"]}, "C"),
    ("B) y", {"choices": ["x", "y"]}, "B"),
    ("it costs 23 dollars", {"choices": ["2", "23"]}, "B"),  # whole words: "23" is not "2"
    # numeric options: the final number chooses, not a number the working passes through
    ("3 km in 2 hours, so the answer is 1.5", {"choices": ["3", "1.5", "2"]}, "B"),
    ("3 km in 2 hours gives 1.5", {"choices": ["3", "1.5", "2"]}, "B"),
    ("it is 7", {"choices": ["3", "1.5", "2"]}, None),
    ("so 1,200", {"choices": ["12", "1200"]}, "B"),
    ("not the hammer but the plum", {"choices": ["hammer", "plum"]}, None),  # two options: none chosen
    ("an apple pie", {"choices": ["apple", "apple pie"]}, "B"),  # "apple" only inside "apple pie"
    ("the answer is a plum", {"choices": ["hammer", "plum"]}, "B"),  # "a" here is an article
    ("|\ufffd\ufffdk\ufffdD\ufffd3", {"choices": ["w", "x", "y", "z"]}, None),  # a byte of a broken token, not "D"
    ("\ufffd B", {"choices": ["x", "y"]}, "B"),
    ("yes, it is", {"choices": None, "answer": "true"}, "true"),
    ("the correct answer is answer3", {"choices": None, "answer": "answer1"}, "answer3"),
])
def test_choice_extraction(text, example, expected):
    assert data.extract_choice(text, example) == expected


@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7. The answer is 7.", "7"),
    ("so 1,200 apples", "1200"),
    ("The answer is 2.50 dollars, not 3", "2.5"),
    ("no number", None),
    ("The answer is: 2 + 3 = 5", "5"),
    ("The answer is 7 - 2 = 5. Next, 9 apples", "5"),
    ("The answer is 5. Then 3 more questions", "5"),
    ("it drops to \u22123 degrees", "-3"),
])
def test_number_extraction(text, expected):
    assert data.extract_number(text) == expected


def test_metrics_per_dataset_and_average():
    task = get_task("reasoning-commonsense")
    examples = [{"dataset": "a", "answer": "A", "choices": ["x", "y"]}, {"dataset": "a", "answer": "B", "choices": ["x", "y"]},
                {"dataset": "b", "answer": "true", "choices": None}]
    results = task.compute_metrics(["accuracy"], examples, ["A", "A", "yes"])
    assert results == {"accuracy": 2 / 3, "accuracy/a": 0.5, "accuracy/b": 1.0, "accuracy_avg": 0.75}
    math = get_task("reasoning-arithmetic")
    results = math.compute_metrics(["accuracy"], [{"dataset": "g", "answer": "7", "choices": None}], ["The answer is 7.0"])
    assert results["accuracy"] == 1.0


def test_pyreft_scoring_reads_generations_as_refts_evaluation_does():
    """scoring=pyreft: commonsense by exact match of the whole generation, math by the
    last number, AQuA by the first capital A-E anywhere (flaws included, for numbers
    comparable with the paper's); lenient scoring reads the stated answer."""
    commonsense, math = get_task("reasoning-commonsense"), get_task("reasoning-arithmetic")

    def accuracy(task, example, text, scoring):
        return task.compute_metrics(["accuracy"], [{**example, "dataset": "d", "scoring": scoring}], [text])["accuracy"]

    token = {"answer": "answer1", "choices": None}
    assert accuracy(commonsense, token, " answer1 ", "pyreft") == 1.0
    assert accuracy(commonsense, token, "answer1 because", "pyreft") == 0.0 == accuracy(commonsense, token, "Answer1", "pyreft")
    assert accuracy(commonsense, token, "answer1 because", "lenient") == 1.0
    number = {"answer": "7", "choices": None}
    assert accuracy(math, number, "The answer is 7. Next: 12", "pyreft") == 0.0  # the last number
    assert accuracy(math, number, "The answer is 7. Next: 12", "lenient") == 1.0
    assert accuracy(math, {"answer": "1200", "choices": None}, "so 1,200", "pyreft") == 1.0
    aqua = {"answer": "C", "choices": ["1", "2", "3", "4", "5"]}
    assert accuracy(math, aqua, "Answer: C", "pyreft") == 0.0  # the A of "Answer" comes first
    assert accuracy(math, aqua, "Answer: C", "lenient") == 1.0

    card = read_card(str(runner.build_config("reasoning-arithmetic", demo=True, overrides=[]).data.card))
    dataset = math.read(card, math.options(scoring="pyreft"))
    assert {e["scoring"] for split in dataset.splits.values() for e in split} == {"pyreft"}
    with pytest.raises(ValueError, match="scoring must be lenient or pyreft"):
        math.options(scoring="strict")


def test_the_papers_average_can_be_the_primary_metric():
    """ReFT's tables report "Avg", the mean over datasets: checkpoints can follow it."""
    from peftlab.shared.metrics import is_better

    def metrics_of(pipeline):
        config = runner.build_config(pipeline, demo=True, overrides=["eval.primary_metric=accuracy_avg"])
        task = get_task(config.task_name)
        card = runner.load_card(config.data.card, task)
        return runner.run_metrics(config, task, card, runner.read_dataset(config, task, cfg.build_task_options(task, config.task_options), card))

    names, primary = metrics_of("reasoning-commonsense")
    assert primary == "accuracy_avg" and "accuracy" in names
    examples = [{"dataset": "a", "answer": "A", "choices": ["x", "y"]}, {"dataset": "a", "answer": "B", "choices": ["x", "y"]},
                {"dataset": "b", "answer": "true", "choices": None}]
    assert get_task("reasoning-commonsense").compute_metrics(names, examples, ["A", "A", "yes"])[primary] == 0.75
    assert is_better(primary, 0.8, 0.75) and not is_better(primary, 0.7, 0.75)
    with pytest.raises(UserError, match=r"^eval\.primary_metric: protein-ppi cannot compute 'accuracy_avg' \(a value only "
                                        r"the tasks that list it derive\); it computes aupr"):
        metrics_of("protein-ppi")


def test_demo_generators_are_deterministic_and_answerable():
    first = data.demo_commonsense({"train": 30, "test": 12}, seed=3)
    assert first == data.demo_commonsense({"train": 30, "test": 12}, seed=3)
    assert {e["dataset"] for e in first["train"]} == {"demo_boolq", "demo_piqa", "demo_arc"}
    problems = data.demo_math({"train": 20}, seed=1)["train"]
    for example in problems:
        assert data.extract_number(example["label"]) == example["answer"]


# ----------------------------------------------------------------------------- pipelines


def _run(pipeline, tmp_path, *overrides):
    config = runner.build_config(pipeline, demo=True, overrides=list(overrides))
    return runner.run(config, out=tmp_path / "run")


def test_commonsense_demo_beats_chance(tmp_path):
    """Chance on the demo's mix (1/3 yes/no, 1/3 two options, 1/3 four options) is 0.417.
    The demo (3,390 steps of `full` on `tiny`) sits at chance for its first ~1,000 steps
    and then finds the answers. At the old lr 3e-3 when it did depended on the seed and
    the CPU's float rounding: 0.96 on 90 test questions on an AVX2 CPU; on an AVX-512
    one 0.96 at seed 1 but 0.54 at seed 2. At the recipe's lr 1e-3, on the AVX-512 CPU:
    1.0, 0.97 and 1.0 at seeds 0-2. So this test cannot be shortened."""
    run_dir = _run("reasoning-commonsense", tmp_path, "data.limit.test=90", "data.limit.validation=30",
                   "eval.splits=[test]")
    results = io.read_json(run_dir / "metrics.json")["test"]
    assert results["accuracy"] > 0.417 + 0.2, results
    assert set(results) >= {"accuracy/demo_boolq", "accuracy/demo_piqa", "accuracy/demo_arc", "accuracy_avg"}
    assert load(run_dir).evaluate("test") == results  # the saved run reproduces its metrics


def test_arithmetic_demo_beats_the_most_frequent_answer(tmp_path):
    """Measured on 60 test problems after 1,140 steps on `tiny-wide` (20 epochs of 450).
    At the old lr 3e-3 the model left its plateau (format learnt, sums not) at an epoch
    set by the CPU's float rounding: 0.82 on an AVX2 CPU, 0.22 (never left) on an
    AVX-512 one at seed 0. At the recipe's lr 1e-3, on the AVX-512 CPU: seeds 0-3 and 5
    gave 0.93-1.0, with one thread or two, in fp32 or bf16. The most frequent answer
    scores 0.15-0.17."""
    run_dir = _run("reasoning-arithmetic", tmp_path, "data.limit.train=450", "data.limit.test=60",
                   "data.limit.validation=30", "eval.splits=[test]")
    results = io.read_json(run_dir / "metrics.json")["test"]
    examples = data.demo_math({"test": 200}, seed=0)["test"]  # the demo card's whole test split
    answers = [e["answer"] for e in examples]
    majority = max(answers.count(a) for a in set(answers)) / len(answers)
    assert results["accuracy"] > majority + 0.4, (results, majority)


def test_cli_refuses_a_commonsense_card_with_a_bad_line(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": "A"}\n{"question": 1\n')
    card = tmp_path / "card.md"
    card.write_text("---\nname: x\ndomain: reasoning\ntask: reasoning-commonsense\nformat: jsonl\n"
                    "splits: {train: train.jsonl, test: train.jsonl}\n---\n")
    code = main(["run", "reasoning-commonsense", "--data", str(card), "--backbone", "tiny", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "train.jsonl:2: invalid JSON" in err[0]
    assert not (tmp_path / "out").exists()


def test_the_recipes_prompt_and_target_are_pyrefts_for_the_paper(tmp_path):
    """LoReFT edits the prompt's first and last tokens, so the recipes use pyreft's prompt
    for the paper: LLM-Adapters' instruction and a newline, trained to answer "the correct
    answer is ANSWER" (commonsense), and the problem in Alpaca's no-input template (math).
    Scoring reads what follows the prefix; pyreft's counts a generation without it wrong."""
    instruction = "Please choose the correct answer to the question: Is a plum a fruit?\n\nAnswer format: true/false"
    lines = tmp_path / "boolq.jsonl"
    lines.write_text(json.dumps({"instruction": instruction, "answer": "true"}) + "\n")
    tokenizer = clm.load_causal_lm("tiny").tokenizer
    commonsense = get_task("reasoning-commonsense")
    options = commonsense.options(**{k: v for k, v in runner.build_config("reasoning-commonsense").task.items() if k != "name"})
    [example] = commonsense.read_inputs([lines], options, {})
    bos = clm.prompt_ids(tokenizer, "")
    assert tokenizer.decode(render_prompt(tokenizer, options, example)[len(bos):]) == instruction + "\n"
    card = tmp_path / "card.md"
    card.write_text("---\nname: c\ndomain: reasoning\ntask: reasoning-commonsense\nformat: jsonl\n"
                    "splits: {train: boolq.jsonl, validation: boolq.jsonl, test: boolq.jsonl}\n---\n")
    dataset = commonsense.read(read_card(str(card)), options)
    assert {e["label"] for split in dataset.splits.values() for e in split} == {"the correct answer is true"}

    def right(text, scoring):
        return commonsense.is_right(text, {**example, "answer": "true", "scoring": scoring})

    assert right("the correct answer is true", "pyreft") and right(" the correct answer is  true ", "pyreft")
    assert not right("true", "pyreft") and right("true", "lenient")  # no prefix: pyreft finds no answer
    assert not right("the correct answer is true, since", "pyreft") and right("the correct answer is true, since", "lenient")
    assert not right("the correct answer is false", "lenient")
    assert commonsense.describe(example, "the correct answer is true", [])["extracted"] == "true"

    math = get_task("reasoning-arithmetic")
    options = math.options(**{k: v for k, v in runner.build_config("reasoning-arithmetic").task.items() if k != "name"})
    problem = math.parse_request({"questions": ["Ann has 3 pens and gets 2 more. How many pens?"]}, options)[0]
    assert tokenizer.decode(render_prompt(tokenizer, options, problem)[len(bos):]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAnn has 3 pens and gets 2 more. How many pens?\n\n### Response:\n")
    assert problem["answer_prefix"] == "" and math.is_right("3 + 2 = 5. The answer is 5.", {**problem, "answer": "5"})
