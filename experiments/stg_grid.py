"""Reproduce the STG finding of CAT Table 1 (§5.2.1): vanilla vs CAT on STG_S/M/L/H over several seeds.

    python experiments/stg_grid.py --model scratch --device cpu --jobs 2
    python experiments/stg_grid.py --model smollm2-135m --jobs 4 --attention          # full fine-tuning
    python experiments/stg_grid.py --model smollm2-135m --lora --jobs 4 -- --batch-size 16

1. α selection, per data set, first seed only: a CAT run for every α of --alphas on the training file less a
   seeded validation share (`train.py --val-frac 0.2 --no-eval`), then `eval.py` on that run's val.jsonl.
   The α with the best validation accuracy wins; a tie goes to the smaller α. The test files are not read.
2. Final runs: vanilla and CAT(α*) for every seed on the whole training file; train.py tests them (IID, OOD).
3. With --attention: eval.py's attention analysis (Figures 3 and 5) of the first seed's vanilla and CAT runs.
4. <out>/summary.json and <out>/summary.md: Table 1's layout, mean ± std over seeds, the majority baseline,
   the paper's TinyLlama-1.1B Full rows, selected α, wall times, and a plain verdict per data set.

Every run is a subprocess in its own folder under <out> (log.txt, wall_time.json); a run whose results.json
exists is skipped, one with a checkpoint is resumed, so the same command finishes an interrupted grid.
Arguments after `--` go to every train.py call unchanged (epochs, lr, batch size, scratch model size, ...).
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import eval as evaluation  # noqa: E402  (the repository root is put on the path above)
import cli  # noqa: E402
import stg  # noqa: E402
from runs import model_label  # noqa: E402

SPLITS = ("iid", "ood")
METHODS = ("vanilla", "cat")
NAMES = {"vanilla": "Vanilla", "cat": "CAT"}
# CAT Table 1, TinyLlama-1.1B, Full: accuracy in % (the paper prints the OOD CAT average as 74.96%, a copy of
# the IID one; the averages here are recomputed from the four columns).
PAPER = {("vanilla", "iid"): {"stg_s": 62.25, "stg_m": 89.50, "stg_l": 95.50, "stg_h": 32.20},
         ("cat", "iid"): {"stg_s": 73.50, "stg_m": 93.50, "stg_l": 95.75, "stg_h": 37.10},
         ("vanilla", "ood"): {"stg_s": 53.50, "stg_m": 60.75, "stg_l": 65.25, "stg_h": 4.10},
         ("cat", "ood"): {"stg_s": 63.75, "stg_m": 66.25, "stg_l": 77.00, "stg_h": 6.10}}
# train.py flags the grid sets itself; passing them after `--` would silently break the design
RESERVED = ("--model", "--data", "--alpha", "--method", "--seed", "--val-frac", "--out", "--name", "--resume",
            "--eval", "--no-eval", "--lora", "--no-lora", "--device", "--stop-after")


@dataclass
class GridConfig:
    model: str = "scratch"               # train.py --model: scratch, smollm2-135m, a folder, a hub id
    lora: bool = False                   # LoRA instead of full fine-tuning
    data: str = "stg_s,stg_m,stg_l,stg_h"
    seeds: str = "42,1,2"                # the first one also selects α
    alphas: str = "0.05,0.15,0.25,0.35"  # §5.1: the paper's range; a scratch model needs α > 1 (docs/design.md)
    val_frac: float = 0.2                # share of the training file held out to select α
    jobs: int = 1                        # runs at the same time (small runs share one GPU well)
    device: str = "auto"                 # auto | cpu | cuda, for train.py and eval.py
    out: str = ""                        # default runs/grid-<model>[-lora]
    attention: bool = False              # Figures 3 and 5 for the first seed's vanilla and CAT runs
    attention_data: str = "stg_m"        # the data set those pictures are drawn on
    train_args: list = field(default_factory=list)   # passed to every train.py call (after `--`)


def items(text: str, kind=str) -> list:
    """A comma-separated flag as a list: "42,1,2" -> [42, 1, 2] with kind=int."""
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def label(cfg: GridConfig) -> str:
    return model_label(cfg.model) + ("-lora" if cfg.lora else "")


# ---------------------------------------------------------------------------------------------
# Jobs: one run folder each, a list of commands, done when the folder holds results.json.

@dataclass
class Job:
    run: Path                  # the run folder; results.json there marks the job done
    commands: list             # argument lists, run in order; the first is train.py (resumable) or eval.py


def write_attempts(path: Path, attempts: list[dict]) -> None:
    """wall_time.json: the seconds of every attempt that has ended, and each attempt."""
    total = sum(a["seconds"] for a in attempts if a["seconds"] is not None)
    cli.write_text(path, json.dumps({"seconds": round(total, 1), "attempts": attempts}, indent=2) + "\n")


def run_job(job: Job, env: dict, record: dict | None = None) -> dict:
    """Run the job's commands (skipping a finished job, resuming from a checkpoint), output to run/log.txt;
    the seconds of every attempt, with `record` (e.g. the revision it ran from), go to run/wall_time.json. An
    attempt is on record from its start, so one that was killed (a session's end kills the worker, which then
    writes nothing) is counted at the next attempt: from its start to the last write of log.txt, which train.py's
    progress bars update every step."""
    if (job.run / "results.json").exists():
        return {"run": str(job.run), "status": "skipped"}
    commands = job.commands
    resumed = (job.run / "checkpoint" / "state.pt").exists()
    if resumed:   # train.py reads the run's own train_config.json back
        commands = [[sys.executable, str(ROOT / "train.py"), "--resume", str(job.run)], *commands[1:]]
    else:         # a partial run without a checkpoint starts again from nothing (metrics.jsonl is appended to)
        shutil.rmtree(job.run, ignore_errors=True)
    job.run.mkdir(parents=True, exist_ok=True)
    wall_path, log_path = job.run / "wall_time.json", job.run / "log.txt"
    attempts = json.loads(wall_path.read_text())["attempts"] if resumed and wall_path.exists() else []
    for attempt in attempts:   # one killed without a word ended with the last write of its log
        if attempt["seconds"] is None and "started" in attempt and log_path.exists():
            attempt.update(seconds=round(max(0.0, log_path.stat().st_mtime - attempt["started"]), 1), killed=True)
    start = time.time()
    attempts.append({"started": round(start, 1), "seconds": None, "resumed": resumed,
                     "commands": [" ".join(c) for c in commands], **(record or {})})
    write_attempts(wall_path, attempts)
    returncode = 0
    with open(log_path, "a") as log:
        for command in commands:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
            if returncode:
                break
    attempts[-1].update(seconds=round(time.time() - start, 1), returncode=returncode)
    write_attempts(wall_path, attempts)
    ok = returncode == 0 and (job.run / "results.json").exists()
    return {"run": str(job.run), "status": "done" if ok else "failed", "seconds": attempts[-1]["seconds"]}


def run_pool(jobs: list[Job], n_workers: int, env: dict) -> list[dict]:
    """Run the jobs with n_workers at a time; print each as it ends."""
    def one(job):
        outcome = run_job(job, env)
        note = {"skipped": "skipped (results.json exists)", "done": f"done in {outcome.get('seconds')} s",
                "failed": f"FAILED: see {job.run / 'log.txt'}"}[outcome["status"]]
        print(f"{job.run}: {note}", flush=True)
        return outcome
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        return list(pool.map(one, jobs))


def child_env(jobs: int) -> dict:
    """Environment of the runs: CPU threads shared out between the parallel jobs unless the user set them."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    return env


