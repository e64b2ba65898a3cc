"""Fine-tune a causal LM with CAT (§4.2: L_total = L_next + γ·L_attn) or vanilla, full or LoRA.

    python train.py --model scratch --data stg_m                 # a small model from scratch, CPU, minutes
    python train.py --model tinyllama --data stg_s --alpha 0.3    # the paper's setting (§5.1, Appendix F)
    torchrun --nproc_per_node 4 train.py ...                      # the same run on 4 processes (DDP)

A plain loop: batches → forward → L_next (+ γ·L_attn) → backward → clip → AdamW step, with a
visible `lr_at(step)`. Writes runs/<name>/: the model (HF layout) or LoRA adapter, train_config.json,
metrics.jsonl, a resumable checkpoint/, and results.json from eval.py on the data set's test files.
"""
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import cat
import model as M
import cli
import stg


@dataclass
class TrainConfig:
    model: str = "scratch"           # alias (tinyllama, qwen2.5-1.5b, llama3.1-8b, smollm2-135m), folder, hub id,
                                     # or "scratch": a small Llama-style model from random init, its tokenizer trained
                                     # on the data
    data: str = "stg_s"              # stg_s | stg_m | stg_l | stg_h | mawps | svamp | asdiv | gsm8k | arc_e | a JSONL
                                     # path
    test: str = ""                   # test files as split=FILE,split=FILE (e.g. iid=a.jsonl,ood=b.jsonl); default: the
                                     # data set's own (a JSONL --data: itself)
    alpha: float = 0.0               # CAT §4.2: hinge threshold on C_i/N_i; 0 = vanilla fine-tuning (the baseline)
    alpha_scale: float = 0.0         # α relative to the model: α = K × the median C/N of the causal rows measured
                                     # before the first step (printed, written to train_config.json); 0 = --alpha
    attn_loss: str = "hinge"         # L_attn: "hinge", the paper's Eq. 10, or "div", the authors' code (myloss.py)
    contrast: str = "all"            # Eq. 9's other tokens: "all" (the paper); not in the paper, with --attn
                                     # explicit: "attributes" (STG only), the record's other "Name: value" phrases,
                                     # or "input", the input's tokens but the first (the attention sink)
    rows: str = "all"                # Eq. 10's rows: "all", every annotated row (the paper); not in the paper:
                                     # "target", only the rows that predict an answer token (not those inside the
                                     # input, where no next-token loss trains)
    gamma_schedule: str = "exp"      # §5.1: γ = e^{-epoch} ("exp") or 1 ("constant", the Table 3 ablation)
    attn: str = "fast"               # how L_attn reads attention: "fast" (causal mass, no T×T maps) or "explicit"
    log_ratio: bool = True           # vanilla runs too: measure C/N on the causal rows (fast path, no gradient)
    lora: bool = False               # LoRA instead of full fine-tuning
    lora_r: int = 64                 # LoRA rank (the authors' code)
    lora_alpha: float = 32.0         # LoRA scaling numerator: ΔW = (alpha/r)·B·A
    lora_dropout: float = 0.1        # dropout on the input of the LoRA branch
    lora_targets: str = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"  # linear layers that get an adapter
    fsdp: bool = False               # under torchrun, full fine-tuning sharded with FSDP (one unit per decoder layer)
    epochs: int | None = None        # passes over the training records; unset: the paper's 6 on STG, 4 elsewhere
                                     # (scratch: 10)
    lr: float | None = None          # peak learning rate; unset: the paper's 5e-5 full, 1e-4 LoRA (scratch: 1e-3)
    batch_size: int = 8              # global batch (records per optimiser step), split over processes
    grad_accum: int = 1              # micro-batches per optimiser step on each process
    warmup_ratio: float = 0.1        # §5.1: linear warm-up over this share of the steps, then cosine decay
    weight_decay: float = 0.0        # AdamW weight decay
    max_grad_norm: float = 1.0       # gradient clipping
    max_len: int = 1024              # longer records are skipped (and counted)
    pad_multiple: int = 16           # a batch's length rounded up to a multiple of this: few distinct matmul shapes,
                                     # so the CPU's oneDNN caches (an entry kept per shape, under bf16 1-2 MB each)
                                     # stop growing; 1 = none. The losses do not change: pads sit after every token
    val_frac: float = 0.0            # carve this share of the training file out as a validation split (choose α on it)
    seed: int = 42                   # data order, initialisation, dropout
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
# Data: record → token ids, labels and the CAT adjacency (§4.1 Step 2), then batches.

@dataclass
class Example:
    ids: list[int]                   # [bos] + input + target + [eos]
    labels: list[int]                # labels[t] = ids[t + 1] where that token is in L_next (target + eos), else -100
    adj: torch.Tensor | None         # (T, T) bool causal adjacency, unshifted; None = no annotation
    contrast: torch.Tensor | None = None   # (T, T) bool, unshifted: the tokens N_i averages over (--contrast); None: all
    n_cat_rows: int = field(default=0, init=False)   # rows of the shifted adjacency that L_attn counts
    n_cat_target_rows: int = field(default=0, init=False)   # those of them that predict a target token

    def __post_init__(self):
        if self.adj is not None:   # counted once here, so that a step knows its global row count without collating it
            contrast = None if self.contrast is None else cat.shift_up(self.contrast)[None]
            causal, other = cat.visible(cat.shift_up(self.adj)[None], None, contrast)       # (1, T, T)
            counted = cat.counted_rows(causal.sum(-1), other.sum(-1))[0]                   # (T,)
            self.n_cat_rows = int(counted.sum())
            self.n_cat_target_rows = int(counted[self.n_prompt - 1:].sum())

    @property
    def n_prompt(self) -> int:
        """Tokens before the first target token: the prefix generation starts from."""
        return next(t for t, label in enumerate(self.labels) if label != -100) + 1

    @property
    def n_targets(self) -> int:
        return sum(label != -100 for label in self.labels)


