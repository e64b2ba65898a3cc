"""Does CAT work on a real model? α placed against the model's starting C/N, on the authors' STG files, over seeds.

    python experiments/alpha_study.py --model <SmolLM2 folder> --authors-data <CAT repo folder> --data stg_s
    python experiments/alpha_study.py --out results/alpha-study-smollm2 --summary-only    # the tables again

Every (data set, setting, seed) is one train.py run on the training file less a seeded validation share
(--val-frac, 0.2), tested at its end on that share, IID and OOD. The CAT setting with the best mean validation
accuracy is the chosen one (the test files choose nothing); every setting's runs are in the figure. Settings:
  vanilla      α = 0
  k<K>         α = K × the median C/N of the causal rows before the first step (train.py --alpha-scale K)
  a<α>         an absolute α (a0.6: the α of the paper's Appendix F for TinyLlama full fine-tuning)
  div-a<α>     the authors' published loss (train.py --attn-loss div) at that α
  div-k<K>     the authors' loss at α = K × the starting median C/N (beside k<K>: the loss alone differs)
  attr-<any>   not in the paper: one of the above with N_i of Eq. 9 over the record's other "Name: value" attributes
               instead of every other token (train.py --contrast attributes --attn explicit), so that C/N compares
               the causes with the alternatives to them; α and C/N are on that scale.
  in-<any>     not in the paper: the same with N_i over the input's tokens but the first, the attention sink
               (train.py --contrast input --attn explicit): any task, no annotation beyond CAT's.
  tgt-<any>    not in the paper: one of the paper's settings above (not vanilla, attr- or in-) with Eq. 10 over the
               rows that predict an answer token only (train.py --rows target), not those inside the input; the
               starting C/N is taken over those rows.
  The attr-, in- and tgt- settings are never the chosen setting, which answers for CAT as published.
Data: stg_s / stg_m / stg_l / stg_h are the authors' files (their repository, github.com/Kairong-Han/CAT, folders
STG and STG_H; --authors-data names its folder); gen-<name> is our generator's (stg.py: gen-stg_s, gen-stg_m, ...),
to see whether the data source matters. Table 2's tasks are the authors' annotated files too: mawps, svamp, arc_e
(each with its own val file, which then chooses), mawps-gpt4o (Table 5: the same records with GPT-4o's annotations;
its vanilla runs are mawps's) and gsm8k-val (the stand-in for the unpublished GSM8K training annotations;
experiments/tables.py puts them in Table 2's and Table 5's layout). The queue runs vanilla and the second setting
seed by seed first, so that every finished prefix compares something; a finished run (results.json) is skipped, an
interrupted one resumed.
--only picks runs of the queue and their order (e.g. --only 'stg_m-k3-*,stg_m-k2-s1'); the study stays the same.
The same command started twice shares the queue (each worker takes the next run no live worker holds): on a 2-core
CPU, two workers with OMP_NUM_THREADS=1 each.
Each run folder keeps train_config.json, metrics.jsonl, results.json, wall_time.json and outcomes.json (each test
record's answer and whether it was right, for the paired test); weights are not saved (train.py --no-save; with
--keep-weights they are, git-ignored, for eval.py --attention), and the files that copy the data (predictions,
val.jsonl) are ignored by the .gitignore the study writes.
<out>/summary.md and summary.json: per setting α, accuracy and the C/N at the end (mean ± std over seeds), Table 1's
layout for the chosen setting, the paired per-seed OOD difference with a 95 % bootstrap interval over test records
and McNemar's exact test per seed, wall times, the machine and the revision; <out>/figure4_<data>.png.
"""
import argparse
import collections
import contextlib
import dataclasses
import fnmatch
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import eval as evaluation  # noqa: E402
import cli  # noqa: E402
import stg  # noqa: E402
from stg_grid import Job, child_env, items, mean_std, run_job  # noqa: E402

