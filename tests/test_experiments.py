"""experiments/stg_grid.py: the aggregation against hand-computed numbers, and one smoke run of the whole grid
(a tiny scratch model, one data set, one seed, two α) that checks α selection reads only the validation split,
the summary's rows and majority baseline, and that a second run skips every finished run."""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import batches  # noqa: E402
import hf  # noqa: E402
import runs  # noqa: E402
import variants  # noqa: E402
import cli  # noqa: E402
import stg  # noqa: E402
import stg_grid  # noqa: E402

GRID = ROOT / "experiments" / "stg_grid.py"


def write_jsonl(path: Path, records: list[dict]) -> None:
    cli.write_jsonl(path, records)


def write_results(run: Path, payload: dict) -> None:
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(payload))


# ---------------------------------------------------------------------------------------------
# Aggregation on hand-made run folders

def test_summary_means_majority_selection_and_verdicts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stub = {"input": "x Answer: ", "target": "Low Risk"}
    write_jsonl(tmp_path / "data/stg_s_train.jsonl", [stub])
    write_jsonl(tmp_path / "data/stg_h_train.jsonl", [stub])
    # STG_E IID: 7 of 10 "Low Risk" -> 0.7; OOD: 6 of 10 "High Risk" -> 0.6
    write_jsonl(tmp_path / "data/stg_e_test_iid.jsonl", [{"input": "q", "target": "Low Risk"}] * 7
                + [{"input": "q", "target": "High Risk"}] * 3)
    write_jsonl(tmp_path / "data/stg_e_test_ood.jsonl", [{"input": "q", "target": "High Risk"}] * 6
                + [{"input": "q", "target": "Low Risk"}] * 4)
    # STG_H: AQI 40, 40, 45, 50 -> always 40: accuracy 0.5, MAE (0 + 0 + 5 + 10) / 4 = 3.75
    for split in ("iid", "ood"):
        write_jsonl(tmp_path / f"data/stg_h_test_{split}.jsonl", [{"input": "q", "target": t} for t in
                                                                  ("40", "40", "45", "50")])
    out = tmp_path / "grid"
    seeds = [42, 1, 2]
    # stg_s OOD: vanilla 0.60/0.62/0.64 (std 0.02), CAT 0.70/0.72/0.74: ahead by 10 points, more than the std
    # stg_h OOD: vanilla 0.10/0.20/0.30 (std 0.10), CAT 0.05/0.15/0.25: behind by 5 points
    acc = {("stg_s", "vanilla"): [0.60, 0.62, 0.64], ("stg_s", "cat"): [0.70, 0.72, 0.74],
           ("stg_h", "vanilla"): [0.10, 0.20, 0.30], ("stg_h", "cat"): [0.05, 0.15, 0.25]}
    mae = [4.0, 5.0, 9.0]
    for (data, method), values in acc.items():
        for seed, a, e in zip(seeds, values, mae):
            split_result = {"accuracy": a, "n": 10 if data == "stg_s" else 4, **({"mae": e} if data == "stg_h" else {})}
            write_results(out / f"{data}-{method}-s{seed}", {data: {"iid": split_result, "ood": split_result}})
    # selection: stg_s has a tie at the top (α 0.15 and 0.35) -> the smaller; stg_h's best is 0.35
    val = {"stg_s": [0.5, 0.8, 0.6, 0.8], "stg_h": [0.1, 0.2, 0.3, 0.4]}
    for data, values in val.items():
        for alpha, a in zip((0.05, 0.15, 0.25, 0.35), values):
            write_results(out / f"{data}-select-a{alpha:g}-s42", {"val": {"test": {"accuracy": a, "n": 8}}})
    (out / "stg_s-vanilla-s42" / "wall_time.json").write_text(json.dumps({"seconds": 12.5, "attempts": []}))

    cfg = stg_grid.GridConfig(data="stg_s,stg_h", out=str(out))
    summary = stg_grid.summarize(cfg, out)

    cell = summary["table"]["vanilla ood"]["stg_s"]
    assert cell["mean"] == pytest.approx(0.62) and cell["std"] == pytest.approx(0.02) and cell["n"] == 3
    # Average: each seed's mean over the two data sets, then mean ± std over seeds
    per_seed = [statistics.fmean([s, h]) for s, h in zip(acc["stg_s", "cat"], acc["stg_h", "cat"])]
    assert summary["table"]["cat iid"]["average"]["mean"] == pytest.approx(statistics.fmean(per_seed))
    assert summary["table"]["cat iid"]["average"]["std"] == pytest.approx(statistics.stdev(per_seed))
    assert summary["stg_h_mae"]["cat ood"]["mean"] == pytest.approx(6.0)
    assert summary["majority"]["stg_s"]["iid"]["accuracy"] == pytest.approx(0.7)
    assert summary["majority"]["stg_s"]["ood"]["accuracy"] == pytest.approx(0.6)
    assert summary["majority"]["stg_h"]["ood"] == {"answer": "40", "accuracy": 0.5, "n": 4, "mae": 3.75}
    assert summary["selection"]["stg_s"]["alpha"] == 0.15      # tie between 0.15 and 0.35 -> the smaller
    assert summary["selection"]["stg_h"]["alpha"] == 0.35
    assert "more than the seed std (2.00)" in summary["verdicts"]["stg_s"]
    assert "CAT falls behind by 5.00 points" in summary["verdicts"]["stg_h"]
    assert summary["wall_times"] == [{"run": "stg_s-vanilla-s42", "seconds": 12.5}]

    md = stg_grid.markdown(summary)
    assert "| Vanilla | OOD | 62.00 ± 2.00 | 20.00 ± 10.00 |" in md
    assert "| majority baseline | IID | 70.00 | 50.00 | 60.00 |" in md
    assert "| paper: TinyLlama-1.1B Full CAT | OOD | 63.75 | 6.10 | 34.92 |" in md
    assert "| STG_S | 50.00 | 80.00 | 60.00 | 80.00 | 0.15 |" in md


def test_verdict_within_seed_noise():
    sentence = stg_grid.verdict("stg_m", {"mean": 0.65, "std": 0.03}, {"mean": 0.64, "std": 0.01}, 0.665)
    assert "ahead by 1.00 points, less than the seed std (3.00): within seed noise" in sentence


def test_flags_the_grid_sets_are_refused_after_the_separator():
    with pytest.raises(SystemExit):
        stg_grid.parse_args(["--data", "stg_s", "--", "--alpha", "0.3"])
    cfg = stg_grid.parse_args(["--data", "stg_s", "--", "--epochs", "1"])
    assert cfg.train_args == ["--epochs", "1"]


# ---------------------------------------------------------------------------------------------
# The whole pipeline, tiny

