"""Step benchmark: a CAT training step against a vanilla one, in time and peak memory, at several lengths.

    python benchmarks/step.py --model smollm2-135m --batch 4 --seq-len 128,512 --repeats 5 --out step.json
    python benchmarks/step.py --shape tinyllama --device cuda --batch 8 --seq-len 512,1024,2048
    python benchmarks/step.py --model smollm2-135m --batch 8 --seq-len 96 --vs-transformers   # against transformers
    python benchmarks/step.py --model smollm2-135m --batch 4 --seq-len 128,512 --lora         # LoRA steps

A step is what train.py does for one optimiser step of one micro-batch: train.losses (forward, L_next, and
L_attn for CAT, §4.2) -> (L_next + γ·L_attn).backward() with γ = 1 -> clip the gradient norm -> AdamW step ->
zero_grad, in the precision train.py picks (--dtype auto: bf16 autocast on CUDA and on CPUs with native bf16).
Three variants of it, on the same weights and tokens:
  vanilla   train.losses with alpha 0 and measure off, so no attention path runs: a pure vanilla step
  explicit  alpha > 0, attn "explicit": per-layer probabilities (B, H, T, T) -> Ā -> C_i / N_i (§4.2)
  fast      alpha > 0, attn "fast": the causal mass (B, R) of the R rows that hold causal tokens only
AdamW runs at lr 0: it does all its arithmetic, but the weights never change, so every variant and every
repeat sees the same model, and L_next and L_attn of the three variants must agree (fast == explicit).
With --lora the model is train.py --lora's (its rank, scaling, dropout and target layers; on CUDA in bf16
autocast the frozen base weights are stored in bf16, as train.py stores them): only the adapters train.
The batch is built once by batches.collate, outside the timed step, as train.py builds it before each step (the
loss positions, the causal rows and their counts, on the CPU).

Data: B sequences of exactly T tokens, each STG_S training records (stg.generate) encoded as batches.encode does,
packed back to back, the last one cut at T; L_next covers each record's target + eos. Every record keeps its own
adjacency (3 causal phrases of ~4 tokens, caused rows = the answer, shifted one row up, §4.2), so the mask has
~2 rows with causal tokens per packed record: --annotated first keeps only the first record's, one causal
region per sequence whatever T is.

CPU: each variant runs in its own subprocess (`--variant NAME --seq-len T`, the worker mode, one JSON line
out); memory = its peak RSS (runs.peak_rss_gib), variants interleaved over --rounds. GPU (--device cuda):
one process, variants interleaved step by step, bf16 autocast as train.py, torch.cuda.synchronize around each
step, torch.cuda.max_memory_allocated reset before each step; model FLOPs utilisation = 6·N·B·T / step time /
--peak-tflops, N = weights of the linear layers (lm_head included, attention's own Q·Kᵀ and P·V not counted);
with --lora, (4·N + 2·N_lora)·B·T: no weight gradient for the frozen weights.

--vs-transformers (optional; needs transformers, which no project module imports): in one process, interleaved,
our vanilla step against transformers' (LlamaForCausalLM with labels: logits at every position) in float32, its
default, and in the precision of our step; and greedy decoding of B STG prompts, 16 new tokens, model.generate
against transformers' generate. Same weights (saved once in HF layout), batch, threads and precision; ratios > 1
mean ours is faster.
"""
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import batches  # noqa: E402
import hf as hf_files  # noqa: E402
import runs  # noqa: E402
import model as M  # noqa: E402
import cli  # noqa: E402
import stg  # noqa: E402
import train  # noqa: E402

VARIANTS = ("vanilla", "explicit", "fast")
SHAPES = {  # random-weights models: ModelArgs fields of a real checkpoint's config.json
    "tinyllama": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, head_dim=64,
                      hidden_dim=5632),                                          # TinyLlama-1.1B
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
                         hidden_dim=1536, rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128),
}


