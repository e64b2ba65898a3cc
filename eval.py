"""Testing a checkpoint (CAT §5.2, Appendix F): batched greedy decoding, one answer checker per task,
accuracy on every test split (Tables 1 and 2), the attention analysis behind Figures 3 and 5, and
Table 1's layout from the results of several runs.

    python eval.py --model runs/<name> --data stg_s --attention
    python eval.py --compare runs/a runs/b --out table.md

Stopped midway, the same command continues: each batch's answers are kept as they come (resume_point).
"""
import dataclasses
import hashlib
import json
import math
import re
import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import cat
import cli
import stg
import batches
import hf
from hf import load_model
from model import generate

KINDS = ("causal", "spurious", "irrelevant")           # CAT §5.2.1: the three factor types of STG
COLORS = {"causal": "tab:green", "spurious": "tab:red", "irrelevant": "tab:gray"}
# short answers (a number or a label, then EOS; the checkers read the first line); GSM8K's worked solutions and any
# other task: Appendix F's 512
MAX_NEW_TOKENS = {"stg_e": 8, "stg_h": 8, "arc_e": 16, "mawps": 24, "svamp": 24, "asdiv": 24}
ATTENTION_BATCH = 16                                    # per-layer (B, H, T, T) maps are large: smaller batches


@dataclass
class EvalConfig:
    model: str | None = None          # run folder, base model alias, local folder or hub id (hf.load_model)
    data: str = "stg_s"               # data set name or JSONL path (stg.resolve_data)
    test: str = ""                    # test files as split=FILE,split=FILE instead of the data set's own
    task: str | None = None           # answer checker of every test split instead of each file's own (split_task;
                                      # see CHECKERS), and its max_new_tokens unless given
    out: str | None = None            # output folder (with --compare: a Markdown file for the table); default: the
                                      # run folder, else runs/eval-<name>
    batch_size: int = 64              # prompts decoded together (Appendix F, Table 6)
    max_new_tokens: int | None = None  # default: MAX_NEW_TOKENS per task (8 STG, 16 ARC-E, 24 MAWPS/SVAMP/ASDiv),
                                       # else 512 (Appendix F)
    max_len: int | None = None        # prompts longer than this less max_new_tokens are skipped and counted;
                                      # default: the model's max_position_embeddings
    limit: int | None = None          # evaluate only the first N records of each split
    attention: bool = False           # STG only: attention on causal / spurious / irrelevant tokens, plots
    device: str = "cuda" if torch.cuda.is_available() else "cpu"   # auto | cpu | cuda[:N]
    dtype: str = "auto"               # compute precision as train.py's --dtype: auto = bfloat16 on CUDA and on CPUs
                                      # with native bf16 matmuls, else float32; float32 | bfloat16
    compare: list[str] = field(default_factory=list)  # run folders to tabulate (Table 1) instead of evaluating


# ---------------------------------------------------------------------------------------------
# Answer checkers: each returns (the answer it read from the output or None, whether it is right)

NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|-?\.\d+")  # "1,093", "43.0", "-7", ".5";
# "1,1500" is not a thousands grouping: its number is 1
OPTION = re.compile(r"^([A-E1-9])\. (.+)$", re.MULTILINE)              # "B. breathing mask" in ARC-E inputs


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip()


def _answer_text(text: str) -> str:
    """The part after the first "#### " (GSM8K's answer mark) if any, else the text; first line, without a leading
    "Answer:" (the authors' MAWPS targets are "Answer: 84.0"), "$" and a unit in brackets ("6 (bags)" -> "6")."""
    if "#### " in text:
        text = text.split("#### ", 1)[1]
    line = re.sub(r"^answer\s*:\s*", "", _first_line(text), flags=re.IGNORECASE)
    return re.sub(r"\s*\([^)]*\)", "", line.replace("$", "")).strip()


def _number(match: re.Match) -> str:
    """A NUMBER match without its thousands commas: "1,093" -> "1093". The commas go only here, inside a number that
    NUMBER read whole: a text such as "1,1,150" is the number 1, never 1,1150 (nor a crash on "1,115")."""
    return match.group().replace(",", "")


def _close(a: str, b: str) -> bool:
    """Two numbers without commas, equal within a relative 1e-4."""
    return abs(float(a) - float(b)) <= 1e-4 * max(1.0, abs(float(b)))


def check_exact(prediction: str, target: str, question: str = "") -> tuple[str | None, bool]:
    """STG_E and any data set without a checker of its own: the first line of the stripped output must equal
    the stripped target ("High Risk" / "Low Risk"); "high risk" and "High Risk, since ..." are wrong."""
    answer = _first_line(prediction)
    return answer, answer == target.strip()


def check_stg_h(prediction: str, target: str, question: str = "") -> tuple[str | None, bool]:
    """STG_H: the first number of the output must equal the integer target (an AQI 0-100) exactly:
    "57" and "57.0" are 57, "57.4" is not; the error of that number feeds the mean absolute error."""
    match = NUMBER.search(prediction)
    if match is None:
        return None, False
    answer = _number(match)
    return answer, float(answer) == float(target)


def check_numeric(prediction: str, target: str, question: str = "") -> tuple[str | None, bool]:
    """MAWPS, SVAMP, ASDiv: the answer is the text after the first "#### " when the output has one (a model
    trained on GSM8K, Table 2's out-of-domain columns), else the output's first line, without "$" and a unit in
    brackets. A numeric target ("43.0", "6 (bags)") is matched by the FIRST number of that answer within a relative
    1e-4 ("41 more, so 43" is 41: wrong; "1,093" is 1093); a target that is not one number ("2:13", "12:50") must
    equal the answer's text."""
    answer, wanted = _answer_text(prediction), _answer_text(target)
    whole = NUMBER.fullmatch(wanted)
    if whole is None:
        return answer, answer.rstrip(".").lower() == wanted.rstrip(".").lower()
    match = NUMBER.search(answer)
    if match is None:
        return None, False
    answer = _number(match)
    return answer, _close(answer, _number(whole))


