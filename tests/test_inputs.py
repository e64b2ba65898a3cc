"""Bad input, as a new or a hostile user gives it: a clear one-line error naming the file, field or flag and what to
do; nothing a user produced is lost or silently changed; every command line explains every flag."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import annotate as A
import hf
import runs
import eval as evaluation
import model as M
import cli
import stg
import train
from conftest import cli_error

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "scratch", "--scratch-dim", "32", "--scratch-layers", "2", "--scratch-heads", "2",
        "--scratch-vocab", "300", "--batch-size", "8", "--epochs", "1", "--no-eval"]


STG_RECORDS = 16   # the conftest fixture stg_file: 2 steps an epoch at batch 8


def train_cli(argv):
    return lambda: train.train(train.parse_args(argv))


# ---------------------------------------------------------------------------------------------
# 1. run folders: a fresh run never writes into another run's folder; a failed validation writes nothing

def test_a_fresh_run_into_an_existing_folder_refuses_and_says_what_to_do(stg_file, tmp_path, capsys):
    argv = [*TINY, "--data", str(stg_file), "--out", str(tmp_path), "--name", "run"]
    run = train.train(train.parse_args(argv))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    err = cli_error(train_cli(argv), capsys)
    assert "a finished run" in err and "--name" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before, "nothing changed"
    err = cli_error(train_cli(["--resume", str(run)]), capsys)
    assert "finished run" in err and (run / "train_config.json").read_bytes() == before["train_config.json"]
    train.train(train.parse_args([*argv, "--overwrite"]))   # an explicit --overwrite replaces it
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2, "steps 1, 2 once, not 1, 2, 1, 2"


def test_an_interrupted_run_is_named_with_its_step(stg_file, tmp_path, capsys):
    argv = [*TINY, "--data", str(stg_file), "--out", str(tmp_path), "--name", "run", "--epochs", "3"]
    train.train(train.parse_args([*argv, "--stop-after", "2", "--save-every", "1"]))
    err = cli_error(train_cli(argv), capsys)
    assert "interrupted at step 2" in err and f"--resume {tmp_path / 'run'}" in err


@pytest.mark.parametrize("flags,named", [
    (["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-2"], "--batch-size -2"),
    (["--epochs", "0"], "--epochs 0"), (["--epochs", "-1"], "--epochs -1"), (["--lr", "-1"], "--lr -1"),
    (["--lr", "0"], "--lr 0"), (["--alpha", "-0.5"], "--alpha -0.5"),
    (["--gamma-schedule", "bogus"], "--gamma-schedule 'bogus'"),
    (["--val-frac", "1"], "--val-frac 1"), (["--dtype", "float16"], "--dtype 'float16'"),
    (["--device", "tpu"], "--device 'tpu'"), (["--attn-loss", "mse"], "--attn-loss 'mse'"),
    (["--alpha", "0.3", "--alpha-scale", "2"], "give one of them"), (["--contrast", "words"], "--contrast 'words'"),
    (["--contrast", "attributes"], "add --attn explicit"),
    (["--contrast", "input"], "add --attn explicit"),
    (["--rows", "prompt"], "--rows 'prompt'"), (["--pad-multiple", "0"], "--pad-multiple 0")],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_every_numeric_and_choice_flag_is_checked_before_any_work(stg_file, tmp_path, capsys, flags, named):
    err = cli_error(train_cli([*TINY, "--data", str(stg_file), "--out", str(tmp_path), *flags]), capsys)
    assert named in err
    assert not any(tmp_path.iterdir()), "a command that fails validation leaves no run folder"


def test_a_run_with_alpha_scale_resumes_with_the_alpha_it_placed(stg_file, tmp_path, capsys):
    argv = [*TINY, "--data", str(stg_file), "--out", str(tmp_path), "--name", "run", "--epochs", "2",
            "--alpha-scale", "2"]
    run = train.train(train.parse_args([*argv, "--stop-after", "1", "--save-every", "1"]))
    placed = json.loads((run / "train_config.json").read_text())["alpha"]
    assert placed > 0
    rows = json.loads((run / "train_config.json").read_text())["extra"]["cat_rows"]   # recorded, and printed
    assert rows["rows"] >= rows["target_rows"] > 0 and f"L_attn runs over {rows['rows']:.1f}" in capsys.readouterr().out
    train.train(train.parse_args(["--resume", str(run)]))
    assert json.loads((run / "train_config.json").read_text())["alpha"] == placed
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4


def test_method_is_not_a_second_switch_beside_alpha():
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "cat"])


def test_an_unset_flag_means_the_default_and_the_resolved_value_is_recorded(stg_file, tmp_path):
    cfg = train.parse_args(["--data", str(stg_file)])
    assert cfg.epochs is None and cfg.lr is None
    runs.resolve(cfg, stg.resolve_data(cfg.data), "cpu")
    assert (cfg.epochs, cfg.lr) == (10, 1e-3)        # scratch model on STG


# ---------------------------------------------------------------------------------------------
# 2. annotate.py keeps a complete last line that lacks its newline, and a dry run writes nothing

def test_annotate_keeps_a_complete_last_line_and_a_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    lines = [json.dumps({"input": f"q{i}", "target": "1", "important": []}) for i in range(3)]
    out.write_text("\n".join(lines))                            # no trailing newline: a complete, paid-for line
    assert A.done_keys(out, repair=False) == {A.record_key(json.loads(line)) for line in lines}
    assert out.read_text() == "\n".join(lines), "a dry run changes nothing"
    assert len(A.done_keys(out)) == 3 and out.read_text() == "\n".join(lines) + "\n"
    out.write_text("\n".join(lines) + "\n" + lines[0][:10])      # a line cut by a kill
    assert len(A.done_keys(out)) == 3 and out.read_text() == "\n".join(lines) + "\n"


def test_annotate_dry_run_leaves_the_output_untouched(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    cli.write_jsonl(inp, [{"input": "Tom has 2 apples. How many?", "target": "2"}])
    out.write_text(json.dumps({"input": "x", "target": "y", "important": []}))
    A.annotate(A.AnnotateConfig(task="gsm8k", inp=str(inp), out=str(out), dry_run=True))
    assert out.read_text() == json.dumps({"input": "x", "target": "y", "important": []})


def test_annotate_refuses_a_concurrency_of_zero(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    cli.write_jsonl(inp, [{"input": "q", "target": "1"}])
    err = cli_error(lambda: A.main(["annotate", "--in", str(inp), "--out", str(tmp_path / "o.jsonl"),
                                    "--concurrency", "0"]), capsys)
    assert "--concurrency 0" in err


# ---------------------------------------------------------------------------------------------
# 4. evaluation skips (and counts) prompts that do not fit, as training skips them

def test_evaluation_skips_prompts_longer_than_max_len(stg_file, tmp_path):
    cfg = train.TrainConfig(model="scratch", data=str(stg_file), scratch_dim=32, scratch_layers=2, scratch_heads=2,
                            scratch_vocab=300)
    records = stg.read_records(stg_file)
    model, tok, _ = runs.build_model(cfg, records, "cpu", torch.float32)
    lengths = [len(evaluation.prompt_ids(tok, r["input"])) for r in records]
    limit = sorted(lengths)[len(lengths) // 2] + 8          # about half the prompts fit with 8 new tokens
    data = stg.DataSet("tiny", "stg_e", None, None, {"test": stg_file})
    result = evaluation.evaluate(model, tok, data, max_new_tokens=8, max_len=limit)["test"]
    too_long = sum(n + 8 > limit for n in lengths)
    assert 0 < too_long < len(records)
    assert result["skipped_too_long"] == too_long and result["n"] == len(records) - too_long


# ---------------------------------------------------------------------------------------------
# 5. a metrics.jsonl cut by a kill, 6. atomic writes, 7. the NaN stop says what is true

def test_resume_drops_a_half_written_metrics_line(stg_file, tmp_path):
    argv = [*TINY, "--data", str(stg_file), "--out", str(tmp_path), "--name", "run", "--epochs", "2"]
    run = train.train(train.parse_args([*argv, "--stop-after", "1", "--save-every", "1"]))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "l_ne')                         # killed during the write of step 2
    train.train(train.parse_args(["--resume", str(run)]))
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with cli.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_one_atomic_writer_for_the_whole_project():
    """Files are written through cli.atomic_path (write_text, atomic_files, figures), never in place; the one other
    rename is train.py's swap of the whole checkpoint folder."""
    for name in ("model.py", "train.py", "eval.py", "annotate.py", "benchmarks/step.py", "experiments/stg_grid.py",
                 "experiments/alpha_study.py"):
        for n, line in enumerate((ROOT / name).read_text().splitlines(), 1):
            where = f"{name}:{n}: {line.strip()}"
            assert ".write_text(" not in line or "cli.write_text(" in line or "path(" in line, where
            assert "savefig(" not in line or "savefig(tmp" in line, where
            assert "os.replace(" not in line or name == "train.py", where