def test_smoke_grid_selects_on_validation_and_resumes(tmp_path):
    """~1.5 minutes on 2 cores: 2 selection runs (train + eval), vanilla and CAT, attention for both, then again."""
    data = tmp_path / "data"
    train = stg.make_records("stg_s_train", 42)[:60]
    write_jsonl(data / "stg_s_train.jsonl", train)
    for split in ("iid", "ood"):
        write_jsonl(data / f"stg_e_test_{split}.jsonl", stg.make_records(f"stg_e_test_{split}", 42)[:20])
    alphas = (1.5, 3.0)
    command = [sys.executable, str(GRID), "--model", "scratch", "--data", "stg_s", "--seeds", "42",
               "--alphas", ",".join(map(str, alphas)), "--jobs", "2", "--device", "cpu", "--out", "runs/grid",
               "--attention", "--attention-data", "stg_s", "--", "--scratch-dim", "32", "--scratch-layers", "2",
               "--scratch-heads", "2", "--scratch-vocab", "300", "--epochs", "1", "--eval-limit", "10"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "runs/grid"
    summary = json.loads((out / "summary.json").read_text())

    # α selection: validation accuracy of each α, read from runs that saw only the validation split
    selection = summary["selection"]["stg_s"]
    assert selection["alpha"] in alphas
    val_acc = {}
    for alpha in alphas:
        run = out / f"stg_s-select-a{alpha:g}-s42"
        results = json.loads((run / "results.json").read_text())
        assert list(results) == ["val"], "selection runs must be tested on the validation split alone"
        assert not list(run.glob("predictions_stg_s_*")), "a selection run read a test file"
        config = json.loads((run / "train_config.json").read_text())
        assert config["val_frac"] == 0.2 and config["eval"] is False and config["alpha"] == alpha
        val = [json.loads(line) for line in (run / "val.jsonl").read_text().splitlines()]
        assert len(val) == 12 and all(r in train for r in val)
        val_acc[alpha] = results["val"]["test"]["accuracy"]
    assert selection["alpha"] == min(alphas, key=lambda a: (-val_acc[a], a))
    cat_config = json.loads((out / "stg_s-cat-s42" / "train_config.json").read_text())
    assert cat_config["alpha"] == selection["alpha"] and cat_config["val_frac"] == 0.0

    # final runs: tested on IID and OOD; the table's cells are their accuracies (one seed: no std)
    for method in ("vanilla", "cat"):
        run = out / f"stg_s-{method}-s42"
        results = json.loads((run / "results.json").read_text())["stg_s"]
        assert summary["table"][f"{method} ood"]["stg_s"]["mean"] == results["ood"]["accuracy"]
        assert (run / "log.txt").exists() and json.loads((run / "wall_time.json").read_text())["seconds"] > 0
        assert set(summary["attention"][method]["ood"]) == {"causal", "spurious", "irrelevant"}
        if importlib.util.find_spec("matplotlib"):   # eval.py draws Figures 3 and 5 only with matplotlib
            pictures = summary["attention"][method]["pictures"]
            assert len(pictures) == 2 and all((out / p).exists() for p in pictures)

    # majority baseline from the first 10 test records (the runs were tested on those, --eval-limit 10)
    md = (out / "summary.md").read_text()
    for split in ("iid", "ood"):
        targets = [r["target"] for r in stg.read_records(data / f"stg_e_test_{split}.jsonl")[:10]]
        share = max(targets.count(t) for t in set(targets)) / len(targets)
        assert f"| majority baseline | {split.upper()} | {100 * share:.2f} |" in md
    for row in ("| Vanilla | IID |", "| CAT | IID |", "| Vanilla | OOD |", "| CAT | OOD |",
                "| paper: TinyLlama-1.1B Full Vanilla | IID | 62.25 |", "Wall time per run"):
        assert row in md

    # a second run skips every finished run and leaves its files alone
    walls = {p: p.read_text() for p in out.glob("**/wall_time.json")}
    second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped (results.json exists)") == 6   # 2 selection, 2 final, 2 attention
    assert "done in" not in second.stdout
    assert walls == {p: p.read_text() for p in out.glob("**/wall_time.json")}


def test_a_run_stopped_after_an_epoch_resumes_there(tmp_path):
    """run_job, as both experiments call it: a run stopped with a checkpoint (here --stop-after at the end of the
    first epoch, where the study's --save-every 0 writes one, as a session's end would leave it) goes on from that
    checkpoint with train.py --resume, not from nothing; its metrics hold every step once, its wall_time.json both
    attempts."""
    data = tmp_path / "stg_small.jsonl"
    write_jsonl(data, stg.make_records("stg_s_train", 42)[:32])
    command = [sys.executable, str(ROOT / "train.py"), "--model", "scratch", "--data", str(data), "--seed", "42",
               "--scratch-dim", "32", "--scratch-layers", "2", "--scratch-heads", "2", "--scratch-vocab", "300",
               "--epochs", "2", "--batch-size", "8", "--out", str(tmp_path / "runs"), "--name", "run", "--no-save",
               "--save-every", "0", "--eval-limit", "4"]
    job = stg_grid.Job(tmp_path / "runs" / "run", [command + ["--stop-after", "4"]])   # stopped after epoch 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert stg_grid.run_job(job, env)["status"] == "failed"
    assert (job.run / "checkpoint" / "state.pt").exists() and not (job.run / "results.json").exists()
    assert stg_grid.run_job(job, env)["status"] == "done"
    attempts = json.loads((job.run / "wall_time.json").read_text())["attempts"]
    assert [a["resumed"] for a in attempts] == [False, True] and "--resume" in attempts[1]["commands"][0]
    steps = [json.loads(line)["step"] for line in (job.run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9)), steps
    assert not (job.run / "checkpoint").exists() and "stg_small" in json.loads((job.run / "results.json").read_text())


def test_a_killed_attempt_is_counted_at_the_next(tmp_path):
    """run_job puts an attempt on record when it starts, so that one killed without a word (a session's end kills
    the worker) still counts: the next attempt closes it at the last write of its log.txt."""
    run, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    wall = run / "wall_time.json"
    probe = ("import json, sys; a = json.load(open(sys.argv[1]))['attempts']; "
             "sys.exit(7 if a[-1]['seconds'] is None else 0)")
    job = stg_grid.Job(run, [[sys.executable, "-c", probe, str(wall)]])
    assert stg_grid.run_job(job, env)["status"] == "failed"    # exit 7: on record, still open, while it ran
    first = json.loads(wall.read_text())["attempts"][0]
    assert first["returncode"] == 7 and first["seconds"] >= 0 and "killed" not in first
    # what a kill leaves: the attempt as it was while it ran, its log last written 100 s after it started
    del first["returncode"]
    wall.write_text(json.dumps({"seconds": 0.0, "attempts": [{**first, "seconds": None}]}))
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.pt").write_bytes(b"")   # a checkpoint: the next attempt resumes (and fails on it)
    os.utime(run / "log.txt", (first["started"] + 100, first["started"] + 100))
    stg_grid.run_job(job, env)
    timing = json.loads(wall.read_text())
    killed, second = timing["attempts"]
    assert killed["seconds"] == 100.0 and killed["killed"] and second["resumed"] and second["seconds"] > 0
    assert timing["seconds"] == pytest.approx(100.0 + second["seconds"], abs=0.1)


# ---------------------------------------------------------------------------------------------
# experiments/alpha_study.py: its statistics against hand-worked numbers, its queue, its summary of run folders

def alpha_study():
    import alpha_study as module
    return module


def test_mcnemar_exact_against_hand_worked_values():
    study = alpha_study()
    # 3 records only the first got right, none only the second: two-sided 2 × C(3, 0) / 2^3 = 0.25
    assert study.mcnemar_p([True, True, True, False], [False, False, False, False]) == pytest.approx(0.25)
    # 2 against 1: 2 × (C(3, 0) + C(3, 1)) / 8 = 1.0 (capped at 1)
    assert study.mcnemar_p([True, True, False, True], [False, False, True, True]) == pytest.approx(1.0)
    # 6 against 0: 2 / 64
    assert study.mcnemar_p([True] * 6, [False] * 6) == pytest.approx(2 / 64)
    assert study.mcnemar_p([True, False], [True, False]) == 1.0       # no discordant record


def test_paired_difference_is_the_mean_of_per_record_differences():
    study = alpha_study()
    cat = {1: {"outcomes": {"ood": {"correct": [True, True, False, True]}}},
           2: {"outcomes": {"ood": {"correct": [True, False, False, False]}}}}
    vanilla = {1: {"outcomes": {"ood": {"correct": [False, True, False, True]}}},
               2: {"outcomes": {"ood": {"correct": [True, False, True, False]}}},
               3: {"outcomes": {"ood": {"correct": [True, True, True, True]}}}}   # no CAT run: not paired
    paired = study.paired_difference(cat, vanilla, "ood")
    assert paired["seeds"] == [1, 2]
    assert paired["per_seed"] == {"1": pytest.approx(0.25), "2": pytest.approx(-0.25)}
    assert paired["mean"] == pytest.approx(0.0)
    low, high = paired["ci95"]
    assert low <= paired["mean"] <= high and low < high


def fake_authors_data(root: Path) -> Path:
    for stem in {s for train, tests in alpha_study().AUTHORS_FILES.values() for s in (train, *tests.values())}:
        (root / f"{stem}.jsonl").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{stem}.jsonl").write_text('{"input": "1 + 1 = ", "target": "2"}\n')
    return root


def test_the_queue_runs_a_shared_vanilla_once(tmp_path):
    study = alpha_study()
    authors = fake_authors_data(tmp_path / "authors")
    cfg = study.StudyConfig(model="m", authors_data=str(authors), data="mawps,mawps-gpt4o", settings="vanilla,k2",
                            seeds="42,1")
    names = [job.run.name for job in study.jobs(cfg, tmp_path / "out")]
    assert names == ["mawps-vanilla-s42", "mawps-k2-s42", "mawps-vanilla-s1", "mawps-k2-s1",
                     "mawps-gpt4o-k2-s42", "mawps-gpt4o-k2-s1"]
    alone = study.StudyConfig(model="m", authors_data=str(authors), data="mawps-gpt4o", settings="vanilla,k2",
                              seeds="42")
    assert [job.run.name for job in study.jobs(alone, tmp_path / "out")] == ["mawps-gpt4o-vanilla-s42",
                                                                             "mawps-gpt4o-k2-s42"]
    job = study.jobs(cfg, tmp_path / "out")[1]            # mawps k2, seed 42: the task's own val file, no share
    command = job.commands[0]
    assert command[command.index("--val-frac") + 1] == "0.0"
    assert "--no-save" in command
    assert command[command.index("--save-every") + 1] == "0"   # each epoch: a stopped run resumes (run_job)
    cfg.keep_weights = True                               # the model stays in the run folder, for eval.py --attention
    assert "--no-save" not in study.jobs(cfg, tmp_path / "out")[1].commands[0]
    assert command[command.index("--alpha-scale") + 1] == "2"
    assert f"val={authors / 'MAWPS/mawps_val.jsonl'}" in command[command.index("--test") + 1]


def test_only_picks_runs_of_the_queue_in_its_own_order(tmp_path):
    study = alpha_study()
    authors = fake_authors_data(tmp_path / "authors")
    cfg = study.StudyConfig(model="m", authors_data=str(authors), data="mawps,mawps-gpt4o", settings="vanilla,k2",
                            seeds="42,1")
    queue = study.jobs(cfg, tmp_path / "out")
    assert study.selected(queue, "") == queue
    picked = study.selected(queue, "mawps-gpt4o-*,mawps-k2-s1,mawps-k2-*")          # a run named twice runs once
    assert [job.run.name for job in picked] == ["mawps-gpt4o-k2-s42", "mawps-gpt4o-k2-s1", "mawps-k2-s1",
                                                "mawps-k2-s42"]
    assert "only" not in study.study_fields(cfg)                  # a choice of one call, not part of the study
    out = tmp_path / "study"
    with pytest.raises(cli.InputError, match="--only mawps-k9-s1: no run of this study is named so; its runs are "
                                             "mawps-vanilla-s42, mawps-k2-s42"):
        study.main(["--model", "m", "--authors-data", str(authors), "--data", "mawps", "--settings", "vanilla,k2",
                    "--seeds", "42", "--out", str(out), "--only", "mawps-k2-s42,mawps-k9-s1"])
    assert not (out / "study_config.json").exists()               # refused before a file is written


def fake_run(run: Path, alpha: float, correct: list[bool], revision: str | None, val: float,
             dtype: str = "bfloat16") -> None:
    run.mkdir(parents=True)
    n = len(correct)
    acc = {"val": {"accuracy": val, "majority": 0.5}, "test": {"accuracy": sum(correct) / n, "majority": 0.25}}
    (run / "results.json").write_text(json.dumps({"mawps_train": acc}))
    (run / "outcomes.json").write_text(json.dumps({"test": {"answer": ["1"] * n, "correct": correct}}))
    (run / "train_config.json").write_text(json.dumps({"alpha": alpha, "dtype": dtype,
                                                       "extra": {"cn_ratio_at_start": {"median": 0.4}}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "cn_ratio": 0.5 + e, "l_attn": 0.3 - 0.2 * e,
                                                           "l_next": 2.0 - e, "tokens_per_s": 100.0}) + "\n"
                                               for e in (0, 0, 1)))
    attempt = {"seconds": 60.0, **({"revision": revision, "threads": 1} if revision else {})}
    (run / "wall_time.json").write_text(json.dumps({"seconds": 60.0, "attempts": [attempt]}))