def repeats_a_number(question: str, answer: str | None) -> bool:
    """Whether a numeric answer (a checker's "5.0", or a target such as "Answer: 5.0") equals a number written in
    the question, sign aside ("10-2" holds 2): what a model answers when it copies an operand instead of computing.
    An answer that is not one number ("2:13") repeats nothing."""
    whole = NUMBER.fullmatch(_answer_text(answer or ""))
    return whole is not None and any(_close(_number(whole).lstrip("-"), _number(number).lstrip("-"))
                                     for number in NUMBER.finditer(question))


def check_gsm8k(prediction: str, target: str, question: str = "") -> tuple[str | None, bool]:
    """GSM8K: the number right after the first "#### " of the output; an output without "#### " has no answer
    (a number elsewhere in the reasoning does not count). The target is the bare number or a solution ending in
    "#### N"."""
    wanted = NUMBER.match(_answer_text(target))
    if wanted is None:
        raise ValueError(f"GSM8K target {target!r} is neither a number nor a solution ending in '#### <number>'")
    match = NUMBER.match(_answer_text(prediction)) if "#### " in prediction else None
    if match is None:
        return None, False
    answer = _number(match)
    return answer, _close(answer, _number(wanted))


def check_arc_e(prediction: str, target: str, question: str = "") -> tuple[str | None, bool]:
    """ARC-E: the option label given by the output's first line (what follows it may be a made-up next
    question), read in this order, with the labels of the input's options ("A." to "E." or "1." to "4.";
    all of them when no input is given):
    1. the first "answer is X" / "Answer: X" ("not B, the answer is D" is D);
    2. a line that is the text of one option ("a bacterial population in the bloodstream" is B);
    3. a line that starts with a label followed by ".", ")", ":", "," or nothing ("B", "(B)", "B. ...").
    Anything else has no answer ("Because ..." is not B, "A bacterial ..." is not A, "B or D" is neither)."""
    options = dict(OPTION.findall(question))
    labels = re.escape("".join(options) or "ABCDE1234")
    line = _first_line(prediction)
    said = re.search(rf"(?i:answer(?:\s+is)?\s*:?)\s*\(?([{labels}])(?![A-Za-z0-9])", line)
    texts = {text.strip().rstrip(".").lower(): label for label, text in options.items()}
    starts = re.match(rf"\(?([{labels}])\)?(?:[.):,]|$)", line)
    if said:
        answer = said.group(1)
    elif line.rstrip(".").lower() in texts:
        answer = texts[line.rstrip(".").lower()]
    else:
        answer = starts.group(1) if starts else None
    return answer, answer == target.strip()


def check_gsm8k_ood(prediction: str, target: str, question: str = "") -> tuple[str | None, bool]:
    """A model trained on GSM8K tested on MAWPS, SVAMP or ASDiv (Table 2's † columns): its answer is the text after
    "#### ", as on GSM8K (an output without one, cut off or unfinished, has no answer, where check_numeric would
    read the first number of its first line, most often one of the question's), checked against that task's target
    by check_numeric ("84.0", "6 (bags)", "2:13", "Clara")."""
    if "#### " not in prediction:
        return None, False
    return check_numeric(prediction, target, question)


CHECKERS = {"stg_e": check_exact, "stg_h": check_stg_h, "mawps": check_numeric, "svamp": check_numeric,
            "asdiv": check_numeric, "gsm8k": check_gsm8k, "gsm8k-ood": check_gsm8k_ood, "arc_e": check_arc_e,
            "generic": check_exact}


def check(task: str, prediction: str, target, question: str = "") -> tuple[str | None, bool]:
    """The answer read from `prediction` and whether it is right, by the task's checker."""
    if task not in CHECKERS:
        raise ValueError(f"no answer checker for task {task!r}; known tasks: {', '.join(CHECKERS)}")
    return CHECKERS[task](prediction, str(target), question)


def is_correct(task: str, prediction: str, target, question: str = "") -> bool:
    """Whether the model's output `prediction` answers `target` (input: the prompt, for ARC-E's options)."""
    return check(task, prediction, target, question)[1]


def split_task(data: stg.DataSet, split: str) -> str:
    """The checker of one test split: the task its file's name names, else the data set's. A model trained on
    GSM8K (gsm8k_val) and tested on merged_asdiv is checked on ASDiv's targets ("6 (bags)", "2:13", "Clara", which
    the GSM8K checker cannot read) with GSM8K's answer format ("#### N"): gsm8k-ood. It writes worked solutions
    there too, so max_new_tokens stays data.task's."""
    named = stg.guess_task(data.tests[split].stem)
    if named == "generic":
        return data.task
    return "gsm8k-ood" if data.task == "gsm8k" and CHECKERS[named] is check_numeric else named


def target_problem(task: str, target: str) -> str | None:
    """Why `task`'s checker cannot read a test target (check_stg_h and majority_baseline read it as a number,
    check_gsm8k as a number or a solution ending in "#### N"), or None when it can."""
    if task == "stg_h":
        try:
            return None if math.isfinite(float(target)) else "not a number"
        except ValueError:
            return "not a number"
    if task == "gsm8k" and NUMBER.match(_answer_text(target)) is None:
        return "neither a number nor a solution ending in '#### <number>'"
    return None