@pytest.mark.parametrize("save_every,says", [(1, "the last good checkpoint is kept in"),
                                            (-1, "no checkpoint was written before it")])
def test_the_nan_stop_says_what_is_true(stg_file, tmp_path, save_every, says):
    cfg = train.TrainConfig(model="scratch", data=str(stg_file), scratch_dim=32, scratch_layers=2, scratch_heads=2,
                            scratch_vocab=300, batch_size=4, lr=1e30, max_grad_norm=1e30, epochs=3,
                            save_every=save_every, out=str(tmp_path), eval=False)
    with pytest.raises(SystemExit, match=rf"step \d+.*{says}"):
        train.train(cfg)


# ---------------------------------------------------------------------------------------------
# 8. errors a person can act on: one line, exit status 2, the file, field or flag named

def test_user_errors_end_in_one_line(stg_file, tmp_path, capsys, smollm2_dir=None):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{not json\n')
    assert "bad.jsonl:2" in cli_error(train_cli([*TINY, "--data", str(bad), "--out", str(tmp_path / "r")]), capsys)
    assert "unknown data set 'stg_x'" in cli_error(train_cli([*TINY, "--data", "stg_x"]), capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no training records" in cli_error(train_cli([*TINY, "--data", str(empty), "--out", str(tmp_path / "r")]),
                                              capsys)
    model, tok = runs.build_scratch(["a b c"] * 5, train.TrainConfig(scratch_dim=32, scratch_layers=1,
                                                                      scratch_heads=2))
    folder = tmp_path / "model"
    hf.save_model(model, tok, folder)
    (folder / "model.safetensors").write_bytes(b"")           # damaged (empty)
    assert "model.safetensors: not a readable safetensors file" in cli_error(lambda: hf.load_model(str(folder)), capsys)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n "vocab_size": }')
    assert "config.json:2: not valid JSON" in cli_error(lambda: hf.load_model(str(folder)), capsys)
    config = model.args.to_hf_config()
    del config["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    assert "num_attention_heads" in cli_error(lambda: hf.load_model(str(folder)), capsys)
    (folder / "config.json").unlink()
    assert "config.json not found" in cli_error(lambda: hf.load_model(str(folder)), capsys)
    data = [*TINY, "--data", str(stg_file), "--out", str(tmp_path / "r")]
    assert "write each test file as split=FILE" in cli_error(train_cli([*data, "--test", "iid"]), capsys)
    assert "is not a file" in cli_error(train_cli([*data, "--test", f"iid={tmp_path / 'none.jsonl'}"]), capsys)
    assert "--fsdp needs torchrun" in cli_error(train_cli([*data, "--fsdp"]), capsys)
    assert "no such folder" in cli_error(lambda: evaluation.main(["--model", str(tmp_path / "absent")]), capsys)
    assert "no such run folder" in cli_error(lambda: evaluation.main(["--compare", str(tmp_path / "absent")]), capsys)


def test_eval_of_an_unfinished_run_says_resume_it(stg_file, tmp_path, capsys):
    run = train.train(train.parse_args([*TINY, "--data", str(stg_file), "--out", str(tmp_path), "--name", "run",
                                        "--epochs", "2", "--stop-after", "1", "--save-every", "1"]))
    err = cli_error(lambda: evaluation.main(["--model", str(run), "--data", str(stg_file)]), capsys)
    assert "unfinished training run" in err and f"train.py --resume {run}" in err


def test_an_empty_prompt_is_refused_with_what_to_do(tmp_path, capsys):
    model, tok = runs.build_scratch(["a b c"] * 5, train.TrainConfig(scratch_dim=32, scratch_layers=1,
                                                                      scratch_heads=2))
    tok.bos_id = None
    hf.save_model(model, tok, tmp_path / "m")
    sys_argv = sys.argv
    try:
        sys.argv = ["model.py", "--model", str(tmp_path / "m"), "--prompt", "", "--device", "cpu"]
        assert "--prompt is empty" in cli_error(M.main, capsys)
    finally:
        sys.argv = sys_argv


# ---------------------------------------------------------------------------------------------
# 9. the API key never reaches a file or a log, not even in part

def test_partial_echoes_of_the_key_are_redacted():
    key = "sk-ABCDEFGHIJKLMNOPQRSTUVwxyz"
    client = A.ChatClient(A.AnnotateConfig(), key, None)
    for echo in (key, "sk-ABCD...wxyz", "sk-ABCD…wxyz", "sk-AB***wxyz", "sk-ABCDEFGH"):
        text = client.redact(f"401: Incorrect API key provided: {echo}. See the docs.")
        assert "[API key]" in text and "wxyz" not in text and "ABCD" not in text, text


# ---------------------------------------------------------------------------------------------
# 10-12. the first ten minutes: set-up, the end of a run, --help

def test_the_readme_test_command_is_what_ci_runs_and_installs_pytest():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci/run").read_text()
    assert "python -m pytest tests/" in readme and ci.strip().splitlines()[-1] == "python -m pytest tests/"
    assert any(line.startswith("pytest") for line in (ROOT / "requirements.txt").read_text().splitlines())
    assert "../shared" not in readme, "the README points at nothing outside the repository"


def test_the_readme_demonstration_quotes_what_its_runs_printed_and_ran():
    """The README's SmolLM2 demonstration: each quoted summary is what runs.summary prints from the committed run's
    files (results.json, train_config.json, the steps of metrics.jsonl, wall_time.json's minutes), and each command
    is the one the run recorded, but for --data naming the same files by name, --out, the default --save-every, and
    --model naming a folder of that name."""
    import re
    import shlex
    from types import SimpleNamespace
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = re.search(r"```bash\nM=smollm2-135m-instruct.*?\n```", readme, re.S).group(0).splitlines()[1:-1]
    quoted = re.search(r"its first lines, from the study's runs \(`(results/[^`]+)/`\):\n\n```\n(.*?)```", readme,
                       re.S)
    folder, lines = ROOT / quoted.group(1), quoted.group(2).splitlines()
    model = commands[0].split("=", 1)[1].split()[0]                               # M=smollm2-135m-instruct
    run_line = shlex.split(commands[1].split("=", 1)[1].strip('"').replace("$M", model))[2:]   # RUN="python ..."
    demos = [run_line + shlex.split(line.split("#")[0])[1:] for line in commands[2:]]
    assert len(lines) == 4 * len(demos) == 12
    for n, argv in enumerate(demos):
        flags = [a for a in argv if a != "--no-save"]
        given = dict(zip(flags[::2], flags[1::2]))
        run = folder / given["--name"]
        config = json.loads((run / "train_config.json").read_text())
        results = next(iter(json.loads((run / "results.json").read_text()).values()))
        wall = json.loads((run / "wall_time.json").read_text())
        steps = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        printed = runs.summary(SimpleNamespace(total=steps, cfg=SimpleNamespace(**config), run_dir=run), results,
                               wall["seconds"]).splitlines()[:4]
        assert lines[4 * n:4 * n + 4] == printed
        recorded = shlex.split(wall["attempts"][0]["commands"][0])[2:]
        assert "--no-save" in recorded and "--no-save" in argv
        recorded = [a for a in recorded if a != "--no-save"]
        ran = dict(zip(recorded[::2], recorded[1::2]))
        data = stg.resolve_data(given["--data"])
        assert ran.pop("--data") == str(data.train) and ran.pop("--test") == ",".join(
            f"{split}={path}" for split, path in data.tests.items())
        assert ran.pop("--save-every") == str(train.TrainConfig.save_every)       # the default
        ran.pop("--out"), given.pop("--out"), given.pop("--data")
        assert Path(ran.pop("--model")).name == given.pop("--model")     # the local copy the comment speaks of
        assert ran == given, f"{given['--name']}: the README's flags are not the ones the run recorded"
    # the sentence after the quote: the C/N at the end and the paired OOD differences of these seed-42 runs
    sys.path.insert(0, str(ROOT / "experiments"))
    import alpha_study
    run = {name: alpha_study.read_run(folder / f"gen-stg_s-{name}-s42") for name in ("vanilla", "a0.6", "attr-k3")}

    def points(x: float) -> str:
        return f"{100 * x:+.2f}".replace("-", "−")
    paper, attr = (alpha_study.paired_difference({42: run[name]}, {42: run["vanilla"]}, "ood")
                   for name in ("a0.6", "attr-k3"))
    assert (f"C/N ends at {run['a0.6']['cn_end']:.2f} against vanilla's {run['vanilla']['cn_end']:.2f}) and not the "
            f"OOD answer ({points(paper['mean'])} points, 95 % interval {points(paper['ci95'][0])} to "
            f"{points(paper['ci95'][1])}); N_i over the other attributes gains {points(attr['mean'])} "
            f"({points(attr['ci95'][0])} to {points(attr['ci95'][1])})") in " ".join(readme.split())


def test_the_readme_layout_counts_the_lines_each_module_has():
    """The README's layout tables say "Lines are `wc -l` at this commit": each count is the file's."""
    import re
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    counts = re.findall(r"^\| `([a-z_]+\.py)` \| (\d+) \|", readme, re.M)
    assert len(counts) >= 11
    for name, lines in counts:
        assert int(lines) == len((ROOT / name).read_text(encoding="utf-8").splitlines()), f"README: {name}"


def test_a_vanilla_run_prints_no_hinge_and_ends_with_what_a_person_wants(stg_file, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *TINY[:-1], "--data", str(stg_file), "--test",
                           f"iid={stg_file}", "--eval-limit", "4", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "hinge" not in proc.stdout
    tail = proc.stdout.strip().splitlines()[-5:]
    assert "accuracy" in tail[1] and "majority baseline" in tail[1], tail
    assert any(line.startswith("run folder:") for line in tail) and any("eval.py --compare" in line for line in tail)


@pytest.mark.parametrize("parser", ["train", "eval", "annotate", "benchmark", "stg", "alpha_study"])
def test_every_flag_of_every_command_line_has_help(parser):
    if parser == "train":
        p = cli.config_parser(train.TrainConfig, "", skip=("extra",))
    elif parser == "eval":
        p = cli.config_parser(evaluation.EvalConfig, "")
    elif parser == "annotate":
        import argparse
        p = argparse.ArgumentParser()
        cli.add_config_arguments(p, A.AnnotateConfig, rename={"inp": "--in"})
    elif parser == "benchmark":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import step
        p = cli.config_parser(step.BenchConfig, "")
    elif parser == "stg":
        p = cli.config_parser(stg.StgConfig, "")
    else:
        sys.path.insert(0, str(ROOT / "experiments"))
        import alpha_study
        p = cli.config_parser(alpha_study.StudyConfig, "", skip=("train_args",))
    for action in p._actions:
        if action.dest != "help":
            assert action.help and not action.help.startswith(" (default"), f"{parser}: {action.option_strings}"