STG_TESTS = {"iid": "STG/spurious_token_game_test3", "ood": "STG/spurious_token_game_ood3_2"}
AUTHORS_FILES = {  # data set -> (training file, {split: test file}) in the authors' repository; a "val" split
    # chooses the setting (Table 2's tasks ship one), else --val-frac carves it out of the training file
    "stg_s": ("STG/spurious_token_game_train3_S", STG_TESTS),
    "stg_m": ("STG/spurious_token_game_train3_M", STG_TESTS),
    "stg_l": ("STG/spurious_token_game_train3", STG_TESTS),
    "stg_h": ("STG_H/STG_H_train", {"iid": "STG_H/STG_H_iid_test", "ood": "STG_H/STG_H_ood_test"}),
    "mawps": ("MAWPS/mawps_train", {"val": "MAWPS/mawps_val", "test": "MAWPS/mawps_test"}),           # GLM-4-air
    "mawps-gpt4o": ("MAWPS/mawps_train_gpt4o", {"val": "MAWPS/mawps_val", "test": "MAWPS/mawps_test"}),  # Table 5
    "svamp": ("SVAMP/svamp_train", {"val": "SVAMP/svamp_val", "test": "SVAMP/svamp_test"}),
    "arc_e": ("ARC_E/ARC_E_train", {"val": "ARC_E/ARC_E_val", "test": "ARC_E/ARC_E_test"}),
    # the annotated GSM8K training file is not published readably: its annotated val file stands in (Table 2, †)
    "gsm8k-val": ("GSM8k/gsm8k_val", {"test": "GSM8k/gsm8k_test", "asdiv": "ASDiv/merged_asdiv",
                                      "mawps_ood": "MAWPS/mawps_ood", "svamp_ood": "SVAMP/svamp_ood"}),
}
# a data set whose records equal another's but for their annotations: vanilla reads no annotation, so its vanilla
# runs are the other's (the same records, seed and code give the same run) and are not run twice
SAME_RECORDS = {"mawps-gpt4o": "mawps"}
MAX_LABELS = 4     # a test file with at most this many distinct answers is a label task: recall per label
KEEP = ("train_config.json", "metrics.jsonl", "results.json", "wall_time.json", "outcomes.json")


@dataclass
class StudyConfig:
    model: str = ""                  # train.py --model (the study: SmolLM2-135M-Instruct, a local folder)
    authors_data: str = ""           # folder with the authors' STG/ and STG_H/ folders (their repository)
    data: str = "stg_s,stg_m"        # comma-separated: stg_s | stg_m | stg_l | stg_h (the authors') | gen-stg_s ...
    settings: str = "vanilla,k2,a0.6,k1.5,k3,div-a0.6"   # see the module docstring; the first two run first
    seeds: str = "42,1,2"            # comma-separated; every setting runs with each
    val_frac: float = 0.2            # training share held out to choose the setting
    device: str = "auto"             # train.py --device
    out: str = "results/alpha-study"  # the run folders, summary and figures
    summary_only: bool = False       # write the summary from the run folders that exist, run nothing
    keep_weights: bool = False       # keep each run's model in its folder (git-ignored), for eval.py --attention
    only: str = ""                   # comma-separated run names or patterns (stg_m-k3-*): run these only, in this
                                     # order; a choice of this call, not of the study (not saved in study_config.json)
    train_args: list = field(default_factory=list)   # passed to every train.py call (after `--`)


# not in the paper: a setting prefix that changes which tokens Eq. 9 or which rows Eq. 10 average over:
# prefix -> (its train.py flags, what it changes)
VARIANTS = {"attr-": (["--contrast", "attributes", "--attn", "explicit"], "N_i over the other attributes"),
            "in-": (["--contrast", "input", "--attn", "explicit"], "N_i over the input but its first token"),
            "tgt-": (["--rows", "target"], "Eq. 10 over the answer's rows only")}


# Figure 4: each prefix's marker, and the line style of its starting C/N
MARKERS = {"attr-": "^", "in-": "v", "tgt-": "D"}
MARKER_NAMES = {"attr-": "triangles", "in-": "down-triangles", "tgt-": "diamonds"}
LINES = {"attr-": "-.", "in-": ":", "tgt-": (0, (3, 1, 1, 1, 1, 1))}


def cn_key(prefix: str) -> str:
    """The summary's key of the starting C/N on a setting prefix's rows and N_i: cn_start, cn_start_attr, ..."""
    return "cn_start" + (f"_{prefix[:-1]}" if prefix else "")


def variant_prefix(setting: str) -> str:
    """The setting's prefix (attr-, in-, tgt-), "" for the paper's rows and N_i."""
    return next((prefix for prefix in VARIANTS if setting.startswith(prefix)), "")


def setting_flags(setting: str) -> list[str]:
    """train.py flags of a setting name: vanilla, k<K>, a<α>, div-a<α>, div-k<K>, and attr-/in-/tgt-<one of those but
    vanilla>."""
    if setting == "vanilla":
        return ["--alpha", "0"]
    prefix = variant_prefix(setting)
    rest = setting[len(prefix):]
    if prefix and rest != "vanilla" and not variant_prefix(rest):
        return setting_flags(rest) + VARIANTS[prefix][0]
    kind, _, value = setting.partition("-") if setting.startswith("div-") else ("hinge", "", setting)
    try:
        number = float(value[1:])
    except ValueError:
        number = -1.0
    if value[:1] not in ("k", "a") or not 0 < number < math.inf:   # NaN fails both
        raise cli.InputError(f"--settings: {setting!r} is not vanilla, k<K>, a<α>, div-a<α> or div-k<K> (K, α > 0), "
                         "nor one of these but vanilla after attr-, in- or tgt-")
    flags = ["--alpha-scale", f"{number:g}"] if value[0] == "k" else ["--alpha", f"{number:g}"]
    return flags + (["--attn-loss", "div"] if kind == "div" else [])


