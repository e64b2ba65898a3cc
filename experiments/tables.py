"""The findings' result tables, from the studies' committed run folders: the STG α studies in Table 1's columns,
and Table 2 and Table 5 of the paper in their layout.

    python experiments/tables.py                                   # results/tables.md, and printed
    python experiments/tables.py --findings docs/findings.md       # also the findings page's marked blocks
    python experiments/tables.py --results results --out results/tables.md

--findings (and --readme, its older name: both may be given) fills any Markdown file's marked blocks:
"<!-- stg-table: <folder>, <data> -->" ... "<!-- /stg-table -->" and "<!-- tables: <suffix> -->" ... "<!-- /tables -->".

STG: every alpha_study.py folder under --results named alpha-study-* (one per model and precision), one table per
data set: every setting's runs (the chosen one in bold; the attr-, in- and tgt- settings, whose N_i or rows are not
the paper's, in italics, last, and never chosen), accuracy in % as mean ± std over seeds, and the paired OOD
difference against vanilla on the same records with its 95 % bootstrap interval.

Table 2 / Table 5: each task is one alpha_study.py folder under --results (SmolLM2-135M-Instruct, full
fine-tuning, the authors' annotated files, the task's val file choosing the setting):
    <task>-smollm2    mawps (with mawps-gpt4o, Table 5), svamp, arc_e, gsm8k-val (the cross-task † columns)
    <task>-smollm2-fp32   the same in float32 (a CPU without native bf16): a table pair of its own, since a paired
                      difference must not mix precisions
A cell is the mean ± std over seeds of test accuracy in %, "(n)" the number of seeds; CAT is the setting chosen on
val, or, before every seed of a setting has finished, the CAT setting with runs, marked "*". "—": not run yet.
The settings past the paper (attr-, in-, tgt-; never chosen) that a task ran get rows of their own in italics.
The summaries are made again from the run folders (alpha_study.summarize), so the tables never lag the runs.
"""
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import cli  # noqa: E402
import alpha_study  # noqa: E402

# Table 2's columns: (header, study folder stem, data set of that study, split)
COLUMNS = [("MAWPS", "mawps", "mawps", "test"), ("SVAMP", "svamp", "svamp", "test"),
           ("ARC-E", "arc_e", "arc_e", "test"),
           ("GSM8K", "gsm8k-val", "gsm8k-val", "test"), ("ASDiv†", "gsm8k-val", "gsm8k-val", "asdiv"),
           ("MAWPS†", "gsm8k-val", "gsm8k-val", "mawps_ood"), ("SVAMP†", "gsm8k-val", "gsm8k-val", "svamp_ood")]
# The paper's TinyLlama-1.1B full fine-tuning rows of Table 2, accuracy in %
PAPER_TABLE2 = {"Vanilla": [38.98, 17.50, 25.38, 13.04, 13.14, 20.68, 11.00],
                "CAT": [41.16, 20.00, 26.01, 14.18, 14.04, 23.15, 11.40]}
# Table 5 (MAWPS, TinyLlama-1.1B, CAT): mean ± std over α 0.05-0.3, in %
PAPER_TABLE5 = {"GPT-4o": (41.65, 1.43), "GLM-4-air": (41.85, 2.16)}
# the downstream study folders' suffix -> their precision: one pair of tables each
PRECISIONS = {"smollm2": "bfloat16 autocast", "smollm2-fp32": "float32"}


@dataclass
class TablesConfig:
    results: str = "results"            # the folder holding the <task>-smollm2 study folders
    out: str = "results/tables.md"      # where the tables are written (markdown)
    findings: str = ""                  # a Markdown file whose <!-- stg-table: <folder>, <data> --> and
                                        # <!-- tables: <suffix> --> blocks are filled (docs/findings.md)
    readme: str = ""                    # another such file (the flag's older name; any file with those blocks)


def summarize(folder: Path) -> dict:
    """A study folder's summary, made again from its run folders (and written beside them)."""
    return alpha_study.write_summary(alpha_study.saved_config(folder), folder)


def study_folders(results: Path, suffix: str) -> dict[str, Path]:
    """{study stem: its folder}, for every downstream study folder <stem>-<suffix> that exists."""
    return {stem: results / f"{stem}-{suffix}" for stem in dict.fromkeys(stem for _, stem, _, _ in COLUMNS)
            if (results / f"{stem}-{suffix}" / "study_config.json").exists()}


def summaries(results: Path, suffix: str) -> dict:
    """{study stem: its summary}, for every downstream study folder <stem>-<suffix> that exists."""
    return {stem: summarize(folder) for stem, folder in study_folders(results, suffix).items()}


