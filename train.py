"""Fine-tune a causal LM with CAT (§4.2: L_total = L_next + γ·L_attn) or vanilla, full or LoRA.

    python train.py --model scratch --data stg_m                 # a small model from scratch, CPU, minutes
    python train.py --model tinyllama --data stg_s --alpha 0.6    # the paper's setting (§5.1, Appendix F)
    torchrun --nproc_per_node 4 train.py ...                      # the same run on 4 processes (DDP)

A plain loop, as nanoGPT's reads: batches → forward → L_next + γ·L_attn → backward → clip → AdamW step,
with a visible lr_at(step). Read beside §4.2 and §5.1: TrainConfig (the paper's settings first), losses (Eq. 7-11),
train_step (Eq. 12). Everything else a job needs (flags checked, the run folder, checkpoints and resume, DDP/FSDP,
the end-of-run summary) is in runs.py; the variants past the paper are in variants.py. Writes runs/<name>/: the
model (HF layout) or LoRA adapter, train_config.json, metrics.jsonl, a resumable checkpoint/, and results.json.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cat
import cli
import batches
import runs
import variants


@dataclass
class TrainConfig:
    # --- the paper (§4.2, §5.1, Appendix F; batch size and clipping are not stated there) ---------
    model: str = "scratch"           # alias (tinyllama, qwen2.5-1.5b, llama3.1-8b, smollm2-135m), folder, hub id,
                                     # or "scratch": a small Llama-style model from random init, its tokenizer trained
                                     # on the data
    data: str = "stg_s"              # stg_s | stg_m | stg_l | stg_h | mawps | svamp | asdiv | gsm8k | arc_e | a JSONL
                                     # path
    test: str = ""                   # test files as split=FILE,split=FILE (e.g. iid=a.jsonl,ood=b.jsonl); default: the
                                     # data set's own (a JSONL --data: itself)
    alpha: float = 0.0               # CAT §4.2: hinge threshold on C_i/N_i; 0 = vanilla fine-tuning (the baseline)
    gamma_schedule: str = "exp"      # §5.1: γ = e^{-epoch} ("exp") or 1 ("constant", the Table 3 ablation)
    lora: bool = False               # LoRA instead of full fine-tuning
    lora_r: int = 64                 # LoRA rank (the authors' code)
    lora_alpha: float = 32.0         # LoRA scaling numerator: ΔW = (alpha/r)·B·A
    lora_dropout: float = 0.1        # dropout on the input of the LoRA branch
    lora_targets: str = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"  # linear layers that get an adapter
    epochs: int | None = None        # passes over the training records; unset: the paper's 6 on STG, 4 elsewhere
                                     # (scratch: 10)
    lr: float | None = None          # peak learning rate; unset: the paper's 5e-5 full, 1e-4 LoRA (scratch: 1e-3)
    batch_size: int = 8              # global batch (records per optimiser step), split over processes
    warmup_ratio: float = 0.1        # §5.1: linear warm-up over this share of the steps, then cosine decay
    weight_decay: float = 0.0        # AdamW weight decay
    max_grad_norm: float = 1.0       # gradient clipping
    seed: int = 42                   # data order, initialisation, dropout

    # --- past the paper (variants.py) ------------------------------------------------------------
    alpha_scale: float = 0.0         # α relative to the model: α = K × the median C/N of the causal rows measured
                                     # before the first step (printed, written to train_config.json); 0 = --alpha
    attn_loss: str = "hinge"         # L_attn: "hinge", the paper's Eq. 10, or "div", the authors' code (myloss.py)
    contrast: str = "all"            # Eq. 9's other tokens: "all" (the paper); not in the paper, with --attn
                                     # explicit: "attributes" (STG only), the record's other "Name: value" phrases,
                                     # or "input", the input's tokens but the first (the attention sink)
    rows: str = "all"                # Eq. 10's rows: "all", every annotated row (the paper); not in the paper:
                                     # "target", only the rows that predict an answer token (not those inside the
                                     # input, where no next-token loss trains)

    # --- running a job (runs.py) -----------------------------------------------------------------
    attn: str = "fast"               # how L_attn reads attention: "fast" (causal mass, no T×T maps) or "explicit"
    log_ratio: bool = True           # vanilla runs too: measure C/N on the causal rows (by --attn's path; no loss)
    fsdp: bool = False               # under torchrun, full fine-tuning sharded with FSDP (one unit per decoder layer)
    grad_accum: int = 1              # micro-batches per optimiser step on each process
    max_len: int = 1024              # longer records are skipped (and counted)
    pad_multiple: int = 16           # a batch's length rounded up to a multiple of this: few distinct matmul shapes,
                                     # so the CPU's oneDNN caches (an entry kept per shape) stop growing; 1 = none.
                                     # The losses do not change: pads sit after every token
    val_frac: float = 0.0            # carve this share of the training file out as a validation split (choose α on it)
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "auto"              # compute precision: auto = bfloat16 autocast (float32 weights) on CUDA and on CPUs
                                     # with native bf16 matmuls (AVX512-BF16, AMX), else float32; float32 | bfloat16
    scratch_dim: int = 256           # --model scratch: the model's width
    scratch_layers: int = 4          # --model scratch: decoder layers
    scratch_heads: int = 4           # --model scratch: attention heads
    scratch_vocab: int = 1000        # --model scratch: vocabulary of the BPE tokenizer trained on the data
    out: str = "runs"                # parent folder of the run folders
    name: str = ""                   # run folder name; default <model>-<data>-<cat|vanilla>[-lora]-s<seed>
    resume: str = ""                 # a run folder: continue from its last checkpoint
    overwrite: bool = False          # replace what a run folder of the same name holds (else a fresh run refuses)
    save_every: int = 0              # checkpoint every N optimiser steps (0: at the end of each epoch; -1: never)
    stop_after: int = 0              # stop (checkpointed) after N optimiser steps in total; resume later
    eval: bool = True                # evaluate on the data set's test files at the end
    save: bool = True                # write the final model (or LoRA adapter); --no-save keeps metrics and results only
    eval_limit: int = 0              # evaluate on the first N records of each test file (0 = all)
    extra: dict = field(default_factory=dict)  # filled in: resolved defaults, coverage, world size


# ---------------------------------------------------------------------------------------------
# The losses of one micro-batch (§4.2)

@dataclass
class Losses:
    l_next: torch.Tensor             # () L_next over the target tokens (Eq. 11)
    l_attn: torch.Tensor             # () L_attn (Eq. 10, or the authors' "div"); 0 for vanilla
    cn: cat.CausalRatio | None       # C_i, N_i of the causal rows (detached unless L_attn uses them); None: not read


def losses(model, batch: batches.Batch, alpha: float, *, attn: str = "fast", measure: bool = True,
           attn_loss: str = "hinge", counts: tuple[int, int, int] | None = None) -> Losses:
    """L_next and L_attn of one micro-batch, averaged over `counts` = (target tokens, sequences, counted CAT rows) of
    the *global* batch (default: this micro-batch's own), so that any split into micro-batches and processes sums to
    the same loss. alpha > 0 adds L_attn; measure reads C/N without it (vanilla runs). attn: "explicit" (every
    layer's (B, H, T, T) map, as the equations read) or "fast" (the causal mass of the causal rows, the same C_i and
    N_i without the maps: cat.mass_sums)."""
    n_tokens, n_seqs, n_rows = counts or (len(batch.targets), len(batch.ids), batch.n_rows)
    reads_attention = batch.annotated and (alpha > 0 or measure)
    fast, explicit = reads_attention and attn == "fast", reads_attention and attn == "explicit"
    if fast and batch.contrast_mask is not None:
        raise ValueError("a contrast mask (--contrast) is read from the attention maps: use attn='explicit'")
    # right padding: no real token sees a pad under j <= i, so the model needs no padding mask
    out = model(batch.ids, return_attn=explicit, causal_rows=batch.causal_rows.rows if fast else None,
                causal_row_mask=batch.causal_rows.row_mask if fast else None, logits_at=batch.target_pos)
    # Eq. 11, L_next = -Σ_t log P(x_{t+1} | x_≤t) over the target tokens, as a mean: divided by their number
    l_next = F.cross_entropy(out.logits.float(), batch.targets, reduction="sum") / n_tokens
    zero = l_next.new_zeros(())
    if not reads_attention:
        return Losses(l_next, zero, None)
    avg = cat.average_attention(out.attentions)                          # Eq. 7: (B, T, T), or (B, R) on the fast path
    if explicit:
        causal, other = cat.causal_and_other(batch.cat_mask.to(batch.ids.device), batch.pad_mask)
        other = variants.narrow_other(other, batch.contrast_mask)        # --contrast; the paper's: unchanged
        sums = cat.attention_sums(avg, causal, other)
    else:
        sums = cat.mass_sums(avg, batch.causal_rows)
    cn = cat.causal_ratio(*sums)                                         # Eq. 8, 9: C_i, N_i
    if alpha <= 0:
        return Losses(l_next, zero, cat.CausalRatio(*(t.detach() for t in cn)))
    if attn_loss == "hinge":   # a mean over this micro-batch's sequences, rescaled to the global batch's
        l_attn = cat.hinge(cn, alpha) * (len(batch.ids) / n_seqs)                       # Eq. 10
    else:                      # past the paper: the authors' loss, a mean over the counted rows (--attn-loss div)
        l_attn = variants.div_loss(cn, alpha) * (batch.n_rows / max(n_rows, 1))
    return Losses(l_next, l_attn, cn)


# ---------------------------------------------------------------------------------------------
# The optimiser and its schedule (§5.1)

def adamw(params, lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.AdamW:
    """AdamW (§5.1; the paper gives no weight decay, so 0 by default: Adam's update). fused: one kernel for all
    parameters instead of a loop of small ones, the same update, faster (benchmarks/README.md). FSDP's sharded
    parameters use the loop."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """§5.1: linear warm-up over warmup_ratio of the steps, then cosine decay towards zero."""
    warmup = max(1, int(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# One optimiser step, and the loop

def train_step(run: runs.Run, step: int) -> dict:
    """One optimiser step over the global batch of `step`: L_total = L_next + γ·L_attn (Eq. 12), backward over this
    rank's micro-batches, clip, AdamW. Returns its metrics, read in two host synchronisations: the losses
    (checked for NaN before the update) and the gradient norm."""
    cfg, model = run.cfg, run.model
    epoch, k = divmod(step, run.steps_per_epoch)
    gamma = cat.gamma(epoch, cfg.gamma_schedule)                            # §5.1: γ = e^{-epoch}
    order = batches.epoch_order(len(run.examples), cfg.seed, epoch)
    batch = [run.examples[i] for i in order[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
    counts = (sum(ex.n_targets for ex in batch), len(batch), sum(ex.n_cat_rows for ex in batch))  # the normalisers
    mine = batch[run.rank::run.world]                                       # this rank's disjoint slice
    per_rank = math.ceil(len(batch) / run.world)
    micro = math.ceil(per_rank / cfg.grad_accum)
    chunks = [mine[m:m + micro] for m in range(0, per_rank, micro)]        # the same count on every rank
    lr = lr_at(step, run.total, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.time()
    logged = torch.zeros(4, device=run.device)   # L_next, L_attn, Σ C/N and the rows it is summed over
    for c, chunk in enumerate(chunks):
        weight = 1.0 if chunk else 0.0   # a rank short of records still joins every collective, with weight zero
        mb = batches.collate(chunk or batch[:1], run.tok.pad_id, cfg.pad_multiple).to(run.device)
        last = c == len(chunks) - 1
        if cfg.fsdp:   # gradients are reduced after the last micro-batch only
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if (run.world > 1 and not cfg.fsdp and not last) else nullcontext()
        with sync, run.autocast:
            out = losses(model, mb, cfg.alpha, attn=cfg.attn, measure=cfg.log_ratio, attn_loss=cfg.attn_loss,
                         counts=counts)
            l_total = out.l_next + gamma * out.l_attn                       # Eq. 12: L_total = L_next + γ·L_attn
            (l_total * run.world * weight).backward()   # ×world: DDP and FSDP average the gradients over ranks
        ratio_sum = (out.cn.ratio.detach() * out.cn.counted).sum() if out.cn else 0.0
        n_ratio = out.cn.counted.sum() if out.cn else 0.0
        logged += weight * torch.stack([out.l_next.detach(), out.l_attn.detach(),
                                        torch.as_tensor(ratio_sum, device=logged.device),
                                        torch.as_tensor(n_ratio, device=logged.device, dtype=torch.float32)])
    if run.world > 1:
        dist.all_reduce(logged)   # the losses are shares of the global batch's: their sum is the global loss
    l_next, l_attn, ratio_sum, n_ratio = logged.tolist()
    if not math.isfinite(l_next + l_attn):
        kept = (f"the last good checkpoint is kept in {run.run_dir / 'checkpoint'}"
                if (run.run_dir / "checkpoint" / "state.pt").exists() else "no checkpoint was written before it")
        raise SystemExit(f"step {step}: loss is {l_next + l_attn} (NaN/inf); {kept}; lower --lr or check the data")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    record = {"step": step + 1, "epoch": epoch, "lr": lr, "l_next": l_next, "l_attn": l_attn, "gamma": gamma,
              "cn_ratio": ratio_sum / n_ratio if n_ratio else None, "grad_norm": float(grad_norm),
              "tokens_per_s": sum(len(ex.ids) for ex in batch) / (time.time() - t0)}
    return record | runs.memory_metrics(run.device)


def train(cfg: TrainConfig) -> Path:
    """Run the whole training: setup, then one train_step per optimiser step, then finish; returns the run folder."""
    started = time.time()
    try:
        run, step = runs.setup(cfg, losses, adamw)
    except KeyboardInterrupt:
        print("\ninterrupted before the first step: run the same command again (with --overwrite if it then says "
              "the run folder holds a run that stopped before its first checkpoint)", file=sys.stderr)
        raise
    resumed_at = step
    metrics = open(run.run_dir / "metrics.jsonl", "a") if run.rank == 0 else None
    progress = runs.Progress(run.cfg.name, run.total, step, enabled=run.rank == 0)
    run.model.train()
    cfg = run.cfg
    try:
        while step < run.total:
            record = train_step(run, step)
            step += 1
            if run.rank == 0:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                progress.update(record)
            stopping = cfg.stop_after and step >= cfg.stop_after
            if stopping or runs.checkpoint_due(cfg, step, run.steps_per_epoch):
                runs.save_checkpoint(run.run_dir, run.model, run.optimizer, step, cfg.fsdp, run.rank)
                run.saved_step = step
            if stopping:
                break
        progress.close()
        if metrics:
            metrics.close()
        runs.finish(run, step, started, resumed_at)   # its last collective gathers the model; rank 0 then tests alone
    except KeyboardInterrupt:                         # Ctrl-C: say where the run can continue from
        print(f"\n{runs.interrupted(run, step)}", file=sys.stderr)
        raise
    if dist.is_initialized():
        dist.destroy_process_group()
    return run.run_dir


def parse_args(argv=None) -> TrainConfig:
    """The command line as a TrainConfig; with --resume, any other flag (but --stop-after) must agree with the run's."""
    parser = cli.config_parser(TrainConfig, __doc__, skip=("extra",))
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    given = runs.given_flags(parser, argv)
    if "resume" in given and not cfg.resume.strip():
        raise cli.InputError("--resume is empty: give the folder of the run to continue")
    if cfg.resume:
        runs.check_resume_flags(given, Path(cfg.resume))
    return cfg


if __name__ == "__main__":
    try:
        cli.run_cli(lambda: train(parse_args()))
    except KeyboardInterrupt:   # train() has said where the run can continue from
        raise SystemExit(130) from None
    if "WORLD_SIZE" in os.environ:
        # Under torchrun, leave without the interpreter's shutdown: a gloo worker thread may still be freeing the
        # tensors of the last collective, and one that needs the GIL while Python finalises aborts the process
        # ("terminate called without an active exception", SIGABRT now and then; pytorch#117762).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
