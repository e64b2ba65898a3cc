"""Bad input, what a fourth sweep found worded poorly: test files whose targets the answer checker cannot read (named
before the model is read), Ctrl-C in eval.py, a --data that is a device or a FIFO, flags beside alpha_study.py's
--summary-only, annotate.py fetch --source without a file or a split, and results.json values out of range. Each
ends in one `error:` line naming the file, line, flag or field, exit status 2, and nothing a user made changed."""
import json
import os
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

import cli
import eval as evaluation
import hf
import model as M
import stg
import train
from conftest import a_run, cli_error, experiment
from model import ModelArgs, Transformer

TINY = ["--model", "scratch", "--scratch-dim", "32", "--scratch-layers", "1", "--scratch-heads", "2",
        "--scratch-vocab", "300", "--batch-size", "8", "--epochs", "1", "--no-eval", "--no-save"]
RECORD = {"input": "Tom has 2 apples and buys 3 more. How many? Answer: ", "target": "5.0"}


@pytest.fixture
def model(tmp_path) -> Path:
    """A folder under the name of a model: the checks below come before a model is read from it."""
    folder = tmp_path / "a" / "run1"
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------- 3. --data that is not a regular file
@pytest.fixture
def not_regular(tmp_path) -> list[Path]:
    """Paths that exist and are neither a file nor a folder: a character device and, where there are FIFOs, one
    (reading it would wait for a writer forever)."""
    paths = [Path(os.devnull)]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.jsonl")
        paths.append(tmp_path / "pipe.jsonl")
    return paths


def test_data_that_is_not_a_regular_file_is_named_so(not_regular, tmp_path, model, capsys, stg_file):
    for path in not_regular:
        with pytest.raises(cli.InputError, match=re.escape(f"{path}: not a regular file")):
            stg.resolve_data(str(path))
        with pytest.raises(cli.InputError, match=re.escape(f"{path}: not a regular file")):
            cli.read_jsonl(path)
        err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(path),
                                                 "--out", str(tmp_path / "e")]), capsys)
        assert f"{path}: not a regular file" in err and "no such file" not in err
        err = cli_error(lambda: train.train(train.parse_args([*TINY, "--data", str(path),
                                                              "--out", str(tmp_path / "r")])), capsys)
        assert f"{path}: not a regular file" in err and "no such file" not in err
        err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(stg_file), "--out",
                                                 str(tmp_path / "e"), "--test", f"iid={path}"]), capsys)
        assert f"{path} (split 'iid'): not a regular file" in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- 1. test targets, before the model
@pytest.mark.parametrize("stem, target, message", [
    ("stg_h_test_iid", "high", "not a number"),          # STG_H's checker reads the target as a number (AQI)
    ("stg_h_test_iid", "nan", "not a number"),
    ("gsm8k_test", "seventy-two", "'#### <number>'"),     # GSM8K's: a number or a solution ending in "#### N"
    ("mawps_test", None, "field 'target' must be a string, found null"),
    ("mawps_test", ["5"], "field 'target' must be a string, found a list"),
    ("mawps_test", {"a": 5}, "field 'target' must be a string, found an object"),
    ("mawps_test", "  ", "field 'target' is empty"),
])
def test_a_test_target_the_checker_cannot_read_is_named_before_the_model(stem, target, message, tmp_path, model,
                                                                         capsys, monkeypatch):
    """Found after decoding, each cost the whole decoding (minutes) and ended in a traceback or an error then; each
    is named now by file and line before the model is looked up or read (an empty folder stands in for it)."""
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("the model was read"))
    good, bad = tmp_path / "good.jsonl", tmp_path / f"{stem}.jsonl"
    cli.write_jsonl(good, [{"input": "a", "target": "1"}])
    bad.write_text(json.dumps({"input": "a", "target": "57"}) + "\n\n" + json.dumps({"input": "b", "target": target})
                   + "\n")
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(good), "--out", str(tmp_path / "e"),
                                             "--test", f"first={good},second={bad}"]), capsys)
    assert f"{bad}:3: " in err and message in err, err
    assert not (tmp_path / "e").exists()