def train_command(cfg: GridConfig, out: Path, name: str, data: str, alpha: float, seed: int, *extra) -> list:
    return [sys.executable, str(ROOT / "train.py"), "--model", cfg.model, "--data", data, "--alpha", f"{alpha:g}",
            "--seed", str(seed), "--device", cfg.device, "--out", str(out), "--name", name,
            *(["--lora"] if cfg.lora else []), *extra, *cfg.train_args]


def eval_command(cfg: GridConfig, run: Path, data: str, out: Path, *extra) -> list:
    device = [] if cfg.device == "auto" else ["--device", cfg.device]   # eval.py picks cuda when present
    return [sys.executable, str(ROOT / "eval.py"), "--model", str(run), "--data", data, "--out", str(out),
            *device, *extra]


# ---------------------------------------------------------------------------------------------
# The plan: selection runs and vanilla runs first (independent of α), then CAT(α*), then attention.

def selection_name(data: str, alpha: float, seed: int) -> str:
    return f"{data}-select-a{alpha:g}-s{seed}"


def final_name(data: str, method: str, seed: int) -> str:
    return f"{data}-{method}-s{seed}"


def selection_job(cfg: GridConfig, out: Path, data: str, alpha: float, seed: int) -> Job:
    """A CAT run on the training file less the validation share, tested on that share alone."""
    run = out / selection_name(data, alpha, seed)
    return Job(run, [train_command(cfg, out, run.name, data, alpha, seed, "--val-frac", str(cfg.val_frac), "--no-eval"),
                     eval_command(cfg, run, str(run / "val.jsonl"), run, "--task", stg.STG_TRAIN[data])])