@dataclass
class BenchConfig:
    model: str = ""               # a model folder, alias or hub id (train.py's --model), or empty with --shape
    shape: str = ""               # a random-weights model of this shape (SHAPES), tokenizer: BPE trained on STG_S
    batch: int = 4                # sequences per step (B)
    seq_len: str = "128,512"      # one or several T, comma-separated
    repeats: int = 5              # timed steps per variant (per round on CPU)
    warmup: int = 1               # untimed steps first (per round on CPU)
    rounds: int = 1               # CPU: worker subprocesses per variant, run interleaved vanilla, explicit, fast, ...
    device: str = "cpu"           # cpu | cuda
    dtype: str = "auto"           # compute precision, as train.py's --dtype: auto | float32 | bfloat16
    lora: bool = False            # LoRA steps as train.py --lora takes them (its defaults): only the adapters train
    vs_transformers: bool = False  # also time transformers' training step and generate on the same weights and batch
    threads: int = 0              # CPU: torch threads per worker (0 = torch's default, one per core)
    alpha: float = 2.0            # CAT hinge threshold: above C_i/N_i of pretrained and random models alike, so
                                  # L_attn is non-zero on every causal row (its cost does not depend on alpha)
    annotated: str = "all"        # all: every packed record keeps its adjacency; first: only the first of each row
    peak_tflops: float = 989.0    # dense bf16 peak of the GPU for MFU (H100 SXM: 989)
    seed: int = 42                # STG records, random weights
    out: str = ""                 # write the results as JSON here
    variant: str = ""             # worker mode: run this variant only, at one --seq-len, print one JSON line


# ---------------------------------------------------------------------------------------------
# Model and data

def build(cfg: BenchConfig, device) -> tuple[M.Transformer, hf_files.Tokenizer]:
    """The checkpoint of --model (float32, as train.py's full fine-tuning), or random weights of --shape; with
    --lora, train.py's adapters on it (frozen base weights in bf16 where train.py keeps them so: CUDA, bf16)."""
    if bool(cfg.model) == bool(cfg.shape):
        raise SystemExit("give exactly one of --model (a checkpoint) and --shape (random weights: "
                         f"{', '.join(SHAPES)})")
    if cfg.shape and cfg.shape not in SHAPES:
        raise SystemExit(f"--shape {cfg.shape!r}: choose one of {', '.join(SHAPES)}")
    weights = runs.stored_dtype(cfg.lora, str(device), cli.precision(str(device), cfg.dtype))
    if cfg.model:
        model, tok = hf_files.load_model(cfg.model, weights, device)
    else:
        texts = [r["input"] + r["target"] for r in stg.make_records("stg_s_train", cfg.seed)]
        _, tok = runs.build_scratch(texts, train.TrainConfig(scratch_vocab=1000, seed=cfg.seed))
        torch.manual_seed(cfg.seed)
        with torch.device(device):
            model = M.Transformer(M.ModelArgs(**SHAPES[cfg.shape])).to(weights)
    if cfg.lora:
        model, _ = runs.with_lora(model, train.TrainConfig(lora=True, seed=cfg.seed))   # train.py's defaults
        model.to(device)
    return model, tok


def packed_batch(tok: hf_files.Tokenizer, B: int, T: int, annotated: str, seed: int) -> batches.Batch:
    """STG_S records packed into B rows of T tokens, each row one batches.Example, through batches.collate."""
    examples = [batches.encode(r, tok)[0] for r in stg.make_records("stg_s_train", seed)]
    rows, k = [], 0
    for _ in range(B):
        ids, labels, adj = [], [], torch.zeros(T, T, dtype=torch.bool)
        while len(ids) < T:
            ex, t = examples[k % len(examples)], len(ids)
            n = min(len(ex.ids), T - t)                                       # the last record is cut at T
            ids += ex.ids[:n]
            labels += ex.labels[:n - 1] + [-100]                              # its last token predicts nothing here
            if annotated == "all" or t == 0:
                adj[t:t + n, t:t + n] = ex.adj[:n, :n]                        # (n, n) block on the diagonal
            k += 1
        rows.append(batches.Example(ids, labels, adj))
    return batches.collate(rows, tok.pad_id)


def matmul_params(model: nn.Module, trainable_only: bool = False) -> int:
    """N of 6·N FLOPs per token: weights of the linear layers, lm_head included (tied or not); trainable_only: those
    that get a weight gradient (the adapters' N_lora with --lora)."""
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and (m.weight.requires_grad or not trainable_only))


