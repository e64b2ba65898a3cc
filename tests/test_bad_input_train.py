"""train.py's answers to a user's mistakes (issue 40, its train.py items): one line naming what to fix, exit status 2,
nothing the user made changed; Ctrl-C says where the run can continue from."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import hf
import runs
import stg
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "scratch", "--scratch-dim", "32", "--scratch-layers", "1", "--scratch-heads", "2",
        "--scratch-vocab", "300", "--batch-size", "8", "--epochs", "1", "--no-eval", "--no-save"]


def train_py(*args, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300, **kw)


def one_error_line(result, *words):
    """The mistake's answer: exit status 2, one `error:` line on stderr naming each of `words`, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A tiny run stopped (checkpointed) after 2 of its 6 steps, to resume; copied per test by `run_copy`."""
    folder = tmp_path_factory.mktemp("stopped")
    cli.write_jsonl(folder / "stg.jsonl", stg.make_records("stg_s_train", 42)[:48])
    result = train_py(*TINY, "--data", str(folder / "stg.jsonl"), "--out", str(folder / "runs"), "--name", "r",
                      "--stop-after", "2", cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (folder / "runs" / "r" / "checkpoint" / "state.pt").exists()
    return folder


@pytest.fixture
def run_copy(stopped_run, tmp_path):
    import shutil
    shutil.copytree(stopped_run, tmp_path / "copy")
    return tmp_path / "copy"


@pytest.mark.parametrize("damaged", ["checkpoint/state.pt", "checkpoint/trainable.safetensors", "train_config.json"])
def test_a_damaged_file_of_a_run_is_named_under_resume(run_copy, damaged):
    path = run_copy / "runs" / "r" / damaged
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])                     # cut, as a full disk or a kill leaves it
    before = {p: p.read_bytes() for p in (run_copy / "runs" / "r").rglob("*") if p.is_file()}
    line = one_error_line(train_py("--resume", str(run_copy / "runs" / "r"), cwd=run_copy), damaged.split("/")[-1],
                          "damaged")
    assert "--overwrite" in line                                # what to do
    after = {p: p.read_bytes() for p in (run_copy / "runs" / "r").rglob("*") if p.is_file()}
    assert after == before                                      # nothing the user has is changed