def test_outcomes_keep_each_split_whose_name_holds_an_underscore(tmp_path):
    """gsm8k-val's splits mawps_ood and svamp_ood both end in "_ood", as its data name gsm8k_val holds "_": each
    split's answers come from its own predictions file, named by results.json."""
    study = alpha_study()
    run = tmp_path / "gsm8k-val-vanilla-s42"
    run.mkdir()
    answers = {"val": ["1", None], "test": ["18"], "mawps_ood": ["84.0", "3"], "svamp_ood": [None]}
    for split, given in answers.items():
        write_jsonl(run / f"predictions_gsm8k_val_{split}.jsonl",
                    [{"input": "Q", "target": "3", "output": "", "answer": a, "correct": a == "3"} for a in given])
    (run / "results.json").write_text(json.dumps({"gsm8k_val": {split: {"accuracy": 0.0} for split in answers}}))
    study.collect_outcomes(run)
    outcomes = json.loads((run / "outcomes.json").read_text())
    assert outcomes == {split: {"answer": given, "correct": [a == "3" for a in given]}
                        for split, given in answers.items()}


def test_the_summary_borrows_the_shared_vanilla_and_names_each_runs_revision(tmp_path):
    study = alpha_study()
    out = tmp_path / "out"
    (out).mkdir()
    (out / "study_config.json").write_text(json.dumps({"revision": "old"}))
    fake_run(out / "mawps-vanilla-s42", 0.0, [True, False, False, False], None, val=0.5)      # recorded no revision
    fake_run(out / "mawps-k2-s42", 0.8, [True, True, False, False], "new", val=0.6)
    fake_run(out / "mawps-gpt4o-k2-s42", 0.9, [True, True, True, False], "new", val=0.7)
    cfg = study.StudyConfig(model="m", data="mawps,mawps-gpt4o", settings="vanilla,k2", seeds="42", out=str(out))
    summary = study.summarize(cfg, out)
    gpt4o = summary["data"]["mawps-gpt4o"]
    assert gpt4o["rows"]["vanilla"]["test"]["mean"] == pytest.approx(0.25)     # mawps's vanilla run
    assert gpt4o["paired"]["k2"]["mean"] == pytest.approx(0.5)                 # 3 of 4 against 1 of 4
    assert summary["data"]["mawps"]["paired"]["k2"]["mean"] == pytest.approx(0.25)
    assert gpt4o["chosen"] == "k2" and gpt4o["main_split"] == "test"
    assert gpt4o["rows"]["k2"]["cn_end"]["mean"] == pytest.approx(1.5)           # the last epoch's mean C/N
    assert gpt4o["rows"]["k2"]["l_attn_first"]["mean"] == pytest.approx(0.3)     # the first epoch's, beside L_next
    assert gpt4o["rows"]["k2"]["l_next_first"]["mean"] == pytest.approx(2.0)
    assert summary["revisions"] == {"old": ["mawps-vanilla-s42"], "new": ["mawps-k2-s42", "mawps-gpt4o-k2-s42"]}
    text = study.markdown(summary)
    assert "Revision old (1 run); new (2 runs)" in text and "torch threads per run: 1, not recorded" in text
    assert "runs on not recorded (3 runs)" in text and "precision: bfloat16 (3 runs)" in text
    assert "| 1.50 | 0.30 / 2.00 |" in text                 # k2's C/N at the end, then the first epoch's losses
    assert "differ in precision" not in text
    config = json.loads((out / "mawps-k2-s42" / "train_config.json").read_text())
    (out / "mawps-k2-s42" / "train_config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    mixed = study.markdown(study.summarize(cfg, out))
    assert "precision: bfloat16 (2 runs), float32 (1 run)" in mixed and "**These runs differ in precision**" in mixed
    assert text.startswith("# α study: m, full fine-tuning\n")
    cfg.train_args = ["--lora", "--lr", "1e-3"]                                 # a LoRA study says so
    assert study.markdown(study.summarize(cfg, out)).startswith("# α study: m, LoRA\n")


def test_a_setting_on_other_tokens_or_rows_is_shown_but_never_chosen(tmp_path):
    study = alpha_study()
    out = tmp_path / "out"
    fake_run(out / "stg_s-vanilla-s42", 0.0, [True, False, False, False], "abc", val=0.5)
    fake_run(out / "stg_s-k2-s42", 0.8, [True, True, False, False], "abc", val=0.6)
    for setting, start in (("attr-k2", 0.9), ("in-k2", 0.7), ("tgt-k2", 0.5)):            # all better on val
        fake_run(out / f"stg_s-{setting}-s42", 2 * start, [True, True, True, False], "abc", val=0.9)
        config = json.loads((out / f"stg_s-{setting}-s42" / "train_config.json").read_text())
        config["extra"]["cn_ratio_at_start"]["median"] = start
        (out / f"stg_s-{setting}-s42" / "train_config.json").write_text(json.dumps(config))
    cfg = study.StudyConfig(model="m", data="stg_s", settings="vanilla,k2,attr-k2,in-k2,tgt-k2", seeds="42",
                            out=str(out))
    d = study.summarize(cfg, out)["data"]["stg_s"]
    assert d["chosen"] == "k2"                                          # the variants are better, never chosen
    for setting in ("attr-k2", "in-k2", "tgt-k2"):                       # their paired difference is still reported
        assert d["paired"][setting]["mean"] == pytest.approx(0.5)
    assert d["cn_start"]["mean"] == pytest.approx(0.4)                  # each variant's starting C/N on its own scale
    assert d["cn_start_attr"]["mean"] == pytest.approx(0.9) and d["cn_start_in"]["mean"] == pytest.approx(0.7)
    assert d["cn_start_tgt"]["mean"] == pytest.approx(0.5)
    text = study.markdown(study.summarize(cfg, out))
    assert "attr-…: not in the paper; N_i over the other attributes (train.py --contrast attributes --attn " \
           "explicit), so their α and C/N are on that scale: C/N before training median 0.900" in text
    assert "in-…: not in the paper; N_i over the input but its first token (train.py --contrast input --attn " \
           "explicit), so their α and C/N are on that scale: C/N before training median 0.700" in text
    assert "tgt-…: not in the paper; Eq. 10 over the answer's rows only (train.py --rows target), so their α and " \
           "C/N are on that scale: C/N before training median 0.500" in text


def test_tables_put_each_study_in_table_2_and_5s_layout(tmp_path):
    study = alpha_study()
    import tables
    results = tmp_path / "results"
    for folder, data in (("svamp-smollm2", "svamp"), ("mawps-smollm2", "mawps,mawps-gpt4o"),
                         ("svamp-smollm2-fp32", "svamp")):
        folder = results / folder
        folder.mkdir(parents=True)
        config = {**study.dataclasses.asdict(study.StudyConfig(model="m", data=data, settings="vanilla,k2,tgt-k2",
                                                              seeds="42,1", out=str(folder))), "revision": "abc"}
        (folder / "study_config.json").write_text(json.dumps(config))
    svamp = results / "svamp-smollm2"
    fake_run(svamp / "svamp-vanilla-s42", 0.0, [True, False, False, False], "abc", val=0.5)   # 25 %
    fake_run(svamp / "svamp-vanilla-s1", 0.0, [True, True, False, False], "abc", val=0.5)     # 50 %
    fake_run(svamp / "svamp-k2-s42", 0.8, [True, True, False, False], "abc", val=0.6)         # 50 %
    fake_run(svamp / "svamp-k2-s1", 0.8, [True, True, True, True], "abc", val=0.6)            # 100 %
    mawps = results / "mawps-smollm2"
    fake_run(mawps / "mawps-vanilla-s42", 0.0, [True, False, False, False], "abc", val=0.5)
    fake_run(mawps / "mawps-gpt4o-k2-s42", 0.9, [True, True, True, False], "abc", val=0.7)    # seed 1 not yet run
    fake_run(mawps / "mawps-tgt-k2-s42", 0.9, [True, True, True, True], "abc", val=0.9)       # a variant: not CAT
    fp32 = results / "svamp-smollm2-fp32"                     # float32: a table pair of its own, never mixed
    fake_run(fp32 / "svamp-vanilla-s42", 0.0, [True, True, True, False], "def", val=0.5, dtype="float32")
    fake_run(fp32 / "svamp-k2-s42", 0.8, [True, False, False, False], "def", val=0.6, dtype="float32")
    text = tables.main(["--results", str(results), "--out", str(tmp_path / "tables.md")])
    heading = "## Table 2 and Table 5 on the authors' annotations (SmolLM2-135M-Instruct, "
    _, bf16, float32 = text.split(heading)
    assert bf16.startswith("bfloat16 autocast; folders *-smollm2)")
    assert float32.startswith("float32; folders *-smollm2-fp32)")
    row = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in bf16.splitlines() if "|" in line}
    assert row["ours, SmolLM2-135M, Vanilla"][1] == "37.50 ± 17.68 (2)"      # SVAMP: mean and sample std of 25, 50
    assert row["ours, SmolLM2-135M, CAT"][1] == "75.00 ± 35.36 (2)"
    assert row["ours: CAT − Vanilla, paired (95 % CI)"][1].startswith("+37.50 (")
    assert row["ours, SmolLM2-135M, Vanilla"][0] == "25.00 (1)" and row["ours, SmolLM2-135M, CAT"][0] == "—"
    assert row["ours, SmolLM2-135M, CAT"][2] == "—"                           # ARC-E: no study folder
    assert row["GPT-4o"][1] == "75.00 (1)*" and row["GLM-4-air"][1] == "—"     # * : seed 1 not finished
    assert row["GPT-4o"][2].startswith("+50.00 (") and row["GPT-4o"][4] == "k2: α 0.900 |"   # which setting
    cells = {c[0]: c[1:] for c in ([c.strip() for c in line.strip("|").split("|")] for line in bf16.splitlines()
                                   if line.startswith("| *ours"))}                   # a variant: rows of its own
    assert list(cells) == ["*ours, past the paper: tgt-k2 (Eq. 10 over the answer's rows only)*",
                           "*ours: tgt-k2 − Vanilla, paired (95 % CI)*"]
    accuracy, paired = cells.values()
    assert accuracy == ["100.00 (1)"] + ["—"] * 6 and row["ours, SmolLM2-135M, CAT"][0] == "—"   # never CAT
    assert paired[0].startswith("+75.00 (") and paired[1:] == ["—"] * 6
    assert (tmp_path / "tables.md").read_text() == text and "revision abc" in bf16 and "precision: bfloat16" in bf16
    row = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in float32.splitlines() if "|" in line}
    assert row["ours, SmolLM2-135M, Vanilla"][1] == "75.00 (1)" and row["ours, SmolLM2-135M, CAT"][1] == "25.00 (1)*"
    assert row["ours, SmolLM2-135M, Vanilla"][0] == "—" and "No MAWPS study in this precision yet." in float32
    assert "past the paper" not in float32                                     # no variant ran in float32
    assert "revision def" in float32 and "precision: float32" in float32 and "abc" not in float32
    readme = tmp_path / "README.md"                              # --readme fills each precision's block
    readme.write_text("a\n<!-- tables: smollm2-fp32 -->\nold\n<!-- /tables -->\nb\n")
    tables.main(["--results", str(results), "--out", str(tmp_path / "tables.md"), "--readme", str(readme)])
    filled = "a\n<!-- tables: smollm2-fp32 -->\n" + float32.split("\n", 2)[2].rstrip("\n") + "\n<!-- /tables -->\nb\n"
    assert readme.read_text() == filled
    findings = tmp_path / "findings.md"                          # --findings does the same; both flags fill both
    for page in (readme, findings):
        page.write_text("a\n<!-- tables: smollm2-fp32 -->\nold\n<!-- /tables -->\nb\n")
    tables.main(["--results", str(results), "--out", str(tmp_path / "t.md"), "--findings", str(findings),
                 "--readme", str(readme)])
    assert findings.read_text() == filled and readme.read_text() == filled
    assert (tmp_path / "t.md").read_text() == text                  # results/tables.md whatever pages are filled


