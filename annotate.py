"""CAT §4.1: causal annotations from an assistant LLM, and the five reasoning data sets they are made for.

    python annotate.py fetch gsm8k [--source FILE] [--out data/]
    python annotate.py annotate --task gsm8k --in data/gsm8k_train.jsonl \
        --out data/gsm8k_train_annotated.jsonl --base-url https://api.openai.com/v1 --model gpt-4o

Step 1 (prompt): the task description P_t and a handwritten demo P_d of Appendix B, then the record.
Step 2 (annotation): M = LLM([P_t; P_d; Q; A]), a JSON dict {effect phrase: [cause phrases]}, kept as the
record format's `important` list of one-key dicts. The client speaks the OpenAI chat-completions API, so
GLM (the paper's assistant), OpenAI and local servers all work. STG needs no LLM: stg.py makes its rules.
"""
import contextlib
import email.utils
import fnmatch
import hashlib
import json
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import requests
from tqdm import tqdm

import cat
import cli
import stg

# ----------------------------------------------------------------------------- prompts (Appendix B)
# The math description is the same for SVAMP, GSM8K and MAWPS in Appendix B (MAWPS's copy lost its braces
# in print). Two print artefacts of the paper are repaired in the demos: GSM8K's "48/2 = <<48/2=24>>24"
# (printed "482 = «482=24»24", the upstream text has the calculator marks) and the JSON braces of ARC_E.
MATH_TASK = (
    "You need to evaluate the causal importance relationships between tokens in text data from the field of "
    "mathematical reasoning. Among them, entities, values, and keywords containing operation symbols are crucial "
    "for numerical reasoning. The data is used to train autoregressive models, so tokens that appear later can "
    "only see the tokens that come before them. Please output the important tokens for executing mathematical "
    "reasoning tasks during training, along with the tokens they should focus on from the preceding context as "
    "causal associations (which can be more than one). Present the output JSON string in a dict format, such as "
    '{"A":[...],"B":[...],...}. You should only output JSON without other contents. Note that the Answer part '
    "is considered important and must be analyzed.")
ARC_TASK = (
    "You need to evaluate the causal importance relationships between tokens in text data from the field of "
    "reasoning. You only need to consider the tokens that have the greatest impact on the final answer. The data "
    "is used to train autoregressive models, so tokens that appear later can only see the tokens that come "
    "before them. Please output the important tokens for executing reasoning tasks during training, along with "
    "the tokens they should focus on from the preceding context as causal associations (which can be more than "
    'one). Present the output JSON string in a dict format, such as {"A":[...],"B":[...],...}. Note that the '
    "Answer part is considered important and must be analyzed. Below I will give you a single-choice question. "
    "You need to analyze the most important part of each option for the answer, and together with the answer, "
    "form the causal relationship that needs to be considered to generate the answer. Note that only the token "
    'behind can notice the previous word, and keep the autoregressive characteristics, such as "option '
    'content": "option A/B/C/D". The specific example is as follows:')
CLOSING = ("##Please output following sentence importance between tokens. The final answer at the end and the "
           "corresponding number's importance must always be analyzed (such as {} shown above).")


@dataclass(frozen=True)
class Template:
    task: str       # P_t, the task description
    demo: str       # P_d, a handwritten example: question and answer ...
    output: dict    # ... and its causal annotation
    request: str    # the closing line before the record


TEMPLATES = {
    "svamp": Template(
        MATH_TASK,
        "If they are already at 659 feet and the cave is 762 feet deep. How much farther until they reach the end "
        "of the cave? Answer: 103.0",
        {"762 feet deep": ["the cave"], "until": ["How much farther"],
         "Answer": ["659 feet", "762 feet", "until", "end of the cave"],
         "103.0": ["659 feet", "and", "762 feet", "Answer"]},
        CLOSING.format("103.0")),
    "arc_e": Template(
        ARC_TASK,
        "Which factor will most likely cause a person to develop a fever?\nA. a leg muscle relaxing after exercise\n"
        "B. a bacterial population in the bloodstream\nC. several viral particles on the skin\n"
        "D. carbohydrates being digested in the stomach\nAnswer: B",
        {"develop a fever": ["factor", "cause"], "leg muscle relaxing": ["A."], "bacterial population": ["B."],
         "viral particles": ["C."], "digested in the stomach": ["D."],
         "Answer: B": ["A.", "leg muscle relaxing", "B.", "bacterial population", "C.", "viral particles", "D.",
                       "digested in the stomach"]},
        CLOSING.format("Answer: B") + " You should only output JSON string without other contents."),
    "gsm8k": Template(
        MATH_TASK,
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
        "clips did Natalia sell altogether in April and May? Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in "
        "May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
        {"in April": ["48"], "in May": ["half as many clips", "48/2 = <<48/2=24>>24 clips", "48"],
         "72 clips": ["How many clips", "sell altogether", "48+24", "in April", "in May"],
         "#### 72": ["How many clips", "in April and May", "48+24", "72 clips"]},
        CLOSING.format("#### 72") + " Please try to use the most refined causal characteristics to summarize the "
        "causal process of the answer"),
    "mawps": Template(
        MATH_TASK,
        "William has 2 bottle caps. He buys 41 more. How many bottle caps does William have in all? Answer: 43.0",
        {"2 bottle caps": ["William"], "41 more": ["He buys"], "William have": ["How many bottle caps"],
         "Answer": ["How many bottle caps"], "43.0": ["2 bottle caps", "41 more"]},
        CLOSING.format("43.0")),
}
TEMPLATES["asdiv"] = TEMPLATES["mawps"]   # the paper tests ASDiv only out of domain; its problems read as MAWPS's


