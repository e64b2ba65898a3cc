"""The README's figure: does CAT work? Each study's paired accuracy difference against vanilla, with its 95 %
bootstrap interval, for the CAT setting chosen on validation and for the one setting past the paper that moved it.

    python experiments/verdict.py                       # docs/verdict.png, from the committed study folders

STG (OOD accuracy, three seeds each): the setting chosen on val and attr-k3 (N_i over the record's other attributes,
past the paper), on the authors' files in the bf16 and float32 studies and on our generator's STG_S; a grey bar
marks where always answering "Low Risk" stands against vanilla's mean. Downstream (test accuracy, bf16, the authors'
annotations): Table 2's columns, the setting chosen on each task's val file. Every number is read from the summaries
that experiments/tables.py makes again from the run folders, so the figure never lags them.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import cli  # noqa: E402
import tables  # noqa: E402

# (label, study folder, data set, setting: "chosen" or a setting name)
STG_ROWS = [("STG_S, bf16", "alpha-study-smollm2", "stg_s", "chosen"),
            ("STG_S, bf16", "alpha-study-smollm2", "stg_s", "attr-k3"),
            ("STG_S, float32", "alpha-study-smollm2-fp32", "stg_s", "chosen"),
            ("STG_S, float32", "alpha-study-smollm2-fp32", "stg_s", "attr-k3"),
            ("STG_M, float32", "alpha-study-smollm2-fp32", "stg_m", "chosen"),
            ("STG_M, float32", "alpha-study-smollm2-fp32", "stg_m", "attr-k3"),
            ("our STG_S, float32", "gen-stg-smollm2-fp32", "gen-stg_s", "chosen"),
            ("our STG_S, float32", "gen-stg-smollm2-fp32", "gen-stg_s", "attr-k3")]


@dataclass
class VerdictConfig:
    results: str = "results"            # the folder holding the study folders
    out: str = "docs/verdict.png"       # the figure


@dataclass
class Row:
    label: str
    mean: float            # paired difference against vanilla, in points
    low: float
    high: float
    past_paper: bool       # a setting past the paper (attr-)
    majority_gap: float | None = None   # always answering the majority label, minus vanilla's mean, in points


def stg_rows(results: Path) -> list[Row]:
    rows, summaries = [], {}
    for label, folder, data, setting in STG_ROWS:
        if folder not in summaries:
            summaries[folder] = tables.summarize(results / folder)
        d = summaries[folder]["data"][data]
        name = d["chosen"] if setting == "chosen" else setting
        paired = d["paired"][name]
        gap = 100 * (d["majority"]["ood"] - d["rows"]["vanilla"]["ood"]["mean"])
        rows.append(Row(f"{label}: {name}", 100 * paired["mean"],
                        100 * paired["ci95"][0], 100 * paired["ci95"][1], setting != "chosen", gap))
    return rows


def downstream_rows(results: Path) -> list[Row]:
    found = tables.summaries(results, "smollm2")
    rows = []
    for header, stem, data, split in tables.COLUMNS:
        d = found.get(stem, {}).get("data", {}).get(data)
        if not d or not d["rows"]:
            continue
        setting, mark = tables.cat_setting(d)
        paired = d["paired_by_split"].get(setting, {}).get(split)
        if not paired or mark:            # only settings chosen on val with every seed finished
            continue
        rows.append(Row(f"{header}, bf16: {setting}", 100 * paired["mean"], 100 * paired["ci95"][0],
                        100 * paired["ci95"][1], False))
    return rows


def draw(stg: list[Row], downstream: list[Row], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    rows = stg + downstream
    fig, ax = plt.subplots(figsize=(9, 0.36 * len(rows) + 1.9))
    y = list(range(len(rows)))[::-1]
    for yi, r in zip(y, rows):
        color = "tab:orange" if r.past_paper else "tab:blue"
        if r.majority_gap is not None:
            ax.plot([0, r.majority_gap], [yi, yi], color="0.8", linewidth=7, solid_capstyle="butt", zorder=1)
        ax.plot([r.low, r.high], [yi, yi], color=color, linewidth=2, zorder=2)
        ax.plot(r.mean, yi, "o", color=color, zorder=3)
        ax.annotate(f"{r.mean:+.1f}", (r.high, yi), xytext=(4, -3), textcoords="offset points", fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    if downstream:
        ax.axhline(len(downstream) - 0.5, color="0.5", linewidth=0.6, linestyle="--")
    ax.set_yticks(y)
    ax.set_yticklabels([r.label for r in rows], fontsize=9)
    ax.set_xlabel("CAT − vanilla, accuracy points, paired, 95 % interval (STG: OOD test file; downstream: test file)",
                  fontsize=9)
    ax.set_title("Does CAT work? SmolLM2-135M-Instruct, full fine-tuning, the authors' files (and our STG_S)",
                 fontsize=10)
    handles = [Line2D([], [], color="tab:blue", marker="o", label="CAT as published, the setting chosen on val"),
               Line2D([], [], color="tab:orange", marker="o", label="past the paper: N_i over the other attributes"),
               Line2D([], [], color="0.8", linewidth=7, label='always answering "Low Risk", minus vanilla')]
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.tight_layout()
    with cli.atomic_path(out) as tmp:   # a stop midway leaves the figure as it was, not half of one
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> Path:
    cfg = VerdictConfig(**vars(cli.config_parser(VerdictConfig, __doc__).parse_args(argv)))
    cli.check_output(cfg.out, "--out", folder=False)   # before the summaries are made again, not after
    results = Path(cfg.results)
    stg, downstream = stg_rows(results), downstream_rows(results)
    for r in stg + downstream:
        print(f"{r.label}: {r.mean:+.2f} ({r.low:+.2f}, {r.high:+.2f})"
              + (f"; majority − vanilla {r.majority_gap:+.2f}" if r.majority_gap is not None else ""))
    draw(stg, downstream, Path(cfg.out))
    print(f"wrote {cfg.out}")
    return Path(cfg.out)


if __name__ == "__main__":
    cli.run_cli(main)
