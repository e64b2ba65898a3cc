"""train.py under torchrun: 2 CPU processes (gloo) train the same model as one process with the same command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


ROOT = Path(__file__).resolve().parents[1]


STG_RECORDS = 21   # the conftest fixture stg_file: an odd count, so ranks get unequal shares


def run(nproc: int, stg_file: Path, out: Path, extra: list[str]) -> Path:
    """train.py with a tiny scratch model; odd record count and batch 6 over 2 ranks with 2 micro-batches."""
    args = ["train.py", "--model", "scratch", "--data", str(stg_file), "--scratch-dim", "32", "--scratch-layers", "2",
            "--scratch-heads", "2", "--scratch-vocab", "300", "--batch-size", "6", "--grad-accum", "2",
            "--epochs", "2", "--lr", "3e-3", "--alpha", "2.0", "--no-eval", "--dtype", "float32", "--out", str(out),
            "--name", "run", *extra]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(launcher + args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out / "run"


LORA = ["--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]


@pytest.mark.parametrize("extra,sharded,weights", [([], [], "model.safetensors"),
                                                   (LORA, [], "adapter_model.safetensors"),
                                                   ([], ["--fsdp"], "model.safetensors")], ids=["ddp", "lora", "fsdp"])
def test_two_processes_equal_one(stg_file, tmp_path, extra, sharded, weights):
    one = run(1, stg_file, tmp_path / "one", extra)
    two = run(2, stg_file, tmp_path / "two", extra + sharded)
    a, b = load_file(str(one / weights)), load_file(str(two / weights))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)
    # only rank 0 wrote: one metrics line per step, the same steps as the single process, world size recorded
    steps = [[json.loads(line)["step"] for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]
    assert steps[0] == steps[1] == list(range(1, len(steps[0]) + 1))
    assert json.loads((two / "train_config.json").read_text())["extra"]["world_size"] == 2
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())


@pytest.mark.parametrize("sharded", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_resume_under_torchrun_equals_one_uninterrupted_process(stg_file, tmp_path, sharded):
    """Stop a 2-process run mid-epoch, resume it under torchrun: the weights of one uninterrupted process."""
    one = run(1, stg_file, tmp_path / "one", [])
    two = run(2, stg_file, tmp_path / "two", ["--stop-after", "3", "--save-every", "1", *sharded])
    assert not (two / "model.safetensors").exists() and (two / "checkpoint").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", "--resume", str(two)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0, msg=name)