def build_prompt(task: str, record: dict) -> str:
    """[P_t; P_d; Q; A] of §4.1 Step 2 as one user message."""
    t = TEMPLATES[task]
    demo_json = "{\n" + ",\n".join(f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v, ensure_ascii=False)}"
                                   for k, v in t.output.items()) + "\n}"
    return f"{t.task}\n##demo\n{t.demo}\n##output\n{demo_json}\n{t.request}\n{record['input']}{record['target']}"


# ----------------------------------------------------------------------------- data sets (§5.1)
@dataclass(frozen=True)
class Source:
    repo: str                  # Hugging Face dataset repository
    files: dict[str, str]      # split -> glob of its files in the repository
    revision: str = "main"
    pool: bool = False         # True: the upstream splits are pooled and split 6:2:2 as the paper did


SOURCES = {
    "gsm8k": Source("openai/gsm8k", {"train": "main/train-*.parquet", "test": "main/test-*.parquet"}),
    "arc_e": Source("allenai/ai2_arc", {"train": "ARC-Easy/train-*.parquet",
                                        "validation": "ARC-Easy/validation-*.parquet",
                                        "test": "ARC-Easy/test-*.parquet"}),
    # SVAMP is one 1000-problem challenge set; Table 2's SVAMP scores are multiples of 1/200, i.e. a 6:2:2 split.
    "svamp": Source("ChilleD/SVAMP", {"train": "train.json", "test": "test.json"}, pool=True),
    # Table 2's MAWPS scores fit a 413-problem test set, 20% of the 2065 problems its MAWPS† column was scored on.
    "mawps": Source("MU-NLPC/Calc-mawps", {"train": "data/train-*.parquet", "validation": "data/validation-*.parquet",
                                           "test": "data/test-*.parquet"}, pool=True),
    # The 2305 problems of ASDiv as parquet (the main branch holds only a script that downloads ASDiv.xml).
    "asdiv": Source("EleutherAI/asdiv", {"all": "asdiv/validation-*.parquet"}, revision="refs/pr/1"),
}
SPLITS = ("train", "val", "test")


def read_rows(path) -> list[dict]:
    """Rows of an upstream file: .jsonl, .json (a list or JSON lines), .parquet (needs pyarrow), ASDiv.xml."""
    return [row for _, row in located_rows(path)]


