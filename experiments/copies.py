"""Do a downstream study's answers repeat a number of the question? Per data set and setting: test accuracy, the
share of test answers that equal a number written in the question (an operand copied instead of a result
computed), and that share for the gold answers; the share of outputs from which the checker read no answer (a
GSM8K-trained model's answer without its final "#### N"), and the accuracy among the others; one row block per
study folder (a precision each). For a multiple-choice task (ARC-E) a second table instead: how the answers spread
over the option labels, beside the gold answers' spread, to show whether a setting settles on one label.

    python experiments/copies.py                      # every Table 2 study under results/, its --authors-data
    python experiments/copies.py --studies results/mawps-smollm2 --authors-data <CAT repo folder>

CAT's causes in the authors' math annotations are mostly the question's numbers ({"84.0": ["89 apples", "5"]}),
so a model pushed to attend to them may answer with one of them. Reads each study's run folders (outcomes.json
holds every test answer) and the test files of the authors' repository; writes a Markdown table to standard output
and to --out (results/copies.md).
"""
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import eval as evaluation  # noqa: E402
import cli  # noqa: E402
import stg  # noqa: E402
import tables  # noqa: E402
from alpha_study import data_files, saved_config, split_outcomes  # noqa: E402
from stg_grid import items  # noqa: E402


@dataclass
class CopiesConfig:
    studies: str = ""                # comma-separated alpha_study.py folders; default: every Table 2 study folder
                                     # under results/, each precision's (tables.study_folders)
    authors_data: str = ""           # the authors' repository folder; default: the one each study was run with
    split: str = "test"              # the test split of each data set to read (test; gsm8k-val also asdiv, ...)
    out: str = "results/copies.md"   # the table is also written here (Markdown), to be committed and cited


def share(flags: list[bool]) -> str:
    return f"{100 * statistics.fmean(flags):.1f} %" if flags else "—"


LABELS = "ABCD"   # ARC-E's usual options; "1"-"4" and "E" (3 % of its test records) count as other labels


def spread(answers: list) -> str:
    """The shares of the answers per option label: "A 25 / B 24 / C 26 / D 23 / other 2 / none 0" (in %)."""
    shares = [sum(a == label for a in answers) for label in LABELS]
    other, none = sum(a is not None and a not in LABELS for a in answers), sum(a is None for a in answers)
    return " / ".join(f"{name} {100 * n / len(answers):.0f}" for name, n in
                      [*zip(LABELS, shares), ("other", other), ("none", none)])


def commonest(answers: list) -> str:
    """The share of the most frequent answer (no answer is none), in %."""
    given = [a for a in answers if a is not None]
    return f"{100 * max(map(given.count, set(given)), default=0) / len(answers):.1f} %"


def table(cfg: CopiesConfig) -> str:
    lines = ["| study | data set | setting | seeds | accuracy | answers that repeat a number of the question | "
             "gold answers that do | outputs with no answer read | accuracy where one is read |",
             "|---|---|---|---|---|---|---|---|---|"]
    choices = ["| study | data set | setting | seeds | accuracy | answers per option label, % | "
               "the commonest label's share |", "|---|---|---|---|---|---|---|"]
    folders = list(map(Path, items(cfg.studies))) if cfg.studies else \
        [folder for suffix in tables.PRECISIONS for folder in tables.study_folders(Path("results"), suffix).values()]
    if not folders:
        raise cli.InputError("results/ holds no Table 2 study folder (<task>-smollm2[-fp32]); --studies names "
                             "alpha_study.py output folders")
    for folder in folders:
        if not (folder / "study_config.json").exists():
            raise cli.InputError(f"{folder}: no study_config.json; --studies names alpha_study.py output folders")
        study = saved_config(folder)
        study.authors_data = cfg.authors_data or study.authors_data
        for data in items(study.data):
            tests = data_files(study, data)[1]
            if cfg.split not in tests:
                raise cli.InputError(f"--split {cfg.split}: {data} has {', '.join(tests)}")
            records = stg.read_records(tests[cfg.split])
            multiple_choice = stg.guess_task(tests[cfg.split].stem) == "arc_e"
            if multiple_choice:
                targets = [str(r["target"]).strip() for r in records]
                choices.append(f"| {folder.name} | {data} | gold | | | {spread(targets)} | {commonest(targets)} |")
            else:
                gold = [evaluation.repeats_a_number(r["input"], str(r["target"])) for r in records]
            for setting in items(study.settings):
                outcomes = split_outcomes(folder, study, data, setting, cfg.split, tests[cfg.split], len(records))
                if not outcomes:
                    continue
                accuracy = [c for o in outcomes for c in o["correct"]]
                if multiple_choice:
                    answers = [a for o in outcomes for a in o["answer"]]
                    rows, cells = choices, [spread(answers), commonest(answers)]
                else:
                    answers = [a for o in outcomes for a in o["answer"]]
                    copies = [evaluation.repeats_a_number(r["input"], a)
                              for o in outcomes for r, a in zip(records, o["answer"])]
                    read = [c for a, c in zip(answers, accuracy) if a is not None]
                    rows, cells = lines, [share(copies), share(gold), share([a is None for a in answers]),
                                          share(read)]
                rows.append("| " + " | ".join([folder.name, data, setting, str(len(outcomes)), share(accuracy),
                                               *cells]) + " |")
    return "\n\n".join("\n".join(rows) for rows in (lines, choices) if len(rows) > 2)


def main(argv=None) -> str:
    cfg = CopiesConfig(**vars(cli.config_parser(CopiesConfig, __doc__).parse_args(argv)))
    cli.check_output(cfg.out, "--out", folder=False)   # before the studies are read, not after
    text = table(cfg)
    cli.write_text(Path(cfg.out), text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    cli.run_cli(main)