# ---------------------------------------------------------------------------------------------
# The step

def train_step(model, optimizer, params, batch: batches.Batch, variant: str, alpha: float,
               autocast) -> tuple[float, float]:
    """One optimiser step as train.py takes it; returns (L_next, L_attn) before the update."""
    with autocast:
        if variant == "vanilla":   # no attention path at all: train.py's step with --alpha 0 --no-log-ratio
            out = train.losses(model, batch, 0.0, measure=False)
        else:
            out = train.losses(model, batch, alpha, attn=variant)
        (out.l_next + out.l_attn).backward()                           # §4.2: L_next + γ·L_attn, γ = e^0 = 1
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.l_next.item(), out.l_attn.item()


def run_variants(cfg: BenchConfig, variants, T: int) -> dict:
    """Warm-up, then timed steps of each variant in turn, in this process: {variant: measurements}."""
    on_cuda = cfg.device.startswith("cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = build(cfg, cfg.device)
    model.train()
    batch = packed_batch(tok, cfg.batch, T, cfg.annotated, cfg.seed).to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = train.adamw(params, lr=0.0)                 # all of AdamW's work, weights unchanged
    autocast = cli.autocast(cfg.device, cli.precision(cfg.device, cfg.dtype))
    rss_before = int(runs.peak_rss_gib() * 2**30)
    out = {v: {"times_s": [], "peak_mem_bytes": 0} for v in variants}
    for r in range(cfg.warmup + cfg.repeats):
        for v in variants:
            if "error" in out[v]:
                continue
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            torch.manual_seed(cfg.seed)            # the same dropout masks (--lora) in every variant and process
            t0 = time.perf_counter()
            try:
                losses = train_step(model, optimizer, params, batch, v, cfg.alpha, autocast)
            except torch.OutOfMemoryError as error:
                out[v]["error"] = f"out of memory: {str(error).splitlines()[0]}"
                optimizer.zero_grad(set_to_none=True)
                continue
            if on_cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if r == 0:
                out[v]["l_next"], out[v]["l_attn"] = losses
            if r >= cfg.warmup:
                out[v]["times_s"].append(elapsed)
                if on_cuda:
                    out[v]["peak_mem_bytes"] = max(out[v]["peak_mem_bytes"], torch.cuda.max_memory_allocated())
    for v in variants:
        out[v]["supervised_rows"] = batch.causal_rows.rows.shape[-1] if v != "vanilla" else 0
        out[v]["n_matmul_params"] = matmul_params(model)
        out[v]["n_trained_matmul_params"] = matmul_params(model, trainable_only=True)
        if not on_cuda:  # one variant per process: the process's peak resident memory, and before any step
            out[v]["peak_mem_bytes"] = int(runs.peak_rss_gib() * 2**30)
            out[v]["rss_before_steps_bytes"] = rss_before
    return out


def run_worker(cfg: BenchConfig, variant: str, T: int) -> dict:
    """This variant at length T in a fresh subprocess (`--variant`), so its peak RSS is its own."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--seq-len", str(T)]
    for f in dataclasses.fields(BenchConfig):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name not in ("seq_len", "variant", "out", "rounds", "vs_transformers"):
            argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    load = os.getloadavg()[0]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"worker exited {done.returncode}: {done.stderr.strip()[-500:]}", "times_s": [],
                "load_1min": load}
    return {**json.loads(done.stdout.strip().splitlines()[-1])[variant], "load_1min": load}


# ---------------------------------------------------------------------------------------------
# Against transformers (optional: only this benchmark imports it, and only with --vs-transformers)

def hf_step(hf, optimizer, params, ids, labels, autocast) -> float:
    """transformers' own training step: the loss from `labels` (shifted inside, logits at every position)."""
    with autocast:
        loss = hf(input_ids=ids, labels=labels).loss
        loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def vs_transformers(cfg: BenchConfig, T: int) -> dict | None:
    """Our vanilla step and greedy decoding against transformers' on the same weights, batch, threads and precision,
    interleaved in one process: {name: {"median_s", "times_s", ...}} and the ratios. None without transformers."""
    try:
        import transformers
    except ImportError:
        print("--vs-transformers: transformers is not installed (pip install -r requirements-test.txt); skipped")
        return None
    import tempfile
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ours, tok = build(cfg, cfg.device)
    with tempfile.TemporaryDirectory() as folder:   # the same weights for both, through the HF layout
        hf_files.save_model(ours, tok, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="sdpa").to(cfg.device)
    precision = cli.precision(cfg.device, cfg.dtype)
    same, plain = cli.autocast(cfg.device, precision), cli.autocast(cfg.device, "float32")
    batch = packed_batch(tok, cfg.batch, T, cfg.annotated, cfg.seed).to(cfg.device)
    labels = torch.full_like(batch.ids, -100)
    labels.view(-1)[batch.target_pos + 1] = batch.targets          # transformers shifts the labels itself
    opt = {name: train.adamw([p for p in m.parameters() if p.requires_grad], lr=0.0)   # fused, as transformers'
           for name, m in (("ours", ours), ("hf", hf))}                               # Trainer default on torch >= 2.8
    ours_params, hf_params = list(ours.parameters()), list(hf.parameters())
    steps = {"ours": lambda: train_step(ours, opt["ours"], ours_params, batch, "vanilla", 0.0, same)[0],
             f"transformers_{precision}": lambda: hf_step(hf, opt["hf"], hf_params, batch.ids, labels, same),
             "transformers_float32": lambda: hf_step(hf, opt["hf"], hf_params, batch.ids, labels, plain)}
    tests = [batches.encode(r, tok)[0] for r in stg.make_records("stg_e_test_iid", cfg.seed)[:cfg.batch]]
    prompts = [ex.ids[:ex.n_prompt] for ex in tests]                 # the prefix eval.py generates from
    new_tokens = 16
    width = max(map(len, prompts))
    hf_ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts], device=cfg.device)
    hf_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=cfg.device)

    def hf_generate():
        with torch.no_grad(), same:
            hf.generate(input_ids=hf_ids, attention_mask=hf_mask, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_id)

    def our_generate():
        with same:
            M.generate(ours, prompts, new_tokens, eos_ids=[], pad_id=tok.pad_id)   # no EOS: all 16 tokens

    timed = {**steps, "generate_ours": our_generate, f"generate_transformers_{precision}": hf_generate}
    out = {name: {"times_s": []} for name in timed}
    for r in range(cfg.warmup + cfg.repeats):
        for name, fn in timed.items():
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            value = fn()
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            if r >= cfg.warmup:
                out[name]["times_s"].append(time.perf_counter() - t0)
            if r == 0 and value is not None:
                out[name]["l_next"] = value
    for row in out.values():
        row["median_s"] = statistics.median(row["times_s"])
    median = {name: row["median_s"] for name, row in out.items()}
    ratios = {"step: transformers float32 (default) / ours": median["transformers_float32"] / median["ours"],
              f"step: transformers {precision} / ours": median[f"transformers_{precision}"] / median["ours"],
              f"generate: transformers {precision} / ours": median[f"generate_transformers_{precision}"]
              / median["generate_ours"]}
    return {"precision": precision, "transformers": transformers.__version__, "generate_new_tokens": new_tokens,
            "timings": out, "speedups": ratios}