def check_test_files(data: stg.DataSet, task: str | None = None, limit: int | None = None) -> None:
    """Every test file read (stg.read_records: a record without string input and target is named by file and line)
    and each target checked by its split's answer checker (`task`, else split_task) before the model is looked up:
    a bad record found while scoring would cost the whole decoding before it."""
    for split, path in data.tests.items():
        records = stg.read_records(path)[:limit]
        if not records:
            raise cli.InputError(f"{path}: no records to evaluate; give a test file with at least one record")
        checker = task or split_task(data, split)
        for i, record in enumerate(records):
            if problem := target_problem(checker, record["target"]):
                line = cli.read_jsonl(path)[i][0]     # read again to name the line: read_records keeps no numbers
                raise cli.InputError(f"{path}:{line}: target {record['target']!r} is {problem}, which the {checker} "
                                     "answer checker needs; correct the record, or choose the checker with --task")


# ---------------------------------------------------------------------------------------------
# Decoding

def prompt_ids(tokenizer, text: str) -> list[int]:
    """Test-time prompt: [bos?] + ids(input), exactly the prefix training puts before the answer."""
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)


def generate_answers(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int,
                     done: dict[int, list[int]] | None = None, keep=None) -> list[list[int]]:
    """Greedy new tokens for each prompt (EOS excluded); prompts of similar length share a batch, results
    come back in the prompts' order. done: {prompt index: new ids} of a stopped evaluation; a batch whose prompts
    are all there is not decoded again. keep(indices, new ids) is called after each batch decoded."""
    done = done or {}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch"):
        batch = order[start:start + batch_size]
        if all(i in done for i in batch):
            new = [done[i] for i in batch]
        else:
            new = generate(model, [prompts[i] for i in batch], max_new_tokens, tokenizer.eos_ids, tokenizer.pad_id)
            if keep is not None:
                keep(batch, new)
        for i, ids in zip(batch, new):
            outputs[i] = ids
    return outputs


def resume_point(path: Path, header: dict) -> dict[int, list[int]]:
    """What a stopped evaluation of one split kept in `path` (predictions_<data>_<split>.partial.jsonl): the first
    line is the header that names the weights, the prompts and the decoding settings, then one line per batch
    decoded. With the same header here, {prompt index: new ids}; otherwise the file is started again."""
    if path.exists():
        try:
            lines = cli.complete_lines(path)        # a kill during a write leaves a last line that is dropped
            if lines and json.loads(lines[0]) == header:
                done = {}
                for line in lines[1:]:
                    batch = json.loads(line)
                    done.update(zip(batch["indices"], batch["new_ids"], strict=True))
                print(f"{path}: continuing a stopped evaluation, {len(done)} answers kept")
                return done
        except (ValueError, KeyError, TypeError) as error:   # damaged otherwise: the answers are made again
            print(f"{path}: unreadable ({type(error).__name__}: {error}); its split is answered again")
    cli.write_text(path, json.dumps(header) + "\n")
    return {}


# ---------------------------------------------------------------------------------------------
# Attention analysis (Figures 3 and 5)

def prompt_kinds(tokenizer, text: str, task: str) -> tuple[list[int], list[str], list[str | None], list[str | None]]:
    """Prompt ids ([bos?] + ids(text)), each token's text, each token's factor kind and attribute name (None
    outside the "Name: value" phrases stg.attribute_spans finds; a token overlapping two phrases takes the later's)."""
    ids, offsets = batches.token_offsets(text, tokenizer.backend)
    labels = [text[start:end].strip() or "␣" for start, end in offsets]  # ␣: a token that is only a space
    kinds: list[str | None] = [None] * len(ids)
    names: list[str | None] = [None] * len(ids)
    for name, kind, start, end in stg.attribute_spans(text, task):
        for t in cat.tokens_in_span(offsets, start, end):
            kinds[t], names[t] = kind, name
    if tokenizer.bos_id is not None:
        return [tokenizer.bos_id] + ids, ["<bos>"] + labels, [None] + kinds, [None] + names
    return ids, labels, kinds, names


def kind_numbers(row: torch.Tensor, kinds: list[str | None]) -> dict:
    """From one row of Ā (T,): mean attention per token of each kind, each kind's share of the attention on all
    attribute tokens, and the row's attention on the first token (the attention sink) and on all attribute tokens."""
    mass = {}
    mean = {}
    for kind in KINDS:
        index = [j for j, k in enumerate(kinds) if k == kind]
        if not index:
            raise ValueError(f"no {kind} attribute tokens in the prompt: attention analysis needs STG records")
        mass[kind] = float(row[index].sum())
        mean[kind] = mass[kind] / len(index)
    total = sum(mass.values())
    return {"mean": mean, "share": {kind: mass[kind] / total for kind in KINDS},
            "mass": {"first token": float(row[0]), "attributes": total}}


def attribute_numbers(row: torch.Tensor, names: list[str | None]) -> dict[str, float]:
    """From one row of Ā (T,): mean attention per token of each attribute's "Name: value" phrase."""
    index = {}
    for j, name in enumerate(names):
        if name is not None:
            index.setdefault(name, []).append(j)
    return {name: float(row[js].sum()) / len(js) for name, js in index.items()}


