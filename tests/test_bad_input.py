"""Issue 40, bad input as a careful and a hostile user gives it to eval.py, annotate.py and stg.py: each item ends in
one `error:` line that names the file, line, flag or field and says what to do, exit status 2, and no file a user
made is changed. Also the shared checks in cli.py that train.py calls too (numbers, devices, output paths, JSONL).

Every evaluation here is refused before the model is read, so an empty folder stands in for the model."""
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import annotate as A
import cli
import eval as evaluation
import stg
from conftest import a_run, cli_error

FIXTURES = Path(__file__).parent / "fixtures"
RECORD = {"input": "Tom has 2 apples and buys 3 more. How many? Answer: ", "target": "5.0"}


def digest(folder: Path) -> dict[str, str]:
    """Every file under folder and the hash of its bytes: what 'nothing was changed' is checked against."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path) -> Path:
    """A small test file of two records."""
    path = tmp_path / "test.jsonl"
    cli.write_jsonl(path, [RECORD, {**RECORD, "target": "6.0"}])
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    """A folder under the name of a model: every check below comes before a model is read from it."""
    folder = tmp_path / "a" / "run1"
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------- 1. a split name given twice
def test_a_split_name_given_twice_is_refused(data, tmp_path, model, capsys):
    other = tmp_path / "other.jsonl"
    cli.write_jsonl(other, [RECORD])
    with pytest.raises(cli.InputError, match="split name 'iid' is given twice"):
        stg.parse_tests(f"iid={data},iid={other}")
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "e"),
                                             "--test", f"iid={data},iid={other}"]), capsys)
    assert "--test" in err and "'iid' is given twice" in err
    assert stg.parse_tests(f"iid={data},ood={other}") == {"iid": data, "ood": other}


# ----------------------------------------------------------------------------- 2. NaN and infinity
@pytest.mark.parametrize("flag, value", [("--max-cost", "nan"), ("--price-in", "nan"), ("--price-out", "inf"),
                                         ("--temperature", "nan"), ("--backoff-max", "inf"), ("--timeout", "inf")])
def test_annotate_float_flags_refuse_nan_and_infinity(flag, value, data, tmp_path, capsys):
    extra = ["--price-in", "1", "--price-out", "1"] if flag.startswith("--price") else []
    err = cli_error(lambda: A.main(["annotate", "--task", "mawps", "--in", str(data), "--out",
                                    str(tmp_path / "out.jsonl"), *extra, f"{flag}={value}", "--dry-run"]), capsys)
    assert err.startswith(f"error: {flag} {float(value)}:")


def test_annotate_max_cost_inf_means_no_cap(data, tmp_path, capsys):
    stats = A.annotate(A.AnnotateConfig(task="mawps", inp=str(data), out=str(tmp_path / "o.jsonl"),
                                        max_cost=float("inf"), dry_run=True))
    assert stats["pending"] == 2


@dataclasses.dataclass
class Flags:
    """A config as train.py's: the check is one function over any config dataclass."""
    alpha: float = 0.0
    lr: float | None = None
    max_cost: float | None = None
    seed: int = 42
    data_path: str = "x"
    eval: bool = True


@pytest.mark.parametrize("change, message", [
    ({"alpha": float("nan")}, "--alpha nan: not a number"),
    ({"lr": float("inf")}, "--lr inf: must be finite"),
    ({"lr": float("-inf")}, "--lr -inf: must be finite"),
    ({"seed": 2 ** 64}, f"--seed {2 ** 64}: out of range"),
    ({"max_cost": float("nan")}, "--max-cost nan: not a number"),
])
def test_check_numbers_names_the_flag(change, message):
    with pytest.raises(cli.InputError, match=message):
        cli.check_numbers(Flags(**change), infinite=("max_cost",))
    cli.check_numbers(Flags(max_cost=float("inf"), lr=1e-3, seed=-1), infinite=("max_cost",))   # all fine


