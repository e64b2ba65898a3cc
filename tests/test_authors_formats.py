"""The CAT authors' published files, read unchanged: each layout from a small fixture written here in that
layout (no copied data), the task guessed from the file name, the answer checker of each target format, and
annotations whose phrases do not occur in their record counted, never a crash."""
import json

import pytest

import runs
import eval as evaluation
import cli
import stg
import train

# One hand-written record per published layout: (file stem, record). The texts are made up; the fields, the
# place of "Answer: " and the target formats are those of the authors' files.
LAYOUTS = {
    "mawps_train": {"idx": 0, "type": "mawps", "input": "Tom has 3 apples and buys 4 more. How many apples now?",
                    "target": "Answer: 7.0", "important": [{"7.0": ["3 apples", "4 more"]}]},
    "mawps_ood": {"idx": 0, "type": "mawps", "input": "Tom has 3 apples and buys 4 more. How many apples now? Answer: ",
                  "target": "7.0", "important": [{"4 more": ["buys"]}]},
    "svamp_train": {"ID": "chal-1", "Body": "Tom has 3 apples.", "Question": "How many?", "Equation": "( 3.0 + 4.0 )",
                    "Answer": 7.0, "Type": "Addition", "idx": 0,
                    "input": "Tom has 3 apples and buys 4 more. How many apples now?. Answer: ", "target": "7.0",
                    "important": [{"4 more": ["3 apples"]}]},
    "ARC_E_train": {"input": "Which is a gas?\nA. water\nB. steam\nC. ice\nD. rock\nAnswer: ", "target": "B",
                    "important": [{"steam": ["gas"]}]},
    "gsm8k_val": {"idx": 0, "question": "Tom has 3 apples...", "answer": "3 + 4 = <<3+4=7>>7\n#### 7",
                  "input": "Tom has 3 apples and buys 4 more. How many apples now? Answer: ",
                  "target": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "important": [{"7": ["3 apples", "4 more"]}]},
    "STG_H_train": {"input": "Industrial Emissions: 50.1; Coal Dependency: 41.9%. Ice Cream Sales Index: 20.3. City "
                             "Anniversary: 38th. Given these diverse conditions, what is the projected Air Quality "
                             "Index (AQI) on a 0-100 scale? Answer: ", "target": 32,    # the AQI as a JSON number
                    "important": [{"Answer: 32": ["50.1", "41.9%"]}]},                # the causes as bare values
    "merged_asdiv": {"idx": 0, "body": "Tom has 3 apples.", "question": "How many?", "formula": "3+4=7",
                     "solution_type": "Addition", "answer": "7 (apples)",
                     "input": "Tom has 3 apples and buys 4 more. How many apples now? Answer: ",
                     "target": "7 (apples)"},
}
TASKS = {"STG_H_train": "stg_h", "mawps_train": "mawps", "mawps_ood": "mawps", "svamp_train": "svamp",
         "ARC_E_train": "arc_e",
         "gsm8k_val": "gsm8k", "merged_asdiv": "asdiv"}
# What a model trained on that layout writes after the input (right, then wrong).
OUTPUTS = {"STG_H_train": ("32", "33"), "mawps_train": ("Answer: 7", "Answer: 8.0"), "mawps_ood": ("7", "8"),
           "svamp_train": ("7.0", "7.5"),
           "ARC_E_train": ("B", "C"), "gsm8k_val": ("3 + 4 = 7\n#### 7", "3 + 4 = 7\n#### 8"),
           "merged_asdiv": ("7 (apples)", "6 (apples)")}


@pytest.mark.parametrize("stem", LAYOUTS)
def test_each_layout_reads_unchanged_and_its_checker_reads_its_target(tmp_path, stem):
    path = tmp_path / f"{stem}.jsonl"
    path.write_text(json.dumps(LAYOUTS[stem]))                  # as published: no newline after the last line
    data = stg.resolve_data(str(path), tests=f"test={path}")
    assert data.task == TASKS[stem] and data.tests == {"test": path}
    record = stg.read_records(path)[0]
    assert record["target"] == str(LAYOUTS[stem]["target"]), "a numeric target is read as its text"
    right, wrong = OUTPUTS[stem]
    assert evaluation.check(data.task, right, record["target"], record["input"])[1], (stem, right)
    assert not evaluation.check(data.task, wrong, record["target"], record["input"])[1], (stem, wrong)


@pytest.mark.parametrize("prediction,target,right", [
    ("Answer: 84", "Answer: 84.0", True), ("Answer: 84.0", "Answer: 84.0", True), ("84", "Answer: 84.0", True),
    ("answer: 8.0 hours", "Answer: 8.0", True), ("Answer: 85.0", "Answer: 84.0", False),
    ("Answer: 84.5", "Answer: 84.0", False)])
def test_mawps_answer_prefix_is_not_part_of_the_number(prediction, target, right):
    assert evaluation.check("mawps", prediction, target)[1] is right


def test_phrases_that_do_not_occur_are_counted_not_fatal(tmp_path, capsys):
    """Some published annotations name phrases that are not in their record: training counts and names them."""
    records = [dict(LAYOUTS["mawps_train"], important=[{"7.0": ["3 apples", "seven oranges"]},
                                                       {"a phrase nowhere": ["4 more"]}])] * 4
    path = tmp_path / "mawps_train.jsonl"
    cli.write_jsonl(path, records)
    cfg = train.TrainConfig(model="scratch", data=str(path), scratch_dim=32, scratch_layers=2, scratch_heads=2,
                            scratch_vocab=300)
    _, tok, _ = runs.build_model(cfg, records, "cpu", None)
    examples = runs.encode_all(records, tok, cfg)
    out = capsys.readouterr().out
    assert "annotation coverage: 12/20 phrases found" in out and "seven oranges" in out, out
    assert all(ex.n_cat_rows > 0 for ex in examples), "the phrases that were found still supervise their rows"
