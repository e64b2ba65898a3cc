"""Running a training job, everything train.py's loop needs that is not in the paper: flags checked and the paper's
defaults filled in, the run folder, records -> examples, the model built (from scratch, a checkpoint, with LoRA),
DDP/FSDP, checkpoints and resume, the end of a run (save, test, summary) and its progress lines."""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import cli
import batches
import hf
import model as M
import stg
import variants

# ---------------------------------------------------------------------------------------------
# Flags: checked before any work, the paper's defaults filled in

def resolve(cfg, data: stg.DataSet, device: str) -> None:
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


def method(cfg) -> str:
    """CAT when an α is asked for (--alpha or --alpha-scale), else vanilla fine-tuning: α is the one switch."""
    return "cat" if cfg.alpha > 0 or cfg.alpha_scale > 0 else "vanilla"


AT_LEAST = {"batch_size": 1, "grad_accum": 1, "max_len": 2, "lora_r": 1, "scratch_dim": 1, "scratch_layers": 1,
            "scratch_heads": 1, "scratch_vocab": 300, "save_every": -1, "stop_after": 0, "eval_limit": 0,
            "alpha": 0, "alpha_scale": 0, "weight_decay": 0, "epochs": 1, "pad_multiple": 1}
POSITIVE = ("lr", "max_grad_norm", "lora_alpha")
FRACTION = ("warmup_ratio", "val_frac", "lora_dropout")          # in [0, 1)
CHOICES = {"gamma_schedule": ("exp", "constant"), "attn": ("fast", "explicit"), "attn_loss": ("hinge", "div"),
           "contrast": ("all", "attributes", "input"), "rows": ("all", "target"),
           "dtype": ("auto", "float32", "bfloat16")}


LINEAR_LAYERS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}   # model.py's names


def validate(cfg) -> None:
    """Every flag checked before any work is done or any file written: the flag, its value, what is allowed."""
    flag = cli.flag_name
    if not 0 <= cfg.seed < 2**32:   # what numpy takes; seed × 1000 + epoch seeds each epoch's order
        raise cli.InputError(f"--seed {cfg.seed}: must be between 0 and {2**32 - 1}")
    cli.check_numbers(cfg)   # no NaN, no infinity, no int past 64 bits: the ranges below then hold
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
        raise cli.InputError(f"--contrast {cfg.contrast}: N_i is then read from the attention maps; "
                             "add --attn explicit")
    if cfg.scratch_dim % cfg.scratch_heads:
        raise cli.InputError(f"--scratch-dim {cfg.scratch_dim} is not a multiple of --scratch-heads "
                             f"{cfg.scratch_heads}")
    if cfg.scratch_dim // cfg.scratch_heads % 2:   # RoPE rotates a head's dimensions in pairs
        raise cli.InputError(f"--scratch-dim {cfg.scratch_dim} / --scratch-heads {cfg.scratch_heads} gives heads of "
                             f"{cfg.scratch_dim // cfg.scratch_heads} dimensions, an odd number: RoPE rotates them in "
                             "pairs; choose them so that each head has an even number")
    cli.check_device(cfg.device)
    if not cfg.resume:   # a resumed run writes into its own folder, which exists
        cli.check_output(cfg.out, "--out", folder=True)
    if cfg.name and (cfg.name != Path(cfg.name).name or cfg.name in (".", "..") or not cfg.name.strip()
                     or any(ord(c) < 32 for c in cfg.name)):
        raise cli.InputError(f"--name {cfg.name!r}: one plain folder name (no '/', not '.' or '..'); the folder it is "
                             "made in is --out")
    unknown = sorted(set(cfg.lora_targets.split(",")) - LINEAR_LAYERS)
    if cfg.lora and unknown:
        raise cli.InputError(f"--lora-targets: {', '.join(unknown)} names no linear layer of the model; choose among "
                             f"{', '.join(sorted(LINEAR_LAYERS))}")
    if cfg.fsdp and cfg.lora:
        raise cli.InputError("--fsdp shards full fine-tuning; LoRA trains few weights and uses plain DDP under "
                             "torchrun")