def attention_by_kind(model, tokenizer, records: list[dict], task: str) -> tuple[list[dict], dict]:
    """CAT Figure 3: for each record, the attention that the answer row (the last prompt position, which
    predicts the first answer token, §4.2) puts on causal, spurious and irrelevant tokens in the average map
    Ā = 1/(L·H) Σ_l Σ_h softmax(Q Kᵀ/√d_k). Returns kind_numbers per record (attribute_numbers under
    "attribute"), and the first record's Ā (T, T) with its token labels and kinds for Figure 5."""
    device = next(model.parameters()).device
    prompts = [prompt_kinds(tokenizer, r["input"], task) for r in records]
    numbers, example = [], None
    for start in tqdm(range(0, len(prompts), ATTENTION_BATCH), desc="attention", unit="batch"):
        batch = prompts[start:start + ATTENTION_BATCH]
        lengths = [len(ids) for ids, *_ in batch]
        ids = torch.full((len(batch), max(lengths)), tokenizer.pad_id, dtype=torch.long)  # (B, T), right-padded
        pad_mask = torch.zeros_like(ids)                                          # (B, T), 1 = real token
        for b, (prompt, *_) in enumerate(batch):
            ids[b, :len(prompt)] = torch.tensor(prompt)
            pad_mask[b, :len(prompt)] = 1
        out = model(ids.to(device), attention_mask=pad_mask.to(device), return_attn=True)
        avg = cat.average_attention(out.attentions).float().cpu()  # (B, T, T)
        for b, (_, _, kinds, names) in enumerate(batch):
            row = avg[b, lengths[b] - 1]                              # row T-1 predicts the answer
            numbers.append({**kind_numbers(row, kinds), "attribute": attribute_numbers(row, names)})
        if example is None:
            _, labels, kinds, _ = batch[0]
            example = {"map": avg[0, :lengths[0], :lengths[0]], "labels": labels, "kinds": kinds}
    return numbers, example


def summarize_attention(numbers: list[dict]) -> dict:
    """Per kind over records: mean and median of the per-token attention, mean share."""
    return {kind: {"mean": statistics.fmean(n["mean"][kind] for n in numbers),
                   "median": statistics.median(n["mean"][kind] for n in numbers),
                   "share": statistics.fmean(n["share"][kind] for n in numbers)} for kind in KINDS}


def summarize_attention_mass(numbers: list[dict]) -> dict[str, float]:
    """Where the answer row's attention goes, mean over records: the first token, the attribute tokens, the rest."""
    first = statistics.fmean(n["mass"]["first token"] for n in numbers)
    attributes = statistics.fmean(n["mass"]["attributes"] for n in numbers)
    return {"first token": first, "attributes": attributes, "rest": 1.0 - first - attributes}


def summarize_attribute_attention(numbers: list[dict]) -> dict[str, float]:
    """Per attribute, over the records that name it: the mean per-token attention from the answer row."""
    per_name = {}
    for n in numbers:
        for name, value in n["attribute"].items():
            per_name.setdefault(name, []).append(value)
    return {name: statistics.fmean(values) for name, values in per_name.items()}