# ----------------------------------------------------------------------------- 3. annotate's --out
def test_annotate_out_equal_to_in_changes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)    # no run gets as far as a request
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "target": "6.0"})[:25])   # last line malformed
    before = digest(tmp_path)
    for extra in ([], ["--dry-run"]):
        err = cli_error(lambda: A.main(["annotate", "--task", "mawps", "--in", str(inp), "--out",
                                        str(tmp_path / ".." / tmp_path.name / "in.jsonl"), *extra]), capsys)
        assert "--out" in err and "is the --in file" in err
    assert digest(tmp_path) == before


@pytest.mark.parametrize("content, found", [
    (json.dumps(RECORD) + "\n", "a record without 'important' (a data file"),               # a test file
    (json.dumps({**RECORD, "raw": "?", "error": "no JSON"}) + "\n", "a rejects file"),
    ("Notes to self\n", "not valid JSON"),
    (json.dumps({**RECORD, "important": []}) + "\nhello", "not valid JSON"),             # not a torn record
])
def test_annotate_refuses_an_out_it_did_not_write(content, found, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text(content)
    before = digest(tmp_path)
    monkeypatch.setenv("CAT_TEST_KEY", "sk-test")
    err = cli_error(lambda: A.main(["annotate", "--task", "mawps", "--in", str(data), "--out", str(out),
                                    "--api-key-env", "CAT_TEST_KEY", "--base-url", "http://127.0.0.1:9/v1",
                                    "--max-retries", "0"]), capsys)
    assert f"--out {out}" in err and found in err
    assert digest(tmp_path) == before


def test_a_write_cut_inside_a_character_is_dropped_as_a_torn_line(tmp_path, capsys):
    """annotate writes UTF-8 (ensure_ascii=False): a kill may cut its last line inside a character."""
    out = tmp_path / "out.jsonl"
    done = json.dumps({**RECORD, "important": [{"5.0": ["2 apples"]}]}, ensure_ascii=False) + "\n"
    torn = json.dumps({**RECORD, "input": "Zoë has 2 apples", "important": []}, ensure_ascii=False).encode()
    out.write_bytes(done.encode() + torn[:torn.index("ë".encode()) + 1])
    assert A.done_keys(out, repair=False, flag="--out") == {A.record_key(RECORD)}
    assert A.done_keys(out, flag="--out") == {A.record_key(RECORD)} and out.read_text() == done


# ----------------------------------------------------------------------------- 4. eval's default output folder
def test_two_models_of_one_folder_name_do_not_share_the_default_output(tmp_path, capsys, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "a" / "run1", tmp_path / "b" / "run1"
    for folder in (first, second):
        folder.mkdir(parents=True)
    out = evaluation.default_out_dir(str(first))
    assert out == evaluation.default_out_dir(str(second)) == Path("runs/eval-run1")
    evaluation.check_out_dir(out, first, chosen=False)            # the first evaluation claims the folder
    evaluation.mark_out_dir(out, first)
    (out / "results.json").write_text(json.dumps({"test": {"test": {"accuracy": 0.5, "majority": 0.5}}}))
    evaluation.check_out_dir(out, first, chosen=False)            # and may come back to it
    before = digest(tmp_path / "runs")
    err = cli_error(lambda: evaluation.main(["--model", str(second), "--data", str(data)]), capsys)
    assert f"{out} holds the results of another model ({first})" in err and "its own --out" in err
    assert digest(tmp_path / "runs") == before
    (out / evaluation.MODEL_MARK).unlink()                        # an older eval.py's folder: no mark
    err = cli_error(lambda: evaluation.main(["--model", str(second), "--data", str(data)]), capsys)
    assert "does not say of which model" in err and f"--out {out}" in err
    evaluation.check_out_dir(out, second, chosen=True)            # --out runs/eval-run1 adopts it


# ----------------------------------------------------------------------------- 5. regenerating data
def test_stg_keeps_hand_edits_unless_overwrite(tmp_path, capsys):
    stg.main(["--out", str(tmp_path)])
    stg.main(["--out", str(tmp_path)])                            # the same files again: nothing to refuse
    edited = tmp_path / "stg_s_train.jsonl"
    edited.write_text(edited.read_text().replace("High Risk", "Low Risk", 1))
    before = digest(tmp_path)
    for seed in ("42", "7"):
        err = cli_error(lambda: stg.main(["--out", str(tmp_path), "--seed", seed]), capsys)
        assert f"--out: {edited}" in err and "--overwrite" in err
        assert digest(tmp_path) == before
    stg.main(["--out", str(tmp_path), "--seed", "7", "--overwrite"])
    assert stg.read_records(edited) == stg.make_records("stg_s_train", 7)


def test_fetch_keeps_hand_edits_unless_overwrite(tmp_path, capsys):
    source = ["--source", f"train={FIXTURES / 'gsm8k_train.jsonl'}", "--source", f"test={FIXTURES / 'gsm8k_test.jsonl'}"]
    assert A.main(["fetch", "gsm8k", *source, "--out", str(tmp_path)]) == 0
    assert A.main(["fetch", "gsm8k", *source, "--out", str(tmp_path)]) == 0      # the same files again
    edited = tmp_path / "gsm8k_test.jsonl"
    edited.write_text(json.dumps(RECORD) + "\n")
    before = digest(tmp_path)
    err = cli_error(lambda: A.main(["fetch", "gsm8k", *source, "--out", str(tmp_path)]), capsys)
    assert f"--out: {edited}" in err and "--overwrite" in err
    assert digest(tmp_path) == before
    assert A.main(["fetch", "gsm8k", *source, "--out", str(tmp_path), "--overwrite"]) == 0
    assert stg.read_records(edited) != [RECORD]


def test_stg_out_empty_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--out is empty" in cli_error(lambda: stg.main(["--out", ""]), capsys)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 6. one JSONL reader
def bad_files(tmp_path) -> dict[str, tuple[Path, str]]:
    """name -> (a file that is not UTF-8 JSONL of objects, what the error must say)."""
    cases = {
        "utf-16": ("utf-16", json.dumps(RECORD).encode("utf-16"), "UTF-16"),
        "utf-16 without a mark": ("utf-16-le", json.dumps(RECORD).encode("utf-16-le"), ":1: holds NUL bytes"),
        "random bytes": ("bytes", b'{"input": "a"}\n' + bytes(range(128, 256)), ":2: not UTF-8 text (byte 0x80)"),
        "malformed line": ("json", (json.dumps(RECORD) + "\n\n{\"input\": \n").encode(), ":3: not valid JSON"),
        "not an object": ("list", b"[1, 2]\n", ":1: expected a JSON object, found list"),
    }
    files = {}
    for name, (stem, data, message) in cases.items():
        path = tmp_path / f"{stem}.jsonl"
        path.write_bytes(data)
        files[name] = path, message
    (tmp_path / "folder.jsonl").mkdir()
    files["a folder"] = tmp_path / "folder.jsonl", "is a folder"
    return files


def test_one_reader_names_file_and_line(tmp_path, capsys, model, data, monkeypatch):
    good = data
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)    # no run gets as far as a request
    for name, (path, message) in bad_files(tmp_path).items():
        with pytest.raises(cli.InputError, match=re.escape(f"{path}{message}" if message.startswith(":") else message)):
            stg.read_records(path)
        err = cli_error(lambda: A.main(["annotate", "--task", "mawps", "--in", str(path), "--out",
                                        str(tmp_path / "o.jsonl"), "--dry-run"]), capsys)
        assert f"--in {path}" in err and message in err, name
        err = cli_error(lambda: A.main(["fetch", "gsm8k", "--source", str(path), "--out", str(tmp_path / "f")]),
                        capsys)
        assert f"--source {path}" in err and message in err, name
        err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(path),
                                                 "--out", str(tmp_path / "e")]), capsys)
        assert str(path) in err and message in err, name
        if path.is_file():                   # the same bytes as an existing --out: named, and left as they are
            out = tmp_path / "out.jsonl"
            out.write_bytes(path.read_bytes())
            before = digest(tmp_path)
            err = cli_error(lambda: A.main(["annotate", "--task", "mawps", "--in", str(good), "--out", str(out)]),
                            capsys)
            assert f"--out {out}" in err and message in err, name
            assert digest(tmp_path) == before
    assert not (tmp_path / "f").exists() and not (tmp_path / "e").exists(), "nothing is written on the way"