def attribute_contrast(record: dict, task: str) -> list[dict]:
    """--contrast attributes (not in the paper): for each effect of the record's `important`, its input's other
    "Name: value" phrases (stg.attribute_spans), in `important`'s own layout, so that cat.adjacency marks them."""
    text, relations = record["input"], cat.relations(record.get("important"))
    causes = {cause for _, values in relations for cause in values}
    others = [text[start:end] for _, _, start, end in stg.attribute_spans(text, task) if text[start:end] not in causes]
    return [{effect: others} for effect, _ in relations]


def input_contrast(n_tokens: int, n_prompt: int) -> torch.Tensor:
    """--contrast input (not in the paper): every row's N_i over the input's tokens but the sequence's first, where a
    pretrained model parks the attention it does not need (the attention sink), and not over the answer; so C/N can
    no longer rise by moving attention off the sink onto every input token. Needs no annotation beyond Eq. 4's.
    (T, T) bool, unshifted, the same columns in every row."""
    mask = torch.zeros(n_tokens, n_tokens, dtype=torch.bool)
    mask[:, 1:n_prompt] = True
    return mask


def encode(record: dict, tok: M.Tokenizer, contrast: list[dict] | str | None = None,
           rows: str = "all") -> tuple[Example, dict]:
    """One record → Example; prompt and target tokenised apart (docs/design.md, "Tokenising prompt and answer").
    contrast, what N_i averages over (--contrast): phrases in `important`'s layout, "input" (input_contrast), or
    None: every other token. rows (--rows): "all" annotated rows, or "target": only those of the answer's tokens."""
    bos = [] if tok.bos_id is None else [tok.bos_id]
    pieces = [record["input"], record["target"]]
    (prompt, prompt_offsets), (answer, answer_offsets) = cat.piece_offsets(pieces, tok.backend)
    stats, adj, contrast_adj = {}, None, None
    if record.get("important"):   # §4.1 Eq. 4 over the same tokens
        adj, stats = cat.adjacency(pieces, prompt_offsets + answer_offsets, record["important"])
        adj = F.pad(adj, (len(bos), 1, len(bos), 1))       # zero rows/columns for bos and eos
        if isinstance(contrast, list):                     # the same construction, the contrast phrases as causes
            contrast_adj, _ = cat.adjacency(pieces, prompt_offsets + answer_offsets, contrast)
            contrast_adj = F.pad(contrast_adj, (len(bos), 1, len(bos), 1))
    ids, n_prompt = bos + prompt + answer + [tok.eos_ids[0]], len(bos) + len(prompt)
    if rows == "target" and adj is not None:               # the input's tokens keep no causes: once shifted, only
        adj[:n_prompt] = False                             # the rows that predict an answer token hold any
    if contrast == "input" and adj is not None:
        contrast_adj = input_contrast(len(ids), n_prompt)
    labels = [-100] * (n_prompt - 1) + ids[n_prompt:] + [-100]   # position t predicts token t + 1
    return Example(ids, labels, adj, contrast_adj), stats


def encode_all(records, tok, cfg, task: str = "generic") -> list[Example]:
    """Encode every record; report skipped ones and the annotation coverage with examples of missing phrases."""
    examples, found, missing, skipped = [], 0, [], 0
    for rec in records:
        contrast = attribute_contrast(rec, task) if cfg.contrast == "attributes" else None
        ex, stats = encode(rec, tok, "input" if cfg.contrast == "input" else contrast, cfg.rows)
        if len(ex.ids) > cfg.max_len:
            skipped += 1
            continue
        examples.append(ex)
        found += stats.get("found", 0)
        missing += stats.get("missing_phrases", [])
    if skipped:
        print(f"skipped {skipped} records longer than --max-len {cfg.max_len} tokens")
    if found + len(missing):
        coverage = found / (found + len(missing))
        cfg.extra["annotation_coverage"] = coverage
        print(f"annotation coverage: {found}/{found + len(missing)} phrases found ({coverage:.1%})"
              + (f"; not found, e.g. {sorted(set(missing))[:5]}" if missing else ""))
    if not examples:
        raise cli.InputError(f"no training records left in {cfg.data} (all longer than --max-len {cfg.max_len}?)")
    return examples


