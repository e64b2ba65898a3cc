"""STG generator: every invariant of CAT Appendix A (and docs/design.md), checked on the written files by parsing
the texts back; reading records and resolving data sets by name or path."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import cli
import stg

TABLE_4 = {"stg_s_train": 400, "stg_m_train": 800, "stg_l_train": 1600, "stg_e_test_iid": 400,
           "stg_e_test_ood": 400, "stg_h_train": 3000, "stg_h_test_iid": 1000, "stg_h_test_ood": 1000}
E_IID = ["stg_s_train", "stg_m_train", "stg_l_train", "stg_e_test_iid"]
H_IID = ["stg_h_train", "stg_h_test_iid"]
PAPER_EXAMPLE = ("Here is the statistical data for a person. Please predict the probability of cancer. "
                 "Yellow fingers: 3, Weight: 1, Room size: 4, Certain gene: 4, Clothing size: 1, Smoking: 2, "
                 "Hormones: 2, Exercise: 5 Answer: ")


@pytest.fixture(scope="module")
def stg_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stg42")
    stg.main(["--out", str(out)])
    return out


def load(stg_dir, stem):
    return stg.read_records(stg_dir / f"{stem}.jsonl")


def parsed(stg_dir, stem):
    task = stg.FILES[stem][0]
    return [(stg.parse_attributes(r["input"], task), r) for r in load(stg_dir, stem)]


def test_sizes_follow_table_4(stg_dir):
    assert sorted(p.name for p in stg_dir.iterdir()) == sorted(f"{s}.jsonl" for s in TABLE_4), "stray or temp files"
    for stem, n in TABLE_4.items():
        assert len(load(stg_dir, stem)) == n, stem


def test_every_record_lists_each_attribute_once_in_a_fresh_order(stg_dir):
    for stem in TABLE_4:
        task = stg.FILES[stem][0]
        names = sum(stg.FACTORS[task].values(), [])
        orders = set()
        for r in load(stg_dir, stem):
            assert r["input"].startswith(stg.QUESTION[task]) and r["input"].endswith(" Answer: "), r["input"]
            found = [name for name, *_ in stg.attribute_spans(r["input"], task)]
            assert sorted(found) == sorted(names), (stem, found)
            body = r["input"][len(stg.QUESTION[task]):-len(" Answer: ")]
            assert body == ", ".join(r["input"][s:e] for _, _, s, e in stg.attribute_spans(r["input"], task))
            orders.add(tuple(found))
        assert len(orders) > 0.9 * TABLE_4[stem], f"{stem}: only {len(orders)} distinct attribute orders"


def test_stg_e_iid_spurious_values_equal_their_formula(stg_dir):
    for stem in E_IID:
        for v, r in parsed(stg_dir, stem):
            assert all(1 <= v[n] <= 10 for n in ("Smoking", "Weight", "Exercise", "Certain gene", "Room size"))
            assert v["Yellow fingers"] == (3 * v["Smoking"]) // 2, r["input"]    # floor(1.5 * Smoking)
            assert v["Clothing size"] == v["Weight"], r["input"]
            assert v["Hormones"] == v["Exercise"] // 2, r["input"]               # floor(0.5 * Exercise)


def test_stg_e_labels_equal_the_rule(stg_dir):
    def rule(s, w, e):  # 1.2·s + 0.7·w − e > 7.2, in exact integer arithmetic
        return "High Risk" if 12 * s + 7 * w - 10 * e > 72 else "Low Risk"
    grid = range(1, 11)
    assert all(stg.e_label({"Smoking": s, "Weight": w, "Exercise": e}) == rule(s, w, e)
               for s in grid for w in grid for e in grid)
    for stem in E_IID + ["stg_e_test_ood"]:
        for v, r in parsed(stg_dir, stem):
            assert r["target"] == rule(v["Smoking"], v["Weight"], v["Exercise"]), r["input"]


def test_stg_e_ood_breaks_the_spurious_link(stg_dir):
    rows = [v for v, _ in parsed(stg_dir, "stg_e_test_ood")]
    assert all(1 <= v[n] <= 10 for v in rows for n in v)
    follows = sum(v["Clothing size"] == v["Weight"] for v in rows)
    assert follows < 0.2 * len(rows), f"OOD Clothing size equals Weight in {follows}/{len(rows)} records"
    for stem, lo, hi in [("stg_e_test_ood", -0.15, 0.15)] + [(s, 0.9, 1.0) for s in E_IID]:
        for name, c in stg.spurious_correlations(load(stg_dir, stem), "stg_e").items():
            assert lo < c <= hi, f"{stem}: corr({name}, parent) = {c:.3f}, expected in ({lo}, {hi}]"


def aqi_from_printed(v) -> int:
    """docs/design.md: raw = 0.3·f1 + 0.25·f2 + 0.2·f3 + 0.15·f4 − 0.2·f5 − 0.3·f6, clipped, scaled to 0-100."""
    raw = (0.3 * v["Industrial emissions"] + 0.25 * v["Vehicle emissions"] + 0.2 * v["Coal dependency"]
           + 0.15 * v["Agricultural burning"] - 0.2 * v["Urban green coverage"] - 0.3 * v["Meteorological dispersion"])
    return round((min(max(raw, -20), 30) + 20) / 50 * 100)


def test_stg_h_answers_are_integers_given_by_the_aqi_formula(stg_dir):
    for stem in H_IID + ["stg_h_test_ood"]:
        for v, r in parsed(stg_dir, stem):
            assert r["target"] == str(int(r["target"])) and 0 <= int(r["target"]) <= 100, r["target"]
            assert abs(int(r["target"]) - aqi_from_printed(v)) <= 1, r["input"]
            assert int(r["target"]) == aqi_from_printed(v), "labels are computed from the printed values"
            assert isinstance(v["City anniversary"], int) and isinstance(v["Number of libraries"], int)
            assert all(isinstance(v[n], float) for n in stg.FACTORS["stg_h"]["causal"])


def test_stg_h_iid_spurious_follow_their_formula(stg_dir):
    for stem in H_IID:
        rows = [v for v, _ in parsed(stg_dir, stem)]
        corr = stg.spurious_correlations(load(stg_dir, stem), "stg_h")
        for name, (parent, coef, sd) in stg.H_SPURIOUS.items():
            x = np.array([v[parent] for v in rows])
            residual = np.array([v[name] for v in rows]) - coef * x
            assert abs(residual.mean()) < 4 * sd / math.sqrt(len(rows)) + 0.05, (stem, name, residual.mean())
            assert abs(residual.std() / sd - 1) < 0.1, (stem, name, residual.std(), sd)
            expected = coef * x.std() / math.sqrt(coef ** 2 * x.var() + sd ** 2)   # corr(coef·x + noise, x)
            assert abs(corr[name] - expected) < 0.08, f"{stem}: corr({name}) {corr[name]:.3f}, formula {expected:.3f}"


def test_stg_h_ood_spurious_are_independent_and_in_range(stg_dir):
    rows = [v for v, _ in parsed(stg_dir, "stg_h_test_ood")]
    for name, (parent, coef, _) in stg.H_SPURIOUS.items():
        low, high, _ = stg.H_CAUSAL[parent]
        lo, hi = sorted((coef * low, coef * high))
        assert all(lo - 0.05 <= v[name] <= hi + 0.05 for v in rows), name
    for name, c in stg.spurious_correlations(load(stg_dir, "stg_h_test_ood"), "stg_h").items():
        assert abs(c) < 0.15, f"OOD corr({name}, parent) = {c:.3f}"


def test_important_phrases_are_the_causal_ones_verbatim(stg_dir):
    for stem, (task, _, _, train) in stg.FILES.items():
        for v, r in parsed(stg_dir, stem):
            if not train:
                assert "important" not in r
                continue
            [effect] = r["important"]
            assert list(effect) == [r["target"]]
            phrases = effect[r["target"]]
            assert [p.split(": ")[0] for p in phrases] == stg.FACTORS[task]["causal"]
            for p in phrases:
                assert r["input"].count(p) == 1, f"{p!r} must occur exactly once in {r['input']!r}"
                assert p == stg.phrase(p.split(": ")[0], v[p.split(": ")[0]])


def test_runs_are_byte_identical_and_the_seed_matters(stg_dir, tmp_path):
    stg.main(["--out", str(tmp_path / "again")])
    stg.main(["--out", str(tmp_path / "seed7"), "--seed", "7"])
    for stem in TABLE_4:
        first = (stg_dir / f"{stem}.jsonl").read_bytes()
        assert (tmp_path / "again" / f"{stem}.jsonl").read_bytes() == first, stem
        assert (tmp_path / "seed7" / f"{stem}.jsonl").read_bytes() != first, stem


def test_test_files_share_no_text_with_training_files(stg_dir):
    for train, tests in [(["stg_s_train", "stg_m_train", "stg_l_train"], ["stg_e_test_iid", "stg_e_test_ood"]),
                         (["stg_h_train"], ["stg_h_test_iid", "stg_h_test_ood"])]:
        seen = {r["input"] for stem in train for r in load(stg_dir, stem)}
        assert not any(r["input"] in seen for stem in tests for r in load(stg_dir, stem))
    assert load(stg_dir, "stg_s_train")[0] != load(stg_dir, "stg_m_train")[0], "each file has its own stream"


def test_summary_is_printed_per_file(tmp_path, capsys):
    stg.main(["--out", str(tmp_path)])
    out = capsys.readouterr().out
    for stem, n in TABLE_4.items():
        assert f"{stem}: {n} records" in out
    share = np.mean([r["target"] == "High Risk" for r in stg.read_records(tmp_path / "stg_s_train.jsonl")])
    assert f"High Risk share {share:.3f}" in out and "AQI mean" in out and "corr(spurious, parent)" in out


def test_paper_example_reads_back_and_follows_the_rules():
    spans = stg.attribute_spans(PAPER_EXAMPLE, "stg_e")
    assert [(n, k, PAPER_EXAMPLE[s:e]) for n, k, s, e in spans][:3] == [
        ("Yellow fingers", "spurious", "Yellow fingers: 3"), ("Weight", "causal", "Weight: 1"),
        ("Room size", "irrelevant", "Room size: 4")]
    v = stg.parse_attributes(PAPER_EXAMPLE, "stg_e")
    causal = {n: v[n] for n in stg.E_CAUSAL}
    assert stg.e_spurious(None, causal, ood=False) == {"Yellow fingers": 3, "Clothing size": 1, "Hormones": 2}
    assert stg.e_label(causal) == "Low Risk"       # the paper's answer: f = 2.4 + 0.7 − 5 = −1.9
    assert {k: len(v) for k, v in stg.FACTORS["stg_e"].items()} == {"causal": 3, "spurious": 3, "irrelevant": 2}
    assert {k: len(v) for k, v in stg.FACTORS["stg_h"].items()} == {"causal": 6, "spurious": 5, "irrelevant": 3}


def test_attribute_spans_on_stg_h_and_unknown_tasks():
    text = "Water awareness score: -6.4, Number of libraries: 16, Vehicle emissions: 38.9 Answer: "
    assert [(n, k, text[s:e]) for n, k, s, e in stg.attribute_spans(text, "stg_h")] == [
        ("Water awareness score", "spurious", "Water awareness score: -6.4"),
        ("Number of libraries", "irrelevant", "Number of libraries: 16"),
        ("Vehicle emissions", "causal", "Vehicle emissions: 38.9")]
    assert stg.parse_attributes(text, "stg_h") == {"Water awareness score": -6.4, "Number of libraries": 16,
                                                   "Vehicle emissions": 38.9}
    assert stg.attribute_spans("Natalia sold 48 clips. Answer: ", "gsm8k") == []


def test_resolve_stg_names_generates_missing_files(stg_dir, tmp_path, capsys):
    data = stg.resolve_data("stg_m", tmp_path)
    assert "generating" in capsys.readouterr().out
    assert (data.name, data.task, data.val) == ("stg_m", "stg_e", None)
    assert data.train == tmp_path / "stg_m_train.jsonl"
    assert data.tests == {"iid": tmp_path / "stg_e_test_iid.jsonl", "ood": tmp_path / "stg_e_test_ood.jsonl"}
    assert data.train.read_bytes() == (stg_dir / "stg_m_train.jsonl").read_bytes(), "generated with seed 42"
    h = stg.resolve_data("stg_h", tmp_path)
    assert "generating" not in capsys.readouterr().out, "files already there are not regenerated"
    assert (h.task, h.train, sorted(h.tests)) == ("stg_h", tmp_path / "stg_h_train.jsonl", ["iid", "ood"])


def test_resolve_downstream_names(tmp_path):
    with pytest.raises(cli.InputError, match=r"python annotate.py fetch gsm8k"):
        stg.resolve_data("gsm8k", tmp_path)
    for split in ("train", "val", "test"):
        (tmp_path / f"gsm8k_{split}.jsonl").write_text('{"input": "q", "target": "1"}\n')
    data = stg.resolve_data("gsm8k", tmp_path)
    assert (data.task, data.train, data.val, data.tests) == (
        "gsm8k", tmp_path / "gsm8k_train.jsonl", tmp_path / "gsm8k_val.jsonl", {"test": tmp_path / "gsm8k_test.jsonl"})
    (tmp_path / "gsm8k_train_annotated.jsonl").write_text('{"input": "q", "target": "1", "important": []}\n')
    data = stg.resolve_data("gsm8k", tmp_path)
    assert (data.train, data.annotations) == (tmp_path / "gsm8k_train.jsonl", tmp_path / "gsm8k_train_annotated.jsonl")


def test_training_records_merge_annotations(tmp_path, capsys):
    """Annotations join the training file by (input, target), in the training file's order; a record without one
    (a reject, an unfinished run) stays in without `important`; an annotation of no record is reported."""
    train = [{"input": f"q{i} ", "target": str(i)} for i in range(4)]
    cli.write_jsonl(tmp_path / "svamp_train.jsonl", train)
    for split in ("val", "test"):
        cli.write_jsonl(tmp_path / f"svamp_{split}.jsonl", train[:1])
    important = {"3": ["q3"]}
    cli.write_jsonl(tmp_path / "svamp_train_annotated.jsonl", [   # completion order, not the file's
        {**train[3], "important": [important]}, {**train[0], "important": []},
        {"input": "stale ", "target": "9", "important": [{"9": ["stale"]}]}])
    records = stg.training_records(stg.resolve_data("svamp", tmp_path))
    assert records == [{**train[0], "important": []}, train[1], train[2], {**train[3], "important": [important]}]
    out = capsys.readouterr().out
    assert "2 of 4 records" in out and "the other 2" in out and "1 annotations" in out
    assert stg.training_records(stg.DataSet("x", "generic", tmp_path / "svamp_train.jsonl", None, {})) == train
    # a record repeated in the training file does not hide an annotation that matches nothing
    cli.write_jsonl(tmp_path / "svamp_train.jsonl", [train[0], train[0]])
    stg.training_records(stg.resolve_data("svamp", tmp_path))
    out = capsys.readouterr().out
    assert "2 of 2 records" in out and "warning: 2 annotations" in out   # train[3]'s and the stale one


def test_resolve_paths_and_unknown_names(tmp_path):
    for file_name, task in [("my_gsm8k_test.jsonl", "gsm8k"), ("spurious_token_game_ood3.jsonl", "stg_e"),
                            ("stg_h_test_ood.jsonl", "stg_h"), ("notes.jsonl", "generic")]:
        path = tmp_path / file_name
        path.write_text('{"input": "q", "target": "1"}\n')
        data = stg.resolve_data(str(path))
        assert (data.name, data.task, data.train, data.tests) == (path.stem, task, path, {"test": path})
    with pytest.raises(ValueError, match="unknown data set 'stg_x'.*stg_s"):
        stg.resolve_data("stg_x", tmp_path)
    with pytest.raises(cli.InputError, match="absent.jsonl: no such file"):
        stg.resolve_data(str(tmp_path / "absent.jsonl"), tmp_path)


def test_read_records_names_file_and_line(tmp_path):
    good = {"input": "a", "target": "b", "important": [{"b": ["a"]}]}
    path = tmp_path / "bad.jsonl"
    cases = [('{"input": "a", "target": ', "not valid JSON"), ('{"input": "a"}', "'target'.*found nothing"),
             ('{"input": 3, "target": "b"}', "'input'.*found int"), ("[1, 2]", "JSON object, found list"),
             ('{"input": "a", "target": "b", "important": {"b": ["a"]}}', "'important' must be a list")]
    for line, message in cases:
        path.write_text(json.dumps(good) + "\n\n" + line + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{message}"):
            stg.read_records(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert stg.read_records(path) == [good, good]