def test_a_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(RECORD) + "\n").encode())
    assert stg.read_records(path) == [RECORD]


@pytest.mark.parametrize("row, message", [({"answer": "#### 3"}, "row 1: no field 'question'"),
                                          ("just a string", "row 1: expected an object with named fields")])
def test_source_rows_that_are_not_the_tasks(row, message, tmp_path, capsys):
    source = tmp_path / "train.json"
    source.write_text(json.dumps([row]))
    err = cli_error(lambda: A.main(["fetch", "gsm8k", "--source", str(source), "--out", str(tmp_path / "f")]), capsys)
    assert f"--source {source}, {message}" in err
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(json.dumps(RECORD) + "\n" + json.dumps({"answer": "#### 3"}) + "\n")
    err = cli_error(lambda: A.main(["fetch", "gsm8k", "--source", str(jsonl), "--out", str(tmp_path / "f")]), capsys)
    assert f"--source {jsonl}:1: no field 'question'" in err      # line 1: a record, not a GSM8K row
    assert not (tmp_path / "f").exists()


# ----------------------------------------------------------------------------- 7. output paths before any work
@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    return path


@pytest.mark.parametrize("where, message", [("under", "is a file, so nothing can be made under it"),
                                            ("equal", "a file is there, where a folder is needed")])
