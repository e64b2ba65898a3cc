"""eval.py: answer checkers on real-looking outputs, batched decoding against one prompt at a time, the
attention analysis against a plain loop, Table 1 from run folders, and train.py -> eval.py end to end."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval as ev
import cli
import stg
from conftest import a_run
import batches
import hf
import model as M
from hf import Tokenizer
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]

FEVER = ("Which factor will most likely cause a person to develop a fever?\nA. a leg muscle relaxing after exercise\n"
         "B. a bacterial population in the bloodstream\nC. several viral particles on the skin\n"
         "D. carbohydrates being digested in the stomach\nAnswer: ")
MATTER = "All living and nonliving material is composed of\n1. air\n2. elements\n3. water\n4. soil\nAnswer: "
GSM_OUT = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

# (task, model output, target, input, answer the checker reads, correct)
CASES = [
    ("stg_e", "High Risk", "High Risk", "", "High Risk", True),
    ("stg_e", " Low Risk\n", "Low Risk", "", "Low Risk", True),
    ("stg_e", "Low Risk", "High Risk", "", "Low Risk", False),
    ("stg_e", "high risk", "High Risk", "", "high risk", False),
    ("stg_e", "High Risk, since Smoking is 8", "High Risk", "", "High Risk, since Smoking is 8", False),
    ("stg_e", "Not High Risk: Low Risk", "High Risk", "", "Not High Risk: Low Risk", False),  # "High Risk" in it
    ("stg_e", "Low Risk\nHigh Risk", "High Risk", "", "Low Risk", False),                    # first line only
    ("stg_h", "57", "57", "", "57", True),
    ("stg_h", "57.0", "57", "", "57.0", True),
    ("stg_h", "The AQI is 57", "57", "", "57", True),
    ("stg_h", "57.4", "57", "", "57.4", False),
    ("stg_h", "42, or maybe 57", "57", "", "42", False),   # 57 is in it, but the first number is 42
    ("stg_h", "", "57", "", None, False),
    ("mawps", "43.0", "43.0", "", "43.0", True),
    ("mawps", "43", "43.0", "", "43", True),
    ("mawps", "43.5", "43.0", "", "43.5", False),
    ("mawps", "41 more makes 43", "43.0", "", "41", False),  # 43 is in it, but the first number is 41
    ("svamp", "103.0 feet", "103.0", "", "103.0", True),
    ("svamp", "$1,093.00", "1093.0", "", "1093.00", True),
    ("svamp", "0.33333", "0.3333", "", "0.33333", True),     # within the relative 1e-4
    ("svamp", "I do not know", "103.0", "", None, False),
    ("asdiv", "6", "6 (bags)", "", "6", True),
    ("asdiv", "6 (bags)", "6 (bags)", "", "6", True),
    ("asdiv", "7 (bags)", "6 (bags)", "", "7", False),
    ("asdiv", "37.38 (dollars)", "37.38 (dollars)", "", "37.38", True),
    ("asdiv", "2:13", "2:13", "", "2:13", True),
    ("asdiv", "2:15", "2:13", "", "2:15", False),             # a non-numeric target compares as text, not "2"
    ("asdiv", "12:50.", "12:50", "", "12:50.", True),
    ("asdiv", "42 / 7 = 6 bags.\n#### 6", "6 (bags)", "", "6", True),   # a GSM8K-trained model (Table 2, †)
    ("asdiv", "Each bag holds 7.\n#### 5", "6 (bags)", "", "5", False),
    ("asdiv", "Each bag holds 7, so 6 bags", "6 (bags)", "", "7", False),
    ("asdiv", "#### 1,150", "1150 (dollars)", "", "1150", True),
    ("asdiv", "#### 1,1,150", "1150 (dollars)", "", "1", False),  # malformed: the number NUMBER reads whole is 1
    ("asdiv", "#### 2,1,150 apples", "1115", "", "2", False),     # never "2,1150", read as 2,115 (once a crash)
    ("mawps", "Answer: 1,1500", "Answer: 1150.0", "", "1", False),   # not a thousands grouping: 1
    ("gsm8k", GSM_OUT, "72", "", "72", True),
    ("gsm8k", GSM_OUT, GSM_OUT, "", "72", True),              # target given as a full solution
    ("gsm8k", GSM_OUT.replace("#### 72", "#### 72.0"), "72", "", "72.0", True),
    ("gsm8k", "#### 70,000", "70000", "", "70000", True),
    ("gsm8k", "#### 70,000", "#### 70,000", "", "70000", True),   # a target with commas too
    ("gsm8k", "#### 1,2400", "12400", "", "1", False),
    ("gsm8k", "#### $18", "18", "", "18", True),
    ("gsm8k", GSM_OUT.split("\n####")[0], "72", "", None, False),  # 72 is in it, but no "#### "
    ("gsm8k", "She makes 9 * 2 = $18 a day.\n#### 9", "18", "", "9", False),
    ("gsm8k", "#### 18\n#### 20", "20", "", "18", False),    # the first "#### " counts
    ("arc_e", "B", "B", FEVER, "B", True),
    ("arc_e", " (B)", "B", FEVER, "B", True),
    ("arc_e", "B. a bacterial population in the bloodstream", "B", FEVER, "B", True),
    ("arc_e", "a bacterial population in the bloodstream", "B", FEVER, "B", True),   # the option's text
    ("arc_e", "A bacterial population in the bloodstream.", "B", FEVER, "B", True),  # not the article "A"
    ("arc_e", "Answer: B", "B", FEVER, "B", True),
    ("arc_e", "The answer is: (B)", "B", FEVER, "B", True),
    ("arc_e", "not B, the answer is D", "B", FEVER, "D", False),
    ("arc_e", "not B, the answer is D", "D", FEVER, "D", True),
    ("arc_e", "Because bacteria cause fevers", "B", FEVER, None, False),
    ("arc_e", "B or D", "B", FEVER, None, False),
    ("arc_e", "the answer is a bacterial population", "A", FEVER, None, False),  # "a" is a word, not option A
    ("arc_e", "C", "B", FEVER, "C", False),
    ("arc_e", "B\nWhich gas do plants take in?\nA. oxygen\nB. carbon dioxide\nAnswer: B", "B", FEVER, "B", True),
    ("arc_e", "C\nWhich factor most likely causes a fever?\nAnswer: B", "B", FEVER, "C", False),  # first line
    ("arc_e", "E", "E", FEVER, None, False),                  # not one of this question's labels
    ("arc_e", "2", "2", MATTER, "2", True),
    ("arc_e", "elements", "2", MATTER, "2", True),
    ("arc_e", "2. elements", "2", MATTER, "2", True),
    ("arc_e", "12", "2", MATTER, None, False),
    ("generic", "Paris\nThe capital", "Paris", "", "Paris", True),
]


@pytest.mark.parametrize("task, output, target, text, answer, correct", CASES)
def test_checkers(task, output, target, text, answer, correct):
    assert ev.check(task, output, target, text) == (answer, correct)
    assert ev.is_correct(task, output, target, text) is correct


def test_checker_edges():
    assert ev.is_correct("stg_h", "57", 57)          # the authors' STG_H files hold integer targets
    assert ev.is_correct("arc_e", "D", "D")          # without the input: any label A-E, 1-4
    with pytest.raises(ValueError, match="no answer checker for task 'mmlu'"):
        ev.is_correct("mmlu", "B", "B")
    with pytest.raises(ValueError, match="GSM8K target"):
        ev.is_correct("gsm8k", "#### 3", "three")


@pytest.mark.parametrize("answer,repeats", [
    ("5.0", True), ("5", True), ("Answer: 89.0", True), ("84.0", False), ("1,093", True), ("0.5", True),
    (".5", True), ("-5", True), ("2", True), ("2:13", False), ("6 (bags)", False), ("7 (bags)", True), (None, False),
    ("no number", False), ("50", False)])
def test_repeats_a_number_of_the_question(answer, repeats):
    question = "Ruth starts with 89 apples. She shares 5 with Peter, then 1,093 more, 0.5 of a pie and 10-2 = 7 bags."
    assert ev.repeats_a_number(question, answer) is repeats


def test_score_hand_worked():
    rows = [{"target": "50", "answer": "50", "correct": True}, {"target": "50", "answer": "47", "correct": False},
            {"target": "60", "answer": None, "correct": False}, {"target": "40", "answer": "41", "correct": False}]
    assert ev.score("stg_h", rows) == {"accuracy": 0.25, "n": 4, "correct": 1, "unparsed": 1, "majority": 0.5,
                                       "mae": pytest.approx((0 + 3 + 1) / 3),
                                       "majority_mae": pytest.approx((0 + 0 + 10 + 10) / 4)}   # always "50"
    assert "mae" not in ev.score("stg_e", rows) and "majority_mae" not in ev.score("stg_e", rows)


def test_default_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "stg_s-cat").mkdir(parents=True)
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert ev.default_out_dir("runs/stg_s-cat") == Path("runs/stg_s-cat")
    assert ev.default_out_dir("models/base") == Path("runs/eval-base")
    assert ev.default_out_dir("HuggingFaceTB/SmolLM2-135M") == Path("runs/eval-HuggingFaceTB-SmolLM2-135M")


def test_compare_runs_table1_layout(tmp_path):
    def run(name, config, results):
        return a_run(tmp_path / name, config, results)

    def split(acc, majority=0.69):
        return {"accuracy": acc, "n": 400, "majority": majority}

    runs = [run("a", {"model": "smollm2-135m", "data": "stg_s", "alpha": 0.0},
                {"stg_s": {"iid": split(0.9), "ood": split(0.605, 0.665)}}),
            run("b", {"model": "smollm2-135m", "data": "stg_s", "alpha": 0.3},
                {"stg_s": {"iid": split(0.8975), "ood": split(0.6375, 0.665)}}),
            run("c", {"model": "smollm2-135m", "data": "stg_s", "alpha": 0.3},
                {"stg_s": {"iid": split(0.9075), "ood": split(0.6475, 0.665)}}),
            run("e", {"model": "/models/smollm2-135m", "data": "stg_s", "alpha": 0.3, "gamma_schedule": "constant",
                      "lora": True}, {"stg_s": {"iid": split(0.8), "ood": split(0.7, 0.665)}}),
            run("d-no-config", None, {"stg_m": {"iid": split(0.95), "ood": split(0.7, 0.665)}})]
    assert ev.compare_runs(runs).splitlines() == [
        "| method | stg_s IID | stg_s OOD | stg_m IID | stg_m OOD |",
        "|---|---|---|---|---|",
        "| smollm2-135m Full Vanilla | 90.00% | 60.50% | – | – |",
        "| smollm2-135m Full CAT α=0.3 | 90.25% (mean of 2) | 64.25% (mean of 2) | – | – |",
        "| smollm2-135m LoRA CAT α=0.3 γ=1 | 80.00% | 70.00% | – | – |",
        "| d-no-config | – | – | 95.00% | 70.00% |",
        "| majority baseline | 69.00% | 66.50% | 69.00% | 66.50% |"]
    with pytest.raises(cli.InputError, match="evaluate the run first"):
        ev.compare_runs([str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# On a tiny random model

@pytest.fixture(scope="module")
def tiny(byte_bpe):
    """A 2-layer random Transformer over the fixture's byte-level BPE, in float64 so that padding and batching
    cannot flip a greedy argmax."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=byte_bpe.get_vocab_size(), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     head_dim=8, hidden_dim=64, tie_word_embeddings=True)
    model = Transformer(args).double()
    tokenizer = Tokenizer(byte_bpe, bos_id=byte_bpe.token_to_id("<s>"), eos_ids=[byte_bpe.token_to_id("</s>")],
                          pad_id=byte_bpe.token_to_id("</s>"))
    return model, tokenizer