def data_files(cfg: StudyConfig, data: str) -> tuple[Path, dict[str, Path]]:
    """(training file, {split: test file}) of a study data set."""
    if data.startswith("gen-"):
        resolved = stg.resolve_data(data.removeprefix("gen-"))
        return resolved.train, resolved.tests
    if data not in AUTHORS_FILES:
        raise cli.InputError(f"--data {data}: expected one of {', '.join(AUTHORS_FILES)} or gen-<name> (stg.py's)")
    train_stem, tests = AUTHORS_FILES[data]
    path = {split: Path(cfg.authors_data) / f"{stem}.jsonl" for split, stem in {"train": train_stem, **tests}.items()}
    missing = [p for p in path.values() if not p.is_file()]
    if missing:
        raise cli.InputError(f"{missing[0]} not found: --authors-data names the folder of the authors' repository "
                             "(github.com/Kairong-Han/CAT), which holds STG/, STG_H/, MAWPS/, ...")
    return path.pop("train"), path


def main_split(splits) -> str:
    """The split a study compares on: OOD where there is one (STG), else the test file."""
    return "ood" if "ood" in splits else "test" if "test" in splits else list(splits)[-1]


def run_name(data: str, setting: str, seed: int) -> str:
    return f"{data}-{setting}-s{seed}"


def run_source(cfg: StudyConfig, data: str, setting: str) -> str:
    """The data set whose run folders hold `setting`'s runs for `data`: vanilla reads no annotation, so a data set
    that differs from another of the study by its annotations alone (SAME_RECORDS) shares that one's vanilla runs."""
    shared = SAME_RECORDS.get(data)
    return shared if setting == "vanilla" and shared in items(cfg.data) else data


def jobs(cfg: StudyConfig, out: Path) -> list[Job]:
    """The queue: per data set, the first two settings seed by seed, then the rest seed by seed."""
    settings, seeds, queue = items(cfg.settings), items(cfg.seeds, int), []
    for data in items(cfg.data):
        train_file, tests = data_files(cfg, data)
        for group in (settings[:2], settings[2:]):
            for seed in seeds:
                for setting in group:
                    if run_source(cfg, data, setting) != data:
                        continue
                    name = run_name(data, setting, seed)
                    val_frac = 0.0 if "val" in tests else cfg.val_frac   # the task's own val file, else a share
                    queue.append(Job(out / name, [[
                        sys.executable, str(ROOT / "train.py"), "--model", cfg.model, "--data", str(train_file),
                        "--test", ",".join(f"{s}={p}" for s, p in tests.items()), "--val-frac", str(val_frac),
                        "--seed", str(seed), "--device", cfg.device, "--out", str(out), "--name", name,
                        # a checkpoint at the end of every epoch, kept until the run is tested: a stopped run
                        # (a session's end) resumes from there (run_job), even one stopped while it is tested
                        *([] if cfg.keep_weights else ["--no-save"]), "--save-every", "0", *setting_flags(setting),
                        *cfg.train_args]]))
    return queue


@contextlib.contextmanager
def claim(run: Path):
    """Hold <out>/.claims/<run> while this process runs `run`, so that several workers of one study (the same command
    started twice, e.g. with OMP_NUM_THREADS=1 each on two cores) share its queue: yields False when a live process
    holds the run already. A claim whose process is gone (a killed worker) is taken over."""
    path = run.parent / ".claims" / run.name
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(path.read_text() or 0)
                os.kill(holder, 0)          # raises when no such process
                alive = holder != os.getpid()
            except (ValueError, ProcessLookupError, FileNotFoundError):
                alive = False
            except PermissionError:         # a process of another user
                alive = True
            if alive:
                yield False
                return
            path.unlink(missing_ok=True)    # a stale claim: take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def collect_outcomes(run: Path) -> None:
    """outcomes.json: per split, each test record's answer and correctness (the predictions copy the inputs). The
    splits are results.json's: a split's name may hold "_" (gsm8k-val's mawps_ood, svamp_ood), as the data's does."""
    name, results = next(iter(json.loads((run / "results.json").read_text()).items()))
    outcomes = {}
    for split in results:
        rows = stg.read_records(evaluation.predictions_path(run, name, split))
        outcomes[split] = {"answer": [r["answer"] for r in rows], "correct": [bool(r["correct"]) for r in rows]}
    cli.write_text(run / "outcomes.json", json.dumps(outcomes) + "\n")


# ---------------------------------------------------------------------------------------------
# Summary