def test_output_folders_are_checked_first(where, message, a_file, model, data, tmp_path, capsys):
    out = a_file / "run" if where == "under" else a_file
    before = digest(tmp_path)
    commands = {"eval.py": lambda: evaluation.main(["--model", str(model), "--data", str(data), "--out", str(out)]),
                "stg.py": lambda: stg.main(["--out", str(out)]),
                "fetch": lambda: A.main(["fetch", "gsm8k", "--source", str(FIXTURES / "gsm8k_train.jsonl"),
                                         "--out", str(out)])}
    for name, command in commands.items():
        err = cli_error(command, capsys)
        assert err.startswith(f"error: --out {out}: ") and message in err, name
    assert digest(tmp_path) == before


def test_compare_out_is_checked_before_reading_runs(a_file, tmp_path, capsys):
    err = cli_error(lambda: evaluation.main(["--compare", str(tmp_path / "absent"), "--out", str(a_file / "t.md")]),
                    capsys)
    assert err.startswith(f"error: --out {a_file / 't.md'}: ") and "is a file" in err
    err = cli_error(lambda: evaluation.main(["--compare", str(tmp_path / "absent"), "--out", str(tmp_path)]), capsys)
    assert "a folder is there, where a file is to be written" in err


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc, where no file can be made")
def test_an_output_nobody_can_write_is_named_with_its_flag(model, data, capsys):
    for command in (lambda: stg.main(["--out", "/proc/cat-test/data"]),
                    lambda: evaluation.main(["--model", str(model), "--data", str(data), "--out", "/proc/cat-test"])):
        err = cli_error(command, capsys)
        assert err.startswith("error: --out /proc/cat-test") and "cannot write in /proc" in err


@pytest.mark.parametrize("folder, path, message", [
    (True, "", "--out is empty"),
    (True, "{file}/x", "is a file, so nothing can be made under it"),
    (True, "{file}", "a file is there, where a folder is needed"),
    (False, "{dir}", "a folder is there, where a file is to be written"),
    (False, "{file}/x.md", "is a file, so nothing can be made under it"),
])
def test_check_output(folder, path, message, a_file, tmp_path):
    with pytest.raises(cli.InputError, match=message):
        cli.check_output(path.format(file=a_file, dir=tmp_path), "--out", folder=folder)
    for good in (tmp_path / "new" / "deeper", tmp_path):
        assert cli.check_output(good, "--out", folder=True) == good
    assert cli.check_output(a_file, "--out", folder=False) == a_file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "nothing is made"