# ---------------------------------------------------------------------------------------------
# Records -> examples; the model

def encode_all(records, tok, cfg, task: str = "generic") -> list[batches.Example]:
    """Encode every record (batches.encode; --contrast and --rows: variants.adapt); report the skipped ones and the
    annotation's coverage, with examples of missing phrases."""
    examples, found, missing, skipped, no_contrast = [], 0, [], 0, []
    for n, rec in enumerate(records, start=1):
        if not rec["input"] and tok.bos_id is None:   # the answer's first token would be predicted from nothing
            raise cli.InputError(f"{cfg.data}: record {n} has an empty input and this tokenizer adds no BOS token; "
                                 "give every record some input text")
        ex, stats = batches.encode(rec, tok)
        ex = variants.adapt(ex, rec, tok, cfg.contrast, cfg.rows, task)     # past the paper; "all": unchanged
        if len(ex.ids) > cfg.max_len:
            skipped += 1
            continue
        if ex.contrast is not None and ex.adj is not None and ex.adj.any() and not ex.contrast.any():
            no_contrast.append(rec["input"])
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
    annotated = sum(ex.adj is not None and bool(ex.adj.any()) for ex in examples)
    example = f"e.g. the one whose input begins {no_contrast[0][:60]!r}" if no_contrast else ""
    if no_contrast and len(no_contrast) >= annotated:
        raise cli.InputError(f"--contrast attributes: no annotated record of {cfg.data} has another \"Name: value\" "
                             f"attribute of task {task} (guessed from the file name) besides its causes ({example}), "
                             "so N_i would be empty; use --contrast all, or STG records in stg.py's or the authors' "
                             "layout")
    if no_contrast:
        print(f"--contrast attributes: {len(no_contrast)} of {annotated} annotated records have no other attribute "
              f"({example}); their rows add nothing to L_attn")
    return examples



def build_scratch(texts: list[str], cfg) -> tuple[M.Transformer, hf.Tokenizer]:
    """A small Llama-style model from random init, with a byte-level BPE tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.scratch_vocab, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    tok = hf.Tokenizer(backend, bos_id=0, eos_ids=[1], pad_id=2,
                      config={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    head_dim = cfg.scratch_dim // cfg.scratch_heads
    args = M.ModelArgs(vocab_size=backend.get_vocab_size(), dim=cfg.scratch_dim, n_layers=cfg.scratch_layers,
                       n_heads=cfg.scratch_heads, n_kv_heads=cfg.scratch_heads, head_dim=head_dim,
                       hidden_dim=int(8 / 3 * cfg.scratch_dim), tie_word_embeddings=True,
                       extra={"max_position_embeddings": cfg.max_len, "bos_token_id": 0, "eos_token_id": 1})
    torch.manual_seed(cfg.seed)
    return M.Transformer(args), tok


def build_model(cfg, train_records, device, dtype):
    """(model, tokenizer, lora config or None) as the config asks; only LoRA parameters train with --lora."""
    if cfg.model == "scratch":
        model, tok = build_scratch([r["input"] + r["target"] for r in train_records], cfg)
    else:
        model, tok = hf.load_model(cfg.model, dtype=dtype, device="cpu")
    lora_cfg = None
    if cfg.lora:
        model, lora_cfg = with_lora(model, cfg)
    return model.to(device), tok, lora_cfg


def stored_dtype(lora: bool, device: str, precision: str) -> torch.dtype:
    """The dtype the weights are kept in: float32 (master weights under autocast), except a LoRA run's frozen base
    weights on CUDA in bf16 autocast, which no update touches: bf16, half the memory."""
    return torch.bfloat16 if lora and device.startswith("cuda") and precision == "bfloat16" else torch.float32


def with_lora(model: M.Transformer, cfg) -> tuple[M.Transformer, M.LoRAConfig]:
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


def checkpoint_due(cfg, step: int, steps_per_epoch: int) -> bool:
    """Whether a checkpoint is written after `step` steps: every --save-every steps, or (0) at each epoch's end."""
    if cfg.save_every > 0:
        return step % cfg.save_every == 0
    return cfg.save_every == 0 and step % steps_per_epoch == 0


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
    weights = read_checkpoint_file(folder / "trainable.safetensors", run_dir)
    state = read_checkpoint_file(folder / "state.pt", run_dir)
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