def located_rows(path, flag: str = "--source") -> list[tuple[str, dict]]:
    """read_rows with where each row is ("FILE:LINE" or "FILE, row N") for messages. A file that is missing, a
    folder, not UTF-8, not JSON, a damaged parquet or XML file, or rows that are not objects raise InputError."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise cli.InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                             f"or pass a .json/.jsonl copy with --source") from None
    if not path.is_file():
        cli.read_text(path, flag)                       # says what is there instead: nothing, or a folder
    if path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as error:          # pyarrow's ArrowInvalid is a ValueError
            raise cli.InputError(f"{flag} {path}: not a readable parquet file ({error})") from None
    elif path.suffix == ".xml":  # github.com/chaochun/nlu-asdiv-dataset: <Problem><Body/><Question/><Answer/>...
        try:
            rows = [{child.tag: child.text or "" for child in p} for p in ET.parse(path).iter("Problem")]
        except ET.ParseError as error:
            raise cli.InputError(f"{flag} {path}: not readable XML ({error})") from None
    else:
        text = cli.read_text(path, flag)
        rows = None
        if path.suffix == ".json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError:
                rows = None          # JSON lines under a .json name
            if isinstance(rows, dict):   # pandas' to_json: {column: {row index: value}} or {column: [values]}
                if not all(isinstance(v, (dict, list)) for v in rows.values()):
                    raise cli.InputError(f"{flag} {path}: a JSON object that is not a table of columns; expected a "
                                         "list of rows, one row a line (JSONL), or pandas' {column: values} layout")
                columns = {k: list(v.values()) if isinstance(v, dict) else v for k, v in rows.items()}
                rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        if rows is None:
            return [(f"{path}:{line}", row) for line, row in cli.read_jsonl(path, flag)]
        if not isinstance(rows, list):
            raise cli.InputError(f"{flag} {path}: holds one {type(rows).__name__}, not a list of rows")
    located = [(f"{path}, row {n}", row) for n, row in enumerate(rows, start=1)]
    for where, row in located:
        if not isinstance(row, dict):
            raise cli.InputError(f"{flag} {where}: expected an object with named fields, found "
                                 f"{type(row).__name__}")
    return located


def _get(row: dict, *names):
    """The first of `names` that the row has (upstream copies spell fields differently); KeyError(names) else."""
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    raise KeyError(names)


def _number(value) -> str | None:
    """'43' / 43 / '9 (apples)' -> '43.0' / '9.0', the answer format of the Appendix B demos; None if not a number."""
    m = re.fullmatch(r"\s*(-?[\d,]*\.?\d+)\s*(\([^()]*\))?\s*", str(value))
    return str(float(m.group(1).replace(",", ""))) if m else None


def _arc(row: dict) -> dict:
    choices = row["choices"]
    labels, texts = choices["label"], choices["text"]
    answer = row["answerKey"]
    if all(label.isdigit() for label in labels):      # a few ARC questions number their options 1-4
        letters = [chr(ord("A") + int(label) - 1) for label in labels]
        answer, labels = letters[labels.index(answer)], letters
    options = "\n".join(f"{label}. {text}" for label, text in zip(labels, texts))
    return {"input": f"{row['question'].strip()}\n{options}\nAnswer: ", "target": answer}


def _join(*parts) -> str:
    return " ".join(str(p).strip() for p in parts if str(p).strip())


def _word_problem(text: str, answer) -> dict | None:
    target = _number(answer)
    return {"input": f"{text.strip()} Answer: ", "target": target} if target is not None else None


NORMALISERS = {   # upstream row -> record (None: dropped, e.g. an ASDiv answer that is not one number)
    "gsm8k": lambda r: {"input": f"{r['question'].strip()} Answer: ", "target": r["answer"].strip()},
    "arc_e": _arc,
    "svamp": lambda r: _word_problem(_join(r.get("Body", ""), _get(r, "Question", "question")),
                                     _get(r, "Answer", "answer", "result_float")),
    "mawps": lambda r: _word_problem(_get(r, "question", "Question"),
                                     _get(r, "result_float", "Answer", "answer", "result")),
    "asdiv": lambda r: _word_problem(_join(_get(r, "body", "Body"), _get(r, "question", "Question")),
                                     _get(r, "answer", "Answer")),
}


def split_records(parts: dict[str, list[dict]], pool: bool, seed: int = 42) -> dict[str, list[dict]]:
    """train/val/test: the upstream test split where there is one, else 6:2:2 of everything (§5.1, seed 42)."""
    rng = random.Random(seed)
    if pool or "test" not in parts:
        rows = [r for part in parts.values() for r in part]
        rng.shuffle(rows)
        n_train, n_val = round(0.6 * len(rows)), round(0.2 * len(rows))
        return {"train": rows[:n_train], "val": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}
    train = list(parts["train"])
    if "validation" in parts:
        return {"train": train, "val": parts["validation"], "test": parts["test"]}
    rng.shuffle(train)           # no validation split upstream: a quarter of train, the paper's 6:2 ratio
    n_val = round(len(train) / 4)
    return {"train": train[n_val:], "val": train[:n_val], "test": parts["test"]}


def download(source: Source) -> dict[str, Path]:
    """hf_hub_download of each split's files (globs resolved against the repository's file list)."""
    from huggingface_hub import HfApi, hf_hub_download
    names = HfApi().list_repo_files(source.repo, repo_type="dataset", revision=source.revision)
    paths = {}
    for split, pattern in source.files.items():
        found = sorted(fnmatch.filter(names, pattern))
        if len(found) != 1:
            raise SystemExit(f"{source.repo}@{source.revision}: expected one file matching {pattern!r}, found "
                             f"{found}; download it yourself and pass --source {split}=FILE")
        paths[split] = Path(hf_hub_download(source.repo, found[0], repo_type="dataset", revision=source.revision))
    return paths


def normalise(task: str, where: str, row: dict) -> dict | None:
    """NORMALISERS[task] of one upstream row; a row without the fields it needs, or with values of another kind,
    raises InputError naming where the row is and what it lacks."""
    try:
        return NORMALISERS[task](row)
    except KeyError as error:
        wanted = error.args[0] if error.args else "?"
        names = " or ".join(map(repr, wanted)) if isinstance(wanted, tuple) else repr(wanted)
        raise cli.InputError(f"--source {where}: no field {names} (the row has {', '.join(map(repr, row)) or 'none'});"
                             f" is it a {task} file of {SOURCES[task].repo}?") from None
    except (TypeError, AttributeError, ValueError, IndexError) as error:
        raise cli.InputError(f"--source {where}: a row {task} cannot read ({type(error).__name__}: {error}); is it a "
                             f"{task} file of {SOURCES[task].repo}?") from None


UPSTREAM_SPLITS = ("train", "validation", "test")


def parse_source(text: str) -> tuple[str, str]:
    """One --source as (split, file): 'SPLIT=FILE' keeps an upstream split, a bare FILE ("all") joins the pool of
    everything. A form that names no file, or a split that is not one, raises InputError saying how to write it."""
    split, sep, path = text.partition("=")
    if not text.strip():
        raise cli.InputError("--source is empty: give a FILE, or SPLIT=FILE with SPLIT train, validation or test")
    if sep and split in UPSTREAM_SPLITS:
        if not path.strip():
            raise cli.InputError(f"--source {text}: no file after '='; write {split}=FILE")
        return split, path
    if not Path(text).exists():   # a file whose name holds '=' or is a split's is read when it exists
        if text in UPSTREAM_SPLITS:
            raise cli.InputError(f"--source {text}: a split name without its file; write {text}=FILE")
        if sep:
            what = "no split name before '='" if not split.strip() else f"{split!r} is no split name"
            raise cli.InputError(f"--source {text}: no such file, and {what}: write train=FILE, validation=FILE or "
                                 "test=FILE, or a bare FILE")
    return "all", text


def fetch(task: str, sources: list[str] | None = None, out_dir="data", overwrite: bool = False) -> dict[str, Path]:
    """Writes out_dir/<task>_{train,val,test}.jsonl. sources: local files, 'FILE' (all data) or 'SPLIT=FILE'.
    Existing files that would change (hand edits, other sources) are replaced only with overwrite; otherwise
    nothing is written (cli.refuse_to_replace)."""
    if task not in SOURCES:
        raise cli.InputError(f"unknown task {task!r}: choose from {sorted(SOURCES)} (STG: stg.py makes its own files)")
    cli.check_output(out_dir, "--out", folder=True)
    if sources:              # 'SPLIT=FILE' keeps an upstream split, a bare FILE joins the pool of everything
        files = [parse_source(s) for s in sources]
        named = [str(Path(path).resolve()) for _, path in files]
        if len(set(named)) < len(named):   # its rows would be written twice, test rows into train too
            raise cli.InputError(f"--source: a file is given more than once ({', '.join(sources)}); name each once")
        splits = dict(zip((split for split, _ in files), sources))
        if not SOURCES[task].pool and "test" in splits and "train" not in splits:   # split_records keeps test apart
            raise cli.InputError(f"--source {splits['test']}: {task} keeps its upstream test split apart, so give its "
                                 "training file too (train=FILE), or give every file bare to pool them and split 6:2:2")
        if not SOURCES[task].pool and "test" in splits and "all" in splits:   # the pool is read only without test
            raise cli.InputError(f"--source {splits['all']}: a bare FILE joins the pool that {task} splits only when "
                                 "no test=FILE is given, so its rows would be left out; name its split (train=FILE)")
    else:
        files = list(download(SOURCES[task]).items())
    parts, dropped = {}, 0
    for split, path in files:
        found = 0
        for where, row in located_rows(path):
            record = normalise(task, where, row)
            dropped += record is None
            if record is not None:
                found += 1
                parts.setdefault(split, []).append(record)
        if not found and sources:   # an empty file: the data set would be written without it, a split left empty
            raise cli.InputError(f"--source {path}: no row {task} can use (an empty file, or every row dropped); is "
                                 f"it a {task} file of {SOURCES[task].repo}?")
    splits = split_records(parts, pool=SOURCES[task].pool)
    out = {name: Path(out_dir) / f"{task}_{name}.jsonl" for name in SPLITS}
    cli.refuse_to_replace({out[name]: cli.jsonl_text(splits[name]) for name in SPLITS}, overwrite, "--out")
    for name in SPLITS:
        cli.write_jsonl(out[name], splits[name])
    print(f"{task}: " + ", ".join(f"{n} {len(splits[n])}" for n in SPLITS) + f" (dropped {dropped}) -> {out_dir}")
    return out


# ----------------------------------------------------------------------------- JSONL files
def record_key(record: dict) -> str:
    """The resume key: a hash of the record's content."""
    return hashlib.sha256(json.dumps([record["input"], record["target"]]).encode()).hexdigest()[:20]