# ---------------------------------------------------------------------------------------------
# Summary

def summarise(cfg: BenchConfig, raw: dict, T: int) -> dict:
    """Median step time, peak memory, ratios to vanilla, FLOPs and (GPU) MFU of each variant at length T."""
    rows = {}
    for v, m in raw.items():
        row = {k: m[k] for k in ("l_next", "l_attn", "supervised_rows", "error") if k in m}
        if m["times_s"]:
            median = statistics.median(m["times_s"])
            n, n_trained = m["n_matmul_params"], m["n_trained_matmul_params"]
            flops = (4 * n + 2 * n_trained) * cfg.batch * T       # forward 2N, backward 2N + 2N of the trained
            row.update(median_s=median, times_s=m["times_s"], peak_mem_bytes=m["peak_mem_bytes"],
                       tflops=flops / median / 1e12)
            if cfg.device.startswith("cuda"):
                row["mfu"] = row["tflops"] / cfg.peak_tflops
            for k in ("rss_before_steps_bytes", "load_1min"):
                if k in m:
                    row[k] = m[k]
        rows[v] = row
    base = rows.get("vanilla", {})
    for row in rows.values():
        if "median_s" in row and "median_s" in base:
            row["time_vs_vanilla"] = row["median_s"] / base["median_s"]
            row["mem_vs_vanilla"] = row["peak_mem_bytes"] / base["peak_mem_bytes"]
    return rows


