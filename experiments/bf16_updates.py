"""How much of the warm-up a bf16 forward pass sees: after each of a run's first AdamW steps, the share of the weight
matrices' entries whose bf16 copy differs from the one before training.

    python experiments/bf16_updates.py --model <SmolLM2 folder>
    python experiments/bf16_updates.py --model <folder> --lr 5e-5 --total-steps 240 --show 1,2,4,8,12,24

bf16 autocast (train.py --dtype bfloat16) keeps float32 master weights and rounds each matrix to bf16, 8 significant
bits, for every matmul; float32 computes with the master weights themselves. A checkpoint stored in bf16 (SmolLM2's
is) puts every master weight on the bf16 grid, so the forward pass computes with a changed weight only once that
weight has moved by more than half a bf16 step, about 2^-9 of its size. AdamW's first step moves every weight with a
gradient by exactly lr (its m/sqrt(v) is ±1 on the first step) and later steps by about lr or less, so after k steps
a weight has moved at most about the sum of the first k learning rates of the schedule (train.lr_at). The table
gives, for each k, the share of entries that a move of that sum takes out of their bf16 rounding interval: the most
favourable case, every step the same way. Reads the weights only; writes a Markdown table to standard output.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import hf  # noqa: E402
import cli  # noqa: E402
import train  # noqa: E402
from stg_grid import items  # noqa: E402


@dataclass
class UpdatesConfig:
    model: str = ""                  # the checkpoint (a folder, alias or hub id)
    lr: float = 5e-5                 # the peak learning rate (train.py's default, §5.1)
    total_steps: int = 240           # the run's optimiser steps (STG_S: 320 training records / batch 8 × 6 epochs)
    warmup_ratio: float = 0.1        # train.py's default
    show: str = "1,2,4,8,12,24"      # the steps to report


def moved_share(weights: list[torch.Tensor], shift: float) -> float:
    """The share of the entries of `weights` whose bf16 rounding changes when each entry moves by +shift."""
    changed = sum(((w.float() + shift).bfloat16() != w.float().bfloat16()).sum().item() for w in weights)
    return changed / sum(w.numel() for w in weights)


def table(cfg: UpdatesConfig) -> str:
    model, _ = hf.load_model(cfg.model)
    matrices = [p.detach() for p in model.parameters() if p.ndim == 2]     # what autocast multiplies in bf16
    schedule = train.TrainConfig(lr=cfg.lr, warmup_ratio=cfg.warmup_ratio)
    on_grid = all(torch.equal(w, w.bfloat16().float()) for w in matrices)
    lines = [f"{cfg.model}: {sum(w.numel() for w in matrices):,} matrix entries, "
             + ("all on the bf16 grid (a bf16 checkpoint)" if on_grid else "not all on the bf16 grid"), "",
             "| steps | learning rate of the last step | sum of the learning rates | entries whose bf16 copy moved |",
             "|---|---|---|---|"]
    moved, show = 0.0, set(items(cfg.show, int))
    for step in range(max(show)):
        lr = train.lr_at(step, cfg.total_steps, schedule)
        moved += lr
        if step + 1 in show:
            lines.append(f"| {step + 1} | {lr:.2e} | {moved:.2e} | {100 * moved_share(matrices, moved):.2f} % |")
    return "\n".join(lines)


def main(argv=None) -> str:
    cfg = UpdatesConfig(**vars(cli.config_parser(UpdatesConfig, __doc__).parse_args(argv)))
    if not cfg.model:
        raise cli.InputError("--model: the checkpoint whose weights to read (a folder, alias or hub id)")
    text = table(cfg)
    print(text)
    return text


if __name__ == "__main__":
    cli.run_cli(main)