OWN_FIELD = {"--out": "important", "--rejects": "error"}   # what each of annotate's files has on every line


def done_keys(path: Path, repair: bool = True, flag: str | None = None) -> set[str]:
    """Keys already written to one of annotate's append-only JSONL files. With flag ("--out" or "--rejects") the
    file must be that output of annotate's: every line a record with string input and target and, for --out, its
    `important` (for --rejects, the `error`); anything else (a data file, a rejects file given as --out) raises
    InputError saying what was found, before anything is changed. A last line that a kill cut mid-write is
    dropped (cli.complete_lines); with repair=False, a dry run, the file is not touched."""
    if not path.exists():
        return set()
    rows, _ = cli.read_jsonl_log(path, flag)
    field, name = OWN_FIELD.get(flag), f"{flag} {path}" if flag else str(path)
    for number, row in rows:
        if not (isinstance(row.get("input"), str) and isinstance(row.get("target"), str)):
            found = "a line without string input and target"
        elif field == "important" and "error" in row and "important" not in row:
            found = "a reply that could not be used (a rejects file)"
        elif field and field not in row:
            found = f"a record without {field!r}" + (" (a data file, not annotations)" if field == "important" else "")
        else:
            continue
        raise cli.InputError(f"{name}:{number}: {found}, so this is not annotate.py's {flag or 'output'} file; "
                             f"nothing was changed. Choose another {flag or 'file'} (annotate.py appends to it and "
                             f"resumes from it)")
    cli.complete_lines(path, repair)
    return {record_key(row) for _, row in rows}