def test_flags_beside_resume_that_contradict_the_run_are_refused(run_copy):
    run = run_copy / "runs" / "r"
    line = one_error_line(train_py("--resume", str(run), "--lr", "0.5", "--epochs", "5", "--data", "other.jsonl",
                                   cwd=run_copy), "--lr 0.5", "--epochs 5", "--data other.jsonl")
    assert "0.001" in line                                       # the run's own value, to compare
    # flags that agree with the run, defaults the run resolved, and --stop-after are accepted
    saved = json.loads((run / "train_config.json").read_text())
    parser = cli.config_parser(__import__("train").TrainConfig, "", skip=("extra",))
    ok = ["--resume", str(run), "--lr", str(saved["lr"]), "--dtype", "auto", "--stop-after", "4",
          "--model", "scratch"]
    runs.check_resume_flags(runs.given_flags(parser, ok), run)
    # a flag given at its default is still a flag given: --alpha 0 on a run with another α is refused
    saved["alpha"] = 2.0
    (run / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(cli.InputError, match="--alpha 0.0"):
        runs.check_resume_flags(runs.given_flags(parser, ["--resume", str(run), "--alpha", "0"]), run)


@pytest.mark.parametrize("flags,words", [
    (["--seed", str(2**70)], ["--seed", "between 0 and"]),
    (["--seed", "-1"], ["--seed"]),
    (["--lora", "--lora-targets", "q_proj,k_prj"], ["--lora-targets", "k_prj", "q_proj"]),
    (["--alpha-scale", "nan"], ["--alpha-scale", "not a number"]),          # NaN passed every range check
    (["--alpha", "inf"], ["--alpha", "finite"]),
    (["--weight-decay", "inf"], ["--weight-decay", "finite"]),
    (["--device", "gpu"], ["--device", "gpu"]),
    (["--out", "{file}/runs"], ["--out", "file"]),                            # under a file: refused before work
])
def test_plausible_mistakes_in_flags(stopped_run, tmp_path, flags, words):
    (tmp_path / "file").write_text("a file, not a folder")
    flags = [flag.replace("{file}", str(tmp_path / "file")) for flag in flags]
    result = train_py(*TINY, "--data", str(stopped_run / "stg.jsonl"), "--out", str(tmp_path / "runs"), *flags,
                      cwd=tmp_path)
    one_error_line(result, *words)
    assert not (tmp_path / "runs").exists()                      # refused before any work


def test_a_checkpoint_whose_config_and_tensors_disagree_is_one_line(tmp_path):
    args = ModelArgs(vocab_size=300, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, hidden_dim=64)
    tok_src = tmp_path / "tok"
    model = Transformer(args)
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save_model(model, hf.Tokenizer(backend, bos_id=0, eos_ids=[1], pad_id=1), tok_src)
    config = json.loads((tok_src / "config.json").read_text())
    config["intermediate_size"] = 96                             # the tensors hold 64
    (tok_src / "config.json").write_text(json.dumps(config))
    result = subprocess.run([sys.executable, str(ROOT / "model.py"), "--model", str(tok_src), "--prompt", "a"],
                            capture_output=True, text=True, timeout=120)
    one_error_line(result, str(tok_src), "mlp", "expects")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process")
def test_ctrl_c_says_where_to_continue(stopped_run, tmp_path, ctrl_c):
    """Ctrl-C in the loop: no traceback; the last checkpoint and the command that continues from it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "runs" / "long"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TINY, "--epochs", "50", "--save-every", "1",
                             "--data", str(stopped_run / "stg.jsonl"), "--out", str(tmp_path / "runs"), "--name",
                             "long"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (run / "checkpoint" / "state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)                                          # the loop has run and saved a step
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"python train.py --resume {run}" in err and "last checkpoint (step" in err
    step = torch.load(run / "checkpoint" / "state.pt", weights_only=True)["step"]
    assert step >= 1


def test_an_empty_input_without_bos_names_its_record(byte_bpe):
    """With no BOS token (Qwen2.5's tokenizer adds none) an empty input leaves the answer's first token nothing to
    be predicted from, and its labels one longer than its ids: the record is named instead of a shape error."""
    tok = hf.Tokenizer(byte_bpe, bos_id=None, eos_ids=[byte_bpe.token_to_id("</s>")],
                       pad_id=byte_bpe.token_to_id("</s>"))
    cfg = __import__("train").TrainConfig(data="mine.jsonl")
    records = [{"input": "Smoking: 8 Answer: ", "target": "High Risk"}, {"input": "", "target": "High Risk"}]
    with pytest.raises(cli.InputError, match="mine.jsonl: record 2 has an empty input"):
        runs.encode_all(records, tok, cfg)
    assert len(runs.encode_all(records[:1], tok, cfg)) == 1


@pytest.mark.parametrize("name", ["notes", "..", ".", "a/b", "   "])
def test_overwrite_never_removes_a_folder_of_the_users_files(stopped_run, tmp_path, name):
    """--overwrite replaces a run's folder; a folder of other files (notes, the data) is refused, and --name is one
    plain folder name, so that it cannot reach above --out."""
    out = tmp_path / "out" / "sub"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "todo.txt").write_text("mine")
    (out / "other-run.txt").write_text("mine too")
    result = train_py(*TINY, "--data", str(stopped_run / "stg.jsonl"), "--out", str(out), "--name", name,
                      "--overwrite", cwd=tmp_path)
    one_error_line(result, "--name" if name != "notes" else "not a training run's")
    assert (out / "notes" / "todo.txt").read_text() == "mine" and (out / "other-run.txt").read_text() == "mine too"


def test_resume_refuses_an_empty_folder_name_and_a_damaged_configuration(run_copy):
    run = run_copy / "runs" / "r"
    one_error_line(train_py("--resume", "", cwd=run_copy), "--resume is empty")
    assert not (run_copy / "runs" / "scratch-stg_s-vanilla-s42").exists()          # no default run was started
    one_error_line(train_py("--resume", str(run_copy / "nowhere"), cwd=run_copy), "no run there")
    saved = json.loads((run / "train_config.json").read_text())
    for damaged, words in ((lambda c: c.pop("data"), ["train_config.json", "no 'data'"]),
                           (lambda c: c.update(lr="abc"), ["train_config.json", "lr = 'abc'"]),
                           (lambda c: c.update(lr=float("nan")), ["train_config.json", "--lr nan"])):
        config = dict(saved)
        damaged(config)
        (run / "train_config.json").write_text(json.dumps(config))
        one_error_line(train_py("--resume", str(run), cwd=run_copy), *words)
    (run / "train_config.json").write_text(json.dumps(saved))


def test_resume_refuses_a_checkpoint_past_the_run_and_changed_data(run_copy):
    run = run_copy / "runs" / "r"
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    torch.save({**state, "step": 999}, run / "checkpoint" / "state.pt")
    one_error_line(train_py("--resume", str(run), cwd=run_copy), "step 999", "--overwrite")
    torch.save(state, run / "checkpoint" / "state.pt")
    data = Path(json.loads((run / "train_config.json").read_text())["data"])   # the file the run trains on
    original = data.read_bytes()
    try:
        cli.write_jsonl(data, stg.read_records(data)[:8])                     # the training file cut since the start
        one_error_line(train_py("--resume", str(run), cwd=run_copy), "stg.jsonl has changed")
    finally:
        data.write_bytes(original)
    result = train_py("--resume", str(run), cwd=run_copy)                 # restored: the run goes on
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_test_file_that_cannot_be_read_is_named_before_training(stopped_run, tmp_path):
    bad = tmp_path / "ood.jsonl"
    bad.write_bytes('{"input": "a", "target": "b"}\n'.encode("utf-16"))
    result = train_py(*TINY, "--eval", "--data", str(stopped_run / "stg.jsonl"), "--test", f"ood={bad}",
                      "--out", str(tmp_path / "runs"), cwd=tmp_path)
    one_error_line(result, str(bad))
    assert not (tmp_path / "runs").exists()                      # nothing trained, nothing written


def test_a_test_target_the_checker_cannot_score_is_named_before_training(stopped_run, tmp_path):
    """An STG_H test file (named so: its answers are scored as the AQI) whose target is no number: refused before the
    first step, not after the training and the decoding."""
    bad = tmp_path / "stg_h_test_ood.jsonl"
    cli.write_jsonl(bad, [{"input": "Industrial emissions: 50.1 Answer: ", "target": "32"},
                          {"input": "Industrial emissions: 40.2 Answer: ", "target": "high"}])
    result = train_py(*TINY, "--eval", "--data", str(stopped_run / "stg.jsonl"), "--test", f"ood={bad}",
                      "--out", str(tmp_path / "runs"), cwd=tmp_path)
    one_error_line(result, f"{bad}:2", "'high'")
    assert not (tmp_path / "runs").exists()