def copy_studies(stems: list[str], results: Path) -> None:
    """Copy the committed files of each study folder under results/ into `results` (git ls-files: what a clean
    clone holds), not the runs a live study has finished or is writing beside them and has not committed yet."""
    listed = subprocess.run(["git", "ls-files", "-z", "--", *(f"results/{stem}" for stem in stems)], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        target = results / Path(name).relative_to("results")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((ROOT / name).read_bytes())


def test_findings_page_holds_the_tables_the_committed_runs_give(tmp_path):
    """docs/findings.md's marked blocks and results/tables.md are exactly what tables.py writes from the committed
    study folders (on a copy of them, so that the repository's summaries are not rewritten)."""
    import shutil
    import tables
    stems = {f"{stem}-{suffix}" for _, stem, _, _ in tables.COLUMNS for suffix in tables.PRECISIONS}
    results = tmp_path / "results"
    copy_studies([folder.name for folder in sorted((ROOT / "results").iterdir())
                  if folder.name.startswith("alpha-study-") or folder.name in stems], results)
    page = tmp_path / "findings.md"
    shutil.copy(ROOT / "docs" / "findings.md", page)
    tables.main(["--results", str(results), "--out", str(tmp_path / "tables.md"), "--findings", str(page)])
    assert page.read_text(encoding="utf-8") == (ROOT / "docs" / "findings.md").read_text(encoding="utf-8")
    assert (tmp_path / "tables.md").read_text(encoding="utf-8") == \
        (ROOT / "results" / "tables.md").read_text(encoding="utf-8")


def fake_stg_run(run: Path, alpha: float, ood: list[bool], val: float, val_majority: float = 0.5) -> None:
    """A finished STG run: IID all right, OOD as given, val as given; C/N 0.5 at the end."""
    run.mkdir(parents=True)
    results = {"val": {"accuracy": val, "majority": val_majority}, "iid": {"accuracy": 1.0, "majority": 0.75},
               "ood": {"accuracy": sum(ood) / len(ood), "majority": 0.25}}
    (run / "results.json").write_text(json.dumps({"stg_s": results}))
    (run / "outcomes.json").write_text(json.dumps({s: {"answer": ["Low Risk"] * len(c), "correct": c}
                                                   for s, c in (("iid", [True] * len(ood)), ("ood", ood))}))
    (run / "train_config.json").write_text(json.dumps({"alpha": alpha, "dtype": "float32",
                                                       "extra": {"cn_ratio_at_start": {"median": 0.4}}}))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "cn_ratio": 0.5, "l_attn": 0.1, "l_next": 1.0,
                                                   "tokens_per_s": 100.0}) + "\n")
    attempt = {"seconds": 60.0, "revision": "abcdef0123", "threads": 1, "machine": "cpu"}
    (run / "wall_time.json").write_text(json.dumps({"seconds": 60.0, "attempts": [attempt]}))