def append_line(f, record: dict) -> None:
    """One whole line per write, flushed and fsynced: a kill loses at most the line being written."""
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------- replies
def extract_json(text: str) -> tuple:
    """The first JSON object in a reply, also inside ``` fences or with text around it, as (key, value) pairs."""
    decoder = json.JSONDecoder(object_pairs_hook=tuple)   # objects -> tuples of pairs: repeated keys are kept
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        return obj
    raise ValueError("no JSON object in the reply")


def parse_annotation(reply: str, text: str) -> tuple[list[dict], int]:
    """{effect: [causes]} -> (`important` list of one-key dicts, phrases dropped for not occurring in text)."""
    pairs = extract_json(reply)
    important, dropped = [], 0
    for key, values in pairs:
        values = [values] if isinstance(values, (str, int, float)) else values
        values = [str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"value of {key!r} is not a list of phrases: {values!r}")
        kept = [v for v in values if v.strip() and cat.find_phrase(text, v)]
        if not key.strip() or not cat.find_phrase(text, key) or not kept:
            dropped += 1 + len(values)
            continue
        dropped += len(values) - len(kept)
        important.append({key: kept})
    if not important:
        raise ValueError("no effect phrase of the reply occurs in the text with a cause that does")
    return important, dropped


# ----------------------------------------------------------------------------- cost (Appendix D)
PRICES = {   # model -> (input, output) per 1M tokens, currency
    "gpt-4o": (2.50, 10.00, "USD"),       # Appendix D, GPT-4o's official pricing
    "glm-4-air": (0.25, 0.25, "CNY"),     # Appendix D, ChatGLM-4-air: (570.0 + 163.9) / 168.4 x 0.25 = 1.09 CNY
}
PROMPT_RATIO = 570.0 / 168.4              # Appendix D, GSM8K: prompt tokens per input token
COMPLETION_RATIO = 163.9 / 168.4          # Appendix D: completion tokens per input token


def price_for(model: str, price_in: float | None = None, price_out: float | None = None):
    """(input, output, currency) per 1M tokens, or None when unknown and not given."""
    known = PRICES.get(re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model.lower()))   # gpt-4o-2024-08-06 -> gpt-4o
    if (price_in is None) != (price_out is None):
        raise cli.InputError("give both --price-in and --price-out (per 1M tokens)")
    if price_in is not None:
        return (price_in, price_out, known[2] if known else "")
    return known


def cost(tokens_in: float, tokens_out: float, price) -> float:
    return (tokens_in * price[0] + tokens_out * price[1]) / 1e6


