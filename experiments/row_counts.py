"""How many terms Eq. 10's sum has on each data set: the causal rows of a record, and how many predict its target.

    python experiments/row_counts.py --model <SmolLM2 folder> --authors-data <CAT repo folder>
    python experiments/row_counts.py --model <folder> --authors-data <folder> --data stg_s,mawps --limit 0

L_attn = sum_i max(0, α − C_i/N_i) has one term per row that sees a causal and another token (variants.row_counts;
train.py records the counts in train_config.json, extra.cat_rows, and prints them for CAT runs). On STG_E those are
the few rows that predict the answer; the authors' downstream annotations also link phrases inside the question, so
most of their rows sit in the prompt, and the same α gives a sum several times larger beside the same L_next. The
authors' published loss (train.py --attn-loss div) averages over the rows instead. Records longer than train.py's
--max-len are left out, as in training. Writes a Markdown table to standard output and to --out
(results/row_counts.md); reads the tokenizer only.
"""
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
import batches  # noqa: E402
import hf  # noqa: E402
import variants  # noqa: E402
import cli  # noqa: E402
import stg  # noqa: E402
import train  # noqa: E402
from alpha_study import StudyConfig, data_files  # noqa: E402
from stg_grid import items  # noqa: E402


@dataclass
class RowsConfig:
    model: str = ""                  # the model whose tokenizer splits the records (a folder, alias or hub id)
    authors_data: str = ""           # folder with the authors' STG/, MAWPS/, ... folders (their repository)
    data: str = "stg_s,stg_h,mawps,mawps-gpt4o,svamp,arc_e,gsm8k-val"   # alpha_study.py's data set names
    limit: int = 300                 # records read from each training file (0 = all)
    out: str = "results/row_counts.md"   # the table is also written here (Markdown), to be committed and cited


def table(cfg: RowsConfig) -> str:
    tok = hf.load_tokenizer(cfg.model)
    study, max_len = StudyConfig(authors_data=cfg.authors_data), train.TrainConfig().max_len
    lines = ["| data set | records read | tokens per record | target tokens (with EOS) | causal rows per annotated "
             "record | of them predicting target tokens |", "|---|---|---|---|---|---|"]
    for data in items(cfg.data):
        train_file, _ = data_files(study, data)
        records = stg.read_records(train_file)
        records = records[:cfg.limit] if cfg.limit > 0 else records
        examples = [ex for ex in (batches.encode(record, tok)[0] for record in records) if len(ex.ids) <= max_len]
        if not examples:   # as training: records over --max-len are left out
            raise cli.InputError(f"{train_file}: no record of at most {max_len} tokens to count")
        counts = variants.row_counts(examples)
        lines.append(f"| {data} | {len(examples)} | {statistics.fmean(len(ex.ids) for ex in examples):.0f} | "
                     f"{statistics.fmean(ex.n_targets for ex in examples):.1f} | {counts['rows']:.1f} | "
                     f"{counts['target_rows']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    cfg = RowsConfig(**vars(cli.config_parser(RowsConfig, __doc__).parse_args(argv)))
    if not cfg.model:
        raise cli.InputError("--model: the model whose tokenizer splits the records (a folder, alias or hub id)")
    cli.check_output(cfg.out, "--out", folder=False)   # before the records are read, not after
    text = table(cfg)
    cli.write_text(Path(cfg.out), text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    cli.run_cli(main)
