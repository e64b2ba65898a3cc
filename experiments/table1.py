"""Table 1 of the paper in its layout for SmolLM2-135M-Instruct (STG_S/M/L/H, full fine-tuning and LoRA), and OOD
accuracy against the training-set size, the paper's Conclusion 1 in a picture; from the committed α-study folders.

    python experiments/table1.py                                  # results/table1.md, results/table1_ood_by_size.png
    python experiments/table1.py --findings docs/findings.md      # also the page's <!-- table1 --> block

Each column is one data set of one alpha_study.py folder under --results (SOURCES; float32, the precision of every
study that ran on a CPU without native bf16). Rows: vanilla, CAT as validation chose it among the paper's settings
that finished every seed ("*": not chosen yet, the first such setting with runs), and attr-k3 (not in the paper: N_i
over the other attributes); IID and OOD accuracy in %, mean ± std over seeds, "(n)" seeds; the paired OOD difference
against vanilla on the same test records with its 95 % bootstrap interval (alpha_study.paired_difference); STG_H's
mean absolute error of the AQI; the majority baseline; the paper's TinyLlama-1.1B rows beside. "—": not run yet;
"n/a": not in the plan (LoRA on STG_L, STG_H and our generator's files).
The summaries are made again from the run folders (tables.summarize), so the table never lags the runs.
"""
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import cli  # noqa: E402
import eval as evaluation  # noqa: E402
import alpha_study  # noqa: E402
import tables  # noqa: E402

COLUMNS = ["STG_S", "STG_M", "STG_L", "STG_H", "STG_S, ours", "STG_M, ours"]
# (regime, column) -> (study folder under --results, its data set); a column a regime does not list is not planned
SOURCES = {("Full", "STG_S"): ("alpha-study-smollm2-fp32", "stg_s"),
           ("Full", "STG_M"): ("alpha-study-smollm2-fp32", "stg_m"),
           ("Full", "STG_L"): ("stg-l-smollm2-fp32", "stg_l"),
           ("Full", "STG_H"): ("stg-h-smollm2-fp32", "stg_h"),
           ("Full", "STG_S, ours"): ("gen-stg-smollm2-fp32", "gen-stg_s"),
           ("Full", "STG_M, ours"): ("gen-stg-smollm2-fp32", "gen-stg_m"),
           ("LoRA", "STG_S"): ("lora-smollm2-fp32", "stg_s"),
           ("LoRA", "STG_M"): ("lora-smollm2-fp32", "stg_m")}
REGIMES = ["Full", "LoRA"]
SIZES = {"STG_S": 400, "STG_M": 800, "STG_L": 1600}     # training records (Table 4); --val-frac 0.2 holds out a fifth
PAST_PAPER = "attr-k3"
# The paper's Table 1, TinyLlama-1.1B: (regime, split, method) -> STG_S, STG_M, STG_L, STG_H in %
PAPER = {("Full", "iid", "Vanilla"): [62.25, 89.50, 95.50, 32.20], ("Full", "iid", "CAT"): [73.50, 93.50, 95.75, 37.10],
         ("Full", "ood", "Vanilla"): [53.50, 60.75, 65.25, 4.10], ("Full", "ood", "CAT"): [63.75, 66.25, 77.00, 6.10],
         ("LoRA", "iid", "Vanilla"): [62.75, 83.50, 96.00, 31.90], ("LoRA", "iid", "CAT"): [81.50, 86.75, 96.00, 35.70],
         ("LoRA", "ood", "Vanilla"): [59.25, 56.75, 61.50, 5.90], ("LoRA", "ood", "CAT"): [65.50, 63.50, 69.50, 9.30]}


@dataclass
class Table1Config:
    results: str = "results"                     # the folder holding the study folders SOURCES names
    out: str = "results/table1.md"               # the table (markdown); the figure goes beside it
    findings: str = ""                           # a Markdown file whose <!-- table1 --> block is filled


def mae(folder: Path, data: str, setting: str, seeds: list[int], split: str) -> dict | None:
    """STG_H's mean absolute error of the AQI on `split` over the finished seeds (those the accuracy rows count),
    from each results.json: {"mae": mean ± std of the model's (over its parsed answers), "majority": that of
    always answering the most frequent AQI, "unparsed": the answers without a number, a mean}; None before any."""
    errors, majority, unparsed = [], [], []
    for seed in seeds:
        run = folder / alpha_study.run_name(data, setting, seed)
        if alpha_study.read_run(run) is not None:
            result = next(iter(evaluation.read_results(run / "results.json").values())).get(split, {})
            errors += [result["mae"]] if result.get("mae") is not None else []
            majority += [result["majority_mae"]] if result.get("majority_mae") is not None else []
            unparsed.append(result.get("unparsed", 0))
    stat = alpha_study.mean_std
    return {"mae": stat(errors) if errors else None, "majority": stat(majority) if majority else None,
            "unparsed": statistics.fmean(unparsed)} if unparsed else None