def approx_tokens(text: str) -> int:
    return max(1, len(text) // 4)          # ~4 characters per token of English BPE; estimates only


# ----------------------------------------------------------------------------- client
class FatalAPIError(RuntimeError):
    """Retrying cannot help (bad key, quota, bad request): the run stops."""


class TransientAPIError(RuntimeError):
    """Still failing after every retry; nothing was paid, the record is asked again on the next run."""


@dataclass
class AnnotateConfig:
    task: str = "gsm8k"                     # which Appendix B template
    inp: str = "data/gsm8k_train.jsonl"     # records to annotate
    out: str = "data/gsm8k_train_annotated.jsonl"   # appended to; also the resume state
    rejects: str | None = None              # replies that could not be used (default: <out>.rejects.jsonl)
    base_url: str = "https://api.openai.com/v1"     # any OpenAI-compatible server (GLM: .../api/paas/v4)
    model: str = "gpt-4o"                   # the assistant LLM (the paper: glm-4-air; Table 5: gpt-4o)
    api_key_env: str = "OPENAI_API_KEY"     # the NAME of the variable holding the key, never the key
    temperature: float = 0.0                # sampling temperature of the assistant (0: its most likely reply)
    json_mode: bool = True                  # response_format json_object, dropped if the server refuses it
    concurrency: int = 8                    # requests in flight
    timeout: float = 120.0                  # seconds per request
    max_retries: int = 6                    # retries of timeouts, connection errors, 429 and 5xx
    backoff_base: float = 1.0               # seconds; retry k waits uniform(0, base * 2**k), capped
    backoff_max: float = 60.0               # seconds: the longest wait between two retries
    max_cost: float | None = None           # stop before this is spent (in the price's currency)
    price_in: float | None = None           # per 1M prompt tokens (default: PRICES)
    price_out: float | None = None          # per 1M completion tokens
    dry_run: bool = False                   # print the first prompt and an estimate; call nothing


class ChatClient:
    """Chat completions over requests, with retries, exponential backoff with jitter and Retry-After."""

    def __init__(self, cfg: AnnotateConfig, api_key: str, stop: threading.Event):
        self.cfg, self.key, self.stop, self.json_mode = cfg, api_key, stop, cfg.json_mode
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"

    def redact(self, text: str) -> str:
        """The text without the API key: whole, or echoed in part as servers do ("sk-ABCD...wxyz", "sk-ab***yz")."""
        if not self.key:
            return text
        text = text.replace(self.key, "[API key]")
        head, tail = re.escape(self.key[:4]), re.escape(self.key[-4:])
        # a run of the key's first characters, an elision (…, ..., ***) and its last ones
        return re.sub(rf"{head}[\w-]*(?:\.{{2,}}|…|\*+)[\w-]*{tail}|{re.escape(self.key[:8])}[\w-]*", "[API key]",
                      text) if len(self.key) >= 12 else text

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """The server's Retry-After (seconds or an HTTP date), else exponential backoff with full jitter."""
        try:
            return float(retry_after)
        except (TypeError, ValueError):
            pass
        try:
            return max(0.0, email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time())
        except (TypeError, ValueError):
            return random.uniform(0, min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** attempt))

    def complete(self, prompt: str) -> tuple[str, dict]:
        """(reply text, usage) for one user message."""
        last = ""
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            if self.stop.is_set():
                raise TransientAPIError("stopped")
            body = {"model": self.cfg.model, "temperature": self.cfg.temperature,
                    "messages": [{"role": "user", "content": prompt}]}
            if self.json_mode:
                body["response_format"] = {"type": "json_object"}
            try:
                response = requests.post(self.url, json=body, timeout=self.cfg.timeout,
                                         headers={"Authorization": f"Bearer {self.key}"})
                if response.status_code == 200:
                    reply = response.json()
                    return reply["choices"][0]["message"]["content"] or "", reply.get("usage") or {}
                text = self.redact(response.text[:500])
                last = f"HTTP {response.status_code}: {text}"
                if response.status_code in (400, 422) and self.json_mode and re.search(
                        "response_format|json_object", text, re.I):
                    self.json_mode = False              # the server has no JSON mode: ask without it
                    continue
                if response.status_code == 429 and re.search("quota|billing|balance|余额", text, re.I):
                    raise FatalAPIError(f"{self.url}: out of quota or credit ({last})")
                if response.status_code not in (408, 429) and response.status_code < 500:
                    hint = f" (check the key in ${self.cfg.api_key_env})" if response.status_code in (401, 403) else ""
                    raise FatalAPIError(f"{self.url}: {last}{hint}")
                retry_after = response.headers.get("Retry-After")
            except (requests.Timeout, requests.ConnectionError, ValueError, KeyError, IndexError) as e:
                last = self.redact(f"{type(e).__name__}: {e}")   # ValueError etc.: a 200 that is not a reply
            self.stop.wait(self._delay(attempt, retry_after))
        raise TransientAPIError(f"gave up after {self.cfg.max_retries + 1} attempts; last: {last}")


@dataclass
class Result:
    line: dict            # the annotated record, or the reject
    ok: bool
    tokens_in: int
    tokens_out: int
    dropped: int


