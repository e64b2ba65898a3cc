"""Fine-tune a causal LM with CAT (§4.2: L_total = L_next + γ·L_attn) or vanilla, full or LoRA.

    python train.py --model scratch --data stg_m                 # a small model from scratch, CPU, minutes
    python train.py --model tinyllama --data stg_s --alpha 0.3    # the paper's setting (§5.1, Appendix F)
    torchrun --nproc_per_node 4 train.py ...                      # the same run on 4 processes (DDP)

A plain loop: batches → forward → L_next (+ γ·L_attn) → backward → clip → AdamW step, with a
visible `lr_at(step)`. Writes runs/<name>/: the model (HF layout) or LoRA adapter, train_config.json,
metrics.jsonl, a resumable checkpoint/, and results.json from eval.py on the data set's test files.
"""
import argparse
import dataclasses
import inspect
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
import stg


@dataclass
class TrainConfig:
    model: str = "scratch"           # alias (tinyllama, qwen2.5-1.5b, llama3.1-8b, smollm2-135m), folder, hub id, or
                                     # "scratch": a small Llama-style model from random init, tokenizer trained on the data
    data: str = "stg_s"              # stg_s | stg_m | stg_l | stg_h | mawps | svamp | asdiv | gsm8k | arc_e | a JSONL path
    alpha: float = 0.0               # CAT §4.2: hinge threshold on C_i/N_i; 0 = vanilla fine-tuning (the baseline)
    method: str = ""                 # "cat" or "vanilla"; derived from alpha when empty
    gamma: str = "exp"               # §5.1: γ = e^{-epoch} ("exp") or 1 ("constant", the Table 3 ablation)
    attn: str = "fast"               # how L_attn reads attention: "fast" (causal mass, no T×T maps) or "explicit"
    log_ratio: bool = True           # vanilla runs too: measure C/N on the causal rows (fast path, no gradient)
    lora: bool = False               # LoRA instead of full fine-tuning
    lora_r: int = 64                 # LoRA rank (the authors' code)
    lora_alpha: float = 32.0         # LoRA scaling numerator: ΔW = (alpha/r)·B·A
    lora_dropout: float = 0.1        # dropout on the input of the LoRA branch
    lora_targets: str = "q_proj,k_proj,v_proj,gate_proj,up_proj,down_proj"  # linear layers that get an adapter
    fsdp: bool = False               # under torchrun, full fine-tuning sharded with FSDP (one unit per decoder layer)
    epochs: int = 0                  # 0 = the paper's default: 6 on STG, 4 elsewhere (scratch: 10)
    lr: float = 0.0                  # 0 = the paper's default: 5e-5 full, 1e-4 LoRA (scratch: 1e-3)
    batch_size: int = 8              # global batch (records per optimiser step), split over processes
    grad_accum: int = 1              # micro-batches per optimiser step on each process
    warmup_ratio: float = 0.1        # §5.1: linear warm-up over this share of the steps, then cosine decay
    weight_decay: float = 0.0        # AdamW weight decay
    max_grad_norm: float = 1.0       # gradient clipping
    max_len: int = 1024              # longer records are skipped (and counted)
    val_frac: float = 0.0            # carve this share of the training file out as a validation split (choose α on it)
    seed: int = 42                   # data order, initialisation, dropout
    device: str = "auto"             # auto | cpu | cuda
    dtype: str = "auto"              # weights: auto = float32 (bfloat16 base weights for LoRA on CUDA)
    scratch_dim: int = 256           # --model scratch: width, layers, heads, tokenizer vocabulary
    scratch_layers: int = 4
    scratch_heads: int = 4
    scratch_vocab: int = 1000
    out: str = "runs"                # parent folder of the run folders
    name: str = ""                   # run folder name; default <model>-<data>-<method>[-lora]-s<seed>
    resume: str = ""                 # a run folder: continue from its last checkpoint
    save_every: int = 0              # checkpoint every N optimiser steps (0: at the end of each epoch; -1: never)
    stop_after: int = 0              # stop (checkpointed) after N optimiser steps in total; resume later
    eval: bool = True                # evaluate on the data set's test files at the end
    eval_limit: int = 0              # evaluate on the first N records of each test file (0 = all)
    extra: dict = field(default_factory=dict)  # filled in: resolved defaults, coverage, world size