@dataclass
class Batch:
    """A right-padded micro-batch, built on the CPU by collate: everything the losses read, so that the step itself
    needs no host synchronisation (no .item(), no data-dependent shape) until its metrics are read."""
    ids: torch.Tensor                # (B, T) token ids, pad_id after each sequence
    pad_mask: torch.Tensor           # (B, T) bool, True = real token
    target_pos: torch.Tensor         # (N,) flat positions b·T + t whose next token is in L_next
    targets: torch.Tensor            # (N,) those next tokens
    cat_mask: torch.Tensor           # (B, T, T) bool, the shifted adjacency (§4.2): row i attends for token i+1; CPU
    contrast_mask: torch.Tensor | None   # (B, T, T) bool, shifted: the tokens N_i averages over (--contrast); CPU
    rows: cat.CausalRows             # the rows of cat_mask that hold causal tokens, with their counts (fast path)
    annotated: bool                  # whether any row holds a causal token
    n_rows: int                      # rows that L_attn counts

    def to(self, device) -> "Batch":
        """The batch on `device` (pinned and asynchronous on CUDA); cat_mask stays on the CPU until the explicit
        path asks for it."""
        device = torch.device(device)
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else \
            (lambda t: t.to(device))
        return dataclasses.replace(self, ids=move(self.ids), pad_mask=move(self.pad_mask),
                                   target_pos=move(self.target_pos), targets=move(self.targets),
                                   rows=cat.CausalRows(*map(move, self.rows)))