def annotate_one(client: ChatClient, task: str, record: dict) -> Result:
    """One record: ask, parse; a reply that cannot be used is asked once more, then kept as a reject."""
    prompt, text = build_prompt(task, record), record["input"] + record["target"]
    tokens_in = tokens_out = 0
    for _ in range(2):
        reply, usage = client.complete(prompt)                 # Eq. 3: M = LLM([P_t; P_d; Q; A])
        tokens_in += usage.get("prompt_tokens") or approx_tokens(prompt)       # the server's count when it gives one
        tokens_out += usage.get("completion_tokens") or approx_tokens(reply)
        try:
            important, dropped = parse_annotation(reply, text)
            return Result({**record, "important": important}, True, tokens_in, tokens_out, dropped)
        except ValueError as e:
            error = str(e)
    return Result({**record, "raw": client.redact(reply), "error": client.redact(error)}, False, tokens_in,
                  tokens_out, 0)


def estimate_tokens(task: str, record: dict) -> tuple[int, float]:
    """(prompt, completion) tokens before asking: the prompt as sent, the reply by Appendix D's ratio."""
    return approx_tokens(build_prompt(task, record)), COMPLETION_RATIO * approx_tokens(
        record["input"] + record["target"])


def record_cost(task: str, record: dict, stats: dict, price) -> float:
    """Expected cost of a record: the mean so far, or before any reply the estimate."""
    n = stats["annotated"] + stats["rejected"]
    return stats["cost"] / n if n else cost(*estimate_tokens(task, record), price)


def dry_run(cfg: AnnotateConfig, pending: list[dict], price) -> dict:
    """The first prompt, and the tokens and cost of every pending record."""
    if pending:
        print(build_prompt(cfg.task, pending[0]), "\n" + "-" * 80)
    estimates = [estimate_tokens(cfg.task, r) for r in pending]
    tokens_in, tokens_out = sum(e[0] for e in estimates), sum(e[1] for e in estimates)
    estimate = f"{cost(tokens_in, tokens_out, price):.4f} {price[2]}" if price else "unknown (set --price-in/out)"
    print(f"{len(pending)} records to annotate: ~{tokens_in} prompt + ~{tokens_out:.0f} completion tokens, "
          f"cost ~{estimate} (Appendix D: GSM8K prompts are {PROMPT_RATIO:.2f}x, replies "
          f"{COMPLETION_RATIO:.2f}x the input tokens)")
    return {"pending": len(pending), "tokens_in": tokens_in, "tokens_out": tokens_out}


@contextlib.contextmanager
def ctrl_c_stops(stop: threading.Event, stats: dict):
    """While annotate runs, Ctrl-C asks nothing more but lets the replies already on their way arrive and be written
    (nothing paid is lost); a second Ctrl-C stops at once. A handler rather than a caught KeyboardInterrupt, which
    could land anywhere in the loop, between a reply's arrival and its write. Only the main thread gets signals."""
    def handler(signum, frame):
        if stats["stopped"] == "interrupted":
            raise KeyboardInterrupt
        stats["stopped"] = "interrupted"
        stop.set()

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield                        # no Ctrl-C reaches this run (a thread, or a process started ignoring it)
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path once resolved (links, "..", relative), or a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:                 # one of them does not exist yet
        return False