def read_run(run: Path) -> dict | None:
    """What the summary needs of one finished run, None when it has not finished."""
    if not (run / "results.json").exists() or not (run / "outcomes.json").exists():
        return None
    config = json.loads((run / "train_config.json").read_text())
    results = next(iter(json.loads((run / "results.json").read_text()).values()))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last_epoch = [m for m in metrics if m["epoch"] == metrics[-1]["epoch"] and m["cn_ratio"] is not None]
    first_epoch = [m for m in metrics if m["epoch"] == metrics[0]["epoch"]]
    wall = run / "wall_time.json"
    timing = json.loads(wall.read_text()) if wall.exists() else {"seconds": None, "attempts": [{}]}
    last = timing["attempts"][-1]
    return {"alpha": config["alpha"], "cn_start": config["extra"].get("cn_ratio_at_start", {}).get("median"),
            "cn_end": statistics.fmean(m["cn_ratio"] for m in last_epoch) if last_epoch else None,
            "l_attn_first": statistics.fmean(m["l_attn"] for m in first_epoch),    # where γ = 1: the hinge's
            "l_next_first": statistics.fmean(m["l_next"] for m in first_epoch),    # weight beside the task's loss
            "accuracy": {s: r["accuracy"] for s, r in results.items()},
            "majority": {s: r["majority"] for s, r in results.items()},
            "outcomes": json.loads((run / "outcomes.json").read_text()),
            "seconds": timing["seconds"], "revision": last.get("revision"), "threads": last.get("threads"),
            "machine": last.get("machine"),
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in metrics), "dtype": config["dtype"]}