def read_checkpoint_file(path: Path, run_dir: Path):
    """A checkpoint file (trainable.safetensors, or state.pt through torch.load(weights_only=True): tensors and
    plain containers only); a damaged or truncated one is an input error that says what to do."""
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or state["step"] < 0:
            raise ValueError("no step count in it")
        return state
    except Exception as error:   # torch and safetensors raise several error types for a cut or foreign file
        raise cli.InputError(f"{path}: damaged or incomplete ({type(error).__name__}: {str(error)[:120]}); the run "
                             f"cannot continue from it: start it again with --overwrite (python train.py ... "
                             f"--name {run_dir.name} --overwrite)") from None


def read_train_config(run_dir: Path) -> dict:
    """A run folder's train_config.json as a dict; a damaged one is an input error that names it."""
    path = run_dir / "train_config.json"
    saved = cli.read_json(path, "the run cannot be resumed: start it again with --overwrite")   # names a damaged one
    if not isinstance(saved, dict):
        raise cli.InputError(f"{path}: damaged, not a JSON object; start the run again with --overwrite")
    return saved


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


def save_final(run_dir: Path, model, tok, lora_cfg, cfg) -> None:
    """Full fine-tuning: the model in HF layout. LoRA: the adapter in PEFT's layout (+ the tokenizer); over a scratch
    model, whose random base exists only in this run, that base too, in base/, which the adapter names."""
    if lora_cfg is None:
        hf.save_model(model, tok, run_dir)
        return
    base_model = cfg.model
    if cfg.model == "scratch":
        base_model = "base"   # read relative to the adapter's folder (hf._adapter_base)
        base = M.Transformer(model.args)
        base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                              if ".lora_" not in k})
        hf.save_model(base, tok, run_dir / base_model)
    hf.save_adapter(model, lora_cfg, run_dir, base_model=base_model)
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
# The run folder and setup

def folder_state(run_dir: Path) -> str | None:
    """What a run folder holds, in words: finished, interrupted at step N, or started; None when no run."""
    if not (run_dir / "train_config.json").exists():   # other files (a grid's log.txt) make no run
        return None
    for folder in ("checkpoint", "checkpoint.old"):
        if (run_dir / folder / "state.pt").exists():
            step = read_checkpoint_file(run_dir / folder / "state.pt", run_dir)["step"]
            return f"a run interrupted at step {step}"
    if (run_dir / "results.json").exists() or (run_dir / "model.safetensors").exists() or \
            (run_dir / "adapter_model.safetensors").exists():
        return "a finished run"
    return "a run that stopped before its first checkpoint"


JOB_FILES = {"log.txt", "wall_time.json"}   # what the experiments' job runner writes into a run folder first


def check_run_folder(cfg, run_dir: Path) -> None:
    """A fresh run never writes into another run's folder nor into a folder of other files, and --resume needs an
    interrupted run."""
    state = folder_state(run_dir)
    if cfg.resume:
        if state is None:
            raise cli.InputError(f"--resume {run_dir}: no run there (no train_config.json); give the folder of an "
                                 "interrupted training run")
        if "interrupted" not in state:
            raise cli.InputError(f"--resume {run_dir}: it holds {state}, with no checkpoint to continue from"
                                 + ("" if "finished" in state else "; start it again with --overwrite"))
    elif state is not None and not cfg.overwrite:
        raise cli.InputError(f"{run_dir} already holds {state}. "
                             + (f"Continue it with --resume {run_dir}, or c" if "interrupted" in state else "C")
                             + "hoose another --name, or replace it with --overwrite")
    elif state is None and run_dir.is_dir():   # --overwrite replaces a run, never a folder of the user's files
        foreign = sorted(path.name for path in run_dir.iterdir() if path.name not in JOB_FILES)
        if foreign:
            raise cli.InputError(f"{run_dir} holds files that are not a training run's ({', '.join(foreign[:3])}"
                                 f"{', ...' if len(foreign) > 3 else ''}); choose another --name or --out")