def final_job(cfg: GridConfig, out: Path, data: str, method: str, seed: int, alpha: float) -> Job:
    run = out / final_name(data, method, seed)
    return Job(run, [train_command(cfg, out, run.name, data, alpha if method == "cat" else 0.0, seed)])


def attention_job(cfg: GridConfig, out: Path, data: str, method: str, seed: int) -> Job:
    """eval.py --attention on a final run, written to run/attention/ (the run's own results stay as trained)."""
    run = out / final_name(data, method, seed)
    return Job(run / "attention", [eval_command(cfg, run, data, run / "attention", "--attention")])


def choose_alpha(out: Path, data: str, alphas: list[float], seed: int) -> dict:
    """The selection table {α: validation accuracy} and the chosen α: the best accuracy, a tie to the smaller α.
    The choice is None while any selection run of the data set lacks its result."""
    results = {}
    for alpha in alphas:
        path = out / selection_name(data, alpha, seed) / "results.json"
        if path.exists():   # eval.py names a JSONL file's data set after its stem ("val"), its one split "test"
            results[f"{alpha:g}"] = json.loads(path.read_text())["val"]["test"]
    complete = len(results) == len(alphas)
    chosen = min(alphas, key=lambda a: (-results[f"{a:g}"]["accuracy"], a)) if complete else None
    return {"seed": seed, "alpha": chosen, "val_accuracy": {a: r["accuracy"] for a, r in results.items()},
            "val_mae": {a: r["mae"] for a, r in results.items() if r.get("mae") is not None},
            "val_n": {a: r["n"] for a, r in results.items()}}


# ---------------------------------------------------------------------------------------------
# Aggregation: Table 1's layout from the run folders.

def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n − 1; None for one value) over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def read_final(out: Path, data: str, method: str, seed: int) -> dict | None:
    """{split: {"accuracy", "mae"?, "n"}} of a final run, None when it has not finished."""
    path = out / final_name(data, method, seed) / "results.json"
    return json.loads(path.read_text())[data] if path.exists() else None


def majority_baseline(data: str, n: dict) -> dict:
    """Always answering the most frequent target of each test file (its first n[split] records, as evaluated):
    STG_E, the majority label's share; STG_H, the accuracy of the most frequent AQI and its mean absolute error."""
    return {split: evaluation.majority_baseline(stg.STG_TRAIN[data], [str(r["target"]) for r in
                                                                      stg.read_records(path)[:n.get(split)]])
            for split, path in stg.resolve_data(data).tests.items()}


def verdict(data: str, cat: dict | None, vanilla: dict | None, majority: float) -> str:
    """One plain sentence: did CAT's OOD mean beat vanilla's by more than the seed std, by less, or fall behind?"""
    if cat is None or vanilla is None:
        return f"{data}: no comparison yet (runs missing)."
    diff = 100 * (cat["mean"] - vanilla["mean"])
    stds = [s for s in (cat["std"], vanilla["std"]) if s is not None]
    head = (f"{data}: OOD, CAT {100 * cat['mean']:.2f}% vs vanilla {100 * vanilla['mean']:.2f}% "
            f"(majority baseline {100 * majority:.2f}%): ")
    if diff <= 0:
        return head + (f"CAT falls behind by {-diff:.2f} points." if diff < 0 else "a tie.")
    if not stds:
        return head + f"CAT ahead by {diff:.2f} points; one seed, no seed std to compare with."
    spread = 100 * max(stds)
    if diff > spread:
        return head + f"CAT ahead by {diff:.2f} points, more than the seed std ({spread:.2f})."
    return head + f"CAT ahead by {diff:.2f} points, less than the seed std ({spread:.2f}): within seed noise."


def evaluated_n(finals: dict) -> dict:
    """{split: records tested} of the first finished run among `finals` (train.py --eval-limit may cap it)."""
    return next(({split: r[split]["n"] for split in SPLITS} for r in finals.values() if r is not None), {})