def plot_attention(numbers: dict[str, list[dict]], example: dict, out_dir: Path, name: str) -> list[Path]:
    """Figure 3 (density of the answer row's attention per token, per factor kind, one panel per split) and
    Figure 5 (Ā over the attribute region of one prompt, tokens as labels coloured by kind), as PNG files."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: the attention numbers are in results.json; "
              "`pip install matplotlib` to get the pictures")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    density = out_dir / f"attention_density_{name}.png"
    fig, axes = plt.subplots(1, len(numbers), figsize=(5 * len(numbers), 3.5), squeeze=False)
    for ax, (split, per_record) in zip(axes[0], numbers.items()):
        for kind in KINDS:
            ax.hist([n["mean"][kind] for n in per_record], bins=30, density=True, histtype="step",
                    color=COLORS[kind], label=kind)
        ax.set(title=f"{name} {split}", xlabel="attention per token from the answer row", ylabel="density")
        ax.locator_params(axis="x", nbins=5)
        ax.legend()
    fig.tight_layout()
    with cli.atomic_path(density) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)

    first = min(j for j, kind in enumerate(example["kinds"]) if kind is not None)
    region = example["map"][first:, first:]  # (T', T'): rows attend to columns; the last row predicts the answer
    size = 4 + 0.12 * len(region)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(region.numpy(), cmap="viridis")
    ticks = range(len(region))
    ax.set_xticks(ticks, example["labels"][first:], rotation=90, fontsize=6)
    ax.set_yticks(ticks, example["labels"][first:], fontsize=6)
    for tick_labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        for tick, kind in zip(tick_labels, example["kinds"][first:]):
            tick.set_color(COLORS.get(kind, "black"))
    ax.set_title(f"average attention map, {name} (green causal, red spurious, gray irrelevant)")
    fig.tight_layout()
    attention_map = out_dir / f"attention_map_{name}.png"
    with cli.atomic_path(attention_map) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
    return [density, attention_map]


# ---------------------------------------------------------------------------------------------
# Evaluation

def majority_baseline(task: str, targets: list[str]) -> dict:
    """Always answering the most frequent target: its share (the accuracy every table reports beside a model's),
    and on STG_H the mean absolute error of that answer."""
    answer, count = Counter(targets).most_common(1)[0]
    result = {"answer": answer, "accuracy": count / len(targets), "n": len(targets)}
    if task == "stg_h":
        result["mae"] = statistics.fmean(abs(float(t) - float(answer)) for t in targets)
    return result


def score(task: str, rows: list[dict]) -> dict:
    """Accuracy of the checked rows, with the majority-label baseline, unparsed outputs and, for STG_H, the
    mean absolute error of the parsed numbers beside that of always answering the most frequent AQI."""
    n = len(rows)
    correct = sum(row["correct"] for row in rows)
    majority = majority_baseline(task, [row["target"] for row in rows])
    result = {"accuracy": correct / n, "n": n, "correct": correct,
              "unparsed": sum(row["answer"] is None for row in rows), "majority": majority["accuracy"]}
    if task == "stg_h":
        errors = [abs(float(row["answer"]) - float(row["target"])) for row in rows if row["answer"] is not None]
        result["mae"] = statistics.fmean(errors) if errors else None
        result["majority_mae"] = majority["mae"]
    return result


def answer_rows(model, tokenizer, records: list[dict], task: str, *, batch_size: int,
                max_new_tokens: int, partial: Path | None = None, model_key: dict | None = None) -> list[dict]:
    """One row per record: input, target, the raw output, the answer the task's checker read, correct. With
    partial and model_key (what the answers depend on besides the prompts: weights, device, precision), each
    batch's new ids are appended to the file `partial` as they come, and a run stopped midway continues from them
    (resume_point)."""
    prompts = [prompt_ids(tokenizer, r["input"]) for r in records]
    done, keep = {}, None
    if partial is not None and model_key is not None:
        header = {**model_key, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                  "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
        done = resume_point(partial, header)

        def keep(indices, new_ids):
            with open(partial, "a", encoding="utf-8") as f:
                f.write(json.dumps({"indices": indices, "new_ids": new_ids}) + "\n")
    new = generate_answers(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           done=done, keep=keep)
    rows = []
    for record, ids in zip(records, new):
        output = tokenizer.decode(ids)
        answer, correct = check(task, output, record["target"], record["input"])
        rows.append({"input": record["input"], "target": str(record["target"]), "output": output,
                     "answer": answer, "correct": correct})
    return rows


def weights_key(*files) -> str:
    """A name for the weights in these files that changes when any is written again: each one's path, inode, size
    and modification time (reading gigabytes to hash them would cost more than a short evaluation)."""
    if not files:
        raise ValueError("weights_key: no files to name")
    stats = [(str(Path(f).resolve()), *(getattr(Path(f).stat(), key) for key in ("st_ino", "st_size", "st_mtime_ns")))
             for f in files]
    return hashlib.sha256(json.dumps(sorted(stats)).encode()).hexdigest()


def predictions_path(out_dir: Path, name: str, split: str) -> Path:
    """Where evaluate writes one split's rows: predictions_<data>_<split>.jsonl (both names may hold "_")."""
    return Path(out_dir) / f"predictions_{name}_{split}.jsonl"


def partial_path(out_dir: Path, name: str, split: str) -> Path:
    """Where evaluate keeps one split's answers while it runs (resume_point)."""
    return Path(out_dir) / f"predictions_{name}_{split}.partial.jsonl"


def check_attention(data: stg.DataSet, attention: bool) -> None:
    """--attention reads the causal / spurious / irrelevant "Name: value" phrases that only STG records have."""
    if attention and data.task not in stg.FACTORS:
        raise cli.InputError(f"--attention needs STG data (tasks {', '.join(stg.FACTORS)}), got task {data.task!r} "
                             f"({data.name}); leave --attention out for other data")


def read_results(path: Path, run: Path | None = None) -> dict:
    """A results.json that evaluate wrote, {data: {split: {"accuracy", "majority", ...}}}; a damaged one (cut short,
    edited) raises InputError naming it and what to do: evaluate the run again, or move the file aside."""
    again = (f"evaluate the run again (python eval.py --model {run} --data <data set>)" if run is not None else
             "move it aside (eval.py then writes a new one) or choose another --out")
    results = cli.read_json(path, again)
    if not (isinstance(results, dict) and all(
            isinstance(splits, dict) and all(isinstance(r, dict) and all(
                isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
                for key in ("accuracy", "majority")) for r in splits.values())
            for splits in results.values())):
        raise cli.InputError(f"{path} is damaged: not the results.json eval.py writes ({{data set: {{split: "
                             f"{{accuracy, majority, ...}}}}}}); {again}")
    for name, splits in results.items():
        for split, r in splits.items():
            if problem := result_problem(r):
                raise cli.InputError(f"{path} is damaged: {name} {split}: {problem}; {again}")
    return results


def result_problem(r: dict) -> str | None:
    """What is out of range in one split's results (score wrote it: a share in [0, 1], counts whole and not
    negative, an MAE not negative or null), or None; a hand edit or another program's file would show as it is."""
    for key in ("accuracy", "majority"):
        if not (isinstance(r[key], (int, float)) and 0 <= r[key] <= 1):   # NaN fails both comparisons
            return f"field {key!r} is {r[key]}, where a share from 0 to 1 belongs"
    for key in ("n", "correct", "unparsed", "skipped_too_long"):
        value = r.get(key, 0)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return f"field {key!r} is {json.dumps(value)}, where a count (a whole number, 0 or more) belongs"
    if "n" in r and r.get("correct", 0) > r["n"]:
        return f"field 'correct' is {r['correct']}, more than the {r['n']} records of field 'n'"
    for key in ("mae", "majority_mae"):
        if r.get(key) is not None and not (isinstance(r[key], (int, float)) and 0 <= r[key] < math.inf):
            return f"field {key!r} is {json.dumps(r[key])}, where a mean absolute error (0 or more, or null) belongs"
    return None


def evaluate(model, tokenizer, data: stg.DataSet, *, batch_size: int = 64, max_new_tokens: int | None = None,
             out_dir=None, attention: bool = False, limit: int | None = None, dtype: str = "auto",
             max_len: int | None = None, task: str | None = None, weights: str | None = None) -> dict:
    """Accuracy on every test split of `data`: {split: {"accuracy", "n", ...}}, each split checked by `task` or
    else by its own file's task (split_task). With out_dir, writes
    predictions_<data>_<split>.jsonl and merges {data.name: result} into out_dir/results.json; with
    attention (STG only), adds the per-kind attention numbers and draws the two pictures. dtype: the compute
    precision (cli.precision), as in training. max_len: records whose prompt and max_new_tokens do not fit are
    skipped and counted (result "skipped_too_long"), as training skips them. weights (weights_key), with out_dir:
    each split's answers are kept as they come in predictions_<data>_<split>.partial.jsonl, so that an evaluation
    stopped midway continues where it stopped when called again with the same weights, device and precision;
    removed at the end."""
    check_attention(data, attention)
    check_test_files(data, task, limit)   # train.py's evaluation too: a bad record is named before any decoding
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS.get(data.task, 512)
    out_dir = Path(out_dir) if out_dir is not None else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results, numbers, example = {}, {}, None
    precision = cli.precision(device, dtype)
    model_key = None if weights is None else {"weights": weights, "device": device.type, "precision": precision}
    with torch.no_grad(), cli.autocast(device, precision):
        for split, path in data.tests.items():
            records = stg.read_records(path)[:limit]
            if not records:
                raise cli.InputError(f"{path}: no records to evaluate")
            fits = [max_len is None or len(prompt_ids(tokenizer, r["input"])) + max_new_tokens <= max_len
                    for r in records]
            skipped = fits.count(False)
            if skipped:
                print(f"{path}: {skipped} of {len(records)} prompts do not fit in {max_len} tokens with "
                      f"{max_new_tokens} new ones; they are skipped")
                records = [r for r, fit in zip(records, fits) if fit]
            if not records:
                raise cli.InputError(f"{path}: no prompt fits in {max_len} tokens (--max-len)")
            checker = task or split_task(data, split)
            partial = partial_path(out_dir, data.name, split) if out_dir is not None else None
            rows = answer_rows(model, tokenizer, records, checker, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, partial=partial, model_key=model_key)
            results[split] = {**score(checker, rows), **({"skipped_too_long": skipped} if skipped else {})}
            if attention:  # the example drawn is the last split's first record: OOD for STG, where the trap shows
                numbers[split], example = attention_by_kind(model, tokenizer, records, data.task)
                results[split]["attention"] = summarize_attention(numbers[split])
                results[split]["attention_by_attribute"] = summarize_attribute_attention(numbers[split])
                results[split]["attention_mass"] = summarize_attention_mass(numbers[split])
                for row, n in zip(rows, numbers[split]):
                    row["attention"] = n["mean"]
            if out_dir is not None:
                cli.write_jsonl(predictions_path(out_dir, data.name, split), rows)
    model.train(was_training)
    if out_dir is not None:
        path = out_dir / "results.json"
        merged = read_results(path) if path.exists() else {}
        cli.write_text(path, json.dumps({**merged, data.name: results}, indent=2) + "\n")
        if attention:
            plot_attention(numbers, example, out_dir, data.name)
        for split in data.tests:   # kept until every split is done: a split finished before a stop is not redone
            partial_path(out_dir, data.name, split).unlink(missing_ok=True)
    return results


def format_results(name: str, results: dict) -> str:
    """A small text table: one line per split."""
    lines = [f"{'data':<10} {'split':<6} {'n':>5} {'accuracy':>9} {'majority':>9}  extra"]
    for split, r in results.items():
        extra = f"MAE {r['mae']:.2f}  " if r.get("mae") is not None else ""
        if "attention" in r:
            extra += "attention per token " + ", ".join(f"{k} {r['attention'][k]['mean']:.4f}" for k in KINDS)
        lines.append(f"{name:<10} {split:<6} {r['n']:>5} {r['accuracy']:>9.4f} {r['majority']:>9.4f}  {extra}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Table 1 from several runs

# Fields of train_config.json that do not change what a run learns: runs differing only in them (and the seed) are
# seeds of one setting, averaged in one row. Every other field, when it differs, makes another row. (pad_multiple
# only rounds batch shapes up: the pads sit after every token and the losses do not change.)
BOOKKEEPING = ("seed", "name", "out", "resume", "overwrite", "save_every", "stop_after", "eval", "save", "extra",
               "pad_multiple")
RENAMED = {"gamma": "gamma_schedule"}   # a field of older train_config.json files -> its name now


def setting_key(cfg: dict) -> dict:
    """What a run learns from, as train_config.json says it: every field but BOOKKEEPING. A field an older file
    lacks (a flag added since, whose default is what runs did before it) counts as train.py's default."""
    import train                                       # here: train.py imports this module
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)
                if f.default is not dataclasses.MISSING}
    cfg = {RENAMED.get(k, k): v for k, v in cfg.items()}
    return {k: v for k, v in {**defaults, **cfg}.items() if k not in BOOKKEEPING}


