"""experiments/stg_grid.py: the aggregation against hand-computed numbers, and one smoke run of the whole grid
(a tiny scratch model, one data set, one seed, two α) that checks α selection reads only the validation split,
the summary's rows and majority baseline, and that a second run skips every finished run."""
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import stg  # noqa: E402
import stg_grid  # noqa: E402

GRID = ROOT / "experiments" / "stg_grid.py"


def write_jsonl(path: Path, records: list[dict]) -> None:
    stg.write_jsonl(path, records)


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