def summarize(cfg: GridConfig, out: Path) -> dict:
    """Everything summary.json holds, from the run folders that exist."""
    datas, seeds = items(cfg.data), items(cfg.seeds, int)
    finals = {(d, m, s): read_final(out, d, m, s) for d in datas for m in METHODS for s in seeds}
    done = {key: r for key, r in finals.items() if r is not None}
    table, mae = {}, {}
    for split in SPLITS:           # Table 1's row order: IID vanilla, IID CAT, OOD vanilla, OOD CAT
        for method in METHODS:
            row = {}
            for data in datas:
                values = [r[split]["accuracy"] for (d, m, _), r in done.items() if (d, m) == (data, method)]
                row[data] = mean_std(values) if values else None
            # Average: each seed's mean over the data sets, then mean ± std over the seeds that have them all
            per_seed = [[done[d, method, s][split]["accuracy"] for d in datas if (d, method, s) in done]
                        for s in seeds]
            values = [statistics.fmean(v) for v in per_seed if len(v) == len(datas)]
            table[f"{method} {split}"] = {**row, "average": mean_std(values) if values else None}
            errors = [r[split]["mae"] for (d, m, _), r in done.items()
                      if (d, m) == ("stg_h", method) and r[split].get("mae") is not None]
            if errors:
                mae[f"{method} {split}"] = mean_std(errors)
    majority = {d: majority_baseline(d, evaluated_n({k: r for k, r in finals.items() if k[0] == d})) for d in datas}
    runs = [{"data": d, "method": m, "seed": s, **{f"{split}_{k}": r[split][k] for split in SPLITS
                                                     for k in ("accuracy", "mae") if k in r[split]}}
            for (d, m, s), r in done.items()]
    walls = [{"run": str(w.parent.relative_to(out)), "seconds": json.loads(w.read_text())["seconds"]}
             for w in sorted(out.glob("**/wall_time.json"))]
    return {"config": dataclasses.asdict(cfg),
            "selection": {d: choose_alpha(out, d, items(cfg.alphas, float), seeds[0]) for d in datas},
            "table": table, "stg_h_mae": mae, "majority": majority,
            "paper_tinyllama_full": {f"{m} {s}": v for (m, s), v in PAPER.items()},
            "verdicts": {d: verdict(d, table["cat ood"][d], table["vanilla ood"][d], majority[d]["ood"]["accuracy"])
                         for d in datas},
            "runs": runs, "wall_times": walls, "attention": attention_numbers(cfg, out, seeds[0])}


def attention_numbers(cfg: GridConfig, out: Path, seed: int) -> dict:
    """Per method: eval.py's attention per factor kind for each split, and the pictures copied to <out>/attention/."""
    numbers = {}
    for method in METHODS if cfg.attention else ():
        folder = out / final_name(cfg.attention_data, method, seed) / "attention"
        if not (folder / "results.json").exists():
            continue
        result = json.loads((folder / "results.json").read_text())[cfg.attention_data]
        pictures = []
        for png in sorted(folder.glob("*.png")):
            copy = out / "attention" / f"{method}-{png.name}"
            copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(png, copy)
            pictures.append(str(copy.relative_to(out)))
        numbers[method] = {"run": str(folder.parent.relative_to(out)), "pictures": pictures,
                           **{split: result[split]["attention"] for split in SPLITS}}
    return numbers


# ---------------------------------------------------------------------------------------------
# summary.md

def cell(stat: dict | None, scale: float = 100.0) -> str:
    if stat is None:
        return "–"
    text = f"{scale * stat['mean']:.2f}"
    return text + (f" ± {scale * stat['std']:.2f}" if stat["std"] is not None else "")