def columns(results: Path) -> dict[tuple[str, str], dict]:
    """(regime, column) -> what its cells need: the summary's data set, the CAT setting shown and its mark, the
    folder; only for studies that have a finished run."""
    found, summaries = {}, {}
    for key, (stem, data) in SOURCES.items():
        folder = results / stem
        if not (folder / "study_config.json").exists():
            continue
        if stem not in summaries:
            summaries[stem] = tables.summarize(folder)
        d = summaries[stem]["data"].get(data)
        if d and d["rows"]:
            setting, mark = tables.cat_setting(d)
            found[key] = {"d": d, "cat": setting, "mark": mark, "folder": folder, "data": data,
                          "seeds": alpha_study.items(summaries[stem]["config"]["seeds"], int)}
    return found


def setting_of(col: dict, method: str) -> str | None:
    """The study setting a method's cells show in a column: vanilla, the CAT setting shown, or attr-k3."""
    return {"Vanilla": "vanilla", "CAT": col["cat"], PAST_PAPER: PAST_PAPER}[method]


def method_rows(found: dict, regime: str) -> list[str]:
    """One regime's rows of SmolLM2: per split the three methods, the paired differences, STG_H's MAE, the
    majority answer, and the α that CAT ran with."""
    def row(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(found.get((regime, c))) if (regime, c) in SOURCES else "n/a"
                                            for c in COLUMNS) + " |"

    def accuracy(split: str, method: str):
        def cell(col):
            if not col:
                return "—"
            setting = setting_of(col, method)
            return tables.cell(col["d"]["rows"].get(setting), split, col["mark"] if method == "CAT" else "")
        return cell

    def paired(method: str):
        def cell(col):
            setting = col and (col["cat"] if method == "CAT" else PAST_PAPER)
            diff = tables.typeset(alpha_study.difference(col and col["d"]["paired"].get(setting)))
            return diff + (col["mark"] if method == "CAT" and diff != "—" else "")
        return cell

    def error(method: str):
        def cell(col):
            if not col or col["data"] != "stg_h":
                return "—" if not col else ""
            setting = setting_of(col, method)
            found = setting and mae(col["folder"], col["data"], setting, col["seeds"], "ood")
            if not found or not found["mae"]:
                return "—"
            unparsed = f", {found['unparsed']:g} unparsed" if found["unparsed"] else ""
            return alpha_study.number(found["mae"]) + f" ({found['mae']['n']}{unparsed})"
        return cell

    def majority_error(col):
        if not col or col["data"] != "stg_h":
            return "—" if not col else ""
        found = mae(col["folder"], col["data"], "vanilla", col["seeds"], "ood")
        return alpha_study.number(found["majority"]) if found and found["majority"] else "—"

    lines = [row("CAT: the setting chosen on val, its α",
                 lambda col: tables.setting_label(col["cat"], col["d"]["rows"].get(col["cat"])) + col["mark"]
                 if col else "—")]
    for split in ("iid", "ood"):
        lines += [row(f"{split.upper()} {method}", accuracy(split, method)) for method in ("Vanilla", "CAT",
                                                                                             PAST_PAPER)]
    lines += [row("OOD CAT − Vanilla (95 % CI)", paired("CAT")),
              row(f"OOD {PAST_PAPER} − Vanilla (95 % CI)", paired(PAST_PAPER))]
    if any(found.get((regime, c), {}).get("data") == "stg_h" for c in COLUMNS):
        lines += [row(f"OOD MAE {method}", error(method)) for method in ("Vanilla", "CAT", PAST_PAPER)]
        lines.append(row("OOD MAE, always the most frequent AQI", majority_error))
    lines.append(row("OOD majority answer", lambda col: f"{100 * col['d']['majority']['ood']:.2f}" if col else "—"))
    return lines