def test_a_test_file_without_records_is_named_before_the_model(tmp_path, model, capsys, monkeypatch):
    monkeypatch.setattr(evaluation, "load_model", lambda *a, **k: pytest.fail("the model was read"))
    good, empty = tmp_path / "good.jsonl", tmp_path / "empty.jsonl"
    cli.write_jsonl(good, [{"input": "a", "target": "1"}])
    empty.write_text("\n")
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(good), "--out", str(tmp_path / "e"),
                                             "--test", f"first={good},second={empty}"]), capsys)
    assert f"{empty}: no records to evaluate" in err


# ----------------------------------------------------------------------------- 2. Ctrl-C in eval.py
@pytest.fixture
def saved_model(byte_bpe, tmp_path) -> Path:
    """A 1-layer random model over the conftest tokenizer, saved as a model folder eval.py reads."""
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=byte_bpe.get_vocab_size(), dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16,
                     hidden_dim=64, tie_word_embeddings=True)
    tok = hf.Tokenizer(byte_bpe, bos_id=byte_bpe.token_to_id("<s>"), eos_ids=[byte_bpe.token_to_id("</s>")],
                       pad_id=byte_bpe.token_to_id("</s>"))
    hf.save_model(Transformer(args), tok, tmp_path / "model")
    return tmp_path / "model"


def stg_tests(folder: Path) -> str:
    """Three IID and three OOD STG_E test records as eval.py's --test."""
    for split in ("iid", "ood"):
        cli.write_jsonl(folder / f"stg_e_test_{split}.jsonl", stg.make_records(f"stg_e_test_{split}", 42)[:3])
    return f"iid={folder / 'stg_e_test_iid.jsonl'},ood={folder / 'stg_e_test_ood.jsonl'}"


def test_ctrl_c_in_eval_says_what_is_kept_and_leaves_no_half_file(saved_model, tmp_path, capsys, decoder):
    """Stopped in the second split's first batch: one line says results.json was not written and which files keep
    the answers decoded so far; every file there reads whole, and the same command continues from them."""
    out = tmp_path / "out"
    argv = ["--model", str(saved_model), "--data", str(tmp_path / "stg_e_test_iid.jsonl"), "--test",
            stg_tests(tmp_path), "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu",
            "--dtype", "float32"]
    decoder.stop[:] = [3]   # iid: batches of 2 and 1; then ood's first
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        evaluation.main(argv)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and f"{out / 'results.json'} was not written" in last, last
    assert "predictions_stg_e_test_iid_iid.partial.jsonl" in last and "run the same command again" in last
    assert not (out / "results.json").exists() and not list(out.glob(".*.tmp"))
    for path in out.glob("*.jsonl"):
        cli.read_jsonl(path)                        # whole: no line cut short
    decoder.stop.clear()
    decoder.batches.clear()
    evaluation.main(argv)
    assert decoder.batches == [2, 1] and (out / "results.json").exists()


def run_eval_as_main(argv, monkeypatch) -> int:
    """python eval.py ARGV, in this process (so that a stand-in can raise Ctrl-C): its exit status."""
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    try:
        runpy.run_path(str(Path(evaluation.__file__)), run_name="__main__")
    except KeyboardInterrupt:                    # caught here, or it would stop pytest itself
        pytest.fail("Ctrl-C left eval.py as a KeyboardInterrupt (a traceback)")
    except SystemExit as stop:
        return stop.code
    pytest.fail("eval.py ended without an exit status")


def test_ctrl_c_in_eval_ends_in_one_line_and_status_130(saved_model, tmp_path, capsys, monkeypatch):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    argv = ["--model", str(saved_model), "--data", str(tmp_path / "stg_e_test_iid.jsonl"), "--test",
            stg_tests(tmp_path), "--out", str(out), "--device", "cpu", "--dtype", "float32"]
    monkeypatch.setattr(M, "generate", ctrl_c)      # eval.py run afresh imports generate from model
    capsys.readouterr()
    assert run_eval_as_main(argv, monkeypatch) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith(f"interrupted: {out / 'results.json'} was not written")
    monkeypatch.setattr(stg, "resolve_data", ctrl_c)    # before the evaluation: nothing written
    assert run_eval_as_main(argv, monkeypatch) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted before any result")