def markdown(cfg: BenchConfig, results: dict) -> str:
    mfu = cfg.device.startswith("cuda")
    lines = ["| T | variant | median step (s) | × vanilla | peak mem (MiB) | × vanilla | TFLOP/s |"
             + (" MFU |" if mfu else "") + " L_attn |",
             "|---|---|---|---|---|---|---|" + ("---|" if mfu else "") + "---|"]
    for T, rows in results.items():
        for v, r in rows.items():
            if "median_s" not in r:
                lines.append(f"| {T} | {v} | {r.get('error', 'no timed step')} |")
                continue
            lines.append(f"| {T} | {v} | {r['median_s']:.3f} | {r['time_vs_vanilla']:.3f} | "
                         f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['mem_vs_vanilla']:.3f} | {r['tflops']:.2f} |"
                         + (f" {r['mfu']:.1%} |" if mfu else "") + f" {r.get('l_attn', float('nan')):.6g} |")
    return "\n".join(lines)


def device_name(cfg: BenchConfig) -> str:
    if cfg.device.startswith("cuda"):
        return torch.cuda.get_device_name(cfg.device)
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{cfg.threads or torch.get_num_threads()} torch threads per worker")


def parse_args(argv=None) -> BenchConfig:
    return BenchConfig(**vars(cli.config_parser(BenchConfig, __doc__).parse_args(argv)))


def main(argv=None) -> dict | None:
    cfg = parse_args(argv)
    seq_lens = [int(t) for t in cfg.seq_len.split(",")]
    if cfg.variant:  # worker mode
        if cfg.variant not in VARIANTS or len(seq_lens) != 1:
            raise SystemExit(f"--variant {cfg.variant!r} takes one of {VARIANTS} and one --seq-len")
        print(json.dumps(run_variants(cfg, [cfg.variant], seq_lens[0])))
        return None
    if cfg.lora and cfg.vs_transformers:
        raise SystemExit("--vs-transformers compares full fine-tuning steps: leave out --lora")
    start = time.strftime("%Y-%m-%d %H:%M:%S")
    results = {}
    for T in seq_lens:
        if cfg.device.startswith("cuda"):
            raw = run_variants(cfg, VARIANTS, T)
        else:
            raw = {v: {"times_s": [], "load_1min": []} for v in VARIANTS}
            for _ in range(cfg.rounds):
                for v in VARIANTS:
                    m = run_worker(cfg, v, T)
                    raw[v] = {**raw[v], **m, "times_s": raw[v]["times_s"] + m["times_s"],
                              "load_1min": raw[v]["load_1min"] + [m["load_1min"]],
                              "peak_mem_bytes": max(raw[v].get("peak_mem_bytes", 0), m.get("peak_mem_bytes", 0))}
        results[str(T)] = summarise(cfg, raw, T)
    report = {"config": dataclasses.asdict(cfg), "device": device_name(cfg), "torch": torch.__version__,
              "start": start, "end": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_end": os.getloadavg(),
              "results": results}
    print(markdown(cfg, results))
    if cfg.vs_transformers:
        report["vs_transformers"] = {str(T): vs_transformers(cfg, T) for T in seq_lens}
        for T, row in report["vs_transformers"].items():
            for name, ratio in (row or {}).get("speedups", {}).items():
                print(f"T = {T}, {name}: {ratio:.2f}x")
    if cfg.out:
        cli.write_text(Path(cfg.out), json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    cli.run_cli(main)