def table(found: dict) -> list[str]:
    lines = ["| | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for regime in REGIMES:
        lines.append(f"| **{regime}** |" + " |" * len(COLUMNS))
        for (reg, split, method), values in PAPER.items():
            if reg == regime:
                lines.append(f"| paper, TinyLlama-1.1B: {split.upper()} {method} | "
                             + " | ".join(f"{v:.2f}" for v in values) + " |" + " |" * (len(COLUMNS) - len(values)))
        lines += method_rows(found, regime)
    return lines


def figure(found: dict, path: Path) -> Path | None:
    """OOD accuracy against the training-set size (S, M, L), one line per method and regime, mean ± std over seeds;
    the majority answer dashed; the paper's TinyLlama-1.1B lines faint."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): the numbers are in the table, no figure")
        return None
    fig, panels = plt.subplots(1, len(REGIMES), figsize=(11, 5), sharey=True)
    colors = {"Vanilla": "tab:gray", "CAT": "tab:blue", PAST_PAPER: "tab:green"}
    for ax, regime in zip(panels, REGIMES):
        for method, color in colors.items():
            xs, ys, errs = [], [], []
            for col, size in SIZES.items():
                c = found.get((regime, col))
                setting = c and setting_of(c, method)
                stat = c and c["d"]["rows"].get(setting, {}).get("ood")
                if stat:
                    xs.append(size), ys.append(100 * stat["mean"]), errs.append(100 * (stat["std"] or 0))
            if xs:
                label = method + (" (chosen on val)" if method == "CAT" else
                                  " (not in the paper)" if method == PAST_PAPER else "")
                ax.errorbar(xs, ys, yerr=errs, marker="o", color=color, capsize=3, label=label)
        for method, color in (("Vanilla", "tab:gray"), ("CAT", "tab:blue")):
            ax.plot(list(SIZES.values()), PAPER[(regime, "ood", method)][:len(SIZES)], ls=":", marker=".",
                    color=color, alpha=0.5, label=f"paper, TinyLlama-1.1B: {method}")
        majority = [100 * c["d"]["majority"]["ood"] for col in SIZES if (c := found.get((regime, col)))]
        if majority:
            ax.axhline(majority[0], color="black", ls="--", lw=1, label="always the majority answer")
        ax.set(xscale="log", xticks=list(SIZES.values()), xticklabels=[f"{c}\n{n}" for c, n in SIZES.items()],
               xlabel="training records (a fifth held out to choose the setting)",
               title=f"SmolLM2-135M-Instruct, {regime}: OOD accuracy")
        ax.minorticks_off()
    panels[0].set_ylabel("OOD accuracy (%), mean ± std over seeds")
    legend = {}                                       # one legend under both panels, where it hides no point
    for ax in panels:
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels())})
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    with cli.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": None})
    plt.close(fig)
    return path


def fill_block(page: Path, lines: list[str]) -> None:
    """Replace the page's block between "<!-- table1 -->" and "<!-- /table1 -->" with the table."""
    text = page.read_text(encoding="utf-8")
    start, end = "<!-- table1 -->\n", "<!-- /table1 -->"
    if start not in text or end not in text:
        raise cli.InputError(f"{page}: no <!-- table1 --> ... <!-- /table1 --> block to fill")
    head, rest = text.split(start, 1)
    cli.write_text(page, head + start + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> str:
    cfg = Table1Config(**vars(cli.config_parser(Table1Config, __doc__).parse_args(argv)))
    found = columns(Path(cfg.results))
    lines = table(found)
    out = Path(cfg.out)
    picture = figure(found, out.with_name(out.stem + "_ood_by_size.png"))
    head = ["# Table 1 for SmolLM2-135M-Instruct (float32)", "",
            "Made by `python experiments/table1.py` from the study folders it names (SOURCES); accuracy in %; "
            "\"—\": not run yet; \"n/a\": not planned.", ""]
    key = ["Settings: vanilla α = 0; a0.6 α = 0.6 (the paper's, Appendix F), a0.2 α = 0.2 (the paper's for STG_H); "
           "k3 α = 3 × the median C/N of the causal rows before training; div-a0.6 the authors' published loss "
           "(their myloss.py) instead of Eq. 10, at α = 0.6; attr-k3 k3 with N_i over the record's other "
           "attributes (past the paper). \"*\": no CAT setting has finished every seed yet; the one shown is the "
           "first with runs. \"(n)\": seeds.", ""]
    text = "\n".join([*head, *lines, "", *key] + ([f"![OOD accuracy against the training-set size]({picture.name})", ""]
                                           if picture else []))
    cli.write_text(out, text)
    if cfg.findings:
        fill_block(Path(cfg.findings), lines)
    print(text)
    return text


if __name__ == "__main__":
    cli.run_cli(main)