def test_tables_put_each_stg_study_in_table_1s_columns(tmp_path):
    study = alpha_study()
    import tables
    folder = tmp_path / "results" / "alpha-study-tiny"
    folder.mkdir(parents=True)
    cfg = study.StudyConfig(model="m", data="stg_s", settings="vanilla,tgt-k2,in-k2,attr-k3,k2,attr-k2", seeds="1,2",
                            out=str(folder))
    config = {**study.dataclasses.asdict(cfg), "revision": "abc"}
    (folder / "study_config.json").write_text(json.dumps(config))
    for seed, (v, k2, a2, a3) in {1: ([True, False, False, False], [True, True, False, False],
                                      [True, True, True, False], [True, True, True, True]),
                                  2: ([True, True, False, False], [True, True, False, False],
                                      [True, True, True, True], [True, True, True, True])}.items():
        split = {"val_majority": 0.5 if seed == 1 else 0.6}     # each seed holds out its own val records
        fake_stg_run(folder / f"stg_s-vanilla-s{seed}", 0.0, v, val=0.5, **split)          # OOD 25 %, 50 %
        fake_stg_run(folder / f"stg_s-k2-s{seed}", 0.8, k2, val=0.75, **split)             # 50 %, 50 %: best on val
        fake_stg_run(folder / f"stg_s-attr-k2-s{seed}", 1.8, a2, val=1.0, **split)         # better, never chosen
        fake_stg_run(folder / f"stg_s-attr-k3-s{seed}", 2.7, a3, val=1.0, **split)
        fake_stg_run(folder / f"stg_s-in-k2-s{seed}", 1.2, a2, val=1.0, **split)
        fake_stg_run(folder / f"stg_s-tgt-k2-s{seed}", 0.9, a2, val=1.0, **split)
    text = tables.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "tables.md")])
    section = text.split("## STG: alpha-study-tiny, stg_s")[1].split("##")[0]
    assert "m; runs from revision abcdef0 on cpu, precision: float32. C/N before training: median 0.400 ± 0.000; " \
           "0.400 ± 0.000 with N_i over the other attributes; 0.400 ± 0.000 with N_i over the input but its first " \
           "token; 0.400 ± 0.000 with Eq. 10 over the answer's rows only." in section
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    names = [r[0] for r in rows]
    assert names == ["vanilla", "**k2 (chosen on val)**", "*attr-k2 (N_i over the other attributes)*",
                     "*attr-k3 (N_i over the other attributes)*", "*in-k2 (N_i over the input but its first token)*",
                     "*tgt-k2 (Eq. 10 over the answer's rows only)*", "majority baseline"]   # variants last, by α
    vanilla, k2, attr_k2 = rows[0], rows[1], rows[2]
    assert vanilla[1:6] == ["2", "0", "50.00 ± 0.00", "100.00 ± 0.00", "37.50 ± 17.68"]
    assert k2[2] == "0.80 ± 0.00" and k2[5] == "**50.00 ± 0.00**" and k2[6] == "0.50 ± 0.00"
    assert k2[7].startswith("**+12.50 (")                                           # paired: +25, 0 points
    assert attr_k2[5] == "87.50 ± 17.68" and attr_k2[7].startswith("+50.00 (")    # shown, with its difference
    assert rows[6][3:6] == ["55.00", "75.00", "25.00"]           # the majority answer's accuracy, val's over seeds
    readme = tmp_path / "README.md"                          # --readme fills the marked block, and only it
    readme.write_text("intro\n<!-- stg-table: alpha-study-tiny, stg_s -->\nold\n<!-- /stg-table -->\nrest\n")
    tables.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "tables.md"), "--readme", str(readme)])
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert readme.read_text() == ("intro\n<!-- stg-table: alpha-study-tiny, stg_s -->\n" + "\n".join(table)
                                  + "\n<!-- /stg-table -->\nrest\n")
    readme.write_text("<!-- stg-table: alpha-study-tiny, stg_h -->\n<!-- /stg-table -->\n")
    with pytest.raises(cli.InputError, match="stg_h -->.* no study folder"):
        tables.main(["--results", str(tmp_path / "results"), "--out", str(tmp_path / "t.md"), "--readme", str(readme)])
    if importlib.util.find_spec("matplotlib"):               # Figure 4, with the attr- rows' own C/N scale
        paths = study.figure(study.summarize(study.saved_config(folder), folder), folder)
        assert paths == [folder / "figure4_stg_s.png"] and paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_puts_each_study_in_the_papers_layout(tmp_path):
    """Table 1's cells from fabricated study folders: a Full STG_S study with two seeds, an STG_H one with one seed
    of vanilla and CAT (its CAT not chosen yet, and its MAE), and no LoRA study; checked against hand-worked values."""
    study = alpha_study()
    import table1
    results = tmp_path / "results"
    right, wrong = True, False

    def a_study(stem: str, data: str) -> Path:
        folder = results / stem
        folder.mkdir(parents=True)
        cfg = study.StudyConfig(model="m", data=data, settings="vanilla,a0.6,attr-k3", seeds="1,2", out=str(folder))
        (folder / "study_config.json").write_text(json.dumps({**study.dataclasses.asdict(cfg), "revision": "abc"}))
        return folder

    full = a_study("alpha-study-smollm2-fp32", "stg_s")
    outcomes = {1: ([right, wrong, wrong, wrong], [right, right, wrong, wrong], [right] * 4),
                2: ([right, right, wrong, wrong], [right, right, wrong, wrong], [right] * 3 + [wrong])}
    for seed, (v, a, t) in outcomes.items():
        fake_stg_run(full / f"stg_s-vanilla-s{seed}", 0.0, v, val=0.5)      # OOD 25 %, 50 %
        fake_stg_run(full / f"stg_s-a0.6-s{seed}", 0.6, a, val=0.75)        # 50 %, 50 %: chosen, the only CAT
        fake_stg_run(full / f"stg_s-attr-k3-s{seed}", 2.7, t, val=1.0)     # 100 %, 75 %: never chosen
    h = a_study("stg-h-smollm2-fp32", "stg_h")
    for setting, alpha, mae, unparsed in (("vanilla", 0.0, 8.0, 0), ("a0.6", 0.6, 6.5, 2)):
        fake_stg_run(h / f"stg_h-{setting}-s1", alpha, [right, wrong, wrong, wrong], val=0.5)
        path = h / f"stg_h-{setting}-s1" / "results.json"
        runs = json.loads(path.read_text())
        runs["stg_s"]["ood"].update(mae=mae, majority_mae=12.25, unparsed=unparsed)
        path.write_text(json.dumps(runs))
    (h / "stg_h-attr-k3-s1").mkdir()                                              # started, not finished
    text = table1.main(["--results", str(results), "--out", str(tmp_path / "table1.md")])
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| **"):
            regime = cells[0].strip("*")
        elif line.startswith("| ") and cells[0]:
            rows[(regime, cells[0])] = dict(zip(table1.COLUMNS, cells[1:]))
    full_rows = {label: row["STG_S"] for (regime, label), row in rows.items() if regime == "Full"}
    assert full_rows["CAT: the setting chosen on val, its α"] == "a0.6: α 0.600"
    assert full_rows["IID Vanilla"] == "100.00 ± 0.00 (2)"
    assert [full_rows[f"OOD {m}"] for m in ("Vanilla", "CAT", "attr-k3")] == [
        "37.50 ± 17.68 (2)", "50.00 ± 0.00 (2)", "87.50 ± 17.68 (2)"]
    assert full_rows["OOD CAT − Vanilla (95 % CI)"].startswith("+12.50 (")          # paired: +25 and 0 points
    assert full_rows["OOD attr-k3 − Vanilla (95 % CI)"].startswith("+50.00 (")      # +75 and +25
    assert full_rows["OOD majority answer"] == "25.00"
    assert full_rows["paper, TinyLlama-1.1B: OOD CAT"] == "63.75"
    h_rows = {label: row["STG_H"] for (regime, label), row in rows.items() if regime == "Full"}
    assert h_rows["CAT: the setting chosen on val, its α"] == "a0.6: α 0.600*"      # seed 2 has not finished
    assert [h_rows[f"OOD MAE {m}"] for m in ("Vanilla", "CAT", "attr-k3")] == ["8.00 (1)", "6.50 (1, 2 unparsed)",
                                                                                 "—"]
    assert h_rows["OOD MAE, always the most frequent AQI"] == "12.25"
    # the same outcomes as vanilla's; marked as its accuracy cells are: not chosen yet
    assert h_rows["OOD CAT − Vanilla (95 % CI)"] == "+0.00 (+0.00, +0.00)*"
    assert rows[("Full", "OOD MAE Vanilla")]["STG_S"] == ""                         # no MAE on STG_E
    assert rows[("Full", "OOD Vanilla")]["STG_L"] == "—"                            # planned, not run yet
    assert rows[("LoRA", "OOD Vanilla")]["STG_S"] == "—" and rows[("LoRA", "OOD Vanilla")]["STG_L"] == "n/a"
    page = tmp_path / "findings.md"
    page.write_text("intro\n<!-- table1 -->\nold\n<!-- /table1 -->\nrest\n")
    table1.main(["--results", str(results), "--out", str(tmp_path / "table1.md"), "--findings", str(page)])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert page.read_text() == "intro\n<!-- table1 -->\n" + "\n".join(table) + "\n<!-- /table1 -->\nrest\n"
    page.write_text("no block\n")
    with pytest.raises(cli.InputError, match="no <!-- table1 --> .* block"):
        table1.main(["--results", str(results), "--out", str(tmp_path / "table1.md"), "--findings", str(page)])
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "table1_ood_by_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_is_what_the_committed_runs_give(tmp_path):
    """results/table1.md and docs/findings.md's table1 block are exactly what table1.py writes from the committed
    study folders (on a copy of them, so that the repository's summaries are not rewritten)."""
    import shutil
    import table1
    results = tmp_path / "results"
    copy_studies(list(dict.fromkeys(stem for stem, _ in table1.SOURCES.values())), results)
    page = tmp_path / "findings.md"
    shutil.copy(ROOT / "docs" / "findings.md", page)
    table1.main(["--results", str(results), "--out", str(tmp_path / "table1.md"), "--findings", str(page)])
    assert page.read_text(encoding="utf-8") == (ROOT / "docs" / "findings.md").read_text(encoding="utf-8")
    assert (tmp_path / "table1.md").read_text(encoding="utf-8") == \
        (ROOT / "results" / "table1.md").read_text(encoding="utf-8")


