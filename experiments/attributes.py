"""Which attributes do a study's STG_E answers follow? Per data set and setting, on the OOD test file: how strongly
the model's "High Risk" answers depend on each of the eight attributes (the correlation ratio η, mean ± std over
seeds), beside the gold answers' and the level of an answer that depends on nothing; and a figure of the "High
Risk" share at each value of each attribute.

    python experiments/attributes.py                   # the STG_S studies; a table to stdout, a PNG per study
    python experiments/attributes.py --studies results/alpha-study-smollm2-fp32 --authors-data <CAT repo folder>

Why the OOD file: there all eight attributes are drawn independently (Appendix A), so the answers' dependence on
one attribute is not another's seen through it. The gold answers follow the rule f = 1.2·Smoking + 0.7·Weight −
Exercise > 7.2 and nothing else. In the training file the spurious attributes copy a causal one (Yellow fingers =
⌊1.5·Smoking⌋, Clothing size = Weight, Hormones = ⌊0.5·Exercise⌋), so a model that learned a proxy instead of its
cause shows it here: the answers depend on the proxy, little on the cause. (On the IID file the attributes are
collinear and no such reading is possible.) η, not a linear correlation: a proxy can be followed in one direction
inside the range of values training showed it and another outside (Hormones only took the values 0–5 there), and
η = sqrt(Var(E[answer | value]) / Var(answer)) sees any shape. With k values and n records, an answer independent
of the attribute has E[η²] = (k − 1)/(n − 1) (about 0.15² for 10 values and 400 records): the table's floor row.
Reads each study's run folders (outcomes.json holds every test answer), the test file and the training file (the
values each attribute took there); writes a Markdown table to standard output and --out (results/attributes.md), and
<study>/attributes_<data>.png (matplotlib, optional).
"""
import collections
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import cli  # noqa: E402
import stg  # noqa: E402
from alpha_study import data_files, number, saved_config, split_outcomes  # noqa: E402
from stg_grid import items, mean_std  # noqa: E402

# the columns: causal, then each spurious attribute (beside the cause it copies in training), then irrelevant
ATTRIBUTES = stg.E_CAUSAL + list(stg.E_SPURIOUS) + stg.E_IRRELEVANT
ROLE = {**{n: "causal" for n in stg.E_CAUSAL}, **{n: f"copies {parent}" for n, (parent, _) in stg.E_SPURIOUS.items()},
        **{n: "irrelevant" for n in stg.E_IRRELEVANT}}
POSITIVE = "High Risk"


@dataclass
class AttributesConfig:
    studies: str = "results/alpha-study-smollm2,results/alpha-study-smollm2-fp32"   # alpha_study.py folders
    authors_data: str = ""           # the authors' repository folder; default: the one each study was run with
    split: str = "ood"               # the test split to read: ood, where the attributes are independent
    figure: bool = True              # write <study>/attributes_<data>.png (needs matplotlib)
    out: str = "results/attributes.md"   # the table is also written here (Markdown), to be committed and cited


def dependence(values: list, answers: list[bool]) -> float | None:
    """The correlation ratio η of the 0/1 answers on an attribute's values: the spread of the "High Risk" share
    between the attribute's values over the answers' spread; None when every answer is the same (a model that
    always answers "Low Risk" depends on nothing)."""
    y = np.asarray(answers, float)
    if y.std() == 0:
        return None
    between = sum(len(g) * (statistics.fmean(g) - y.mean()) ** 2 for g in by_value(values, answers).values())
    return math.sqrt(between / ((y - y.mean()) ** 2).sum())


def floor(values: list) -> float:
    """sqrt(E[η²]) of answers independent of the attribute: (k − 1)/(n − 1) for k distinct values, n records."""
    return math.sqrt((len(set(values)) - 1) / (len(values) - 1))


def by_value(values: list, answers: list[bool]) -> dict:
    """{value: the answers of the records with that value}."""
    groups = collections.defaultdict(list)
    for value, answer in zip(values, answers):
        groups[value].append(answer)
    return groups


def share_by_value(values: list, answers: list[bool]) -> dict:
    """{value: the share of "High Risk" answers among the records with that value}."""
    groups = by_value(values, answers)
    return {value: statistics.fmean(groups[value]) for value in sorted(groups)}


def cell(values: list) -> str:
    """Mean ± std over seeds of the η that are defined; "—" when none is."""
    defined = [v for v in values if v is not None]
    return number(mean_std(defined) if defined else None)