RESOLVED = {"epochs": None, "lr": None, "dtype": "auto", "name": ""}   # unset flags the run's saved values resolve


def given_flags(parser, argv) -> dict:
    """The flags a command line gave explicitly (name -> value), told apart from defaults: argparse fills in a
    default only where the namespace has no value yet, so every field starts as a marker that stays where unset."""
    unset = object()
    names = [a.dest for a in parser._actions if a.dest != "help"]
    given = vars(parser.parse_args(argv, namespace=argparse.Namespace(**{n: unset for n in names})))
    return {name: value for name, value in given.items() if value is not unset}


REQUIRED = ("model", "data", "alpha", "seed", "epochs", "lr", "batch_size")   # in every train_config.json written
RENAMED = {"gamma": "gamma_schedule"}                                            # field names train.py had before


def saved_config(cfg, saved: dict):
    """The configuration of a run to resume, from its train_config.json (`saved`), each value checked against its
    field's type; keys added to TrainConfig since the run started take their defaults."""
    where = Path(cfg.resume) / "train_config.json"
    saved = {RENAMED.get(k, k): v for k, v in saved.items()}   # an older run's name for a field
    fields = {f.name: f.type for f in dataclasses.fields(cfg)}
    problems = [f"unknown key {k!r}" for k in saved if k not in fields] + \
               [f"no {k!r}" for k in REQUIRED if k not in saved] + \
               [f"{k} = {v!r} is not {getattr(fields[k], '__name__', fields[k])}" for k, v in saved.items()
                if k in fields and not fits(v, fields[k])]
    if problems:
        raise cli.InputError(f"{where}: {problems[0]}; it was not written by this train.py, or it is damaged: start "
                             "the run again with --overwrite")
    return type(cfg)(**{**saved, "resume": cfg.resume, "stop_after": cfg.stop_after})


def fits(value, kind) -> bool:
    """Whether a JSON value fits a TrainConfig field's type (float | None, int, str, bool, dict)."""
    kinds = typing.get_args(kind) or (kind,)
    for k in kinds:
        if k is type(None) and value is None or k is bool and isinstance(value, bool) or \
                k is float and isinstance(value, (int, float)) and not isinstance(value, bool) or \
                k is int and isinstance(value, int) and not isinstance(value, bool) or \
                k in (str, dict) and isinstance(value, k):
            return True
    return False


def check_resume_flags(given: dict, run_dir: Path) -> None:
    """--resume continues a run with the configuration it was started with: any other flag (but --stop-after) must
    agree with the saved one, or the command is refused, naming what differs."""
    if folder_state(run_dir) is None:
        raise cli.InputError(f"--resume {run_dir}: no run there (no train_config.json); give the folder of an "
                             "interrupted training run")
    saved = read_train_config(run_dir)
    differ = [f"--{name.replace('_', '-')} {value} (the run has {saved.get(name)!r})" for name, value in given.items()
              if name not in ("resume", "stop_after") and value != saved.get(name)
              and not (name in RESOLVED and value == RESOLVED[name])]
    if differ:
        raise cli.InputError(f"--resume {run_dir} continues the run with its saved train_config.json, but "
                             f"{'; '.join(differ)}: drop these flags, or start a new run with another --name")