# ---------------------------------------------------------------------------------------------
# Data: record → token ids, loss mask and the CAT adjacency (§4.1 Step 2), then batches.

@dataclass
class Example:
    ids: list[int]                   # [bos] + input + target + [eos]
    n_prompt: int                    # tokens before the target: L_next covers positions n_prompt.. (target + eos)
    adj: torch.Tensor | None         # (T, T) bool causal adjacency, unshifted; None = no annotation


def encode(record: dict, tok: M.Tokenizer) -> tuple[Example, dict]:
    """One record → Example; prompt and target tokenised apart (DESIGN.md, "Tokenising prompt and answer")."""
    prompt = tok.encode(record["input"])
    bos = [] if tok.bos_id is None else [tok.bos_id]
    stats = {}
    if record.get("important"):
        body, adj, stats = cat.token_adjacency([record["input"], record["target"]], record["important"], tok.backend)
        adj = F.pad(adj, (len(bos), 1, len(bos), 1))       # zero rows/columns for bos and eos
    else:
        body, adj = prompt + tok.encode(record["target"]), None
    return Example(bos + body + [tok.eos_ids[0]], len(bos) + len(prompt), adj), stats


def encode_all(records, tok, cfg) -> list[Example]:
    """Encode every record; report skipped ones and the annotation coverage with examples of missing phrases."""
    examples, found, missing, skipped = [], 0, [], 0
    for rec in records:
        ex, stats = encode(rec, tok)
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
        raise SystemExit(f"no training records left in {cfg.data} (all longer than --max-len {cfg.max_len}?)")
    return examples


def collate(examples: list[Example], pad_id: int, device):
    """Right-pad a micro-batch: ids (B, T), pad_mask (B, T), labels (B, T) with -100 off the target, CAT mask (B, T, T)."""
    T = max(len(ex.ids) for ex in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros(len(examples), T, T, dtype=torch.bool)
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        ids[b, :n] = torch.tensor(ex.ids)
        labels[b, ex.n_prompt - 1:n - 1] = ids[b, ex.n_prompt:n]   # position t predicts token t+1
        if ex.adj is not None:
            mask[b, :n, :n] = cat.shift_up(ex.adj)                  # §4.2: row i attends for token i+1
    pad_mask = torch.arange(T)[None, :] < torch.tensor([len(ex.ids) for ex in examples])[:, None]
    return ids.to(device), pad_mask.to(device), labels.to(device), mask.to(device)


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
        lora_cfg = M.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                target_modules=tuple(cfg.lora_targets.split(",")))
        torch.manual_seed(cfg.seed)
        model = M.apply_lora(model, lora_cfg)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()     # trainable LoRA weights in float32 even on bfloat16 base weights
    return model.to(device), tok, lora_cfg


# ---------------------------------------------------------------------------------------------
# The losses of one micro-batch: L_next, and CAT's L_attn read from the attention (§4.2).