def study_rows(folder: Path, cfg: AttributesConfig) -> list[dict]:
    """Per STG_E data set of the study with finished runs: the attributes' values in the test file and the training
    file, and the "High Risk" answers of the gold file and of every run, per setting."""
    study = saved_config(folder)
    study.authors_data = cfg.authors_data or study.authors_data
    found = []
    for data in items(study.data):
        train, tests = data_files(study, data)
        if cfg.split not in tests:
            raise cli.InputError(f"--split {cfg.split}: {data} has {', '.join(tests)}")
        records = stg.read_records(tests[cfg.split])
        attributes = [stg.parse_attributes(r["input"], "stg_e") for r in records]
        if any(set(a) != set(ATTRIBUTES) for a in attributes):
            print(f"{data}: not an STG_E data set (its records do not name the eight attributes); left out")
            continue
        settings = {}
        for setting in items(study.settings):
            outcomes = split_outcomes(folder, study, data, setting, cfg.split, tests[cfg.split], len(records))
            if outcomes:
                settings[setting] = {"accuracy": [statistics.fmean(o["correct"]) for o in outcomes],
                                     "answers": [[a.strip() == POSITIVE for a in o["answer"]] for o in outcomes]}
        if not settings:
            continue
        trained = [stg.parse_attributes(r["input"], "stg_e") for r in stg.read_records(train)]
        found.append({"folder": folder, "data": data, "split": cfg.split,
                      "values": {n: [a[n] for a in attributes] for n in ATTRIBUTES},
                      "trained": {n: sorted({a[n] for a in trained if n in a}) for n in ATTRIBUTES},
                      "gold": [str(r["target"]).strip() == POSITIVE for r in records], "settings": settings})
    return found


def markdown(found: list[dict]) -> str:
    head = " | ".join(f"{name} ({ROLE[name]})" for name in ATTRIBUTES)
    lines = [f"| study | data | answers | seeds | accuracy | \"{POSITIVE}\" share | {head} |",
             "|" + "---|" * (6 + len(ATTRIBUTES))]
    for d in found:
        where, values = f"| {d['folder'].name} | {d['data']} ({d['split']}) ", d["values"]
        lines.append(where + f"| gold | | | {100 * statistics.fmean(d['gold']):.1f} % | "
                     + " | ".join(cell([dependence(values[n], d["gold"])]) for n in ATTRIBUTES) + " |")
        for setting, s in d["settings"].items():
            cells = [cell([dependence(values[n], answers) for answers in s["answers"]]) for n in ATTRIBUTES]
            positive = statistics.fmean(statistics.fmean(answers) for answers in s["answers"])
            lines.append(where + f"| {setting} | {len(s['answers'])} | {100 * statistics.fmean(s['accuracy']):.2f} "
                         f"| {100 * positive:.1f} % | " + " | ".join(cells) + " |")
        lines.append(where + "| none (independent of the attribute) | | | | "
                     + " | ".join(f"{floor(values[n]):.2f}" for n in ATTRIBUTES) + " |")
    return "\n".join(lines)


def figure(d: dict) -> Path | None:
    """One panel per attribute: the "High Risk" share of the answers at each of its values, the gold answers and
    each setting (mean over seeds); shaded, the values the attribute never took in the training file."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): the numbers are in the table, no figure")
        return None
    fig, axes = plt.subplots(2, 4, figsize=(14, 6.5), sharey=True)
    curves = {"gold": [d["gold"]]}
    for st, s in d["settings"].items():
        curves[f"{st} ({len(s['answers'])} seed{'s' * (len(s['answers']) > 1)})"] = s["answers"]
    for ax, name in zip(axes.flat, ATTRIBUTES):
        values = d["values"][name]
        for n, (label, runs) in enumerate(curves.items()):
            shares = [share_by_value(values, answers) for answers in runs]
            xs = list(shares[0])
            ax.plot(xs, [100 * statistics.fmean(s[x] for s in shares) for x in xs], marker="o", ms=3,
                    color="black" if label == "gold" else f"C{n - 1}", lw=2.5 if label == "gold" else 1.2,
                    label=label)
        unseen = [x for x in sorted(set(values)) if x not in d["trained"][name]]
        for x in unseen:
            ax.axvspan(x - 0.5, x + 0.5, color="gray", alpha=0.15, lw=0)
        ax.set_title(f"{name} ({ROLE[name]}{' in training' if name in stg.E_SPURIOUS else ''})", fontsize=9)
        ax.set_xlabel("value", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"answers \"{POSITIVE}\" (%)", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{d['folder'].name}, {d['data']}, {d['split']} test file (attributes independent): the share of "
                 f"\"{POSITIVE}\" answers at each value; shaded: values the attribute never took in training",
                 fontsize=10)
    fig.tight_layout()
    path = d["folder"] / f"attributes_{d['data']}.png"
    with cli.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv=None) -> str:
    cfg = AttributesConfig(**vars(cli.config_parser(AttributesConfig, __doc__).parse_args(argv)))
    cli.check_output(cfg.out, "--out", folder=False)   # before the studies are read, not after
    found = []
    for folder in map(Path, items(cfg.studies)):
        if not (folder / "study_config.json").exists():
            raise cli.InputError(f"{folder}: no study_config.json; --studies names alpha_study.py output folders")
        found += study_rows(folder, cfg)
    text = markdown(found)
    cli.write_text(Path(cfg.out), text + "\n")
    print(text)
    if cfg.figure:
        for d in found:
            if path := figure(d):
                print(f"wrote {path}")
    return text


if __name__ == "__main__":
    cli.run_cli(main)