# ---------------------------------------------------------------------------------------------
# The STG α studies

# what a setting is, beside its name (the others are named by alpha_study's setting names: k<K>, a<α>, div-...)
NOTES = {"a0.6": "the paper's α", "div-a0.6": "the authors' loss",
         "k6": "control: the paper's N_i, the loss as large as attr-k3's"}


def typeset(text: str) -> str:
    """Minus signs as − in the findings page's STG tables."""
    return text.replace("-", "−")


def variant_label(st: str) -> str:
    """A setting past the paper with what it is: "tgt-k2 (Eq. 10 over the answer's rows only)"."""
    return f"{st} ({alpha_study.VARIANTS[alpha_study.variant_prefix(st)][1]})"


def stg_table(d: dict) -> list[str]:
    """One data set of an α study: a row per setting (the paper's first, the attr-, in- and tgt- ones last), the
    setting chosen on val in bold, the majority baseline last."""
    def order(st):      # the paper's settings in the study's order, then each variant's by α
        prefix = alpha_study.variant_prefix(st)
        return (1 + list(alpha_study.VARIANTS).index(prefix), d["rows"][st]["alpha"]["mean"]) if prefix else (0, 0)
    rows = sorted(d["rows"], key=order)
    lines = ["| setting | seeds | α | val | IID | OOD | C/N, last epoch | OOD − vanilla (95 % CI) |",
             "|---|---|---|---|---|---|---|---|"]
    for st in rows:
        r, paired = d["rows"][st], d["paired"].get(st)     # no paired difference for vanilla itself
        notes = [NOTES[st]] if st in NOTES else []
        if st == d["chosen"]:
            notes.append("chosen on val")
        name = f"*{variant_label(st)}*" if alpha_study.variant_prefix(st) else \
            st + (f" ({'; '.join(notes)})" if notes else "")
        cells = [name, str(r["ood"]["n"]), "0" if st == "vanilla" else typeset(alpha_study.number(r["alpha"])),
                 *(typeset(alpha_study.pct(r.get(split))) for split in ("val", "iid", "ood")),
                 typeset(alpha_study.number(r["cn_end"])), typeset(alpha_study.difference(paired))]
        if st == d["chosen"]:
            cells[0], cells[5], cells[7] = f"**{cells[0]}**", f"**{cells[5]}**", f"**{cells[7]}**"
        lines.append("| " + " | ".join(cells) + " |")
    m = {split: f"{100 * share:.2f}" for split, share in d["majority"].items()}
    lines.append(f"| majority baseline | | | {m.get('val', '—')} | {m['iid']} | {m['ood']} | | |")
    return lines


def short(revision: str | None) -> str:
    """A revision as a 7-character hash, keeping "(with uncommitted changes)"."""
    head, _, rest = str(revision).partition(" ")
    return head[:7] + (f" {rest}" if rest else "")


def of_data(data: str, by: dict) -> list[str]:
    """The keys of a summary's {revision / machine / precision: run names} that runs of `data` have."""
    return [key for key, names in by.items() if any(name.startswith(f"{data}-") for name in names)]


def stg_sections(results: Path) -> dict[str, list[str]]:
    """{"<study folder>, <data set>": its section}: a line on what the runs ran on, then the table."""
    sections = {}
    for folder in sorted(results.glob("alpha-study-*")):
        if not (folder / "study_config.json").exists():
            continue
        summary = summarize(folder)
        for data, d in summary["data"].items():
            if not d["rows"] or "ood" not in d["splits"]:
                continue
            starts = [alpha_study.number(d["cn_start"], 3)] + [    # each variant on its own scale
                f"{alpha_study.number(d[alpha_study.cn_key(p)], 3)} with {alpha_study.VARIANTS[p][1]}"
                for p in alpha_study.VARIANTS if alpha_study.cn_key(p) in d]
            ran_on = (f"{Path(summary['config']['model']).name}; runs from revision "
                      + ", ".join(short(rev) for rev in of_data(data, summary.get("revisions", {})))
                      + " on " + "; ".join(of_data(data, summary.get("machines", {}))) + ", precision: "
                      + ", ".join(of_data(data, summary.get("precisions", {}))) + ". C/N before training: median "
                      + "; ".join(starts) + ". The setting chosen on val is chosen among those with every seed "
                      "finished.")
            sections[f"{folder.name}, {data}"] = [ran_on, "", *stg_table(d)]
    return sections