def run_config(run: Path) -> dict | None:
    """A run's train_config.json, or None where there is none (a folder of eval.py's own); a damaged one raises
    InputError naming it and what to do."""
    path = run / "train_config.json"
    if not path.exists():
        return None
    what_to_do = f"train.py writes it when a run starts: restore it from a copy, or leave {run} out of --compare"
    cfg = cli.read_json(path, what_to_do)
    if not isinstance(cfg, dict):
        raise cli.InputError(f"{path} is damaged: not the JSON object train.py writes; {what_to_do}")
    import runs                                        # as in setting_key
    import train
    fields = {f.name: f.type for f in dataclasses.fields(train.TrainConfig)}
    for key, value in cfg.items():   # a hand edit ("alpha": "0.6") would end in a traceback in the table's labels
        kind = fields.get(RENAMED.get(key, key))
        if kind is not None and not runs.fits(value, kind):
            raise cli.InputError(f"{path} is damaged: {key} is {json.dumps(value)}, not the "
                                 f"{getattr(kind, '__name__', kind)} train.py writes; {what_to_do}")
    return cfg


def run_label(run: Path, cfg: dict | None = None) -> str:
    """A row name for a run: model, full/LoRA and method from train_config.json (cfg, else read), else the folder
    name."""
    cfg = run_config(run) if cfg is None else cfg
    if cfg is None:
        return run.name
    method = f"CAT α={cfg['alpha']:g}" if cfg.get("alpha") else "Vanilla"   # train.py: α = 0 is vanilla
    if cfg.get("alpha") and cfg.get("gamma_schedule", cfg.get("gamma")) == "constant":
        method += " γ=1"                                                  # Table 3's ablation of the γ decay
    return f"{Path(cfg.get('model', run.name)).name} {'LoRA' if cfg.get('lora') else 'Full'} {method}"