# ----------------------------------------------------------------------------- 8. one device check
@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", "CPU", ""])
def test_eval_device_is_checked_as_train_checks_it(device, model, data, tmp_path, capsys):
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(data), "--device", device]), capsys)
    assert err == f"error: --device {device!r}: choose auto, cpu, cuda or cuda:N"


@pytest.mark.parametrize("flags, message", [([], "give --model to evaluate, or --compare"),
                                            (["--model", "m", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
                                            (["--model", "m", "--task", "gsm"], "--task 'gsm': choose one of"),
                                            (["--model", "m", "--dtype", "fp16"], "--dtype 'fp16': choose auto")])
def test_eval_flags_end_in_one_line(flags, message, capsys):
    assert cli_error(lambda: evaluation.main(flags), capsys).startswith(f"error: {message}")


def test_device_auto_and_absent_cuda(monkeypatch):
    assert evaluation.parse_args(["--model", "m", "--device", "auto"]).device == \
        ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(cli.InputError, match=f"--device {device}: no CUDA device is available here"):
            cli.check_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cli.check_device("cuda:1")
    with pytest.raises(cli.InputError, match="--device cuda:2: this machine has 2 CUDA devices, cuda:0 to cuda:1"):
        cli.check_device("cuda:2")


# ----------------------------------------------------------------------------- 9. damaged files of the project's own
def split(accuracy, majority=0.5):
    return {"accuracy": accuracy, "n": 400, "majority": majority}


@pytest.mark.parametrize("name, text, message", [
    ("results.json", '{"stg_s": {"iid": {"accuracy": 0.5', "is damaged: not valid JSON"),
    ("results.json", '{"stg_s": [0.5]}', "is damaged: not the results.json eval.py writes"),
    ("train_config.json", '{"model": "m", "alpha": ', "is damaged: not valid JSON"),
    ("train_config.json", "[]", "is damaged: not the JSON object train.py writes"),
])
def test_compare_names_a_damaged_file(name, text, message, tmp_path, capsys):
    run = Path(a_run(tmp_path / "run", {"model": "m", "alpha": 0.0}, {"stg_s": {"iid": split(0.5)}}))
    (run / name).write_text(text)
    err = cli_error(lambda: evaluation.main(["--compare", str(run)]), capsys)
    assert err.startswith(f"error: {run / name} {message}") and ("evaluate the run again" in err
                                                                   or "restore it" in err)


def test_a_damaged_results_json_in_the_output_folder_is_named_before_any_work(model, data, tmp_path, capsys):
    out = tmp_path / "e"
    out.mkdir()
    (out / "results.json").write_text('{"test": {"test": ')
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(data), "--out", str(out)]), capsys)
    assert f"{out / 'results.json'} is damaged" in err and "move it aside" in err