def test_names_of_settings_at_close_alpha_do_not_overprint():
    plt = pytest.importorskip("matplotlib.pyplot", reason="matplotlib draws Figure 4 (an optional extra)")
    fig, ax = plt.subplots()
    ax.set(xlim=(-0.1, 3.0), ylim=(60, 95))
    points = [("k1.5", 0.53, 65.6), ("a0.6", 0.60, 64.6), ("div-a0.6", 0.61, 65.9), ("k2", 0.70, 63.8),
              ("k3", 1.05, 67.2), ("vanilla", 0.0, 62.3)]
    alpha_study().name_points(ax, points)
    at = {text.get_text(): text.xyann for text in ax.texts}      # where each name is written (data coordinates)
    assert set(at) == {name for name, *_ in points}
    line = 0.045 * 35
    for a, (xa, ya) in at.items():
        for b, (xb, yb) in at.items():
            if a < b and abs(xa - xb) < 0.1 * 3.1:
                assert abs(ya - yb) >= line - 1e-9, (a, b)          # a line apart where α is close
    assert at["vanilla"][1] == 62.3 and at["k3"][1] == 67.2            # a name with room stays at its point
    plt.close(fig)


def test_two_workers_of_a_study_never_take_the_same_run(tmp_path):
    study = alpha_study()
    run = tmp_path / "out" / "stg_s-k2-s42"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])   # a live worker
    try:
        (tmp_path / "out" / ".claims").mkdir(parents=True)
        (tmp_path / "out" / ".claims" / run.name).write_text(str(other.pid))
        with study.claim(run) as mine:
            assert mine is False                          # held by a live process
    finally:
        other.kill()
        other.wait()
    with study.claim(run) as mine:                        # its process is gone: the claim is taken over
        assert mine is True
        assert (tmp_path / "out" / ".claims" / run.name).read_text() == str(os.getpid())
    assert not (tmp_path / "out" / ".claims" / run.name).exists()      # released when the run ends


def test_the_machine_names_whether_it_multiplies_bf16_natively(monkeypatch):
    study = alpha_study()            # two CPUs of one model name can differ there, and --dtype auto follows it
    monkeypatch.setattr(study.cli, "native_bf16_cpu", lambda: True)
    assert study.machine().endswith(f", {os.cpu_count()} cores, native bf16")
    monkeypatch.setattr(study.cli, "native_bf16_cpu", lambda: False)
    assert study.machine().endswith(f", {os.cpu_count()} cores, no native bf16")


def test_row_counts_reads_each_data_set_through_the_training_encoder(tmp_path):
    import row_counts
    import train
    authors = fake_authors_data(tmp_path / "authors")
    records = [{"input": "Tom has 3 apples and buys 4 more. How many apples now?", "target": "Answer: 7.0",
                "important": [{"4 more": ["3 apples"]}, {"7.0": ["3 apples", "4 more"]}]},
               {"input": "Ann has 2 pears.", "target": "Answer: 2.0", "important": [{"2.0": ["2 pears"]}]},
               {"input": "Ann has 5 figs.", "target": "Answer: 5.0", "important": [{"5.0": ["5 figs"]}]}]
    cli.write_jsonl(authors / "MAWPS/mawps_train.jsonl", records)
    cfg = train.TrainConfig(model="scratch", data="x", scratch_dim=32, scratch_layers=2, scratch_heads=2,
                            scratch_vocab=300)
    _, tok, _ = runs.build_model(cfg, records, "cpu", None)
    tok.save(tmp_path / "tok")
    text = row_counts.main(["--model", str(tmp_path / "tok"), "--authors-data", str(authors), "--data", "mawps",
                            "--limit", "2", "--out", str(tmp_path / "rows.md")])
    assert (tmp_path / "rows.md").read_text() == text + "\n"
    row = next(line for line in text.splitlines() if line.startswith("| mawps |")).strip("| ").split(" | ")
    expected = variants.row_counts([batches.encode(r, tok)[0] for r in records[:2]])      # the first two records only
    assert row[1] == "2" and row[4] == f"{expected['rows']:.1f}" and row[5] == f"{expected['target_rows']:.1f}"
    assert float(row[4]) > float(row[5]) > 0          # rows inside the prompt, and rows predicting the answer
    with pytest.raises(cli.InputError, match="--data nope"):
        row_counts.main(["--model", str(tmp_path / "tok"), "--authors-data", str(authors), "--data", "nope",
                         "--out", str(tmp_path / "rows.md")])