def split_outcomes(folder: Path, study: StudyConfig, data: str, setting: str, split: str, test_file: Path,
                   records: int) -> list[dict]:
    """outcomes[split] ({"answer", "correct"} per test record) of each finished seed of `setting` on `data`, in seed
    order; InputError when a run answered another number of records than `test_file` holds (another data folder)."""
    runs = [r for seed in items(study.seeds, int)
            if (r := read_run(folder / run_name(run_source(study, data, setting), setting, seed)))]
    outcomes = [run["outcomes"][split] for run in runs]
    if any(len(o["answer"]) != records for o in outcomes):
        raise cli.InputError(f"{folder}: the runs of {setting} answered another number of records than {test_file} "
                             "holds; is --authors-data the folder they were run on?")
    return outcomes


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar test of paired outcomes: the records that only one of the two got right."""
    only_a, only_b = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired_difference(cat: dict, vanilla: dict, split: str, resamples: int = 2000) -> dict:
    """CAT − vanilla accuracy on `split`, seed by seed on the same test records, and a 95 % bootstrap interval of
    its mean over seeds (the test records resampled, the same draw for every seed)."""
    seeds = sorted(set(cat) & set(vanilla))
    if not seeds:
        return {}
    diffs = np.array([np.array(cat[s]["outcomes"][split]["correct"], float)
                      - np.array(vanilla[s]["outcomes"][split]["correct"], float) for s in seeds])   # (S, n)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, diffs.shape[1], size=(resamples, diffs.shape[1]))
    means = diffs[:, draws].mean(axis=(0, 2))
    return {"seeds": seeds, "per_seed": dict(zip(map(str, seeds), diffs.mean(axis=1).tolist())),
            "mean": float(diffs.mean()), "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "mcnemar_p": {str(s): mcnemar_p(cat[s]["outcomes"][split]["correct"],
                                            vanilla[s]["outcomes"][split]["correct"]) for s in seeds}}


def recall_by_label(cfg: StudyConfig, data: str, split: str, runs: dict) -> dict:
    """What the accuracy on `split` is made of, for a label task (STG_E: "High Risk" / "Low Risk"): per gold answer,
    the share of its test records each setting got right, mean ± std over seeds. Reads the test file for the gold
    answers (they are not committed with the runs), so {} when it is not readable here (--authors-data), when the
    task has more than MAX_LABELS distinct answers, or when the runs answered another number of records."""
    try:
        gold = [str(r["target"]).strip() for r in stg.read_records(data_files(cfg, data)[1][split])]
    except (cli.InputError, KeyError):
        return {}
    counts = collections.Counter(gold)
    labels = sorted(counts, key=lambda label: (-counts[label], label))      # the majority answer first
    if len(labels) > MAX_LABELS:
        return {}
    rows = {}
    for st, by_seed in runs.items():
        outcomes = [run["outcomes"][split]["correct"] for run in by_seed.values()]
        if not outcomes or any(len(correct) != len(gold) for correct in outcomes):
            continue
        rows[st] = {label: mean_std([statistics.fmean(c for c, g in zip(correct, gold) if g == label)
                                     for correct in outcomes]) for label in labels}
    return {"labels": {label: counts[label] for label in labels}, "rows": rows} if rows else {}


def machine() -> str:
    """The CPU's model name, core count and whether it multiplies bf16 natively (what a wall time depends on: two
    CPUs of one model name can differ there, and on a CPU --dtype auto picks bf16 or float32 by it)."""
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores, {'native' if cli.native_bf16_cpu() else 'no native'} bf16"


def git_revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def summarize(cfg: StudyConfig, out: Path) -> dict:
    settings, seeds = items(cfg.settings), items(cfg.seeds, int)
    summary = {"config": study_fields(cfg), "data": {}}
    finished = {}    # run name -> its run, each read once (a shared vanilla run serves two data sets)
    for data in items(cfg.data):
        runs = {st: {} for st in settings}
        for st in settings:
            for s in seeds:
                name = run_name(run_source(cfg, data, st), st, s)
                if name not in finished and (run := read_run(out / name)) is not None:
                    finished[name] = run
                if name in finished:
                    runs[st][s] = finished[name]
        a_run_per_seed = {s: r for by_seed in runs.values() for s, r in by_seed.items()}   # a seed: one val split
        any_run = next(iter(a_run_per_seed.values()), None)
        splits = sorted(any_run["accuracy"], key=lambda s: s != "val") if any_run else []   # val first
        main = main_split(splits) if splits else None
        rows = {}
        for st, by_seed in runs.items():
            if by_seed:
                rows[st] = {"seeds": sorted(by_seed), "alpha": mean_std([r["alpha"] for r in by_seed.values()]),
                            **{s: mean_std([r["accuracy"][s] for r in by_seed.values()]) for s in splits},
                            "cn_end": mean_std([r["cn_end"] for r in by_seed.values() if r["cn_end"] is not None]
                                               or [float("nan")]),
                            "l_attn_first": mean_std([r["l_attn_first"] for r in by_seed.values()]),
                            "l_next_first": mean_std([r["l_next_first"] for r in by_seed.values()]),
                            "minutes": mean_std([r["seconds"] / 60 for r in by_seed.values() if r["seconds"]]
                                                or [float("nan")])}
        cats = [st for st in rows
                if st != "vanilla" and not variant_prefix(st) and len(rows[st]["seeds"]) == len(seeds)]
        chosen = max(cats, key=lambda st: rows[st]["val"]["mean"]) if cats else None   # a tie: the earlier setting
        summary["data"][data] = {
            "rows": rows, "chosen": chosen, "splits": splits, "main_split": main,
            # the val split is drawn per seed, so its majority answer's accuracy is averaged over the seeds' splits
            "majority": {s: statistics.fmean(run["majority"][s] for run in a_run_per_seed.values()) for s in splits},
            # the starting C/N of the paper's rows and N_i, and of each variant's on its own scale (cn_start_attr, ...)
            **{cn_key(prefix):
               mean_std([r["cn_start"] for st, by in runs.items() if variant_prefix(st) == prefix
                         for r in by.values() if r["cn_start"]] or [float("nan")])
               for prefix in ["", *VARIANTS] if not prefix or any(variant_prefix(st) == prefix for st in rows)},
            "paired": {st: paired_difference(runs[st], runs["vanilla"], main) for st in rows if st != "vanilla"}
            if "vanilla" in runs else {},
            "recall": recall_by_label(cfg, data, main, runs) if main else {},
            "paired_by_split": {st: {s: paired_difference(runs[st], runs["vanilla"], s) for s in splits if s != "val"}
                                for st in rows if st != "vanilla"} if "vanilla" in runs else {}}
    saved = out / "study_config.json"
    summary["revision"] = json.loads(saved.read_text()).get("revision") if saved.exists() else None
    # revision / machine -> its runs (a run that recorded no revision: the study's)
    revisions, threads, machines, precisions = {}, set(), {}, {}
    for name, run in finished.items():
        revisions.setdefault(run["revision"] or summary["revision"], []).append(name)
        threads.add(run["threads"] or "not recorded")
        machines.setdefault(run["machine"] or "not recorded", []).append(name)
        precisions.setdefault(run["dtype"] or "not recorded", []).append(name)
    summary["revisions"], summary["threads"], summary["machines"] = revisions, sorted(map(str, threads)), machines
    summary["precisions"] = precisions
    return summary


def difference(paired: dict | None) -> str:
    """A paired difference in points with its 95 % interval: "+3.42 (+1.08, +5.83)"; "—" when there is none."""
    if not paired:
        return "—"
    return f"{100 * paired['mean']:+.2f} ({100 * paired['ci95'][0]:+.2f}, {100 * paired['ci95'][1]:+.2f})"


def pct(stat: dict | None) -> str:
    if not stat or stat["mean"] != stat["mean"]:
        return "—"
    return f"{100 * stat['mean']:.2f}" + (f" ± {100 * stat['std']:.2f}" if stat["std"] is not None else "")


def number(stat: dict | None, digits: int = 2) -> str:
    if not stat or stat["mean"] != stat["mean"]:
        return "—"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def with_runs(value, names: list[str]) -> str:
    """"value (3 runs)": a revision, machine or precision and how many runs had it."""
    return f"{value} ({len(names)} run{'s' * (len(names) != 1)})"


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    revisions = summary.get("revisions") or {summary["revision"]: []}
    regime = "LoRA" if "--lora" in cfg["train_args"] else "full fine-tuning"
    lines = [f"# α study: {Path(cfg['model']).name}, {regime}", "",
             "Revision " + "; ".join(with_runs(rev, names) if len(revisions) > 1 else str(rev)
                                     for rev, names in revisions.items())
             + "; runs on " + ("; ".join(with_runs(m, n) for m, n in summary.get("machines", {}).items())
                               or "—")
             + f", torch threads per run: {', '.join(summary.get('threads', [])) or '—'}"
             + ", precision: " + (", ".join(with_runs(dtype, n) for dtype, n in summary.get("precisions", {}).items())
                                  or "—")
             + ". Command: `python experiments/alpha_study.py "
             f"--model {cfg['model']} --authors-data <folder> --data {cfg['data']} --settings {cfg['settings']} "
             f"--seeds {cfg['seeds']} --out {cfg['out']}" + (" -- " + " ".join(cfg["train_args"]) if cfg["train_args"]
                                                              else "") + "`.", ""]
    if len(summary.get("precisions", {})) > 1:
        lines += ["**These runs differ in precision**: a paired difference between runs of different precision mixes "
                  "the precision's effect with the setting's (bf16 autocast and float32 learn the first epoch at "
                  "different speeds: docs/findings.md). Pin it with "
                  "`-- --dtype float32` or `-- --dtype bfloat16`, one study folder per precision.", ""]
    for data, d in summary["data"].items():
        if not d["rows"]:
            lines += [f"## {data}", "", "No run has finished yet.", ""]
            continue
        splits, main = d["splits"], d["main_split"]
        lines += [f"## {data}", "",
                  f"C/N of the causal rows before training: median {number(d['cn_start'], 3)} (over runs). "
                  "Majority baseline: " + ", ".join(f"{s} {100 * d['majority'][s]:.2f} %" for s in splits) + ".", "",
                  "| setting | seeds | α | " + " | ".join(splits) + " | C/N at the end | L_attn / L_next, first epoch "
                  f"| {main} − vanilla (95 % CI) | minutes per run |", "|---" * (len(splits) + 7) + "|"]
        for st, row in d["rows"].items():
            diff = difference(d["paired"].get(st))
            mark = " (chosen on val)" if st == d["chosen"] else ""
            lines.append(f"| {st}{mark} | {len(row['seeds'])} | {number(row['alpha'], 3)} | "
                         + " | ".join(pct(row[s]) for s in splits) + f" | {number(row['cn_end'])} | "
                         f"{number(row['l_attn_first'])} / {number(row['l_next_first'])} | {diff} | "
                         f"{number(row['minutes'], 1)} |")
        for prefix, (flags, what) in VARIANTS.items():
            if cn_key(prefix) in d:
                lines += ["", f"{prefix}…: not in the paper; {what} (train.py {' '.join(flags)}), so their α "
                          f"and C/N are on that scale: C/N before training median {number(d[cn_key(prefix)], 3)}. "
                          "Never the chosen setting."]
        if d["chosen"]:
            paired = d["paired"][d["chosen"]]
            lines += ["", f"Paired per seed ({main}, CAT {d['chosen']} − vanilla): "
                      + ", ".join(f"seed {s}: {100 * v:+.2f} (McNemar p = {paired['mcnemar_p'][s]:.3f})"
                                  for s, v in paired["per_seed"].items()) + "."]
        if d.get("recall"):
            labels = d["recall"]["labels"]
            lines += ["", f"What the {main} accuracy is made of: per gold answer, the share of its records answered "
                      "right.", "", "| setting | " + " | ".join(f"{label} ({n} records)" for label, n in labels.items())
                      + " |", "|---" * (len(labels) + 1) + "|"]
            lines += [f"| {st} | " + " | ".join(pct(row[label]) for label in labels) + " |"
                      for st, row in d["recall"]["rows"].items()]
        lines.append("")
    return "\n".join(lines)


def name_points(ax, points: list[tuple[str, float, float]]) -> None:
    """Each (name, x, y) written beside its point. Settings at close α crowd (k1.5, a0.6 and div-a0.6 near 0.6):
    from the lowest up, a name that would overprint one already placed near the same x moves up a line, joined to
    its point by a thin line."""
    (x_lo, x_hi), (y_lo, y_hi) = ax.get_xlim(), ax.get_ylim()
    line, near = 0.045 * (y_hi - y_lo), 0.1 * (x_hi - x_lo)
    placed = []
    for name, x, y in sorted(points, key=lambda point: point[2]):
        at = y
        while any(abs(px - x) < near and abs(py - at) < line for px, py in placed):
            at += line
        placed.append((x, at))
        ax.annotate(name, (x, y), xytext=(x + 0.015 * (x_hi - x_lo), at), textcoords="data", fontsize=7,
                    va="center", arrowprops=dict(arrowstyle="-", lw=0.5, color="gray") if at != y else None)


def figure(summary: dict, out: Path) -> list[Path]:
    """Figure 4's layout per data set: accuracy against α (vanilla at 0), and the C/N at the end against α."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): the numbers are in summary.md, no figure")
        return []
    paths = []
    for data, d in summary["data"].items():
        if not d["rows"]:
            continue
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        colors = dict(zip([s for s in d["splits"] if s != "val"], ("tab:blue", "tab:red", "tab:purple", "tab:orange",
                                                                    "tab:brown", "tab:olive")))
        names = []    # (setting, α, accuracy on the main split): where each setting's name goes
        for st, row in d["rows"].items():
            x = 0.0 if st == "vanilla" else row["alpha"]["mean"]
            marker = MARKERS.get(variant_prefix(st)) or ("s" if st.startswith("div") else "o")
            for split, color in colors.items():
                left.errorbar(x, 100 * row[split]["mean"], yerr=100 * (row[split]["std"] or 0), fmt=marker,
                              color=color, capsize=3)
            right.errorbar(x, row["cn_end"]["mean"], yerr=row["cn_end"]["std"] or 0, fmt=marker, color="tab:green",
                           capsize=3)
            names.append((st, x, 100 * row[d["main_split"]]["mean"]))
        for split, color in colors.items():
            left.axhline(100 * d["majority"][split], color=color, ls=":", lw=1)
            left.plot([], [], "o", color=color, label=split)
        left.plot([], [], ":", color="gray", label="majority baseline")
        name_points(left, names)
        shown = [prefix for prefix in VARIANTS if cn_key(prefix) in d]     # the variants with runs
        left.set(xlabel="α (vanilla at 0; squares: the authors' div loss"
                 + "".join(f";\n{MARKER_NAMES[p]}: {VARIANTS[p][1]}" for p in shown) + ")",
                 ylabel="accuracy (%)",
                 title=f"{data}: accuracy, mean ± std over seeds")
        left.legend(fontsize=8)
        if d["cn_start"]["mean"] == d["cn_start"]["mean"]:
            right.axhline(d["cn_start"]["mean"], color="gray", ls="--", lw=1, label="median C/N before training")
        for prefix in shown:          # these markers' C/N is on the scale of their own rows and N_i
            right.axhline(d[cn_key(prefix)]["mean"], color="gray", ls=LINES[prefix], lw=1,
                          label=f"the same, with {VARIANTS[prefix][1]}")
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize=8)
        right.set(xlabel="α", ylabel="mean C/N of the causal rows, last epoch", title="did attention move?")
        fig.tight_layout()
        path = out / f"figure4_{data}.png"
        with cli.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------

