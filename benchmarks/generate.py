"""Decoding benchmark: model.generate (the KV cache written in place; finished rows leave the batch a quarter at a
time) against the plain loop (the whole batch decodes until its last row ends; the cache grows by torch.cat), on
the same prompts, weights, threads and precision: time, and how many answers differ.

    python benchmarks/generate.py --model <SmolLM2 folder> --weights <run>/checkpoint/trainable.safetensors \
        --data <gsm8k_test.jsonl> --prompts 128 --batch 64 --max-new-tokens 512 --threads 2

This is eval.py's decoding: the first --prompts records' inputs of --data, encoded by eval.prompt_ids, sorted by
length and cut into batches of --batch as eval.generate_answers does, in eval.py's precision (--dtype auto: bf16
autocast on CUDA and on CPUs with native bf16). --weights: a run's full fine-tuned weights (train.py's
checkpoint/trainable.safetensors) put over --model, so that answers end as a trained model's do; an untrained
model rarely writes EOS, and then both loops run every batch to --max-new-tokens. The two loops alternate batch
by batch, which comes first swapping each time. Answers can differ only where a row's batch differs (bf16
matmuls of another batch size may round a near tie the other way): the count is printed, and each loop's accuracy
by the checker of the task the file's name names (eval.check). In float32 none should differ.
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf  # noqa: E402
import runs  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
import cli  # noqa: E402
import stg  # noqa: E402


@dataclass
class BenchConfig:
    model: str = ""                   # a model folder, alias or hub id (hf.load_model)
    weights: str = ""                 # optional: a full fine-tuned trainable.safetensors put over --model
    data: str = ""                    # a JSONL file of records with "input" (the authors' layout or ours)
    prompts: int = 128                # the first this many records
    batch: int = 64                   # prompts decoded together (eval.py's --batch-size)
    max_new_tokens: int = 512
    device: str = "cpu"
    dtype: str = "auto"               # auto | bfloat16 | float32 (cli.precision)
    threads: int = 0                  # CPU torch threads (0 = torch's default)
    out: str = ""                     # optional: the figures as JSON


class ConcatCache(M.KVCache):
    """The cache grown by torch.cat: every new token copies all of it, every layer."""

    def __init__(self):
        super().__init__(size=0)

    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k, v):
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@torch.inference_mode()
def plain_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """Greedy decoding as model.generate, but every row stays in the batch until the last one has ended."""
    device = next(model.parameters()).device
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = torch.tensor(eos_ids, device=device)
    cache, done, new = ConcatCache(), torch.zeros(len(prompts), dtype=torch.bool, device=device), []
    logits = model(ids, mask, cache=cache, last_only=True).logits
    for _ in range(max_new_tokens):
        token = torch.where(done, pad_id, logits[:, -1].argmax(-1))
        new.append(token)
        done |= torch.isin(token, eos)
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(token[:, None], mask, cache=cache, last_only=True).logits
    rows = torch.stack(new, dim=1).tolist()
    return [row[:next((i for i, t in enumerate(row) if t in eos_ids), len(row))] for row in rows]


def timed(fn, *args) -> tuple[list[list[int]], float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None) -> dict:
    cfg = BenchConfig(**vars(cli.config_parser(BenchConfig, __doc__).parse_args(argv)))
    if not cfg.model or not cfg.data:
        raise cli.InputError("--model and --data are both needed (see the docstring's command)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    precision = cli.precision(cfg.device, cfg.dtype)
    weights = torch.bfloat16 if precision == "bfloat16" and cfg.device.startswith("cuda") else torch.float32
    model, tokenizer = hf.load_model(cfg.model, dtype=weights, device=cfg.device)
    if cfg.weights:
        runs.put_weights(model, load_file(cfg.weights), cfg.weights)
    records = stg.read_records(Path(cfg.data))[:cfg.prompts]
    encoded = sorted(((E.prompt_ids(tokenizer, r["input"]), r) for r in records), key=lambda pair: len(pair[0]))
    prompts, records = [ids for ids, _ in encoded], [r for _, r in encoded]
    task = stg.guess_task(Path(cfg.data).stem)
    ours, plain, seconds = [], [], {"generate": 0.0, "plain": 0.0}
    with cli.autocast(cfg.device, precision):
        for n, start in enumerate(range(0, len(prompts), cfg.batch)):
            batch = prompts[start:start + cfg.batch]
            args = (model, batch, cfg.max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id)
            for name in (("generate", "plain") if n % 2 == 0 else ("plain", "generate")):
                out, s = timed(M.generate if name == "generate" else plain_generate, *args)
                seconds[name] += s
                (ours if name == "generate" else plain).extend(out)
                print(f"batch {n}: {name} {s:.1f} s", flush=True)
    lengths = sorted(map(len, plain))

    def accuracy(answers):
        return sum(E.is_correct(task, tokenizer.decode(ids), r["target"], r["input"])
                   for ids, r in zip(answers, records)) / len(records)
    figures = {"prompts": len(prompts), "batch": cfg.batch, "max_new_tokens": cfg.max_new_tokens,
               "precision": precision, "threads": torch.get_num_threads(), "device": cfg.device,
               "seconds": seconds, "speedup": seconds["plain"] / seconds["generate"],
               "answers_differ": sum(a != b for a, b in zip(ours, plain)), "task": task,
               "accuracy": {"generate": accuracy(ours), "plain": accuracy(plain)},
               "new_tokens": {"median": lengths[len(lengths) // 2], "max": lengths[-1],
                              "at_limit": sum(n == cfg.max_new_tokens for n in lengths)}}
    print(json.dumps(figures, indent=2))
    if cfg.out:
        cli.write_text(Path(cfg.out), json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    cli.run_cli(main)