def test_setting_names_give_their_train_flags():
    study = alpha_study()
    assert study.setting_flags("vanilla") == ["--alpha", "0"]
    assert study.setting_flags("k2") == ["--alpha-scale", "2"]
    assert study.setting_flags("a0.6") == ["--alpha", "0.6"]
    assert study.setting_flags("div-a0.6") == ["--alpha", "0.6", "--attn-loss", "div"]
    assert study.setting_flags("div-k2") == ["--alpha-scale", "2", "--attn-loss", "div"]
    assert study.setting_flags("attr-k2") == ["--alpha-scale", "2", "--contrast", "attributes", "--attn", "explicit"]
    assert study.setting_flags("attr-div-a1") == ["--alpha", "1", "--attn-loss", "div", "--contrast", "attributes",
                                                  "--attn", "explicit"]
    assert study.setting_flags("in-k3") == ["--alpha-scale", "3", "--contrast", "input", "--attn", "explicit"]
    assert study.setting_flags("tgt-k2") == ["--alpha-scale", "2", "--rows", "target"]
    assert study.setting_flags("tgt-div-k2") == ["--alpha-scale", "2", "--attn-loss", "div", "--rows", "target"]
    for bad in ("k0", "b2", "div-x1", "k", "attr-vanilla", "attr-", "attr-attr-k2", "in-attr-k2", "in-vanilla",
                "tgt-vanilla", "tgt-in-k2"):
        with pytest.raises(cli.InputError, match="is not vanilla"):
            study.setting_flags(bad)


def test_copies_counts_answers_that_repeat_a_number_of_the_question(tmp_path, monkeypatch):
    import copies
    study = alpha_study()
    authors = fake_authors_data(tmp_path / "authors")
    questions = ["Ann has 3 pears and buys 4 more. How many?", "Tom has 10 figs and eats 2. How many are left?"]
    cli.write_jsonl(authors / "MAWPS/mawps_test.jsonl", [{"input": questions[0], "target": "Answer: 7.0"},
                                                          {"input": questions[1], "target": "Answer: 10.0"}])
    folder = tmp_path / "mawps-smollm2"
    folder.mkdir()
    config = {**study.dataclasses.asdict(study.StudyConfig(model="m", data="mawps", settings="vanilla,k2,k1",
                                                          seeds="42", out=str(folder))), "revision": "abc"}
    (folder / "study_config.json").write_text(json.dumps(config))
    for setting, answers, correct in (("vanilla", ["7.0", "8.0"], [True, False]), ("k2", ["3.0", "2"], [False, False]),
                                      ("k1", [None, "7"], [False, False])):
        run = folder / f"mawps-{setting}-s42"
        fake_run(run, 0.0, correct, "abc", val=0.5)
        (run / "outcomes.json").write_text(json.dumps({"test": {"answer": answers, "correct": correct}}))
    text = copies.main(["--studies", str(folder), "--authors-data", str(authors), "--out", str(tmp_path / "c.md")])
    assert (tmp_path / "c.md").read_text() == text + "\n"
    rows = {line.split(" | ")[2]: line.strip("| ").split(" | ") for line in text.splitlines()[2:]}
    assert rows["vanilla"][:2] == ["mawps-smollm2", "mawps"]          # the study folder names the precision
    # gold: the second target 10.0 is in its question; no answer read: None, as from a "####"-less GSM8K output
    assert rows["vanilla"][4:] == ["50.0 %", "0.0 %", "50.0 %", "0.0 %", "50.0 %"]
    assert rows["k2"][4:] == ["0.0 %", "100.0 %", "50.0 %", "0.0 %", "0.0 %"]    # 3 and 2: the question's numbers
    assert rows["k1"][4:] == ["0.0 %", "0.0 %", "50.0 %", "50.0 %", "0.0 %"]     # 7 is not in the second question
    monkeypatch.chdir(tmp_path)                        # no --studies: every Table 2 study folder under results/
    with pytest.raises(cli.InputError, match="results/ holds no Table 2 study folder"):
        copies.main(["--authors-data", str(authors), "--out", str(tmp_path / "c.md")])
    (tmp_path / "results").mkdir()
    folder = folder.rename(tmp_path / "results" / "mawps-smollm2")
    assert copies.main(["--authors-data", str(authors), "--out", str(tmp_path / "c.md")]) == text
    (authors / "MAWPS/mawps_test.jsonl").write_text('{"input": "1 + 1 = ", "target": "2"}\n')
    with pytest.raises(cli.InputError, match="another number of records"):
        copies.main(["--studies", str(folder), "--authors-data", str(authors), "--out", str(tmp_path / "c.md")])


def test_copies_spreads_a_multiple_choice_tasks_answers_over_its_labels(tmp_path):
    import copies
    study = alpha_study()
    authors = fake_authors_data(tmp_path / "authors")
    cli.write_jsonl(authors / "ARC_E/ARC_E_test.jsonl", [{"input": f"Q{i}\nA. x\nB. y\nC. z\nD. w\nAnswer: ",
                                                           "target": t} for i, t in enumerate("ABCD")])
    folder = tmp_path / "arc_e-smollm2"
    folder.mkdir()
    config = {**study.dataclasses.asdict(study.StudyConfig(model="m", data="arc_e", settings="vanilla,k2",
                                                          seeds="42,1", out=str(folder))), "revision": "abc"}
    (folder / "study_config.json").write_text(json.dumps(config))
    runs = {("vanilla", 42): ["A", "B", "C", "C"], ("vanilla", 1): ["A", "A", None, "D"],
            ("k2", 42): ["A", "A", "A", "A"], ("k2", 1): ["A", "A", "A", "1"]}
    for (setting, seed), answers in runs.items():
        run = folder / f"arc_e-{setting}-s{seed}"
        correct = [a == t for a, t in zip(answers, "ABCD")]
        fake_run(run, 0.0, correct, "abc", val=0.5)
        (run / "outcomes.json").write_text(json.dumps({"test": {"answer": answers, "correct": correct}}))
    text = copies.main(["--studies", str(folder), "--authors-data", str(authors), "--out", str(tmp_path / "c.md")])
    assert "repeat a number" not in text                  # no numeric task: the copies table is left out
    rows = {cells[2]: cells for line in text.splitlines()[2:]
            if (cells := [cell.strip() for cell in line.strip("|").split("|")])}
    assert rows["gold"][3:] == ["", "", "A 25 / B 25 / C 25 / D 25 / other 0 / none 0", "25.0 %"]
    # vanilla over both seeds: A 3, B 1, C 2, D 1, none 1 of 8; right 3 + 2 of 8
    assert rows["vanilla"][3:] == ["2", "62.5 %", "A 38 / B 12 / C 25 / D 12 / other 0 / none 12", "37.5 %"]
    assert rows["k2"][3:] == ["2", "25.0 %", "A 88 / B 0 / C 0 / D 0 / other 12 / none 0", "87.5 %"]


def test_a_study_of_gpt4o_alone_reads_its_own_vanilla_runs(tmp_path):
    study = alpha_study()
    out = tmp_path / "out"
    out.mkdir()
    (out / "study_config.json").write_text(json.dumps({"revision": "abc"}))
    fake_run(out / "mawps-gpt4o-vanilla-s42", 0.0, [True, False, False, False], "abc", val=0.5)   # run by jobs()
    fake_run(out / "mawps-gpt4o-k2-s42", 0.9, [True, True, True, False], "abc", val=0.7)
    cfg = study.StudyConfig(model="m", data="mawps-gpt4o", settings="vanilla,k2", seeds="42", out=str(out))
    assert study.run_source(cfg, "mawps-gpt4o", "vanilla") == "mawps-gpt4o"
    assert study.summarize(cfg, out)["data"]["mawps-gpt4o"]["paired"]["k2"]["mean"] == pytest.approx(0.5)
    both = study.StudyConfig(model="m", data="mawps,mawps-gpt4o", settings="vanilla,k2", seeds="42", out=str(out))
    assert study.run_source(both, "mawps-gpt4o", "vanilla") == "mawps"
    assert study.run_source(both, "mawps-gpt4o", "k2") == "mawps-gpt4o"