def setting(field_name: str, value) -> str:
    """One field that tells two rows apart, as the flag that sets it: "--contrast attributes", "--val-frac 0.2",
    "--lora" / "--no-lora"; "folder a/run1" for runs without train_config.json."""
    if field_name == "folder":
        return f"folder {value}"
    flag = cli.flag_name(field_name)
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {json.dumps(value) if value == '' else value}"


TABLE_HEAD = "| method | "   # how a table of --compare starts: an --out that does not is a file of something else


def compare_runs(runs: list[str]) -> str:
    """Table 1's layout as Markdown: one row per setting, one column per data set and split, accuracies in %, and
    the majority-label baseline as the last row. Runs whose train_config.json differ only in the seed (and
    BOOKKEEPING) are averaged in one row; where runs of one label (model, full/LoRA, method) would share a cell but
    differ in more, each row's label adds the settings that tell them apart ("--contrast attributes")."""
    entries, seen = [], {}
    for run in map(Path, runs):
        path = run / "results.json"
        if not run.is_dir():
            raise cli.InputError(f"--compare {run}: no such run folder")
        if not path.exists():
            raise cli.InputError(f"{path} does not exist: evaluate the run first "
                                 f"(python eval.py --model {run} --data <data set>)")
        if run.resolve() in seen:
            raise cli.InputError(f"--compare {run}: the run is named twice (also as {seen[run.resolve()]}); its "
                                 f"results would count twice in a mean")
        seen[run.resolve()] = run
        cfg = run_config(run)
        key = {"folder": str(run)} if cfg is None else setting_key(cfg)
        results = read_results(path, run)
        # a copy of a run folder: the same setting, seed and results (a config without its seed cannot tell)
        same = (json.dumps(key, sort_keys=True), None if cfg is None else cfg.get("seed"),
                json.dumps(results, sort_keys=True))
        if same[1] is not None and same in seen:
            raise cli.InputError(f"--compare {run}: the same setting, seed and results as {seen[same]} (a copy?); "
                                 "its results would count twice in a mean")
        seen[same] = run
        entries.append((run_label(run, cfg), key, results))

    # the fields that differ between runs of one label that land in one cell (data set and split)
    in_cell: dict[tuple[str, str], list[dict]] = {}
    for label, key, results in entries:
        for name, splits in results.items():
            for split in splits:
                in_cell.setdefault((label, f"{name} {split.upper()}"), []).append(key)
    apart: dict[str, list[str]] = {}
    for (label, _), keys in in_cell.items():
        for name in dict.fromkeys(k for key in keys for k in key):     # config order, each field once
            if len({json.dumps(key.get(name), sort_keys=True) for key in keys}) > 1:
                apart.setdefault(label, [])
                apart[label] += [name] if name not in apart[label] else []

    cells: dict[tuple[str, str], list[float]] = {}
    rows, columns, majority = [], [], {}
    for label, key, results in entries:
        if apart.get(label):
            label += " (" + ", ".join(setting(name, key.get(name)) for name in apart[label]) + ")"
        rows += [label] if label not in rows else []
        for name, splits in results.items():
            for split, r in splits.items():
                column = f"{name} {split.upper()}"
                columns += [column] if column not in columns else []
                cells.setdefault((label, column), []).append(r["accuracy"])
                majority.setdefault(column, r["majority"])

    def cell(values: list[float]) -> str:
        text = f"{100 * statistics.fmean(values):.2f}%"
        return text + (f" (mean of {len(values)})" if len(values) > 1 else "")

    lines = [TABLE_HEAD + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in rows:
        lines.append(f"| {label} | " + " | ".join(cell(cells[label, c]) if (label, c) in cells else "–"
                                                  for c in columns) + " |")
    lines.append("| majority baseline | " + " | ".join(cell([majority[c]]) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line

def default_out_dir(model: str) -> Path:
    """The run folder when the model is a folder under runs/, else runs/eval-<name>."""
    path = Path(model)
    if path.is_dir() and path.resolve().parent.name == "runs":
        return path
    return Path("runs") / f"eval-{path.name if path.is_dir() else model.replace('/', '-')}"


def parse_args(argv=None) -> EvalConfig:
    """The command line as an EvalConfig, every flag checked (a bad one raises cli.InputError naming it)."""
    p = cli.config_parser(EvalConfig, __doc__)
    cfg = EvalConfig(**vars(p.parse_args(argv)))
    if not cfg.compare and cfg.model is None:
        raise cli.InputError("give --model to evaluate, or --compare RUN ... to tabulate results")
    cli.check_numbers(cfg)
    for name in ("batch_size", "max_new_tokens", "max_len", "limit"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise cli.InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.task is not None and cfg.task not in CHECKERS:
        raise cli.InputError(f"--task {cfg.task!r}: choose one of {', '.join(CHECKERS)}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise cli.InputError(f"--dtype {cfg.dtype!r}: choose auto, float32 or bfloat16")
    cli.check_device(cfg.device)
    cfg.device = cli.resolve_device(cfg.device)
    return cfg


MODEL_MARK = "evaluated_model.json"   # in an output folder of eval.py's own: the model whose results it holds


def check_out_dir(out_dir: Path, model_folder: Path, chosen: bool) -> None:
    """One output folder holds one model's results: its results.json merges every data set evaluated into it, so
    a second model (a/run1 and b/run1 share the default runs/eval-run1) would mix into the first's. The folder's
    MODEL_MARK names its model; another model is refused, as is a default folder of an older eval.py with results
    and no mark (chosen: the folder was given with --out, which adopts it). A training run's folder (with
    train_config.json) holds its own model's results and has no mark. Also refuses a damaged results.json there
    before any work, rather than after it."""
    if (out_dir / "results.json").exists():
        read_results(out_dir / "results.json")
    if (out_dir / "train_config.json").exists():   # a training run's folder holds that run's results only
        if out_dir.resolve() != Path(model_folder).resolve():
            raise cli.InputError(f"{out_dir} is another training run's folder, and its results.json would take this "
                                 f"model's results: give this evaluation of {model_folder} its own --out")
        return
    mark, model = out_dir / MODEL_MARK, str(Path(model_folder).resolve())
    if mark.exists():
        recorded = cli.read_json(mark, f"delete it if {out_dir} holds only the results of one model")
        recorded = recorded.get("model") if isinstance(recorded, dict) else recorded
        if recorded != model:
            raise cli.InputError(f"{out_dir} holds the results of another model ({recorded}), and its results.json "
                                 f"would mix the two: give this evaluation of {model} its own --out")
    elif not chosen and (out_dir / "results.json").exists():
        raise cli.InputError(f"{out_dir}, the default output folder, already holds results and does not say of which "
                             f"model: pass --out {out_dir} if they are {model}'s, or choose another --out")


def mark_out_dir(out_dir: Path, model_folder: Path) -> None:
    """Write MODEL_MARK, the model whose results out_dir holds (check_out_dir), unless it is a training run's."""
    if not (out_dir / "train_config.json").exists():
        cli.write_text(out_dir / MODEL_MARK, json.dumps({"model": str(Path(model_folder).resolve())}) + "\n")


def check_model_folder(model: str) -> None:
    """A run folder that training has not finished is refused with what to do (a missing path: hf.resolve)."""
    path = Path(model)
    if (path / "checkpoint" / "state.pt").exists() and not (path / "model.safetensors").exists() \
            and not (path / "adapter_config.json").exists():
        raise cli.InputError(f"{path} is an unfinished training run (it has a checkpoint, no model yet): "
                             f"finish it with python train.py --resume {path}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after main has said what was kept: __main__ ends in exit status 130 without saying more."""


def interrupted(out_dir: Path, data: stg.DataSet) -> str:
    """What to say after Ctrl-C in the evaluation: what is kept (resume_point's files) and how to go on."""
    kept = [partial_path(out_dir, data.name, split) for split in data.tests
            if partial_path(out_dir, data.name, split).exists()]
    where = (f"the answers decoded so far are kept in {', '.join(map(str, kept))}: run the same command again to "
             f"continue from them" if kept else "no answer was decoded: run the same command again")
    return f"interrupted: {out_dir / 'results.json'} was not written (it is written when every split is done); {where}"


def main(argv=None) -> None:
    cfg = parse_args(argv)
    if cfg.compare:
        if cfg.out:
            cli.check_output(cfg.out, "--out", folder=False)
            out = Path(cfg.out)
            if out.exists() and not out.read_text(encoding="utf-8", errors="replace").startswith(TABLE_HEAD):
                raise cli.InputError(f"--out {out}: the file exists and is not a table of eval.py --compare; "
                                     "give a new file (a .md) for the table")
        table = compare_runs(cfg.compare)
        print(table)
        if cfg.out:
            cli.write_text(Path(cfg.out), table + "\n")
        return
    out_dir = Path(cli.check_output(cfg.out if cfg.out is not None else default_out_dir(cfg.model), "--out",
                                    folder=True))
    check_model_folder(cfg.model)
    data = stg.resolve_data(cfg.data, tests=cfg.test or None)
    if cfg.task:
        data = replace(data, task=cfg.task)
    check_attention(data, cfg.attention)
    check_test_files(data, cfg.task, cfg.limit)   # a bad record is named now, not after a download and the decoding
    folder = str(hf.resolve(cfg.model))    # a hub id is looked up (and downloaded) once, here
    check_out_dir(out_dir, Path(folder), chosen=cfg.out is not None)
    precision = cli.precision(cfg.device, cfg.dtype)
    print(f"precision: {precision} on {cfg.device}")
    weights = torch.bfloat16 if precision == "bfloat16" and cfg.device.startswith("cuda") else torch.float32
    try:
        model, tokenizer = load_model(folder, dtype=weights, device=cfg.device)
        key = weights_key(*hf.source_files(folder))
        mark_out_dir(out_dir, Path(folder))
        results = evaluate(model, tokenizer, data, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                           out_dir=out_dir, attention=cfg.attention, limit=cfg.limit, dtype=precision,
                           max_len=cfg.max_len or model.args.extra.get("max_position_embeddings"), task=cfg.task,
                           weights=key)
    except KeyboardInterrupt:   # Ctrl-C: every file is written whole (cli.atomic_path) or appended a line at a time
        print(f"\n{interrupted(out_dir, data)}", file=sys.stderr)
        raise Interrupted from None
    print(format_results(data.name, results))
    print(f"results in {out_dir / 'results.json'}, predictions in {out_dir}/predictions_{data.name}_*.jsonl")


if __name__ == "__main__":
    try:
        cli.run_cli(main)
    except KeyboardInterrupt as stop:
        if not isinstance(stop, Interrupted):   # before the evaluation, or in --compare: nothing is written until then
            print("\ninterrupted before any result was written: run the same command again", file=sys.stderr)
        raise SystemExit(130) from None