def command_line(cfg: dict) -> str:
    """The command that reproduces the grid (every run skipped once done, so it also completes one)."""
    flags = [f"--{k.replace('_', '-')} {cfg[k]}" for k in ("model", "data", "seeds", "alphas", "val_frac", "jobs",
                                                          "device", "out")]
    flags += ["--lora"] * cfg["lora"] + [f"--attention --attention-data {cfg['attention_data']}"] * cfg["attention"]
    return " ".join(["python experiments/stg_grid.py", *flags, *(["--", *cfg["train_args"]] * bool(cfg["train_args"]))])


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    datas, n_seeds = items(cfg["data"]), len(items(cfg["seeds"]))
    setting = "LoRA" if cfg["lora"] else "Full"
    head = "| method | split | " + " | ".join(d.upper() for d in datas) + " | Average |"
    rule = "|---" * (len(datas) + 3) + "|"
    lines = [f"# STG grid: {cfg['model']} {setting}", "", f"Reproduce: `{command_line(cfg)}`", "",
             f"Accuracy in %, mean ± sample std over {n_seeds} seeds ({cfg['seeds']}); Average: each seed's mean "
             "over the columns, then mean ± std over seeds. CAT uses the α selected below.", "", head, rule]
    for key, row in summary["table"].items():
        method, split = key.split()
        lines.append(f"| {NAMES[method]} | {split.upper()} | " + " | ".join(cell(row[d]) for d in datas)
                     + f" | {cell(row['average'])} |")
    for split in SPLITS:
        shares = [summary["majority"][d][split]["accuracy"] for d in datas]
        lines.append(f"| majority baseline | {split.upper()} | " + " | ".join(f"{100 * s:.2f}" for s in shares)
                     + f" | {100 * statistics.fmean(shares):.2f} |")
    for key, row in summary["paper_tinyllama_full"].items():
        method, split = key.split()
        lines.append(f"| paper: TinyLlama-1.1B Full {NAMES[method]} | {split.upper()} | "
                     + " | ".join(f"{row[d]:.2f}" for d in datas)
                     + f" | {statistics.fmean(row[d] for d in datas):.2f} |")
    lines += ["", "Majority baseline: always the most frequent target of the test file (STG_E: the majority label; "
              "STG_H: the most frequent AQI). Paper rows: CAT Table 1 (its OOD CAT average is misprinted there).", ""]
    if summary["stg_h_mae"]:
        lines += ["STG_H mean absolute error (AQI points, mean ± std over seeds):", "",
                  "| method | split | MAE |", "|---|---|---|"]
        lines += [f"| {NAMES[key.split()[0]]} | {key.split()[1].upper()} | {cell(v, 1.0)} |"
                  for key, v in summary["stg_h_mae"].items()]
        lines += [f"| majority baseline | {s.upper()} | {summary['majority']['stg_h'][s]['mae']:.2f} |" for s in SPLITS]
        lines.append("")
    alphas = [f"{a:g}" for a in items(cfg["alphas"], float)]
    lines += [f"Selected α (validation accuracy in %, seed {cfg['seeds'].split(',')[0]}, {cfg['val_frac']:g} of the "
              "training file held out; the best wins, a tie goes to the smaller α; test files unread):", "",
              "| data | " + " | ".join(f"α={a}" for a in alphas) + " | chosen |", "|---" * (len(alphas) + 2) + "|"]
    for data, sel in summary["selection"].items():
        accs = [f"{100 * sel['val_accuracy'][a]:.2f}" if a in sel["val_accuracy"] else "–" for a in alphas]
        chosen = "–" if sel["alpha"] is None else f"{sel['alpha']:g}"
        lines.append(f"| {data.upper()} | " + " | ".join(accs) + f" | {chosen} |")
    lines += ["", "Verdicts (the OOD means of CAT and vanilla, their difference against the larger seed std):", ""]
    lines += [f"- {v}" for v in summary["verdicts"].values()] + [""]
    if summary["attention"]:
        lines += [f"Attention of the answer row on each factor kind ({cfg['attention_data'].upper()}, seed "
                  f"{cfg['seeds'].split(',')[0]}; share of the attention on attribute tokens, eval.py --attention):",
                  "", "| method | split | causal | spurious | irrelevant |", "|---|---|---|---|---|"]
        for method, numbers in summary["attention"].items():
            for split in SPLITS:
                lines.append(f"| {NAMES[method]} | {split.upper()} | " + " | ".join(
                    f"{numbers[split][k]['share']:.3f}" for k in ("causal", "spurious", "irrelevant")) + " |")
        lines.append("")
        lines += [f"![{picture}]({picture})" for numbers in summary["attention"].values()
                  for picture in numbers["pictures"]] + [""]
    lines += ["Wall time per run (seconds, all attempts):", "", "| run | seconds |", "|---|---|"]
    lines += [f"| {w['run']} | {w['seconds']:.1f} |" for w in summary["wall_times"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None) -> GridConfig:
    """argparse onto GridConfig; everything after `--` is passed to train.py."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    own, passed = argv[:cut], argv[cut + 1:]
    d = GridConfig()
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model, help="scratch | smollm2-135m | a model folder | a hub id")
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=d.lora)
    p.add_argument("--data", default=d.data, help="comma-separated STG data sets")
    p.add_argument("--seeds", default=d.seeds, help="comma-separated; the first also selects α")
    p.add_argument("--alphas", default=d.alphas, help="α grid (the paper's 0.05–0.35; scratch models need α > 1)")
    p.add_argument("--val-frac", type=float, default=d.val_frac, help="training share held out to select α")
    p.add_argument("--jobs", type=int, default=d.jobs, help="runs at the same time")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=d.out, help="default runs/grid-<model>[-lora]")
    p.add_argument("--attention", action="store_true", help="Figures 3 and 5 for one vanilla and one CAT run")
    p.add_argument("--attention-data", default=d.attention_data)
    cfg = GridConfig(**vars(p.parse_args(own)), train_args=passed)
    for arg in passed:
        if arg.split("=")[0] in RESERVED:
            p.error(f"{arg} after `--`: the grid sets {arg.split('=')[0]} itself; use stg_grid.py's own flag")
    unknown = [d for d in items(cfg.data) if d not in stg.STG_TRAIN]
    if unknown:
        p.error(f"--data {','.join(unknown)}: expected STG data sets ({', '.join(stg.STG_TRAIN)})")
    if cfg.attention and cfg.attention_data not in items(cfg.data):
        p.error(f"--attention-data {cfg.attention_data} is not one of --data {cfg.data}")
    # checked here: a mistake would end the grid in a traceback midway, or fail every run in its own log.txt
    try:
        seeds = items(cfg.seeds, int)
    except ValueError:
        p.error(f"--seeds {cfg.seeds!r}: comma-separated whole numbers, e.g. 42,1,2")
    try:
        alphas = items(cfg.alphas, float)
    except ValueError:
        p.error(f"--alphas {cfg.alphas!r}: comma-separated numbers, e.g. 0.05,0.15")
    if not seeds or any(not 0 <= seed < 2**32 for seed in seeds):
        p.error(f"--seeds {cfg.seeds!r}: one or more seeds, each between 0 and {2**32 - 1}")
    if cfg.jobs < 1 or not alphas or not all(0 < alpha < math.inf for alpha in alphas):   # NaN fails too
        p.error("--jobs must be ≥ 1 and --alphas a list of α > 0")
    if not 0 < cfg.val_frac < 1:   # the selection runs are tested on the share held out
        p.error(f"--val-frac {cfg.val_frac}: must be between 0 and 1")
    return cfg


def main(argv=None) -> Path:
    cfg = parse_args(argv)
    cfg = dataclasses.replace(cfg, out=cfg.out or f"runs/grid-{label(cfg)}")
    out = cli.check_output(cfg.out, "--out", folder=True)
    datas, seeds, alphas = items(cfg.data), items(cfg.seeds, int), items(cfg.alphas, float)
    if cfg.model == "scratch" and max(alphas) < 1:
        print("note: a scratch model starts at C/N ≈ 1 (docs/design.md), so the hinge max(0, α − C/N) stays zero for "
              "α < 1: these CAT runs will train much as vanilla does. Try --alphas 1.5,2,3 to engage it.")
    out.mkdir(parents=True, exist_ok=True)
    cli.write_text(out / "grid_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    env = child_env(cfg.jobs)
    # α selection and the vanilla runs do not depend on α*: they share the first round
    first = [selection_job(cfg, out, d, a, seeds[0]) for d in datas for a in alphas]
    first += [final_job(cfg, out, d, "vanilla", s, 0.0) for d in datas for s in seeds]
    outcomes = run_pool(first, cfg.jobs, env)
    cat_jobs = []
    for data in datas:
        chosen = choose_alpha(out, data, alphas, seeds[0])["alpha"]
        if chosen is None:
            print(f"{data}: a selection run failed, so no α* and no CAT runs; see the logs above")
            continue
        print(f"{data}: α* = {chosen:g} (validation accuracy)")
        cat_jobs += [final_job(cfg, out, data, "cat", s, chosen) for s in seeds]
    outcomes += run_pool(cat_jobs, cfg.jobs, env)
    if cfg.attention:
        outcomes += run_pool([attention_job(cfg, out, cfg.attention_data, m, seeds[0]) for m in METHODS
                              if (out / final_name(cfg.attention_data, m, seeds[0]) / "results.json").exists()],
                             cfg.jobs, env)
    summary = summarize(cfg, out)
    cli.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    cli.write_text(out / "summary.md", markdown(summary))
    print(markdown(summary))
    failed = [o["run"] for o in outcomes if o["status"] == "failed"]
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed (their log.txt says why): {', '.join(failed)}")
    print(f"summary in {out / 'summary.md'} and {out / 'summary.json'}")
    return out


if __name__ == "__main__":
    cli.run_cli(main)
