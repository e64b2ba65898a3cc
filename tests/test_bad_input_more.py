"""Bad input, what a fourth sweep found worded poorly: test files whose targets the answer checker cannot read (named
before the model is read), Ctrl-C in eval.py, a --data that is a device or a FIFO, flags beside alpha_study.py's
--summary-only, annotate.py fetch --source without a file or a split, and results.json values out of range. Each
ends in one `error:` line naming the file, line, flag or field, exit status 2, and nothing a user made changed."""
import json
import os
import re
from pathlib import Path

import pytest

import cli
import eval as evaluation
import stg
import train

TINY = ["--model", "scratch", "--scratch-dim", "32", "--scratch-layers", "1", "--scratch-heads", "2",
        "--scratch-vocab", "300", "--batch-size", "8", "--epochs", "1", "--no-eval", "--no-save"]
RECORD = {"input": "Tom has 2 apples and buys 3 more. How many? Answer: ", "target": "5.0"}


def cli_error(main, capsys) -> str:
    """Run a command's main() as its __main__ does (cli.run_cli): it must end in exit status 2 and one line
    'error: ...' on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(main)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    return err


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