def write_summary(cfg: StudyConfig, out: Path) -> dict:
    """The study's summary from its run folders, written to <out>/summary.json and summary.md."""
    summary = summarize(cfg, out)
    cli.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    cli.write_text(out / "summary.md", markdown(summary))
    return summary


def study_fields(cfg: StudyConfig) -> dict:
    """The fields that define the study (what study_config.json and the summary record): all but --only."""
    fields = dataclasses.asdict(cfg)
    fields.pop("only")
    return fields


def selected(queue: list[Job], only: str) -> list[Job]:
    """The runs of the queue that --only names (run names or fnmatch patterns), in the order of its items."""
    if not only:
        return queue
    picked = []
    for pattern in items(only):
        matches = [job for job in queue if fnmatch.fnmatchcase(job.run.name, pattern)]
        if not matches:
            raise cli.InputError(f"--only {pattern}: no run of this study is named so; its runs are "
                                 f"{', '.join(job.run.name for job in queue)}")
        picked += [job for job in matches if job not in picked]
    return picked


def saved_config(out: Path) -> StudyConfig:
    """The configuration a study folder was run with (its study_config.json), with `out` where it is now. A damaged
    file (a merge conflict, a hand edit) raises InputError naming it and the first field that is not the study's."""
    path = Path(out) / "study_config.json"
    saved = cli.read_json(path, "restore it from git")
    if not isinstance(saved, dict):
        raise cli.InputError(f"{path} is damaged: not the JSON object alpha_study.py writes; restore it from git")
    saved.pop("revision", None)
    fields = {f.name: f.type for f in dataclasses.fields(StudyConfig)}
    for key, value in saved.items():
        kind = fields.get(key)
        if kind is None or not (isinstance(value, kind) if kind is not float else
                                isinstance(value, (int, float)) and not isinstance(value, bool)):
            found = f"{key} is {json.dumps(value)}, not the {kind.__name__} alpha_study.py writes" if kind else \
                f"{key!r} is no setting of alpha_study.py's"
            raise cli.InputError(f"{path} is damaged: {found}; restore it from git")
    return StudyConfig(**{**saved, "out": str(out), "summary_only": True})


