"""`peftlab predict RUN CARD`, in every pipeline: a card of the run's task is read by the
task's own reader and each example of the chosen split gets one line, in the card's order,
naming its split, with the same fields as a prediction on files."""

from __future__ import annotations

import pytest
from peftlab.pipelines import runner
from peftlab.pipelines.predictor import load
from peftlab.shared.evaluation import predict_outputs
from peftlab.shared.tasks import list_tasks

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

PIPELINES = sorted(task.name for task in list_tasks())
ONE_STEP = ["train.epochs=1", "train.max_steps=1", "train.batch_size=4", "data.limit.train=4",
            "data.limit.validation=4", "data.limit.test=4", "train.precision=fp32"]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_predict_on_a_card_gives_a_line_per_example_of_the_split(pipeline, tmp_path):
    config = runner.build_config(pipeline, demo=True, overrides=ONE_STEP)
    predictor = load(runner.run(config, out=tmp_path / "run"))
    card = runner.load_card(config.data.card, predictor.task)
    examples = predictor.task.read(card, predictor.options).splits["validation"]

    rows = predictor.predict([config.data.card], split="validation")

    assert [row.pop("split") for row in rows] == ["validation"] * len(examples)
    outputs = predict_outputs(predictor.model, examples, predictor.batch_size, predictor.accelerator.autocast)
    assert rows == [predictor.task.describe(e, o, predictor.labels) for e, o in zip(examples, outputs)]


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_predict_on_example_dicts_without_ids_names_them_by_position(pipeline, tmp_path):
    config = runner.build_config(pipeline, demo=True, overrides=ONE_STEP)
    predictor = load(runner.run(config, out=tmp_path / "run"))
    examples = predictor.task.read(runner.load_card(config.data.card, predictor.task), predictor.options).splits["test"][:3]
    # hand-made dicts need no id (describe read it: KeyError 'id' in the reasoning tasks)
    rows = predictor.predict([{key: value for key, value in e.items() if key != "id"} for e in examples])
    assert len(rows) == len(examples)
    assert all(row["id"] == str(index) for index, row in enumerate(rows) if "id" in row)


def test_a_json_input_missing_a_field_is_told_to_name_its_keys(tmp_path):
    """JSON lines have keys, not columns: the hint says which. A compressed input is named as such."""
    from peftlab.shared.errors import UserError

    config = runner.build_config("code-review-necessity", demo=True, overrides=ONE_STEP)
    predictor = load(runner.run(config, out=tmp_path / "run"))
    (tmp_path / "new.jsonl").write_text('{"diff": "@@ -1 +1 @@\\n-a\\n+b"}\n')
    with pytest.raises(UserError, match=r"new\.jsonl:1: .*: name the keys so in the input$"):
        predictor.predict([str(tmp_path / "new.jsonl")])
    (tmp_path / "new.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(UserError, match=r"new\.jsonl\.gz: gzip-compressed: decompress it \(gunzip\), then pass the "
                                        r"file it holds$"):
        predictor.predict([str(tmp_path / "new.jsonl.gz")])
    (tmp_path / "new.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(UserError, match=r"new\.jsonl\.zst: zstd-compressed: decompress it \(unzstd\)"):
        predictor.predict([str(tmp_path / "new.jsonl.zst")])