def losses(model, ids, pad_mask, labels, mask, cfg: TrainConfig, n_tokens: int, n_seqs: int):
    """(L_next, L_attn, C/N ratios on the causal rows) of one micro-batch, each normalised by the *global* batch's
    target-token and sequence counts, so that any split into micro-batches and processes sums to the same loss."""
    annotated = bool(mask.any())
    fast = annotated and cfg.attn == "fast" and (cfg.alpha > 0 or cfg.log_ratio)   # vanilla: C/N measured only
    explicit = annotated and cfg.attn == "explicit" and cfg.alpha > 0
    rows, row_mask = cat.causal_rows(mask) if fast else (None, None)   # the rows that hold causal tokens
    out = model(ids, pad_mask.long(), return_attn=explicit, causal_rows=rows, causal_row_mask=row_mask)
    # L_next (§4.2): -Σ log P(x_{t+1} | x_≤t) over the target tokens, mean over the global batch's target tokens
    l_next = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / n_tokens
    if not (fast or explicit):
        return l_next, l_next.new_zeros(()), l_next.new_zeros(0)
    if fast:
        ratio, counted = cat.ratio_from_mass(out.causal_mass.float(), mask, pad_mask)
    else:
        ratio, counted = cat.causal_ratio(cat.average_attention(out.attentions), mask, pad_mask)
    # L_attn (§4.2): Σ_i max(0, α − C_i/N_i); cat.hinge averages over this micro-batch's sequences
    l_attn = cat.hinge(ratio, counted, cfg.alpha) * ids.shape[0] / n_seqs
    return l_next, l_attn, ratio[counted].detach()


@torch.no_grad()
def starting_ratios(model, examples: list[Example], pad_id: int, device, autocast, n: int = 64) -> torch.Tensor:
    """C_i/N_i on the causal rows of up to n annotated records before training: α acts on the rows below it."""
    annotated = [ex for ex in examples if ex.adj is not None and ex.adj.any()][:n]
    measure = TrainConfig(attn="fast", log_ratio=True)   # the fast path of losses(), which returns the C/N ratios
    ratios = []
    model.eval()
    for i in range(0, len(annotated), 8):
        with autocast:
            ratios.append(losses(model, *collate(annotated[i:i + 8], pad_id, device), measure, 1, 1)[2].cpu())
    model.train()
    return torch.cat(ratios) if ratios else torch.zeros(0)


def peak_rss_gib() -> float | None:
    """This process's peak resident memory in GiB (the CPU's counterpart of max_memory_allocated); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


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
        raise SystemExit(f"--resume {run_dir}: no checkpoint/state.pt there; start the run again without --resume")
    weights = load_file(str(folder / "trainable.safetensors"))
    state = torch.load(folder / "state.pt", weights_only=True)  # tensors and plain containers only
    if fsdp:   # every rank reads the whole state and keeps its own shard of it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        params = dict(unwrap(model).named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


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
        raise SystemExit("--fsdp needs torchrun: torchrun --nproc_per_node N train.py ... --fsdp")
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


def mean_over_ranks(values: list[float], world: int, device) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)   # NCCL reduces CUDA tensors only
    dist.all_reduce(t)
    return (t / world).tolist()


# ---------------------------------------------------------------------------------------------

def resolve(cfg: TrainConfig, data: stg.DataSet) -> None:
    """Fill in the paper's defaults (§5.1, Appendix F) that depend on model, data and method."""
    is_stg = data.task.startswith("stg")
    if cfg.method == "vanilla":
        cfg.alpha = 0.0
    elif cfg.method == "cat" and cfg.alpha <= 0:
        raise SystemExit("--method cat needs --alpha > 0 (the paper uses 0.05–0.35 on pretrained models)")
    cfg.method = "cat" if cfg.alpha > 0 else "vanilla"
    cfg.epochs = cfg.epochs or (10 if cfg.model == "scratch" else 6 if is_stg else 4)
    cfg.lr = cfg.lr or (1e-3 if cfg.model == "scratch" else 1e-4 if cfg.lora else 5e-5)
    if cfg.attn not in ("fast", "explicit"):
        raise SystemExit(f"--attn {cfg.attn!r}: choose fast or explicit")
    short = Path(cfg.model).name if os.sep in cfg.model else cfg.model
    cfg.name = cfg.name or f"{short}-{data.name}-{cfg.method}{'-lora' if cfg.lora else ''}-s{cfg.seed}"