def parse_args(argv=None) -> StudyConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = cli.config_parser(StudyConfig, __doc__, skip=("train_args",))
    cfg = StudyConfig(**vars(p.parse_args(argv[:cut])), train_args=argv[cut + 1:])
    for setting in items(cfg.settings):
        setting_flags(setting)
    saved_path = Path(cfg.out) / "study_config.json"
    if cfg.summary_only and saved_path.is_file():   # main then reads the study from there: a flag would be ignored
        saved = cli.read_json(saved_path, "restore it from git, or give the study's flags without --summary-only")
        if not isinstance(saved, dict):
            raise cli.InputError(f"{saved_path} is damaged: not the JSON object alpha_study.py writes; restore it "
                                 "from git")
        unset = object()   # argparse fills in a default only where the namespace has no value: what is left was given
        given = vars(p.parse_args(argv[:cut], namespace=argparse.Namespace(
            **{action.dest: unset for action in p._actions if action.dest != "help"})))
        study = {**dataclasses.asdict(StudyConfig()), **saved}   # a key an older file lacks: its default, as main
        given = {name: value for name, value in given.items() if value is not unset
                 and name not in ("out", "summary_only", "only") and value != study[name]}
        if cut < len(argv) and cfg.train_args != study["train_args"]:
            given["train_args"] = " ".join(cfg.train_args) or "(none)"
        if given:
            name, value = next(iter(given.items()))
            flag = "the train.py flags after --" if name == "train_args" else f"--{name.replace('_', '-')}"
            raise cli.InputError(f"{flag} {value}: --summary-only reads the study's own {saved_path} (which has "
                                 f"{json.dumps(study[name])}), so a flag that defines another study is not used; drop "
                                 "it, or leave out --summary-only to run that study in another --out")
    if not cfg.summary_only and not cfg.model:
        p.error("--model: the model to fine-tune (a folder, alias or hub id)")
    if not cfg.summary_only:   # every run would fail at its start, each saying so only in its own log.txt
        cli.check_numbers(cfg)
        cli.check_device(cfg.device)
        if not 0 <= cfg.val_frac < 1:
            raise cli.InputError(f"--val-frac {cfg.val_frac}: must be in [0, 1)")
        try:
            seeds = items(cfg.seeds, int)
        except ValueError:
            raise cli.InputError(f"--seeds {cfg.seeds!r}: comma-separated whole numbers, e.g. 42,1,2") from None
        if not seeds or not items(cfg.settings) or not items(cfg.data):
            raise cli.InputError("--seeds, --settings and --data each need at least one item")
        if any(not 0 <= seed < 2**32 for seed in seeds):
            raise cli.InputError(f"--seeds {cfg.seeds}: each must be between 0 and {2**32 - 1}")
    return cfg