def interrupted(run: "Run", step: int) -> str:
    """What to do after Ctrl-C: where the last checkpoint is and the command that continues from it."""
    if run.saved_step < 0:
        when = ("checkpoints are off (--save-every -1)" if run.cfg.save_every < 0 else
                f"before the first checkpoint (saved every {run.cfg.save_every} steps)" if run.cfg.save_every > 0 else
                "before the first checkpoint (saved at the end of each epoch)")
        return (f"interrupted at step {step} of {run.total}, {when}: nothing to continue from; start the run again "
                f"with --overwrite (its folder {run.run_dir} holds only its configuration)")
    return (f"interrupted at step {step} of {run.total}; the last checkpoint (step {run.saved_step}) is in "
            f"{run.run_dir / 'checkpoint'}: continue with python train.py --resume {run.run_dir}")


def split_validation(records: list[dict], cfg) -> tuple[list[dict], list[dict]]:
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
    cfg: object                      # train.TrainConfig
    run_dir: Path
    data: stg.DataSet
    rank: int
    world: int
    device: str
    model: torch.nn.Module           # wrapped in DDP or FSDP under torchrun
    tok: hf.Tokenizer
    lora_cfg: M.LoRAConfig | None
    optimizer: torch.optim.Optimizer
    params: list                     # the trainable parameters
    examples: list[batches.Example]
    autocast: object                 # the compute precision's autocast context (cli.autocast)
    steps_per_epoch: int
    total: int                       # optimiser steps of the whole run
    saved_step: int = -1             # the step of the checkpoint on disk (-1: none yet)


def setup(cfg, losses, adamw) -> tuple[Run, int]:
    """Device, data, model, optimiser (adamw) and run folder; returns the run and the step to start from. losses
    (train.losses) measures the starting C/N that --alpha-scale places α against."""
    if cfg.resume:
        check_run_folder(cfg, Path(cfg.resume))
        saved = read_train_config(Path(cfg.resume))
        saved.setdefault("pad_multiple", 1)   # a run started before batches were padded keeps its batch shapes
        cfg = saved_config(cfg, saved)
        try:
            validate(cfg)
        except cli.InputError as error:   # the values came from the file, not from flags
            raise cli.InputError(f"{Path(cfg.resume) / 'train_config.json'}: {error}; the file is damaged: start the "
                                 "run again with --overwrite") from None
    else:
        validate(cfg)
    device = cli.resolve_device(cfg.device)
    rank, world = init_distributed(device, cfg.fsdp)
    if device == "cuda" and dist.is_initialized():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)   # FSDP and NCCL place each rank on its current device
    on_cuda = device.startswith("cuda")
    data = stg.resolve_data(cfg.data, tests=cfg.test or None)
    if data.train is None:
        raise cli.InputError(f"--data {cfg.data}: no training file")
    if cfg.val_frac > 0 and "val" in data.tests:   # the file would take the carved-out split's place, unseen
        raise cli.InputError(f"--test: the split name 'val' ({data.tests['val']}) is the name of the validation split "
                             f"that --val-frac {cfg.val_frac} carves out; name that test file otherwise (e.g. "
                             f"dev={data.tests['val']}), or leave out --val-frac")
    if cfg.contrast == "attributes" and data.task not in stg.FACTORS:
        raise cli.InputError(f"--contrast attributes: {data.train} is not STG data (task {data.task!r}); its records "
                             "have no known \"Name: value\" attributes to contrast the causes with")
    resolve(cfg, data, device)
    digest = hashlib.sha256(data.train.read_bytes()).hexdigest()   # the training file this run trains on
    if cfg.resume and cfg.extra.get("data_sha256", digest) != digest:
        raise cli.InputError(f"--resume {cfg.resume}: {data.train} has changed since the run started (its SHA-256 "
                             "differs from train_config.json's); restore the file, or start a new run")
    cfg.extra["data_sha256"] = digest
    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.out) / cfg.name
    if not cfg.resume:
        cli.check_output(run_dir, "--out/--name", folder=True)   # --name may hold a path, or name a file
        check_run_folder(cfg, run_dir)
    if dist.is_initialized():
        dist.barrier()   # every rank has looked at the run folder before rank 0 writes into it
    if rank == 0:
        print(f"precision: {cfg.dtype}" + (" (bf16 autocast, float32 weights)" if cfg.dtype == "bfloat16" else "")
              + f" on {device}")
    records, val_records = split_validation(stg.training_records(data), cfg)
    if cfg.eval:   # a test file that cannot be read or scored is named now, not after the training
        import eval as evaluation
        evaluation.check_test_files(data, limit=cfg.eval_limit or None)
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
    if not cfg.resume and rank == 0 and (counts := variants.row_counts(examples))["annotated"]:
        cfg.extra["cat_rows"] = counts
        if method(cfg) == "cat":
            how = "Eq. 10: one hinge term each" if cfg.attn_loss == "hinge" else "the div loss averages over them"
            print(f"L_attn runs over {counts['rows']:.1f} causal rows per annotated record, "
                  f"{counts['target_rows']:.1f} of them predicting target tokens ({how})")
    if not cfg.resume and (rank == 0 or cfg.alpha_scale > 0):   # every rank places the same α from the same data
        variants.place_alpha(cfg, variants.starting_ratios(losses, model, examples, tok.pad_id, device, autocast,
                                                           attn=cfg.attn))
    if rank == 0 and not cfg.resume:   # a resumed run keeps the configuration it was started with
        if cfg.overwrite and folder_state(run_dir) is not None:   # a run's folder (check_run_folder), nothing else
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
    if step > run.total:
        raise cli.InputError(f"{run_dir / 'checkpoint'}: step {step} is past the run's last step ({run.total}): "
                             "the checkpoint is damaged or belongs to another run; start it again with --overwrite")
    run.saved_step = step if cfg.resume else -1
    if cfg.resume and rank == 0:   # metrics of steps after the checkpoint are about to be recomputed
        path = run_dir / "metrics.jsonl"
        lines = cli.complete_lines(path) if path.exists() else []    # a line cut by a kill is dropped
        kept = []
        for n, line in enumerate(lines, start=1):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise cli.InputError(f"{path}:{n}: damaged (not a metrics record with a step); the run cannot be "
                                     "continued: start it again with --overwrite") from None
        cli.write_text(path, "".join(kept))
    return run, step


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
        base = hf.source_files(cfg.model) if cfg.lora and cfg.model != "scratch" else []
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