@pytest.fixture
def stg_data(tmp_path):
    """Five IID and five OOD STG_E test records (stg.py's generator) as a DataSet."""
    tests = {}
    for split in ("iid", "ood"):
        tests[split] = tmp_path / f"stg_e_test_{split}.jsonl"
        cli.write_jsonl(tests[split], stg.make_records(f"stg_e_test_{split}", 42)[:5])
    return stg.DataSet("stg_tiny", "stg_e", None, None, tests)


def read_jsonl(path):
    return stg.read_records(path)


def test_batched_equals_one_by_one(tiny, stg_data, tmp_path):
    model, tokenizer = tiny
    records = stg.read_records(stg_data.tests["iid"]) + stg.read_records(stg_data.tests["ood"])
    prompts = [ev.prompt_ids(tokenizer, r["input"]) for r in records]
    prompts[3] = prompts[3][:-9]  # lengths differ, so batches carry left padding
    batched = ev.generate_answers(model, tokenizer, prompts, batch_size=4, max_new_tokens=6)
    single = [ev.generate_answers(model, tokenizer, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(len(ids) == 6 for ids in single)  # a random model rarely says EOS: the comparison covers 6 steps

    results = {}
    for batch_size in (3, 1):
        out = tmp_path / f"batch{batch_size}"
        results[batch_size] = ev.evaluate(model, tokenizer, stg_data, batch_size=batch_size, max_new_tokens=6,
                                          out_dir=out)
        assert json.loads((out / "results.json").read_text()) == {"stg_tiny": results[batch_size]}
    assert results[3] == results[1]
    for split in ("iid", "ood"):
        rows = read_jsonl(tmp_path / "batch3" / f"predictions_stg_tiny_{split}.jsonl")
        assert rows == read_jsonl(tmp_path / "batch1" / f"predictions_stg_tiny_{split}.jsonl")
        assert [r["input"] for r in rows] == [r["input"] for r in stg.read_records(stg_data.tests[split])]
        for row in rows:
            assert row["correct"] == ev.is_correct("stg_e", row["output"], row["target"])


def test_a_stopped_evaluation_continues_from_the_answers_it_kept(tiny, stg_data, tmp_path, decoder):
    """Stopped in the second split's second batch, then called again with the same weights and settings: only the
    batches not done are decoded, a line cut by the stop is dropped, and the results equal an evaluation never
    stopped. Called with other weights, another batch size, another precision or fewer records, everything is
    decoded again."""
    model, tokenizer = tiny
    settings = dict(batch_size=2, max_new_tokens=6, dtype="float32")
    whole = ev.evaluate(model, tokenizer, stg_data, out_dir=tmp_path / "whole", **settings)
    assert not list((tmp_path / "whole").glob("*.partial.jsonl")), "without weights nothing is kept"
    out = tmp_path / "stopped"
    everything = [2, 2, 1, 2, 2, 1]
    for changed, decoded in [({}, [2, 1]), ({"weights": "w2"}, everything), ({"batch_size": 3}, [3, 2, 3, 2]),
                             ({"dtype": "bfloat16"}, everything), ({"limit": 4}, [2, 2, 2, 2])]:
        decoder.batches.clear()
        decoder.stop[:] = [5]   # iid: batches of 2, 2 and 1; then ood's second batch
        with pytest.raises(KeyboardInterrupt):
            ev.evaluate(model, tokenizer, stg_data, out_dir=out, weights="w1", **settings)
        decoder.stop.clear()
        partial = out / "predictions_stg_tiny_ood.partial.jsonl"
        assert len(partial.read_text().splitlines()) == 2   # the header and the first batch
        with open(partial, "a") as f:
            f.write('{"indices": [7, ')                      # a stop in the middle of a write
        decoder.batches.clear()
        results = ev.evaluate(model, tokenizer, stg_data, out_dir=out, **{**settings, "weights": "w1", **changed})
        assert decoder.batches == decoded, changed
        assert not list(out.glob("*.partial.jsonl"))
        if "dtype" not in changed and "limit" not in changed:
            assert results == whole
            for split in ("iid", "ood"):
                name = f"predictions_stg_tiny_{split}.jsonl"
                assert read_jsonl(out / name) == read_jsonl(tmp_path / "whole" / name)


def test_eval_cli_continues_where_it_stopped_and_names_the_base_of_an_adapter(tiny, stg_data, tmp_path, decoder):
    """eval.py run again after a stop decodes only what it had not; an adapter's files name its base model's too,
    so that another base would start over."""
    model, tokenizer = tiny
    base = tmp_path / "base"
    hf.save_model(copy.deepcopy(model).float(), tokenizer, base)
    adapter = tmp_path / "adapter"
    hf.save_adapter(M.apply_lora(copy.deepcopy(model).float(), M.LoRAConfig(r=2, alpha=4)), M.LoRAConfig(r=2, alpha=4),
                   adapter, base_model=str(base))
    assert {path.name for path in hf.source_files(str(adapter))} >= {"adapter_config.json", "adapter_model.safetensors",
                                                                   "config.json", "model.safetensors",
                                                                   "tokenizer.json"}
    assert set(hf.source_files(str(base))) < set(hf.source_files(str(adapter)))
    tests = ",".join(f"{split}={path}" for split, path in stg_data.tests.items())
    argv = ["--model", str(adapter), "--data", str(stg_data.tests["iid"]), "--test", tests, "--out",
            str(tmp_path / "out"), "--batch-size", "2", "--max-new-tokens", "6", "--device", "cpu", "--dtype",
            "float32"]
    decoder.stop[:] = [5]   # iid: batches of 2, 2 and 1; then ood's second batch
    with pytest.raises(KeyboardInterrupt):
        ev.main(argv)
    decoder.stop.clear()
    decoder.batches.clear()
    ev.main(argv)
    assert decoder.batches == [2, 1]


def test_resume_point_keeps_only_answers_it_can_trust(tmp_path, capsys):
    """Kept answers come back under the same header only; another header, or a file damaged otherwise than by a
    kill (a broken line before the last, a batch with fewer answers than indices), starts the file again."""
    path, header = tmp_path / "predictions_d_test.partial.jsonl", {"weights": "w", "prompts": "p"}
    batches = [{"indices": [3, 0], "new_ids": [[5, 6], [7]]}, {"indices": [1], "new_ids": [[]]}]
    kept = "".join(json.dumps(line) + "\n" for line in [header, *batches])
    for text, other, expected in [(kept, header, {3: [5, 6], 0: [7], 1: []}),
                                  (kept + '{"indices": [2', header, {3: [5, 6], 0: [7], 1: []}),
                                  (kept, {**header, "weights": "v"}, {}),
                                  (kept.replace('{"indices": [3', '{"indices: [3'), header, {}),
                                  (kept.replace("[[5, 6], [7]]", "[[5, 6]]"), header, {})]:
        path.write_text(text)
        assert ev.resume_point(path, other) == expected
        if not expected:
            assert path.read_text() == json.dumps(other) + "\n", "started again, with the new header"
    assert "unreadable" in capsys.readouterr().out
    path.unlink()
    assert ev.resume_point(path, header) == {} and path.read_text() == json.dumps(header) + "\n"


def test_weights_key_names_the_files_as_they_are(tmp_path):
    """The same files give the same key; a file written again (another modification time, or a new file in its
    place) or another set of files gives another."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")
    key = ev.weights_key(a, b)
    assert ev.weights_key(b, a) == key and len(key) == 64
    assert ev.weights_key(a) != key
    stat = a.stat()
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert ev.weights_key(a, b) != key
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ev.weights_key(a, b) == key
    (tmp_path / "new").write_bytes(b"1234")
    os.replace(tmp_path / "new", a)              # as a checkpoint is saved: a new file renamed into place
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ev.weights_key(a, b) != key, "same size and time, another file"


def plain_attention_numbers(model, tokenizer, text):
    """Reference: one prompt, no padding; Ā by a loop over layers and heads; per-kind numbers by a loop."""
    ids, offsets = batches.token_offsets(text, tokenizer.backend)
    ids, offsets = [tokenizer.bos_id] + ids, [(0, 0)] + offsets
    with torch.no_grad():
        attentions = model(torch.tensor([ids]), return_attn=True).attentions
    L, H = len(attentions), attentions[0].shape[1]
    row = sum(attentions[l][0, h, -1] for l in range(L) for h in range(H)) / (L * H)  # answer row of Ā
    kind_of, name_of = {}, {}
    for name, kind, start, end in stg.attribute_spans(text, "stg_e"):
        for t, (s, e) in enumerate(offsets):
            if t > 0 and s < end and e > start:
                kind_of[t], name_of[t] = kind, name
    mass = {k: sum(float(row[t]) for t, kt in kind_of.items() if kt == k) for k in ev.KINDS}
    count = {k: sum(kt == k for kt in kind_of.values()) for k in ev.KINDS}
    by_name = {n: [float(row[t]) for t, nt in name_of.items() if nt == n] for n in set(name_of.values())}
    return ({k: mass[k] / count[k] for k in ev.KINDS}, {k: mass[k] / sum(mass.values()) for k in ev.KINDS},
            {n: sum(v) / len(v) for n, v in by_name.items()}, (float(row[0]), sum(mass.values())))


def test_attention_numbers_equal_plain_loop(tiny, stg_data, tmp_path):
    pytest.importorskip("matplotlib", reason="the two pictures need matplotlib (an optional extra)")
    model, tokenizer = tiny
    results = ev.evaluate(model, tokenizer, stg_data, batch_size=4, max_new_tokens=2, out_dir=tmp_path,
                          attention=True)
    for split in ("iid", "ood"):
        records = stg.read_records(stg_data.tests[split])
        reference = [plain_attention_numbers(model, tokenizer, r["input"]) for r in records]
        rows = read_jsonl(tmp_path / f"predictions_stg_tiny_{split}.jsonl")
        for row, (mean, *_) in zip(rows, reference):
            assert row["attention"] == pytest.approx(mean, rel=1e-5)
        summary = results[split]["attention"]
        for kind in ev.KINDS:
            per_token = sorted(mean[kind] for mean, *_ in reference)
            assert summary[kind]["mean"] == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)
            assert summary[kind]["median"] == pytest.approx(per_token[len(per_token) // 2], rel=1e-5)
            assert summary[kind]["share"] == pytest.approx(
                sum(share[kind] for _, share, *_ in reference) / len(reference), rel=1e-5)
        by_attribute = results[split]["attention_by_attribute"]
        assert set(by_attribute) == set(stg.E_CAUSAL) | set(stg.E_SPURIOUS) | set(stg.E_IRRELEVANT)
        for name, value in by_attribute.items():
            assert value == pytest.approx(sum(r[2][name] for r in reference) / len(reference), rel=1e-5)
        first, attributes = (sum(r[3][i] for r in reference) / len(reference) for i in (0, 1))
        assert results[split]["attention_mass"] == pytest.approx(
            {"first token": first, "attributes": attributes, "rest": 1 - first - attributes}, rel=1e-5)
    assert (tmp_path / "attention_density_stg_tiny.png").stat().st_size > 0
    assert (tmp_path / "attention_map_stg_tiny.png").stat().st_size > 0


def test_attention_without_matplotlib(tiny, stg_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    model, tokenizer = tiny
    results = ev.evaluate(model, tokenizer, stg_data, max_new_tokens=1, out_dir=tmp_path, attention=True, limit=2)
    assert set(results["ood"]["attention"]) == set(ev.KINDS)
    assert "pip install matplotlib" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.png"))


def test_attention_needs_stg(tiny, tmp_path):
    path = tmp_path / "mawps_test.jsonl"
    path.write_text(json.dumps({"input": "William has 2 caps. He buys 41 more. Answer: ", "target": "43.0"}) + "\n")
    with pytest.raises(ValueError, match="--attention needs STG data"):
        ev.evaluate(*tiny, stg.resolve_data(str(path)), attention=True)


def test_each_test_file_is_checked_by_its_own_task(tiny, tmp_path, monkeypatch):
    """A model trained on GSM8K writes worked solutions ending "#### N" on every test (Table 2's † columns): each
    file is checked on the targets of the task its name names (ASDiv's "2:13" and "Clara", which the GSM8K checker
    cannot read) in GSM8K's answer format, a file named after no task by the data set's checker; all decode with
    GSM8K's 512 new tokens; --task checks them all."""
    model, tokenizer = tiny
    files = {  # split -> (file stem, [(input, target, the model's output)])
        "test": ("gsm8k_test", [("Q1 Answer: ", "18", "9 * 2 = <<9*2=18>>18\n#### 18"),
                                ("Q2 Answer: ", "5", "2 + 2 = 4\n#### 4")]),
        "asdiv": ("merged_asdiv", [("Q3 Answer: ", "6 (bags)", "12 / 2 = 6\n#### 6"),
                                   ("Q4 Answer: ", "2:13", "#### 2:13"), ("Q5 Answer: ", "Clara", "#### Clara"),
                                   ("Q6 Answer: ", "2:13", "#### 2"),
                                   ("Q9 Answer: ", "7 (cats)", "There are 7 cats.")]),
        "extra": ("held_out", [("Q7 Answer: ", "7", "There are 7 cats."), ("Q8 Answer: ", "7", "3 + 4\n#### 7")]),
    }
    tests = {}
    for split, (stem, rows) in files.items():
        tests[split] = tmp_path / f"{stem}.jsonl"
        cli.write_jsonl(tests[split], [{"input": q, "target": t} for q, t, _ in rows])
    data = stg.DataSet("gsm8k_val", "gsm8k", None, None, tests)
    assert [ev.split_task(data, split) for split in tests] == ["gsm8k", "gsm8k-ood", "gsm8k"]
    outputs = {q: out for _, rows in files.values() for q, _, out in rows}
    budgets = []

    def fake_generate(model, tokenizer, prompts, *, batch_size, max_new_tokens, **resume):
        budgets.append(max_new_tokens)
        return [tokenizer.encode(outputs[tokenizer.decode(p).strip() + " "]) for p in prompts]

    monkeypatch.setattr(ev, "generate_answers", fake_generate)
    results = ev.evaluate(model, tokenizer, data)
    assert budgets == [512, 512, 512]
    # "There are 7 cats." has no "#### ": no answer in GSM8K's format, on ASDiv's file and on the file named after
    # no task (the data set's checker)
    assert {split: r["correct"] for split, r in results.items()} == {"test": 1, "asdiv": 3, "extra": 1}
    assert ev.check("gsm8k-ood", "There are 7 cats.", "7 (cats)") == (None, False)
    # --task: one checker for every file; ASDiv's own reads a first line without "#### " too
    assert {split: r["correct"] for split, r in ev.evaluate(model, tokenizer, data, task="asdiv").items()} == \
        {"test": 1, "asdiv": 4, "extra": 2}
    trained_on_mawps = stg.DataSet("mawps_train", "mawps", None, None, tests)   # a short-answer model: ASDiv's own
    assert ev.split_task(trained_on_mawps, "asdiv") == "asdiv"
    with pytest.raises(ValueError, match="'Clara' is neither a number"):   # what GSM8K's checker makes of ASDiv
        ev.evaluate(model, tokenizer, data, task="gsm8k")


# ---------------------------------------------------------------------------------------------
# End to end: train.py then eval.py

def test_train_then_eval_end_to_end(tmp_path):
    """One epoch of a small scratch model on stg_s (train.py evaluates 20 records per split in memory), then
    eval.py on the saved run with --attention. About a minute on two CPU cores."""
    pytest.importorskip("matplotlib", reason="the two pictures need matplotlib (an optional extra)")
    runs = tmp_path / "runs"
    subprocess.run([sys.executable, "train.py", "--model", "scratch", "--data", "stg_s", "--epochs", "1",
                    "--scratch-dim", "64", "--scratch-layers", "2", "--eval-limit", "20", "--out", str(runs),
                    "--name", "stg_s-scratch"], cwd=ROOT, check=True)
    run = runs / "stg_s-scratch"
    after_training = json.loads((run / "results.json").read_text())["stg_s"]
    assert {split: r["n"] for split, r in after_training.items()} == {"iid": 20, "ood": 20}
    subprocess.run([sys.executable, "eval.py", "--model", str(run), "--data", "stg_s", "--attention",
                    "--limit", "50"], cwd=ROOT, check=True)  # a folder under runs/: results go into it
    results = json.loads((run / "results.json").read_text())["stg_s"]
    for split in ("iid", "ood"):
        assert 0.0 <= results[split]["accuracy"] <= 1.0 and results[split]["n"] == 50
        assert set(results[split]["attention"]) == set(ev.KINDS)
        rows = read_jsonl(run / f"predictions_stg_s_{split}.jsonl")
        assert results[split]["correct"] == sum(r["correct"] for r in rows)
    assert (run / "attention_density_stg_s.png").exists() and (run / "attention_map_stg_s.png").exists()