def main(argv=None) -> Path:
    cfg = parse_args(argv)
    out = cli.check_output(cfg.out, "--out", folder=True)
    if not cfg.summary_only and out.is_dir() and any(out.iterdir()) and not (out / "study_config.json").exists():
        raise cli.InputError(f"--out {out}: the folder holds other files and no study_config.json; give a new "
                             "folder, or the folder of the study to continue")
    config_path = out / "study_config.json"
    if not cfg.summary_only and config_path.exists():   # its finished runs are skipped, taken as this study's own
        saved = saved_config(out)
        for name in ("model", "val_frac", "train_args"):   # what every run of the study was trained with
            if getattr(cfg, name) != getattr(saved, name):
                flag = "the train.py flags after --" if name == "train_args" else f"--{name.replace('_', '-')}"
                value = (" ".join(cfg.train_args) or "(none)") if name == "train_args" else getattr(cfg, name)
                raise cli.InputError(f"{flag} {value}: {config_path} has {json.dumps(getattr(saved, name))}, and the "
                                     "study's finished runs would count as this study's; give this study another "
                                     f"--out, or the study's own {flag}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.summary_only and config_path.exists():   # the committed configuration, with this run's --out
        cfg = saved_config(out)
    if not cfg.summary_only:
        queue = selected(jobs(cfg, out), cfg.only)     # a mistake in --only stops here, before a file is written
        # the revision the runs come from (run the study from a worktree at a commit)
        config = {**study_fields(cfg), "revision": git_revision()}
        cli.write_text(config_path, json.dumps(config, indent=2) + "\n")
        cli.write_text(out / ".gitignore", "# written by alpha_study.py: only the small files of each run\n*/*\n"
                       + "".join(f"!*/{name}\n" for name in KEEP))
        env = child_env(jobs=1)   # one run at a time, with every core (OMP_NUM_THREADS, when set, wins)
        for job in queue:
            with claim(job.run) as mine:
                if not mine:
                    print(f"{job.run.name}: taken by another worker of this study", flush=True)
                    continue
                outcome = run_job(job, env, record={"revision": config["revision"], "machine": machine(),
                                                    "threads": int(env["OMP_NUM_THREADS"])})
                if outcome["status"] == "done":
                    collect_outcomes(job.run)
            print(f"{job.run.name}: {outcome['status']}" + (f" in {outcome['seconds']:.0f} s"
                                                            if outcome.get("seconds") else ""), flush=True)
            write_summary(cfg, out)    # after every run, so that the summary is never behind the runs
    summary = write_summary(cfg, out)
    figure(summary, out)
    print(markdown(summary))
    return out


if __name__ == "__main__":
    cli.run_cli(main)