def fill_blocks(path: Path, text: str, stg_tables: dict[str, list[str]], downstream: dict[str, list[str]]) -> None:
    """Replace each block of `path`, whose text is `text`, between "<!-- stg-table: <folder>, <data> -->" and
    "<!-- /stg-table -->" with that STG section's table, and between "<!-- tables: <suffix> -->" and
    "<!-- /tables -->" with that precision's Table 2 and Table 5, so that the page (docs/findings.md) shows what the
    committed runs give and nothing else."""
    def fill(match: re.Match) -> str:
        kind, key = match.group(1), match.group(2)
        sections = stg_tables if kind == "stg-table" else downstream
        if key not in sections:
            raise cli.InputError(f"{path}: <!-- {kind}: {key} --> names no study " + (
                "folder and data set" if kind == "stg-table" else "folder suffix") + " with finished runs; there "
                f"are: {', '.join(sections) or 'none'}")
        lines = [line for line in sections[key] if line.startswith("|")] if kind == "stg-table" else sections[key]
        return f"<!-- {kind}: {key} -->\n" + "\n".join(lines) + f"\n<!-- /{kind} -->"
    cli.write_text(path, re.sub(r"<!-- (stg-table|tables): (.+?) -->\n.*?<!-- /\1 -->", fill, text, flags=re.S))


def cat_setting(d: dict) -> tuple[str | None, str]:
    """The CAT setting a table shows for a data set, and "*" when it is not (yet) chosen on val."""
    if d["chosen"]:
        return d["chosen"], ""
    ran = [st for st in d["rows"] if st != "vanilla" and not alpha_study.variant_prefix(st)]   # never a variant
    return (ran[0], "*") if ran else (None, "")


def setting_label(setting: str | None, row: dict | None) -> str:
    """"k2: α 0.862": the CAT setting a cell shows and its α (the mean over seeds)."""
    return f"{setting}: α {row['alpha']['mean']:.3f}" if row else "—"


def cell(row: dict | None, split: str, mark: str = "") -> str:
    if not row or split not in row:
        return "—"
    stat = row[split]
    spread = f" ± {100 * stat['std']:.2f}" if stat["std"] is not None else ""
    return f"{100 * stat['mean']:.2f}{spread} ({stat['n']}){mark}"