def split_validation(records: list[dict], cfg: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Carve a seeded validation share out of the training records (for choosing α, never the test files)."""
    if cfg.val_frac <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_val = int(len(records) * cfg.val_frac)
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def train(cfg: TrainConfig) -> Path:
    """Run the whole training; returns the run folder."""
    if cfg.resume:
        saved = json.loads((Path(cfg.resume) / "train_config.json").read_text())
        cfg = TrainConfig(**{**saved, "resume": cfg.resume, "stop_after": cfg.stop_after})
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = init_distributed(device, cfg.fsdp)
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)   # FSDP and NCCL place each rank on its current device
    on_cuda = device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if (cfg.lora and on_cuda) else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg.dtype]
    data = stg.resolve_data(cfg.data)
    if data.train is None:
        raise SystemExit(f"--data {cfg.data}: no training file")
    resolve(cfg, data)
    records, val_records = split_validation(stg.training_records(data), cfg)
    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.out) / cfg.name
    torch.manual_seed(cfg.seed)
    model, tok, lora_cfg = build_model(cfg, records, device, dtype)
    examples = encode_all(records, tok, cfg)
    if cfg.method == "cat" and not any(ex.adj is not None and ex.adj.any() for ex in examples):
        raise SystemExit(f"--alpha {cfg.alpha}: no record of {data.train} carries an `important` annotation that "
                         "was found in its text; annotate the data (annotate.py) or train vanilla with --alpha 0")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()
    fresh = rank == 0 and not cfg.resume
    ratios = starting_ratios(model, examples, tok.pad_id, device, autocast) if fresh else torch.zeros(0)
    if len(ratios):   # DESIGN.md, "What α means in practice": place α against where the model starts
        q10, q50, q90 = torch.quantile(ratios, torch.tensor([0.1, 0.5, 0.9])).tolist()
        cfg.extra["cn_ratio_at_start"] = {"p10": q10, "median": q50, "p90": q90, "rows": len(ratios)}
        print(f"C/N on the causal rows before training: median {q50:.2f} (10th percentile {q10:.2f}, 90th {q90:.2f}), "
              f"{len(ratios)} rows; the hinge acts on rows with C/N < α = {cfg.alpha}")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.extra["world_size"] = world
        stg.write_text(run_dir / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        if val_records:   # the validation split travels with the run, and is evaluated beside the test files
            stg.write_jsonl(run_dir / "val.jsonl", val_records)
            data = dataclasses.replace(data, tests={"val": run_dir / "val.jsonl", **data.tests})
    if cfg.fsdp and cfg.lora:
        raise SystemExit("--fsdp shards full fine-tuning; LoRA trains few weights and uses plain DDP under torchrun")
    # The CAT loss needs nothing from other ranks: each sequence's attention, and so its L_attn, stays on its rank.
    if cfg.fsdp:
        model = shard(model, on_cuda)
    elif world > 1:   # only trainable parameters are synchronised; every parameter gets a gradient every step
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if on_cuda else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    step = load_checkpoint(run_dir, model, optimizer, cfg.fsdp) if cfg.resume else 0
    if cfg.resume and rank == 0:   # metrics of steps after the checkpoint are about to be recomputed
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        stg.write_text(run_dir / "metrics.jsonl", "".join(l + "\n" for l in lines if json.loads(l)["step"] <= step))
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=cfg.name)
    model.train()
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        gamma = cat.gamma(epoch, cfg.gamma)                                 # §5.1: γ = e^{-epoch}
        batch = [examples[i] for i in epoch_order(len(examples), cfg.seed, epoch)[k * cfg.batch_size:
                                                                                 (k + 1) * cfg.batch_size]]
        n_tokens = sum(len(ex.ids) - ex.n_prompt for ex in batch)          # global counts: the loss normaliser
        n_seqs = len(batch)
        mine = batch[rank::world]                                           # this rank's disjoint slice
        per_rank = math.ceil(len(batch) / world)
        micro = math.ceil(per_rank / cfg.grad_accum)
        chunks = [mine[m:m + micro] for m in range(0, per_rank, micro)]     # the same count on every rank
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        t0, sums, ratios = time.time(), [0.0, 0.0], []
        for c, chunk in enumerate(chunks):
            # a rank short of records (the last batch of an epoch) still joins every collective, with weight zero
            weight = 1.0 if chunk else 0.0
            ids, pad_mask, labels, mask = collate(chunk or batch[:1], tok.pad_id, device)
            last = c == len(chunks) - 1
            if cfg.fsdp:   # gradients are reduced after the last micro-batch only
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if (world > 1 and not cfg.fsdp and not last) else nullcontext()
            with sync, autocast:
                l_next, l_attn, ratio = losses(model, ids, pad_mask, labels, mask, cfg, n_tokens, n_seqs)
                # §4.2: L_total = L_next + γ·L_attn; ×world because DDP and FSDP average gradients over ranks
                ((l_next + gamma * l_attn) * world * weight).backward()
            sums[0] += l_next.item() * weight
            sums[1] += l_attn.item() * weight
            ratios.append(ratio.float().cpu())
        l_next_v, l_attn_v = mean_over_ranks([sums[0] * world, sums[1] * world], world, device)
        if not math.isfinite(l_next_v + l_attn_v):
            raise SystemExit(f"step {step}: loss is {l_next_v + l_attn_v} (NaN/inf); the last good checkpoint is "
                             f"kept in {run_dir / 'checkpoint'}; lower --lr or check the data")
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ratio = torch.cat(ratios)
        record = {"step": step, "epoch": epoch, "lr": lr_at(step - 1, total, cfg), "l_next": l_next_v,
                  "l_attn": l_attn_v, "gamma": gamma, "cn_ratio": ratio.mean().item() if len(ratio) else None,
                  "tokens_per_s": sum(len(ex.ids) for ex in mine) * world / (time.time() - t0)}
        if on_cuda:
            record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        elif (rss := peak_rss_gib()) is not None:
            record["max_rss_gib"] = rss
        if rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(ep=epoch, l_next=f"{l_next_v:.3f}", l_attn=f"{l_attn_v:.3f}",
                            tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update()
        end_of_epoch = step % steps_per_epoch == 0
        stopping = cfg.stop_after and step >= cfg.stop_after
        if (cfg.save_every > 0 and step % cfg.save_every == 0) or (end_of_epoch and cfg.save_every == 0) or stopping:
            save_checkpoint(run_dir, model, optimizer, step, cfg.fsdp, rank)
        if stopping:
            break
    bar.close()
    if step < total:
        print(f"stopped after step {step}; continue with: python train.py --resume {run_dir}")
    else:
        final = gather_model(model, cfg.fsdp, rank)
        if rank == 0:
            save_final(run_dir, final, tok, lora_cfg, cfg)
            shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)   # the run is complete: nothing to resume
            if cfg.eval and data.tests:
                import eval as evaluation
                evaluation.evaluate(final, tok, data, out_dir=run_dir, limit=cfg.eval_limit or None)
    if dist.is_initialized():
        dist.destroy_process_group()
    return run_dir


def field_comments(cls) -> dict[str, str]:
    """The comment beside each field of a dataclass (and its continuation lines): its --help text."""
    comments, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s+(\w+): [^#]*#\s?(.*)", line):
            name, comments[m[1]] = m[1], m[2]
        elif name and (m := re.match(r"\s+#\s?(.*)", line)):
            comments[name] += " " + m[1]
    return comments


def parse_args(argv=None) -> TrainConfig:
    """argparse mapped one-to-one onto TrainConfig: every field is a flag, with the dataclass default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = field_comments(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag, text = "--" + f.name.replace("_", "-"), comments.get(f.name, "") + " (default: %(default)s)"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=text)
    return TrainConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    train(parse_args())