def check_base_url(url: str) -> None:
    """--base-url must be an http(s) address with a host (and a number for a port), checked before any request:
    otherwise every record would fail the same way and the run would end with nothing done."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        parts = parts._replace(netloc="")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise cli.InputError(f"--base-url {url!r}: not an http(s) address with a host; give the API root of an "
                             f"OpenAI-compatible server, e.g. https://api.openai.com/v1")


def annotate(cfg: AnnotateConfig) -> dict:
    """Annotates every record of cfg.inp not yet in cfg.out or the rejects; returns counts and cost. Every flag and
    file is checked before the first request, and before anything is written."""
    if cfg.task not in TEMPLATES:
        raise cli.InputError(f"no prompt template for task {cfg.task!r} (have {sorted(TEMPLATES)}); STG records "
                         f"carry rule-made `important` fields and need no LLM")
    cli.check_numbers(cfg, rename={"inp": "--in"}, infinite=("max_cost",))   # --max-cost inf: no cap, as unset
    for name, value, low in (("concurrency", cfg.concurrency, 1), ("max_retries", cfg.max_retries, 0)):
        if value < low:
            raise cli.InputError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
    for name in ("timeout", "backoff_base", "backoff_max", "max_cost", "price_in", "price_out"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 0 or (name == "timeout" and cfg.timeout == 0):
            raise cli.InputError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be positive")
    if cfg.temperature < 0:
        raise cli.InputError(f"--temperature {cfg.temperature}: must be at least 0")
    check_base_url(cfg.base_url)
    out = cli.check_output(cfg.out, "--out", folder=False)
    rejects = cli.check_output(cfg.rejects or out.with_suffix(".rejects.jsonl"), "--rejects", folder=False)
    for (flag, path), (other, other_path) in [(("--out", out), ("--in", cfg.inp)),
                                              (("--rejects", rejects), ("--in", cfg.inp)),
                                              (("--rejects", rejects), ("--out", out))]:
        if same_file(path, Path(other_path)):
            raise cli.InputError(f"{flag} {path} is the {other} file: annotate.py appends to {flag} and resumes from "
                                 f"it, so {other} would be changed; give {flag} a file of its own")
    records = stg.read_records(cfg.inp, "--in")
    done = done_keys(out, not cfg.dry_run, "--out") | done_keys(rejects, not cfg.dry_run, "--rejects")
    pending = list({record_key(r): r for r in records if record_key(r) not in done}.values())
    price = price_for(cfg.model, cfg.price_in, cfg.price_out)
    if cfg.dry_run:
        return dry_run(cfg, pending, price)
    if cfg.max_cost is not None and price is None:
        raise cli.InputError(f"--max-cost needs prices for {cfg.model!r}: pass --price-in and --price-out")
    api_key = os.environ.get(cfg.api_key_env, "")
    if not api_key:
        raise cli.InputError(f"no API key: set the environment variable {cfg.api_key_env} (or name another with "
                         f"--api-key-env)")
    stop = threading.Event()
    client = ChatClient(cfg, api_key, stop)
    stats = {"annotated": 0, "rejected": 0, "failed": 0, "dropped_phrases": 0, "tokens_in": 0, "tokens_out": 0,
             "cost": 0.0, "already_done": len(done), "stopped": None, "failure": None}
    out.parent.mkdir(parents=True, exist_ok=True)
    todo, running, fatal = iter(pending), {}, None
    with ThreadPoolExecutor(cfg.concurrency) as pool, open(out, "a", encoding="utf-8") as f_out, \
            open(rejects, "a", encoding="utf-8") as f_rej, tqdm(total=len(pending), unit="rec") as bar, \
            ctrl_c_stops(stop, stats):
        while True:
            while not stop.is_set() and len(running) < cfg.concurrency:
                record = next(todo, None)
                if record is None:
                    break
                if cfg.max_cost is not None and stats["cost"] + (len(running) + 1) * record_cost(
                        cfg.task, record, stats, price) > cfg.max_cost:   # the records in flight are paid too
                    stats["stopped"] = f"the next request could pass --max-cost {cfg.max_cost} {price[2]}"
                    stop.set()
                    break
                running[pool.submit(annotate_one, client, cfg.task, record)] = record
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                running.pop(future)
                try:
                    result = future.result()
                except FatalAPIError as e:
                    fatal = fatal or e
                    stop.set()
                    continue
                except TransientAPIError as e:
                    stats["failed"] += 1
                    stats["failure"] = str(e)
                    continue
                append_line(f_out if result.ok else f_rej, result.line)
                stats["annotated" if result.ok else "rejected"] += 1
                stats["dropped_phrases"] += result.dropped
                stats["tokens_in"] += result.tokens_in
                stats["tokens_out"] += result.tokens_out
                if price:
                    stats["cost"] = cost(stats["tokens_in"], stats["tokens_out"], price)
                bar.update(1)
                bar.set_postfix_str(f"in {stats['tokens_in']} out {stats['tokens_out']} tok" + (
                    f", {stats['cost']:.4f} {price[2]}" if price else ""))
    if fatal:
        raise fatal
    return stats


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download and normalise a data set into data/<task>_{train,val,test}.jsonl")
    p_fetch.add_argument("task", choices=sorted(SOURCES))
    p_fetch.add_argument("--source", action="append", help="a local upstream file instead of the hub: FILE or "
                                                           "SPLIT=FILE (train/validation/test); repeatable")
    p_fetch.add_argument("--out", default="data",
                         help="folder for <task>_{train,val,test}.jsonl (default: %(default)s)")
    p_fetch.add_argument("--overwrite", action="store_true",
                         help="replace files of --out that differ from what this fetch makes (hand edits, other "
                              "sources); without it such files are left as they are and nothing is written")
    p_ann = sub.add_parser("annotate", help="annotate records with an assistant LLM (resumable)",
                           description="Each option is a field of AnnotateConfig in annotate.py, commented there.")
    cli.add_config_arguments(p_ann, AnnotateConfig, rename={"inp": "--in"})
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(args.task, args.source, args.out, args.overwrite)
        return 0
    cfg = AnnotateConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    try:
        stats = annotate(cfg)
    except FatalAPIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(stats))
    if stats.get("failed"):
        print(f"{stats['failed']} records got no answer ({stats['failure']})", file=sys.stderr)
    if stats.get("stopped") or stats.get("failed"):
        print(f"stopped early: {stats['stopped'] or 'failures'}; run the same command again to go on",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run_cli(lambda: sys.exit(main()))