# ----------------------------------------------------------------------------- 4. alpha_study.py --summary-only
STUDY = {"model": "/models/smollm2", "authors_data": "/data/CAT", "data": "stg_s,stg_m", "settings": "vanilla,k2",
         "seeds": "42,1", "val_frac": 0.2, "device": "cpu", "out": "/elsewhere/study", "summary_only": False,
         "keep_weights": False, "train_args": ["--epochs", "2"], "revision": "abc"}


@pytest.mark.parametrize("extra, flag", [
    (["--settings", "vanilla,k3"], "--settings vanilla,k3"),
    (["--seeds", "7"], "--seeds 7"),
    (["--data", "stg_l"], "--data stg_l"),
    (["--model", "/models/other"], "--model /models/other"),
    (["--val-frac", "0.3"], "--val-frac 0.3"),
    (["--keep-weights"], "--keep-weights True"),
    (["--settings", "vanilla,k2", "--", "--epochs", "3"], "the train.py flags after -- --epochs 3"),
    (["--"], "the train.py flags after -- (none):"),
])
def test_summary_only_refuses_a_flag_of_another_study(extra, flag, tmp_path, capsys):
    """--summary-only reads the study from its study_config.json: a flag beside it that says otherwise was ignored
    without a word, and a summary of one study came out of a command that named another."""
    study = experiment("alpha_study")
    out = tmp_path / "study"
    out.mkdir()
    (out / "study_config.json").write_text(json.dumps(STUDY, indent=2) + "\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = cli_error(lambda: study.main(["--out", str(out), "--summary-only", *extra]), capsys)
    assert err.startswith(f"error: {flag}") and f"{out / 'study_config.json'}" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_summary_only_takes_the_studys_own_flags(tmp_path):
    """The study's own command with --summary-only added defines the same study: nothing to refuse."""
    study = experiment("alpha_study")
    out = tmp_path / "study"
    out.mkdir()
    (out / "study_config.json").write_text(json.dumps({k: v for k, v in STUDY.items() if k != "keep_weights"}))
    same = ["--model", "/models/smollm2", "--data", "stg_s,stg_m", "--settings", "vanilla,k2", "--seeds", "42,1",
            "--device", "cpu", "--no-keep-weights", "--only", "stg_s-k2-s1"]
    assert study.parse_args(["--out", str(out), "--summary-only", *same, "--", "--epochs", "2"]).summary_only
    assert study.parse_args(["--out", str(out), "--summary-only"]).summary_only
    assert study.parse_args(["--out", str(tmp_path / "new"), "--summary-only", "--seeds", "7"]).seeds == "7"


# ----------------------------------------------------------------------------- 5. annotate.py fetch --source
GSM8K_ROW = {"question": "Tom has 2 apples and buys 3 more. How many?", "answer": "2 + 3 = 5\n#### 5"}


@pytest.mark.parametrize("source, message", [
    ("test=", "--source test=: no file after '='; write test=FILE"),
    ("validation=", "--source validation=: no file after '='; write validation=FILE"),
    ("test", "--source test: a split name without its file; write test=FILE"),
    ("=rows.jsonl", "--source =rows.jsonl: no such file, and no split name before '='"),
    ("", "--source is empty"),
    ("test=rows.jsonl", "--source test=rows.jsonl: gsm8k keeps its upstream test split apart, so give its training "
                        "file too (train=FILE)"),
])
def test_fetch_source_without_a_file_or_a_split_is_one_line(source, message, tmp_path, capsys, monkeypatch):
    """Each was a traceback (ValueError, KeyError: 'train') or named the current folder ("--source .: is a folder")."""
    import annotate as A
    monkeypatch.chdir(tmp_path)
    cli.write_jsonl(tmp_path / "rows.jsonl", [GSM8K_ROW])
    err = cli_error(lambda: A.main(["fetch", "gsm8k", "--source", source, "--out", str(tmp_path / "out")]), capsys)
    assert err == f"error: {message}" or err.startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_fetch_source_with_no_rows_or_rows_left_out_is_refused(tmp_path, capsys, monkeypatch):
    """An empty file wrote empty data files (or, as train=, ended in KeyError: 'train'); a bare FILE beside test=FILE
    was left out of every split without a word."""
    import annotate as A
    monkeypatch.chdir(tmp_path)
    cli.write_jsonl(tmp_path / "rows.jsonl", [GSM8K_ROW])
    cli.write_jsonl(tmp_path / "more.jsonl", [{**GSM8K_ROW, "question": "Two more?"}])
    (tmp_path / "empty.jsonl").write_text("")
    for sources, message in [
            (["empty.jsonl"], "--source empty.jsonl: no row gsm8k can use"),
            (["train=empty.jsonl", "test=rows.jsonl"], "--source empty.jsonl: no row gsm8k can use"),
            (["train=rows.jsonl", "test=more.jsonl", "empty.jsonl"], "--source empty.jsonl: a bare FILE")]:
        argv = ["fetch", "gsm8k", *(f"--source={s}" for s in sources), "--out", str(tmp_path / "out")]
        assert cli_error(lambda: A.main(argv), capsys).startswith(f"error: {message}")
        assert not (tmp_path / "out").exists()
    A.main(["fetch", "gsm8k", "--source", "train=rows.jsonl", "--source", "test=more.jsonl", "--out", "out"])
    assert [len(stg.read_records(tmp_path / "out" / f"gsm8k_{s}.jsonl")) for s in ("train", "test")] == [1, 1]


# ----------------------------------------------------------------------------- 6. results.json out of range
SPLIT = {"accuracy": 0.75, "n": 4, "correct": 3, "unparsed": 0, "majority": 0.5}


@pytest.mark.parametrize("change, message", [
    ({"accuracy": 1.7}, "field 'accuracy' is 1.7"),
    ({"accuracy": -0.2}, "field 'accuracy' is -0.2"),
    ({"accuracy": float("nan")}, "field 'accuracy' is nan"),
    ({"majority": 2}, "field 'majority' is 2"),
    ({"n": -4}, "field 'n' is -4"),
    ({"n": 4.5}, "field 'n' is 4.5"),
    ({"unparsed": -1}, "field 'unparsed' is -1"),
    ({"correct": 5}, "field 'correct' is 5, more than the 4 records"),
    ({"mae": -3.0}, "field 'mae' is -3.0"),
    ({"mae": float("inf")}, "field 'mae' is Infinity"),
])
def test_results_out_of_range_are_named_by_file_and_field(change, message, tmp_path, model, capsys):
    """An accuracy of 1.7 or NaN was tabulated as 170.00% or nan%; a count below zero shown as it was."""
    good = a_run(tmp_path / "runs" / "good", None, {"d": {"test": SPLIT}})
    bad = a_run(tmp_path / "runs" / "bad", None, {"d": {"iid": SPLIT, "ood": {**SPLIT, **change}}})
    err = cli_error(lambda: evaluation.main(["--compare", good, bad, "--out", str(tmp_path / "t.md")]), capsys)
    assert err.startswith(f"error: {Path(bad) / 'results.json'} is damaged: d ood: {message}"), err
    assert f"python eval.py --model {bad}" in err and not (tmp_path / "t.md").exists()
    data = tmp_path / "test.jsonl"   # the results.json of an --out is read before the model too
    cli.write_jsonl(data, [RECORD])
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(data), "--out", bad]), capsys)
    assert f"{Path(bad) / 'results.json'} is damaged: d ood: {message}" in err
    evaluation.main(["--compare", good])   # in range: read as before