def collate(examples: list[Example], pad_id: int, multiple: int = 1) -> Batch:
    """Right-pad a micro-batch to a length that is a multiple of `multiple`; the loss positions and the CAT rows with
    their counts are found here, on the CPU."""
    B, T = len(examples), -(-max(len(ex.ids) for ex in examples) // multiple) * multiple
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    cat_mask = torch.zeros(B, T, T, dtype=torch.bool)
    contrast_mask = torch.zeros(B, T, T, dtype=torch.bool) if any(ex.contrast is not None for ex in examples) else None
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        ids[b, :n], labels[b, :n] = torch.tensor(ex.ids), torch.tensor(ex.labels)
        if ex.adj is not None:
            cat_mask[b, :n, :n] = cat.shift_up(ex.adj)              # §4.2: row i attends for token i+1
        if ex.contrast is not None:
            contrast_mask[b, :n, :n] = cat.shift_up(ex.contrast)
    pad_mask = torch.arange(T)[None, :] < torch.tensor([len(ex.ids) for ex in examples])[:, None]
    target_pos = (labels.flatten() != -100).nonzero().flatten()
    return Batch(ids, pad_mask, target_pos, labels.flatten()[target_pos], cat_mask, contrast_mask,
                 cat.causal_rows(cat_mask, pad_mask), bool(cat_mask.any()), sum(ex.n_cat_rows for ex in examples))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled record order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


# ---------------------------------------------------------------------------------------------
# Model: a pretrained checkpoint, or a small one from scratch; optionally wrapped with LoRA.

def build_scratch(texts: list[str], cfg: TrainConfig) -> tuple[M.Transformer, M.Tokenizer]:
    """A small Llama-style model from random init, with a byte-level BPE tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.scratch_vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tok = M.Tokenizer(backend, bos_id=0, eos_ids=[1], pad_id=2,
                      config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    head_dim = cfg.scratch_dim // cfg.scratch_heads
    args = M.ModelArgs(vocab_size=backend.get_vocab_size(), dim=cfg.scratch_dim, n_layers=cfg.scratch_layers,
                       n_heads=cfg.scratch_heads, n_kv_heads=cfg.scratch_heads, head_dim=head_dim,
                       hidden_dim=int(8 / 3 * cfg.scratch_dim), tie_word_embeddings=True,
                       extra={"max_position_embeddings": cfg.max_len, "bos_token_id": 0, "eos_token_id": 1})
    torch.manual_seed(cfg.seed)
    return M.Transformer(args), tok


def build_model(cfg: TrainConfig, train_records, device, dtype):
    """(model, tokenizer, lora config or None) as the config asks; only LoRA parameters train with --lora."""
    if cfg.model == "scratch":
        model, tok = build_scratch([r["input"] + r["target"] for r in train_records], cfg)
    else:
        model, tok = M.load_model(cfg.model, dtype=dtype, device="cpu")
    lora_cfg = None
    if cfg.lora:
        model, lora_cfg = with_lora(model, cfg)
    return model.to(device), tok, lora_cfg


def stored_dtype(lora: bool, device: str, precision: str) -> torch.dtype:
    """The dtype the weights are kept in: float32 (master weights under autocast), except a LoRA run's frozen base
    weights on CUDA in bf16 autocast, which no update touches: bf16, half the memory."""
    return torch.bfloat16 if lora and device.startswith("cuda") and precision == "bfloat16" else torch.float32


def with_lora(model: M.Transformer, cfg: TrainConfig) -> tuple[M.Transformer, M.LoRAConfig]:
    """The model with --lora's adapters (seeded by --seed), every other weight frozen."""
    lora_cfg = M.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                            target_modules=tuple(cfg.lora_targets.split(",")))
    torch.manual_seed(cfg.seed)
    model = M.apply_lora(model, lora_cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()     # trainable LoRA weights in float32 even on bfloat16 base weights
    return model, lora_cfg


# ---------------------------------------------------------------------------------------------
# The losses of one micro-batch: L_next, and CAT's L_attn read from the attention (§4.2).

@dataclass
class Losses:
    l_next: torch.Tensor             # () L_next over the target tokens (§4.2)
    l_attn: torch.Tensor             # () L_attn (§4.2 Eq. 10, or the authors' "div"); 0 for vanilla
    cn: cat.CausalRatio | None       # C_i, N_i of the causal rows (detached unless L_attn uses them); None: not read


def losses(model, batch: Batch, alpha: float, *, attn: str = "fast", measure: bool = True, attn_loss: str = "hinge",
           counts: tuple[int, int, int] | None = None) -> Losses:
    """L_next and L_attn of one micro-batch, averaged over `counts` = (target tokens, sequences, counted CAT rows) of
    the *global* batch (default: this micro-batch's own), so that any split into micro-batches and processes sums to
    the same loss. alpha > 0 adds L_attn; measure reads C/N without it (vanilla runs); attn: "fast" (the causal
    mass of the causal rows) or "explicit" (every layer's (B, H, T, T) map, as the equations read)."""
    n_tokens, n_seqs, n_rows = counts or (len(batch.targets), len(batch.ids), batch.n_rows)
    reads_attention = batch.annotated and (alpha > 0 or measure)
    fast, explicit = reads_attention and attn == "fast", reads_attention and attn == "explicit"
    # right padding: no real token sees a pad under j <= i, so the model needs no padding mask
    out = model(batch.ids, return_attn=explicit, causal_rows=batch.rows.rows if fast else None,
                causal_row_mask=batch.rows.row_mask if fast else None, logits_at=batch.target_pos)
    # L_next (§4.2): -Σ log P(x_{t+1} | x_≤t) over the target tokens, logits at those positions only (N, V)
    l_next = F.cross_entropy(out.logits.float(), batch.targets, reduction="sum") / n_tokens
    zero = l_next.new_zeros(())
    if fast:
        if batch.contrast_mask is not None:
            raise ValueError("a contrast mask (--contrast) is read from the attention maps: use attn='explicit'")
        cn = cat.ratio_from_mass(out.causal_mass.float(), batch.rows.n_causal, batch.rows.n_other)
    elif explicit:
        contrast = None if batch.contrast_mask is None else batch.contrast_mask.to(batch.ids.device)
        cn = cat.causal_ratio(cat.average_attention(out.attentions), batch.cat_mask.to(batch.ids.device),
                              batch.pad_mask, contrast)
    else:
        return Losses(l_next, zero, None)
    if alpha <= 0:
        return Losses(l_next, zero, cat.CausalRatio(*(t.detach() for t in cn)))
    # L_attn (§4.2 Eq. 10): a mean over this micro-batch's sequences (hinge) or counted rows (div), rescaled to the
    # global batch's
    share = len(batch.ids) / n_seqs if attn_loss == "hinge" else batch.n_rows / max(n_rows, 1)
    return Losses(l_next, cat.reattention_loss(cn, alpha, attn_loss) * share, cn)


@torch.no_grad()
def starting_ratios(model, examples: list[Example], pad_id: int, device, autocast, n: int = 64,
                    attn: str = "fast") -> torch.Tensor:
    """C_i/N_i on the causal rows of up to n annotated records before training: α acts on the rows below it."""
    annotated = [ex for ex in examples if ex.n_cat_rows][:n]
    ratios = []
    was_training = model.training
    model.eval()
    for i in range(0, len(annotated), 8):
        with autocast:
            cn = losses(model, collate(annotated[i:i + 8], pad_id).to(device), alpha=0.0, measure=True, attn=attn).cn
        ratios.append(cn.ratio[cn.counted].float().cpu())
    model.train(was_training)
    return torch.cat(ratios) if ratios else torch.zeros(0)


def peak_rss_gib() -> float | None:
    """This process's peak resident memory in GiB (the CPU's counterpart of max_memory_allocated); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def adamw(params, lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.AdamW:
    """AdamW (§5.1). fused: one kernel for all parameters instead of a loop of small ones, the same update; on
    2 CPU cores it takes a SmolLM2 step's optimiser from 0.30 to 0.09 s. FSDP's sharded parameters use the loop."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """§5.1: linear warm-up over warmup_ratio of the steps, then cosine decay to zero."""
    warmup = max(1, int(cfg.warmup_ratio * total))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Checkpoints: trainable weights, optimiser, step and RNG, written atomically; safe to load.

def full_state(model, optimizer, fsdp: bool) -> tuple[dict, dict]:
    """(trainable weights, optimiser state), whole and on CPU. Under FSDP every rank must call it: it gathers shards."""
    names = [n for n, p in unwrap(model).named_parameters() if p.requires_grad]   # tied weights once
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
        return {n: weights[n].contiguous() for n in names if n in weights}, optim   # empty off rank 0
    params = dict(unwrap(model).named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in names}, optimizer.state_dict()


def save_checkpoint(run_dir: Path, model, optimizer, step: int, fsdp: bool, rank: int) -> None:
    weights, optim = full_state(model, optimizer, fsdp)
    if rank != 0:
        return
    tmp, final = run_dir / "checkpoint.tmp", run_dir / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optim, "step": step, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
               tmp / "state.pt")
    old = run_dir / "checkpoint.old"     # the previous checkpoint stays whole until the new one is in place
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, model, optimizer, fsdp: bool) -> int:
    folder = run_dir / "checkpoint"
    if not (folder / "state.pt").exists():   # interrupted between the two renames of save_checkpoint
        folder = run_dir / "checkpoint.old"
    if not (folder / "state.pt").exists():
        raise cli.InputError(f"--resume {run_dir}: no checkpoint/state.pt there; start the run again without --resume")
    weights = load_file(str(folder / "trainable.safetensors"))
    state = torch.load(folder / "state.pt", weights_only=True)  # tensors and plain containers only
    if fsdp:   # every rank reads the whole state and keeps its own shard of it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        put_weights(model, weights, folder / "trainable.safetensors")
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def put_weights(model, weights: dict, source) -> None:
    """Copy a checkpoint's trainable weights (name -> tensor) into the model's parameters of those names."""
    params = dict(unwrap(model).named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params or params[name].shape != value.shape:
                found = f"shape {tuple(params[name].shape)}" if name in params else "no such parameter"
                raise cli.InputError(f"{source}: tensor {name} {tuple(value.shape)} does not fit the model ({found}); "
                                     "load it over the model it was trained from")
            params[name].copy_(value)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def save_final(run_dir: Path, model, tok, lora_cfg, cfg: TrainConfig) -> None:
    """Full fine-tuning: the model in HF layout. LoRA: the adapter in PEFT's layout (+ the tokenizer)."""
    if lora_cfg is None:
        M.save_model(model, tok, run_dir)
    else:
        M.save_adapter(model, lora_cfg, run_dir, base_model=cfg.model)
        tok.save(run_dir)


def gather_model(model, fsdp: bool, rank: int):
    """The trained model as one plain module on rank 0 (None elsewhere): FSDP shards are gathered first."""
    if not fsdp:
        return unwrap(model) if rank == 0 else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    plain = M.Transformer(model.args)
    plain.load_state_dict(weights)
    return plain.to(next(model.parameters()).device)   # evaluated where it trained


# ---------------------------------------------------------------------------------------------
# Distributed: torchrun sets RANK / WORLD_SIZE; each sequence's attention stays on its own rank.

def init_distributed(device: str, fsdp: bool) -> tuple[int, int]:
    """(rank, world size): a process group when torchrun started several processes, or one for FSDP."""
    if "WORLD_SIZE" not in os.environ and fsdp:
        raise cli.InputError("--fsdp needs torchrun: torchrun --nproc_per_node N train.py ... --fsdp")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not fsdp:
        return 0, 1
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def shard(model, on_cuda: bool):
    """FSDP (fully_shard): each decoder layer one unit, then the rest; bf16 compute with float32 reductions on CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if on_cuda else \
        MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


# ---------------------------------------------------------------------------------------------

def resolve(cfg: TrainConfig, data: stg.DataSet, device: str) -> None:
    """Fill in the paper's defaults (§5.1, Appendix F) that depend on model, data, method and device."""
    is_stg = data.task.startswith("stg")
    if cfg.epochs is None:
        cfg.epochs = 10 if cfg.model == "scratch" else 6 if is_stg else 4
    if cfg.lr is None:
        cfg.lr = 1e-3 if cfg.model == "scratch" else 1e-4 if cfg.lora else 5e-5
    cfg.dtype = cli.precision(device, cfg.dtype)
    lora = "-lora" if cfg.lora else ""
    cfg.name = cfg.name or f"{model_label(cfg.model)}-{data.name}-{method(cfg)}{lora}-s{cfg.seed}"


def model_label(model: str) -> str:
    """The model's part of a run name: a folder's or hub id's last component, or the alias."""
    return Path(model).name if "/" in model or os.sep in model else model


def method(cfg: TrainConfig) -> str:
    """CAT when an α is asked for (--alpha or --alpha-scale), else vanilla fine-tuning: α is the one switch."""
    return "cat" if cfg.alpha > 0 or cfg.alpha_scale > 0 else "vanilla"


AT_LEAST = {"batch_size": 1, "grad_accum": 1, "max_len": 2, "lora_r": 1, "scratch_dim": 1, "scratch_layers": 1,
            "scratch_heads": 1, "scratch_vocab": 300, "save_every": -1, "stop_after": 0, "eval_limit": 0,
            "alpha": 0, "alpha_scale": 0, "weight_decay": 0, "epochs": 1, "pad_multiple": 1}
POSITIVE = ("lr", "max_grad_norm", "lora_alpha")
FRACTION = ("warmup_ratio", "val_frac", "lora_dropout")          # in [0, 1)
CHOICES = {"gamma_schedule": ("exp", "constant"), "attn": ("fast", "explicit"), "attn_loss": tuple(cat.ATTN_LOSSES),
           "contrast": ("all", "attributes", "input"), "rows": ("all", "target"),
           "dtype": ("auto", "float32", "bfloat16")}


def validate(cfg: TrainConfig) -> None:
    """Every flag checked before any work is done or any file written: the flag, its value, what is allowed."""
    def flag(name):
        return "--" + name.replace("_", "-")
    for name, low in AT_LEAST.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise cli.InputError(f"{flag(name)} {value}: must be at least {low}")
    for name in POSITIVE:
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise cli.InputError(f"{flag(name)} {getattr(cfg, name)}: must be positive (leave it out for the default)")
    for name in FRACTION:
        if not 0 <= getattr(cfg, name) < 1:
            raise cli.InputError(f"{flag(name)} {getattr(cfg, name)}: must be in [0, 1)")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise cli.InputError(f"{flag(name)} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if cfg.alpha > 0 and cfg.alpha_scale > 0 and not cfg.resume:   # a resumed run holds the α its scale gave
        raise cli.InputError(f"--alpha {cfg.alpha} and --alpha-scale {cfg.alpha_scale}: give one of them")
    if cfg.contrast != "all" and cfg.attn != "explicit":
        raise cli.InputError(f"--contrast {cfg.contrast}: N_i is then read from the attention maps; add --attn explicit")
    if cfg.scratch_dim % cfg.scratch_heads:
        raise cli.InputError(f"--scratch-dim {cfg.scratch_dim} is not a multiple of --scratch-heads "
                             f"{cfg.scratch_heads}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise cli.InputError(f"--device {cfg.device!r}: choose auto, cpu or cuda[:N]")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise cli.InputError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu (or auto)")
    if cfg.fsdp and cfg.lora:
        raise cli.InputError("--fsdp shards full fine-tuning; LoRA trains few weights and uses plain DDP under "
                             "torchrun")


def folder_state(run_dir: Path) -> str | None:
    """What a run folder holds, in words: finished, interrupted at step N, or started; None when no run."""
    if not (run_dir / "train_config.json").exists():   # other files (a grid's log.txt) make no run
        return None
    for folder in ("checkpoint", "checkpoint.old"):
        if (run_dir / folder / "state.pt").exists():
            step = torch.load(run_dir / folder / "state.pt", weights_only=True)["step"]
            return f"a run interrupted at step {step}"
    if (run_dir / "results.json").exists() or (run_dir / "model.safetensors").exists() or \
            (run_dir / "adapter_model.safetensors").exists():
        return "a finished run"
    return "a run that stopped before its first checkpoint"


def check_run_folder(cfg: TrainConfig, run_dir: Path) -> None:
    """A fresh run never writes into another run's folder, and --resume needs an interrupted run."""
    state = folder_state(run_dir)
    if cfg.resume:
        if state is None:
            raise cli.InputError(f"--resume {run_dir}: no run there (no train_config.json)")
        if "interrupted" not in state:
            raise cli.InputError(f"--resume {run_dir}: it holds {state}, with no checkpoint to continue from"
                                 + ("" if "finished" in state else "; start it again with --overwrite"))
    elif state is not None and not cfg.overwrite:
        raise cli.InputError(f"{run_dir} already holds {state}. "
                             + (f"Continue it with --resume {run_dir}, or c" if "interrupted" in state else "C")
                             + "hoose another --name, or replace it with --overwrite")


def split_validation(records: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Carve a seeded validation share out of the training records (for choosing α, never the test files)."""
    if cfg.val_frac <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(len(records) * cfg.val_frac)
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


@dataclass
class Run:
    """What the loop works with, built once by setup()."""
    cfg: TrainConfig
    run_dir: Path
    data: stg.DataSet
    rank: int
    world: int
    device: str
    model: torch.nn.Module           # wrapped in DDP or FSDP under torchrun
    tok: M.Tokenizer
    lora_cfg: M.LoRAConfig | None
    optimizer: torch.optim.Optimizer
    params: list                     # the trainable parameters
    examples: list[Example]
    autocast: object                 # the compute precision's autocast context (cli.autocast)
    steps_per_epoch: int
    total: int                       # optimiser steps of the whole run
    saved_step: int = -1             # the step of the checkpoint on disk (-1: none yet)


def row_counts(examples: list[Example]) -> dict:
    """How many rows L_attn runs over: per annotated record, the rows it counts (those that see a causal and another
    token) and those of them that predict a target token (the others sit inside the prompt). Eq. 10 sums over them,
    so the hinge's size beside L_next grows with their number; the authors' div loss averages over them."""
    annotated = [ex for ex in examples if ex.n_cat_rows]
    if not annotated:
        return {"annotated": 0, "rows": 0.0, "target_rows": 0.0}
    return {"annotated": len(annotated), "rows": sum(ex.n_cat_rows for ex in annotated) / len(annotated),
            "target_rows": sum(ex.n_cat_target_rows for ex in annotated) / len(annotated)}


def place_alpha(cfg: TrainConfig, ratios: torch.Tensor) -> None:
    """Print where the model starts (docs/design.md, "What α means"), and with --alpha-scale set α from it."""
    if not len(ratios):
        return
    q10, q50, q90 = torch.quantile(ratios, torch.tensor([0.1, 0.5, 0.9])).tolist()
    cfg.extra["cn_ratio_at_start"] = {"p10": q10, "median": q50, "p90": q90, "rows": len(ratios)}
    if cfg.alpha_scale > 0:
        cfg.alpha = cfg.alpha_scale * q50
        print(f"--alpha-scale {cfg.alpha_scale:g}: α = {cfg.alpha_scale:g} × median C/N {q50:.3f} = {cfg.alpha:.3f}")
    print(f"C/N on the causal rows before training: median {q50:.2f} (10th percentile {q10:.2f}, 90th {q90:.2f}), "
          f"{len(ratios)} rows" + (f"; the hinge acts on rows with C/N < α = {cfg.alpha:.3g} "
                                   f"({(ratios < cfg.alpha).float().mean():.0%} of them now)" if cfg.alpha > 0 else ""))


def setup(cfg: TrainConfig) -> tuple[Run, int]:
    """Device, data, model, optimiser and run folder; returns the run and the step to start from."""
    if cfg.resume:
        check_run_folder(cfg, Path(cfg.resume))
        saved = json.loads((Path(cfg.resume) / "train_config.json").read_text())
        saved.setdefault("pad_multiple", 1)   # a run started before batches were padded keeps its batch shapes
        cfg = TrainConfig(**{**saved, "resume": cfg.resume, "stop_after": cfg.stop_after})
    validate(cfg)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = init_distributed(device, cfg.fsdp)
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)   # FSDP and NCCL place each rank on its current device
    on_cuda = device.startswith("cuda")
    data = stg.resolve_data(cfg.data, tests=cfg.test or None)
    if data.train is None:
        raise cli.InputError(f"--data {cfg.data}: no training file")
    if cfg.contrast == "attributes" and data.task not in stg.FACTORS:
        raise cli.InputError(f"--contrast attributes: {data.train} is not STG data (task {data.task!r}); its records "
                             "have no known \"Name: value\" attributes to contrast the causes with")
    resolve(cfg, data, device)
    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.out) / cfg.name
    if not cfg.resume:
        check_run_folder(cfg, run_dir)
    if dist.is_initialized():
        dist.barrier()   # every rank has looked at the run folder before rank 0 writes into it
    if rank == 0:
        print(f"precision: {cfg.dtype}" + (" (bf16 autocast, float32 weights)" if cfg.dtype == "bfloat16" else "")
              + f" on {device}")
    records, val_records = split_validation(stg.training_records(data), cfg)
    if not records:
        raise cli.InputError(f"{data.train}: no training records" + (f" left after --val-frac {cfg.val_frac}"
                                                                     if val_records else ""))
    torch.manual_seed(cfg.seed)
    model, tok, lora_cfg = build_model(cfg, records, device, stored_dtype(cfg.lora, device, cfg.dtype))
    examples = encode_all(records, tok, cfg, data.task)
    if method(cfg) == "cat" and not any(ex.n_cat_rows for ex in examples):
        where = " on the answer's rows (--rows target; --rows all counts the input's too)" \
            if cfg.rows == "target" else ""
        raise cli.InputError(f"--alpha {cfg.alpha or cfg.alpha_scale}: no record of {data.train} carries an "
                             f"`important` annotation that was found in its text{where}; annotate the data "
                             "(annotate.py) or train vanilla with --alpha 0")
    autocast = cli.autocast(device, cfg.dtype)
    if not cfg.resume and rank == 0 and (counts := row_counts(examples))["annotated"]:
        cfg.extra["cat_rows"] = counts
        if method(cfg) == "cat":
            how = "Eq. 10: one hinge term each" if cfg.attn_loss == "hinge" else "the div loss averages over them"
            print(f"L_attn runs over {counts['rows']:.1f} causal rows per annotated record, "
                  f"{counts['target_rows']:.1f} of them predicting target tokens ({how})")
    if not cfg.resume and (rank == 0 or cfg.alpha_scale > 0):   # every rank places the same α from the same data
        place_alpha(cfg, starting_ratios(model, examples, tok.pad_id, device, autocast, attn=cfg.attn))
    if rank == 0 and not cfg.resume:   # a resumed run keeps the configuration it was started with
        if cfg.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.extra["world_size"] = world
        cli.write_text(run_dir / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    if rank == 0 and val_records:   # the validation split travels with the run, evaluated beside the test files
        cli.write_jsonl(run_dir / "val.jsonl", val_records)
        data = dataclasses.replace(data, tests={"val": run_dir / "val.jsonl", **data.tests})
    # The CAT loss needs nothing from other ranks: each sequence's attention, and so its L_attn, stays on its rank.
    if cfg.fsdp:
        model = shard(model, on_cuda)
    elif world > 1:   # only trainable parameters are synchronised; every parameter gets a gradient every step
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if on_cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.lr, cfg.weight_decay, fused=not cfg.fsdp)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    run = Run(cfg, run_dir, data, rank, world, device, model, tok, lora_cfg, optimizer, params, examples, autocast,
              steps_per_epoch, steps_per_epoch * cfg.epochs)
    step = load_checkpoint(run_dir, model, optimizer, cfg.fsdp) if cfg.resume else 0
    run.saved_step = step if cfg.resume else -1
    if cfg.resume and rank == 0:   # metrics of steps after the checkpoint are about to be recomputed
        path = run_dir / "metrics.jsonl"
        lines = cli.complete_lines(path) if path.exists() else []    # a line cut by a kill is dropped
        cli.write_text(path, "".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))
    return run, step


def train_step(run: Run, step: int) -> dict:
    """One optimiser step over the global batch of `step`: L_total = L_next + γ·L_attn (§4.2), backward over this
    rank's micro-batches, clip, AdamW. Returns its metrics, read in two host synchronisations: the losses
    (checked for NaN before the update) and the gradient norm."""
    cfg, model = run.cfg, run.model
    epoch, k = divmod(step, run.steps_per_epoch)
    gamma = cat.gamma(epoch, cfg.gamma_schedule)                            # §5.1: γ = e^{-epoch}
    order = epoch_order(len(run.examples), cfg.seed, epoch)
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
        mb = collate(chunk or batch[:1], run.tok.pad_id, cfg.pad_multiple).to(run.device)
        last = c == len(chunks) - 1
        if cfg.fsdp:   # gradients are reduced after the last micro-batch only
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if (run.world > 1 and not cfg.fsdp and not last) else nullcontext()
        with sync, run.autocast:
            out = losses(model, mb, cfg.alpha, attn=cfg.attn, measure=cfg.log_ratio, attn_loss=cfg.attn_loss,
                         counts=counts)
            # §4.2: L_total = L_next + γ·L_attn; ×world because DDP and FSDP average gradients over ranks
            ((out.l_next + gamma * out.l_attn) * run.world * weight).backward()
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
    if run.device.startswith("cuda"):
        record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    elif (rss := peak_rss_gib()) is not None:
        record["max_rss_gib"] = rss
    return record


def finish(run: Run, step: int, started: float, resumed_at: int = 0) -> None:
    """Save the final model (or say how to resume), evaluate on the test files, and say where everything is."""
    cfg, run_dir = run.cfg, run.run_dir
    if step < run.total:
        if run.rank == 0:
            print(f"stopped after step {step} of {run.total}; continue with: python train.py --resume {run_dir}")
        return
    final = gather_model(run.model, cfg.fsdp, run.rank)
    if run.rank != 0:
        return
    if cfg.save:
        save_final(run_dir, final, run.tok, run.lora_cfg, cfg)
    results = None
    if cfg.eval and run.data.tests:
        import eval as evaluation
        # the last checkpoint holds these weights when it was saved at this step: a test stopped midway then
        # continues from the answers it kept (eval.resume_point) when the run is resumed. A LoRA run's weights are
        # its base model's files too
        checkpoint = run_dir / "checkpoint" / "trainable.safetensors"
        base = M.source_files(cfg.model) if cfg.lora and cfg.model != "scratch" else []
        weights = evaluation.weights_key(checkpoint, *base) if run.saved_step == step and checkpoint.exists() \
            else None
        results = evaluation.evaluate(final, run.tok, run.data, out_dir=run_dir, limit=cfg.eval_limit or None,
                                      dtype=cfg.dtype, max_len=cfg.max_len, weights=weights)
    # the run is complete: nothing to resume. Removed only now, so that a run stopped while it is tested (GSM8K's
    # four files of worked solutions take hours on a CPU) resumes at its last step and is tested again
    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
    print(summary(run, results, time.time() - started, resumed_at))


def summary(run: Run, results: dict | None, seconds: float, resumed_at: int = 0) -> str:
    """The last lines of a run: accuracy per test split beside the majority baseline, where the run is, what next.
    The minutes are this process's: a resumed run names the step it resumed at."""
    steps = f"{run.total} steps, resumed at step {resumed_at}:" if resumed_at else f"{run.total} steps in"
    lines = [f"{run.cfg.name}: {steps} {seconds / 60:.1f} min ({method(run.cfg)}"
             + (f", α = {run.cfg.alpha:.3g}" if run.cfg.alpha > 0 else "") + f", {run.cfg.dtype})"]
    for split, result in (results or {}).items():
        lines.append(f"  {split:>5}: accuracy {result['accuracy']:.1%} of {result['n']} records "
                     f"(majority baseline {result['majority']:.1%})")
    test = f" --test {run.cfg.test}" if run.cfg.test else ""
    lines += [f"run folder: {run.run_dir}",
              f"evaluate again: python eval.py --model {run.run_dir} --data {run.cfg.data}{test}" if run.cfg.save
              else "the weights were not saved (--no-save)",
              f"compare runs:   python eval.py --compare {run.run_dir.parent}/*"]
    return "\n".join(lines)


def train(cfg: TrainConfig) -> Path:
    """Run the whole training, as nanoGPT's loop reads: setup, then one train_step per optimiser step, then finish;
    returns the run folder."""
    started = time.time()
    run, step = setup(cfg)
    resumed_at = step
    metrics = open(run.run_dir / "metrics.jsonl", "a") if run.rank == 0 else None
    bar = tqdm(total=run.total, initial=step, disable=run.rank != 0, desc=run.cfg.name)
    run.model.train()
    while step < run.total:
        record = train_step(run, step)
        step += 1
        if run.rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(ep=record["epoch"], l_next=f"{record['l_next']:.3f}", l_attn=f"{record['l_attn']:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
        cfg = run.cfg
        stopping = cfg.stop_after and step >= cfg.stop_after
        end_of_epoch = step % run.steps_per_epoch == 0
        if (cfg.save_every > 0 and step % cfg.save_every == 0) or (end_of_epoch and cfg.save_every == 0) or stopping:
            save_checkpoint(run.run_dir, run.model, run.optimizer, step, cfg.fsdp, run.rank)
            run.saved_step = step
        if stopping:
            break
    bar.close()
    if metrics:
        metrics.close()
    finish(run, step, started, resumed_at)   # its last collective gathers the model; rank 0 then evaluates alone
    if dist.is_initialized():
        dist.destroy_process_group()
    return run.run_dir


def parse_args(argv=None) -> TrainConfig:
    return TrainConfig(**vars(cli.config_parser(TrainConfig, __doc__, skip=("extra",)).parse_args(argv)))


if __name__ == "__main__":
    cli.run_cli(lambda: train(parse_args()))
    if "WORLD_SIZE" in os.environ:
        # Under torchrun, leave without the interpreter's shutdown: a gloo worker thread may still be freeing the
        # tensors of the last collective, and one that needs the GIL while Python finalises aborts the process
        # ("terminate called without an active exception", SIGABRT about one run in ten; pytorch#117762).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