# ----------------------------------------------------------------------------- 10. --attention on other data
def test_attention_on_data_that_is_not_stg(model, data, tmp_path, capsys):
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(data), "--attention",
                                             "--out", str(tmp_path / "e")]), capsys)
    assert "--attention needs STG data" in err and "'generic'" in err
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- 13. annotate's connection flags
@pytest.mark.parametrize("flags, message", [
    (["--timeout", "nan"], "--timeout nan: not a number"),
    (["--base-url", "notaurl"], "--base-url 'notaurl': not an http(s) address"),
    (["--base-url", "http://"], "--base-url 'http://': not an http(s) address"),
    (["--base-url", "http://localhost:port/v1"], "not an http(s) address"),
])
def test_annotate_connection_flags_are_checked_before_any_request(flags, message, data, tmp_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setenv("CAT_TEST_KEY", "sk-test")
    base = [] if "--base-url" in flags else ["--base-url", "http://127.0.0.1:9/v1"]   # nothing listens on port 9
    err = cli_error(lambda: A.main(["annotate", "--task", "mawps", "--in", str(data), "--out",
                                    str(tmp_path / "o.jsonl"), "--api-key-env", "CAT_TEST_KEY", "--max-retries", "0",
                                    *base, *flags]), capsys)
    assert message in err
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------- 14. causes that are not phrases
@pytest.mark.parametrize("causes, found", [([8, 12, True], "8 (int)"), (["Smoking: 8", True], "true (bool)"),
                                           (8.5, "8.5 (float)"), ([None], "null (NoneType)"),
                                           ([["2 apples"]], '["2 apples"] (list)')])
def test_a_cause_that_is_not_a_phrase_names_its_record(causes, found, tmp_path):
    path = tmp_path / "train.jsonl"
    cli.write_jsonl(path, [{**RECORD, "important": [{"5.0": ["2 apples"]}]},
                           {**RECORD, "important": [{"5.0": causes}]}])
    with pytest.raises(cli.InputError, match=re.escape(f"train.jsonl:2: 'important' gives the effect '5.0' the cause "
                                                       f"{found}, not a phrase")):
        stg.read_records(path)


def test_phrases_as_the_authors_files_write_them_are_read(tmp_path):
    """A string, a list of strings, and an object whose keys are the phrases (the authors' gsm8k_val, line 254)."""
    path = tmp_path / "train.jsonl"
    important = [{"5.0": "3 more"}, {"5.0": ["2 apples"]}, {"5.0": {"Tom has": ["2 apples"]}}]
    cli.write_jsonl(path, [{**RECORD, "important": important}])
    assert stg.read_records(path)[0]["important"] == important


# ----------------------------------------------------------------------------- 15. --compare keeps settings apart
def test_compare_keeps_runs_of_other_settings_apart_and_names_what_differs(tmp_path):
    base = {"model": "/models/smollm2", "data": "stg_s", "alpha": 2.69, "contrast": "all", "val_frac": 0.0,
            "seed": 42, "name": "x", "extra": {"world_size": 1}}
    runs = [a_run(tmp_path / "cat-s42", base, {"stg_s": {"ood": split(0.70)}}),
            a_run(tmp_path / "cat-s1", {**base, "seed": 1, "name": "y", "extra": {}}, {"stg_s": {"ood": split(0.80)}}),
            a_run(tmp_path / "attr", {**base, "contrast": "attributes"}, {"stg_s": {"ood": split(0.90)}}),
            a_run(tmp_path / "val", {**base, "val_frac": 0.2}, {"stg_s": {"ood": split(0.60)}}),
            a_run(tmp_path / "old", {k: v for k, v in base.items() if k != "contrast"}, {"stg_s": {"ood": split(0.45)}})]
    assert evaluation.compare_runs(runs).splitlines()[2:] == [
        "| smollm2 Full CAT α=2.69 (--contrast all, --val-frac 0) | 65.00% (mean of 3) |",   # "old": contrast unset
        "| smollm2 Full CAT α=2.69 (--contrast attributes, --val-frac 0) | 90.00% |",
        "| smollm2 Full CAT α=2.69 (--contrast all, --val-frac 0.2) | 60.00% |",
        "| majority baseline | 50.00% |"]
    with pytest.raises(cli.InputError, match="named twice"):
        evaluation.compare_runs([runs[0], str(tmp_path / "." / "cat-s42")])


def test_compare_keeps_folders_of_one_name_without_config_apart(tmp_path):
    runs = [a_run(tmp_path / "a" / "run1", None, {"stg_s": {"ood": split(0.7)}}),
            a_run(tmp_path / "b" / "run1", None, {"stg_s": {"ood": split(0.9)}})]
    assert evaluation.compare_runs(runs).splitlines()[2:4] == [f"| run1 (folder {runs[0]}) | 70.00% |",
                                                               f"| run1 (folder {runs[1]}) | 90.00% |"]



@pytest.mark.parametrize("command", [["train.py", "--alpah", "2"], ["train.py", "--epochs", "two"],
                                     ["eval.py", "--limit", "x"], ["stg.py", "--seed", "abc"],
                                     ["annotate.py", "fetch", "nope"], ["model.py", "--model", "m"],
                                     ["train.py", "--max-grad-norm", "-inf"]])
def test_argparse_mistakes_are_one_line_too(command):
    """A flag argparse itself refuses (unknown, of the wrong type, an invalid choice, one missing) is answered as
    every other input error: one `error:` line that points at --help, exit status 2, not the whole usage text."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / command[0]), *command[1:]], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "--help" in lines[0] and "usage:" not in result.stderr
    if "-inf" in command:   # a negative value reads as a flag: the line says how to write it
        assert "--flag=-value" in lines[0]


# ----------------------------------------------------------------------------- the second sweep's findings
def test_compare_refuses_an_out_that_is_not_a_table_and_a_copy_of_a_run(a_file, tmp_path, capsys):
    run = Path(a_run(tmp_path / "base", {"model": "m", "alpha": 0.0, "seed": 42}, {"stg_s": {"iid": split(0.5)}}))
    before = (run / "results.json").read_text()
    for out in (run / "results.json", a_file):                       # a run's own file, a user's file
        err = cli_error(lambda: evaluation.main(["--compare", str(run), "--out", str(out)]), capsys)
        assert "not a table of eval.py --compare" in err
    assert (run / "results.json").read_text() == before and a_file.read_text() == "mine\n"
    table = tmp_path / "table.md"                                    # a table of its own is replaced, as before
    evaluation.main(["--compare", str(run), "--out", str(table)])
    evaluation.main(["--compare", str(run), "--out", str(table)])
    import shutil
    shutil.copytree(run, tmp_path / "base.bak")                      # the same setting and seed twice
    err = cli_error(lambda: evaluation.main(["--compare", str(run), str(tmp_path / "base.bak")]), capsys)
    assert "the same setting, seed and results" in err


def test_eval_refuses_to_write_into_another_training_runs_folder(model, data, tmp_path, capsys):
    other = Path(a_run(tmp_path / "other", {"model": "m", "alpha": 0.0, "seed": 42}, {"test": {"test": split(0.0)}}))
    before = (other / "results.json").read_text()
    err = cli_error(lambda: evaluation.main(["--model", str(model), "--data", str(data), "--out", str(other)]), capsys)
    assert "another training run's folder" in err and (other / "results.json").read_text() == before


@pytest.mark.parametrize("target", ["", "   "])
def test_an_empty_target_names_its_line(tmp_path, target, capsys):
    """An empty answer teaches nothing and is 'right' for an empty output (accuracy 100 %)."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "target": target}) + "\n")
    with pytest.raises(cli.InputError, match=rf"{path}:2: field 'target' is empty"):
        stg.read_records(path)


def test_fetch_refuses_a_source_named_twice(tmp_path, capsys):
    source = tmp_path / "g.jsonl"
    cli.write_jsonl(source, [{"question": "1 + 1?", "answer": "#### 2"}] * 4)
    err = cli_error(lambda: A.main(["fetch", "gsm8k", "--source", str(source), "--source", str(source),
                                    "--out", str(tmp_path / "o")]), capsys)
    assert "more than once" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--out", ""], "--out is empty"),
    (["--out", "{busy}"], "holds other files and no study_config.json"),
    (["--settings", "knan"], "'knan' is not"),
    (["--seeds", "a,b"], "--seeds 'a,b'"),
    (["--device", "gpu"], "--device 'gpu'"),
    (["--val-frac", "nan"], "--val-frac"),
])
def test_alpha_study_checks_its_flags_before_any_run(tmp_path, flags, message, capsys):
    import sys as _sys
    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import alpha_study
    busy = tmp_path / "mine"
    busy.mkdir()
    (busy / ".gitignore").write_text("data/\n")
    flags = [f.replace("{busy}", str(busy)) for f in flags]
    args = ["--model", "scratch", "--data", "gen-stg_s", "--out", str(tmp_path / "study"), *flags]
    err = cli_error(lambda: alpha_study.main(args), capsys)
    assert message in err
    assert (busy / ".gitignore").read_text() == "data/\n" and not (tmp_path / "study").exists()