def table2(found: dict) -> list[str]:
    header = "| | " + " | ".join(h for h, *_ in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for name, values in PAPER_TABLE2.items():
        lines.append(f"| paper, TinyLlama-1.1B, {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    vanilla, cat, diff, alpha, minutes = [], [], [], [], []
    for _, stem, data, split in COLUMNS:
        d = found.get(stem, {}).get("data", {}).get(data)
        if not d or not d["rows"]:
            vanilla.append("—"), cat.append("—"), diff.append("—"), alpha.append("—"), minutes.append("—")
            continue
        setting, mark = cat_setting(d)
        vanilla.append(cell(d["rows"].get("vanilla"), split))
        cat.append(cell(d["rows"].get(setting), split, mark))
        paired = d["paired_by_split"].get(setting, {}).get(split)
        diff.append(alpha_study.difference(paired))
        row = d["rows"].get(setting)
        alpha.append(setting_label(setting, row))
        timed = d["rows"].get("vanilla") or row
        minutes.append(alpha_study.number(timed["minutes"], 0) if timed else "—")
    lines += ["| ours, SmolLM2-135M, Vanilla | " + " | ".join(vanilla) + " |",
              "| ours, SmolLM2-135M, CAT | " + " | ".join(cat) + " |",
              "| ours: CAT − Vanilla, paired (95 % CI) | " + " | ".join(diff) + " |",
              "| ours: CAT setting | " + " | ".join(alpha) + " |",
              "| ours: minutes per run (vanilla) | " + " | ".join(minutes) + " |"]
    return lines + variant_rows(found)


def variant_rows(found: dict) -> list[str]:
    """Table 2's rows for the settings past the paper (attr-, in-, tgt-) that a column ran: each one's accuracy and
    its paired difference against vanilla, in italics, below the paper's rows."""
    studies = [found.get(stem, {}).get("data", {}).get(data) or {"rows": {}} for _, stem, data, _ in COLUMNS]
    variants = sorted({st for d in studies for st in d["rows"] if alpha_study.variant_prefix(st)},
                      key=lambda st: (list(alpha_study.VARIANTS).index(alpha_study.variant_prefix(st)), st))
    lines = []
    for st in variants:
        accuracy = [cell(d["rows"].get(st), split) for d, (*_, split) in zip(studies, COLUMNS)]
        paired = [alpha_study.difference(d["paired_by_split"].get(st, {}).get(split)) if st in d["rows"] else "—"
                  for d, (*_, split) in zip(studies, COLUMNS)]
        lines += [f"| *ours, past the paper: {variant_label(st)}* | " + " | ".join(accuracy) + " |",
                  f"| *ours: {st} − Vanilla, paired (95 % CI)* | " + " | ".join(paired) + " |"]
    return lines


def table5(found: dict) -> list[str]:
    if "mawps" not in found:
        return ["No MAWPS study in this precision yet."]
    lines = ["| annotations | paper, TinyLlama-1.1B, CAT (mean ± std over α 0.05–0.3) | ours, SmolLM2-135M, CAT | "
             "CAT − Vanilla, paired (95 % CI) | C/N at the end | CAT setting |", "|---|---|---|---|---|---|"]
    data_of = {"GPT-4o": "mawps-gpt4o", "GLM-4-air": "mawps"}
    summary = found.get("mawps", {})
    for name, (mean, std) in PAPER_TABLE5.items():
        d = summary.get("data", {}).get(data_of[name])
        setting, mark = cat_setting(d) if d and d["rows"] else (None, "")
        row = d["rows"].get(setting) if setting else None
        paired = d["paired_by_split"].get(setting, {}).get("test") if row else {}
        lines.append(f"| {name} | {mean:.2f} ± {std:.2f} | {cell(row, 'test', mark)} | "
                     f"{alpha_study.difference(paired)} | {alpha_study.number(row['cn_end']) if row else '—'} | "
                     f"{setting_label(setting, row)} |")
    d = summary.get("data", {}).get("mawps")
    lines.append(f"| none (Vanilla) | — | {cell(d['rows'].get('vanilla') if d else None, 'test')} | | | |")
    return lines


def downstream_section(found: dict) -> list[str]:
    """One precision's Table 2 and Table 5, after a line on what their runs ran on."""
    revisions = sorted({rev for s in found.values() for rev in s.get("revisions", {})})
    machines = sorted({m for s in found.values() for m in s.get("machines", {})})
    threads = sorted({t for s in found.values() for t in s.get("threads", [])})
    precisions = sorted({p for s in found.values() for p in s.get("precisions", {})})
    return ["Test accuracy in %, mean ± std over seeds, (n) seeds; * not all seeds finished, so no choice on val yet. "
            "Runs from revision " + (", ".join(revisions) or "—") + " on " + ("; ".join(machines) or "—")
            + ", torch threads per run: " + (", ".join(threads) or "—") + ", precision: "
            + (", ".join(precisions) or "—") + "; the minutes are vanilla's.", "",
            "**Table 2** (test accuracy in %):", "", *table2(found), "",
            "**Table 5** (MAWPS, test accuracy in %):", "", *table5(found)]


def main(argv=None) -> str:
    cfg = TablesConfig(**vars(cli.config_parser(TablesConfig, __doc__).parse_args(argv)))
    if not Path(cfg.results).is_dir():   # else every table would come out empty, without a word
        what = "not a folder" if Path(cfg.results).exists() else "no such folder"
        raise cli.InputError(f"--results {cfg.results}: {what}; give the folder that holds the study folders "
                             "(alpha-study-*, <task>-smollm2)")
    cli.check_output(cfg.out, "--out", folder=False)   # before the summaries are made again, not after
    pages = {}   # the pages whose blocks are filled, read now: a missing one is named before any work
    for flag, page in (("--findings", cfg.findings), ("--readme", cfg.readme)):
        if page and Path(page) not in pages:
            pages[Path(page)] = cli.read_text(cli.check_output(page, flag, folder=False), flag)
    sections = stg_sections(Path(cfg.results))
    stg_lines = [line for key, section in sections.items() for line in (f"## STG: {key}", "", *section, "")]
    downstream = {suffix: downstream_section(found) for suffix in PRECISIONS
                  if (found := summaries(Path(cfg.results), suffix))}
    downstream_lines = [line for suffix, section in downstream.items() for line in (
        f"## Table 2 and Table 5 on the authors' annotations (SmolLM2-135M-Instruct, {PRECISIONS[suffix]}; "
        f"folders *-{suffix})", "", *section, "")]
    text = "\n".join(["# The README's result tables (full fine-tuning)", "", *stg_lines, *downstream_lines])
    cli.write_text(Path(cfg.out), text)
    for page, page_text in pages.items():
        fill_blocks(page, page_text, sections, downstream)
    print(text)
    return text


if __name__ == "__main__":
    cli.run_cli(main)