def test_bf16_updates_counts_the_entries_whose_bf16_copy_moves(tmp_path):
    import bf16_updates
    import train
    # by hand, bf16 steps (8 significant bits): 2^-7 at 1.0, 2^-6 at 3.0, 2^-8 at 0.5, 2^-14 at 2^-7; +0.003 is under
    # half a step at 1.0 (0.0039) and 3.0 (0.0078), so they round back; over it at 0.5 (0.00195) and 2^-7, so they move
    w = torch.tensor([[1.0, 2.0 ** -7, 0.5, 3.0]])
    assert bf16_updates.moved_share([w], 0.003) == 0.5        # 1.0 and 3.0 stay, 2^-7 and 0.5 move
    assert bf16_updates.moved_share([w], 0.0) == 0.0

    records = [{"input": "Smoking: 8 Answer: ", "target": "High Risk"}]
    cfg = train.TrainConfig(model="scratch", data="x", scratch_dim=32, scratch_layers=2, scratch_heads=2,
                            scratch_vocab=300)
    model, tok, _ = runs.build_model(cfg, records, "cpu", None)
    with torch.no_grad():                      # a bf16 checkpoint: every weight on the bf16 grid
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    hf.save_model(model, tok, tmp_path / "m")
    text = bf16_updates.main(["--model", str(tmp_path / "m"), "--lr", "1e-3", "--total-steps", "100",
                              "--show", "1,3"])
    assert "all on the bf16 grid" in text
    matrices = [p.detach().flatten().tolist() for p in model.parameters() if p.ndim == 2]
    entries = [x for m in matrices for x in m]
    bf16 = lambda x: torch.tensor(x).bfloat16().item()                      # noqa: E731
    for step, shift in ((1, 1e-3 / 10), (3, 1e-3 * (1 + 2 + 3) / 10)):   # warm-up: 10 steps, lr × k / 10
        expected = sum(bf16(x + shift) != bf16(x) for x in entries) / len(entries)
        row = next(line for line in text.splitlines() if line.startswith(f"| {step} |")).strip("| ").split(" | ")
        assert row[2] == f"{shift:.2e}" and row[3] == f"{100 * expected:.2f} %"


def test_the_summary_splits_a_label_tasks_accuracy_by_gold_answer(tmp_path):
    study = alpha_study()
    authors = fake_authors_data(tmp_path / "authors")
    cli.write_jsonl(authors / "MAWPS/mawps_test.jsonl", [{"input": "q", "target": t} for t in "AABBB"])
    out = tmp_path / "out"
    fake_run(out / "mawps-vanilla-s42", 0.0, [True, True, False, False, True], "r", val=0.5)
    fake_run(out / "mawps-vanilla-s1", 0.0, [True, False, False, False, False], "r", val=0.5)
    fake_run(out / "mawps-k2-s42", 0.8, [False, False, True, True, True], "r", val=0.6)
    cfg = study.StudyConfig(model="m", authors_data=str(authors), data="mawps", settings="vanilla,k2",
                            seeds="42,1", out=str(out))
    recall = study.summarize(cfg, out)["data"]["mawps"]["recall"]
    assert recall["labels"] == {"B": 3, "A": 2}                          # the majority answer first
    vanilla, k2 = recall["rows"]["vanilla"], recall["rows"]["k2"]
    assert vanilla["A"]["mean"] == pytest.approx((2 / 2 + 1 / 2) / 2)   # seed 42: both A right; seed 1: one of two
    assert vanilla["B"]["mean"] == pytest.approx((1 / 3 + 0 / 3) / 2)
    assert k2["A"]["mean"] == 0.0 and k2["B"]["mean"] == 1.0 and k2["B"]["std"] is None      # one seed
    text = study.markdown(study.summarize(cfg, out))
    assert "| setting | B (3 records) | A (2 records) |" in text and "| k2 | 100.00 | 0.00 |" in text
    cli.write_jsonl(authors / "MAWPS/mawps_test.jsonl", [{"input": "q", "target": t} for t in "ABCDE"])
    assert study.summarize(cfg, out)["data"]["mawps"]["recall"] == {}      # five answers: not a label task
    cfg.authors_data = str(tmp_path / "elsewhere")                         # the test file not readable here
    assert study.summarize(cfg, out)["data"]["mawps"]["recall"] == {}


def test_attributes_measures_how_the_answers_depend_on_each_attribute(tmp_path):
    import attributes
    study = alpha_study()
    authors = fake_authors_data(tmp_path / "authors")
    names = attributes.ATTRIBUTES                                          # Smoking first, the rest held constant

    def record(smoking: int, target: str) -> dict:
        text = ", ".join(f"{n}: {smoking if n == 'Smoking' else 5}" for n in names)
        return {"input": f"{stg.QUESTION_E}{text} Answer: ", "target": target}
    test = [record(1, "Low Risk"), record(1, "High Risk"), record(2, "High Risk"), record(2, "High Risk")]
    cli.write_jsonl(authors / "STG/spurious_token_game_ood3_2.jsonl", test)
    cli.write_jsonl(authors / "STG/spurious_token_game_train3_S.jsonl", [record(1, "Low Risk")])
    folder = tmp_path / "alpha-study"
    folder.mkdir()
    config = {**study.dataclasses.asdict(study.StudyConfig(model="m", data="stg_s", settings="vanilla,k2",
                                                          seeds="42,1", out=str(folder))), "revision": "abc"}
    (folder / "study_config.json").write_text(json.dumps(config))
    answers = {("vanilla", 42): ["High Risk", "Low Risk", "Low Risk", "High Risk"],   # independent of Smoking
               ("vanilla", 1): ["Low Risk"] * 4,                                      # constant: depends on nothing
               ("k2", 42): ["Low Risk", "Low Risk", "High Risk", "High Risk"]}        # a function of Smoking
    for (setting, seed), given in answers.items():
        run = folder / f"stg_s-{setting}-s{seed}"
        fake_run(run, 0.0, [True] * 4, "abc", val=0.5)
        correct = [a == r["target"] for a, r in zip(given, test)]
        (run / "outcomes.json").write_text(json.dumps({"ood": {"answer": given, "correct": correct}}))

    def eta(values, answers):                      # the definition, written out: between-value over total spread
        mean = sum(answers) / len(answers)
        total = sum((a - mean) ** 2 for a in answers)
        between = 0.0
        for v in set(values):
            group = [a for x, a in zip(values, answers) if x == v]
            between += len(group) * (sum(group) / len(group) - mean) ** 2
        return (between / total) ** 0.5
    smoking = [1, 1, 2, 2]
    assert attributes.dependence(smoking, [0, 1, 1, 1]) == pytest.approx(eta(smoking, [0, 1, 1, 1]))
    assert attributes.dependence(smoking, [0, 1, 1, 1]) == pytest.approx(3 ** -0.5)     # by hand: 0.25 / 0.75
    assert attributes.dependence(smoking, [1, 0, 0, 1]) == 0.0
    assert attributes.dependence([5] * 4, [0, 1, 1, 1]) == 0.0 and attributes.dependence(smoking, [0] * 4) is None
    assert attributes.floor(smoking) == pytest.approx((1 / 3) ** 0.5) and attributes.floor([5] * 4) == 0.0
    assert attributes.share_by_value(smoking, [0, 1, 1, 1]) == {1: 0.5, 2: 1.0}

    out = ["--out", str(tmp_path / "attributes.md")]
    text = attributes.main(["--studies", str(folder), "--authors-data", str(authors), "--no-figure", *out])
    assert (tmp_path / "attributes.md").read_text() == text + "\n"
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()[2:]]
    rows = {row[2]: row for row in cells}
    assert rows["gold"][5:] == ["75.0 %", "0.58"] + ["0.00"] * 7
    assert rows["vanilla"][3:7] == ["2", "25.00", "25.0 %", "0.00"]       # seed 1's constant answers: no η
    assert rows["k2"][3:7] == ["1", "75.00", "50.0 %", "1.00"]
    assert rows["none (independent of the attribute)"][-8:] == ["0.58"] + ["0.00"] * 7
    found = attributes.study_rows(folder, attributes.AttributesConfig(authors_data=str(authors)))
    assert found[0]["trained"]["Smoking"] == [1]           # the shaded values of the figure: Smoking 2 is unseen
    if importlib.util.find_spec("matplotlib"):               # the figure is drawn only with matplotlib
        attributes.main(["--studies", str(folder), "--authors-data", str(authors), *out])
        assert (folder / "attributes_stg_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (authors / "STG/spurious_token_game_ood3_2.jsonl").write_text(json.dumps(test[0]) + "\n")
    with pytest.raises(cli.InputError, match="another number of records"):
        attributes.main(["--studies", str(folder), "--authors-data", str(authors), "--no-figure", *out])