def peak_rss_gib() -> float | None:
    """This process's peak resident memory in GiB (the CPU's counterpart of max_memory_allocated); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def memory_metrics(device: str) -> dict:
    """A step's memory figure for metrics.jsonl: the GPU's peak allocation, or this process's peak resident memory."""
    if device.startswith("cuda"):
        return {"max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    rss = peak_rss_gib()
    return {} if rss is None else {"max_rss_gib": rss}


class Progress:
    """The loop's progress: a tqdm bar on a terminal; when the output is a file (a log), a plain line every `every`
    seconds and at the end instead, since a bar redrawn into a file makes one line of hundreds of kilobytes."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool = True, every: float = 60.0):
        self.name, self.total, self.step, self.enabled, self.every = name, total, initial, enabled, every
        self.bar = tqdm(total=total, initial=initial, desc=name) if enabled and sys.stderr.isatty() else None
        self.started = self.last = time.time()
        self.first = initial

    def update(self, record: dict) -> None:
        self.step += 1
        shown = dict(ep=record["epoch"], l_next=f"{record['l_next']:.3f}", l_attn=f"{record['l_attn']:.3f}",
                     tok_s=f"{record['tokens_per_s']:.0f}")
        if self.bar is not None:
            self.bar.set_postfix(**shown)
            self.bar.update()
        elif self.enabled and (time.time() - self.last >= self.every or self.step == self.total):
            self.last = time.time()
            per_step = (self.last - self.started) / max(self.step - self.first, 1)
            left = (self.total - self.step) * per_step / 60
            print(f"{self.name}: step {self.step}/{self.total}, " + ", ".join(f"{k} {v}" for k, v in shown.items())
                  + f", {per_step:.1f} s/step, about {left:.0f} min left", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
