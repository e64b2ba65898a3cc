"""The Spurious Token Game (CAT Appendix A, §5.2.1), and where every data set of the project lives.

STG_E: predict lung-cancer risk from 8 attributes; STG_H: predict an air-quality index (0-100) from 14.
Each attribute is causal (it sets the answer), spurious (computed from a causal parent in IID data,
independent of it out of distribution) or irrelevant. The generator knows the causal graph, so the
`important` field of every training record is exact:

    {"input": "Here is ... cancer. Weight: 4, ..., Exercise: 2 Answer: ", "target": "High Risk",
     "important": [{"High Risk": ["Smoking: 8", "Weight: 4", "Exercise: 2"]}]}

    python stg.py --out data/ [--seed 42]

Every file is drawn from its own stream, random.Random(f"{seed}/{file stem}"), so training and test
files never share a stream, and the files are byte-identical on every run.
"""
import json
import math
import os
import random
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cli import (NOT_REGULAR, InputError, check_output, config_parser, jsonl_text, read_jsonl, refuse_to_replace,
                 run_cli, write_jsonl)

# ----------------------------------------------------------------------------- STG_E (Appendix A)
QUESTION_E = "Here is the statistical data for a person. Please predict the probability of cancer. "
E_CAUSAL = ["Smoking", "Weight", "Exercise"]                     # each randint(1, 10)
E_SPURIOUS = {"Yellow fingers": ("Smoking", 1.5),                # name: (causal parent, ratio r_i)
              "Clothing size": ("Weight", 1.0),
              "Hormones": ("Exercise", 0.5)}
E_IRRELEVANT = ["Certain gene", "Room size"]                     # each randint(1, 10)


def e_causal(rng: random.Random) -> dict:
    """C_i ~ Rand(1, 10)."""
    return {name: rng.randint(1, 10) for name in E_CAUSAL}


def e_spurious(rng: random.Random, causal: dict, ood: bool) -> dict:
    """IID: S_i = floor(r_i * C_i) ("all values are rounded down"); OOD: S_i ~ Rand(1, 10), independent."""
    if ood:
        return {name: rng.randint(1, 10) for name in E_SPURIOUS}
    return {name: math.floor(r * causal[parent]) for name, (parent, r) in E_SPURIOUS.items()}


def e_irrelevant(rng: random.Random) -> dict:
    """I_i ~ Rand(1, 10)."""
    return {name: rng.randint(1, 10) for name in E_IRRELEVANT}


def e_label(causal: dict) -> str:
    """f = 1.2·Smoking + 0.7·Weight − Exercise; High Risk when f > μ_h = 7.2.

    The paper writes f ≥ μ_h; the authors' generator uses > in floating point, where the 8 combinations with
    f = 7.2 exactly evaluate to 7.199999999999999: Low Risk either way. This is exact `12S + 7W − 10E > 72`.
    """
    f = 1.2 * causal["Smoking"] + 0.7 * causal["Weight"] - causal["Exercise"]
    return "High Risk" if f > 7.2 else "Low Risk"


# ----------------------------------------------------------------------------- STG_H (Appendix A, Figure 7)
QUESTION_H = ("Here are this year's records for a city. "
              "Please predict its air quality index (AQI), an integer from 0 to 100. ")
H_CAUSAL = {"Industrial emissions": (30, 70, 2.0),               # name: U(low, high) + N(0, sd)
            "Vehicle emissions": (20, 60, 2.0),
            "Coal dependency": (10, 50, 1.5),
            "Agricultural burning": (10, 30, 1.0),
            "Urban green coverage": (40, 80, 3.0),
            "Meteorological dispersion": (50, 90, 3.0)}
AQI_WEIGHTS = {"Industrial emissions": 0.3, "Vehicle emissions": 0.25, "Coal dependency": 0.2,
               "Agricultural burning": 0.15, "Urban green coverage": -0.2, "Meteorological dispersion": -0.3}
H_SPURIOUS = {"Ice cream sales": ("Meteorological dispersion", 0.4, 2.0),   # name: (parent, coef, noise sd)
              "Allergy complaints": ("Agricultural burning", 0.2, 3.0),
              "Renewable stock index": ("Industrial emissions", 1.1, 1.5),
              "Public transport subscriptions": ("Vehicle emissions", 0.15, 2.0),
              "Water awareness score": ("Urban green coverage", -0.1, 1.0)}
H_IRRELEVANT = ["City anniversary", "Internet speed", "Number of libraries"]


def h_causal(rng: random.Random) -> dict:
    """Six causes, uniform plus Gaussian noise, rounded to the one decimal the text prints."""
    return {name: round(rng.uniform(low, high) + rng.gauss(0, sd), 1) for name, (low, high, sd) in H_CAUSAL.items()}


def h_spurious(rng: random.Random, causal: dict, ood: bool) -> dict:
    """IID: coef·parent + N(0, sd); OOD: uniform over the range coef·U(low, high) spans, independent of all."""
    values = {}
    for name, (parent, coef, sd) in H_SPURIOUS.items():
        if ood:
            low, high, _ = H_CAUSAL[parent]
            values[name] = round(rng.uniform(min(coef * low, coef * high), max(coef * low, coef * high)), 1)
        else:
            values[name] = round(coef * causal[parent] + rng.gauss(0, sd), 1)
    return values


def h_irrelevant(rng: random.Random) -> dict:
    """Three factors no answer depends on; the two counts print as integers."""
    return {"City anniversary": rng.randint(1, 100),
            "Internet speed": round(rng.uniform(80, 120) + rng.gauss(0, 3), 1),
            "Number of libraries": rng.randint(10, 50)}


def h_label(causal: dict) -> str:
    """raw = Σ w_i·f_i clipped to [−20, 30]; AQI = round((raw + 20) / 50 · 100), from the printed values."""
    raw = sum(w * causal[name] for name, w in AQI_WEIGHTS.items())
    raw = min(max(raw, -20.0), 30.0)
    return str(round((raw + 20) / 50 * 100))


# ----------------------------------------------------------------------------- records and files
GENERATORS = {"stg_e": (e_causal, e_spurious, e_irrelevant, e_label),
              "stg_h": (h_causal, h_spurious, h_irrelevant, h_label)}
QUESTION = {"stg_e": QUESTION_E, "stg_h": QUESTION_H}
FACTORS = {"stg_e": {"causal": E_CAUSAL, "spurious": list(E_SPURIOUS), "irrelevant": E_IRRELEVANT},
           "stg_h": {"causal": list(H_CAUSAL), "spurious": list(H_SPURIOUS), "irrelevant": H_IRRELEVANT}}
PARENT = {"stg_e": {name: spec[0] for name, spec in E_SPURIOUS.items()},    # spurious -> its causal parent
          "stg_h": {name: spec[0] for name, spec in H_SPURIOUS.items()}}
FILES = {  # file stem: (task, records, out of distribution, training file with `important`)   Table 4
    "stg_s_train": ("stg_e", 400, False, True),
    "stg_m_train": ("stg_e", 800, False, True),
    "stg_l_train": ("stg_e", 1600, False, True),
    "stg_e_test_iid": ("stg_e", 400, False, False),
    "stg_e_test_ood": ("stg_e", 400, True, False),
    "stg_h_train": ("stg_h", 3000, False, True),
    "stg_h_test_iid": ("stg_h", 1000, False, False),
    "stg_h_test_ood": ("stg_h", 1000, True, False),
}


def phrase(name: str, value) -> str:
    """'Name: value', floats with one decimal, integers as integers."""
    return f"{name}: {value:.1f}" if isinstance(value, float) else f"{name}: {value}"


def make_record(task: str, rng: random.Random, ood: bool, train: bool) -> dict:
    """One record: the question, the attributes in a fresh random order, 'Answer: '; the rule-made label."""
    causal_fn, spurious_fn, irrelevant_fn, label_fn = GENERATORS[task]
    causal = causal_fn(rng)
    values = {**causal, **spurious_fn(rng, causal, ood), **irrelevant_fn(rng)}
    target = label_fn(causal)
    names = list(values)
    rng.shuffle(names)
    record = {"input": QUESTION[task] + ", ".join(phrase(n, values[n]) for n in names) + " Answer: ",
              "target": target}
    if train:  # CAT §4.1 Step 2: the answer is caused by the causal phrases only
        record["important"] = [{target: [phrase(n, values[n]) for n in FACTORS[task]["causal"]]}]
    return record


def make_records(stem: str, seed: int) -> list[dict]:
    """All records of one file, from its own stream random.Random(f"{seed}/{stem}")."""
    task, n, ood, train = FILES[stem]
    rng = random.Random(f"{seed}/{stem}")
    return [make_record(task, rng, ood, train) for _ in range(n)]


def spurious_correlations(records: list[dict], task: str) -> dict[str, float]:
    """Pearson correlation of each spurious attribute with its causal parent, read back from the texts."""
    rows = [parse_attributes(r["input"], task) for r in records]
    return {name: float(np.corrcoef([row[name] for row in rows], [row[parent] for row in rows])[0, 1])
            for name, parent in PARENT[task].items()}


def summarize(stem: str, records: list[dict]) -> str:
    """Record count, label balance, and how strongly each spurious attribute follows its parent."""
    task = FILES[stem][0]
    if task == "stg_e":
        balance = f"High Risk share {np.mean([r['target'] == 'High Risk' for r in records]):.3f}"
    else:
        aqi = np.array([int(r["target"]) for r in records])
        balance = f"AQI mean {aqi.mean():.1f}, sd {aqi.std():.1f}, range {aqi.min()}-{aqi.max()}"
    corr = ", ".join(f"{name}~{PARENT[task][name]} {c:+.2f}"
                     for name, c in spurious_correlations(records, task).items())
    return f"{stem}: {len(records)} records, {balance}\n    corr(spurious, parent): {corr}"


def write_stg(out_dir, seed: int = 42, only_missing: bool = False, overwrite: bool = False) -> list[Path]:
    """Write the STG files of Table 4 into out_dir (only the absent ones with only_missing); print a summary.
    An existing file that would change (hand edits, another seed) is replaced only with overwrite; otherwise
    nothing is written (cli.refuse_to_replace). Writing the same files again changes nothing."""
    records = {}
    for stem in FILES:
        path = Path(out_dir) / f"{stem}.jsonl"
        if not (only_missing and path.exists()):
            records[path] = make_records(stem, seed)
    refuse_to_replace({path: jsonl_text(rs) for path, rs in records.items()}, overwrite, "--out")
    for path, rs in records.items():
        write_jsonl(path, rs)
        print(summarize(path.stem, rs))
    return list(records)


# ----------------------------------------------------------------------------- reading
# The authors' STG_H files (their repository, STG_H/) spell the 14 attributes their own way and print units
# ("Coal Dependency: 41.9%", "City Anniversary: 38th", "Average Internet Speed: 114.2Mbps"): their spelling -> ours.
# Their STG_E files spell the 8 attributes as we do.
AUTHORS_NAMES = {"stg_e": {},
                 "stg_h": {"Industrial Emissions": "Industrial emissions", "Vehicle Emissions": "Vehicle emissions",
                           "Coal Dependency": "Coal dependency", "Agricultural Burning": "Agricultural burning",
                           "Urban Green Coverage": "Urban green coverage",
                           "Meteorological Dispersion": "Meteorological dispersion",
                           "Ice Cream Sales Index": "Ice cream sales", "Allergy Complaints Level": "Allergy complaints",
                           "Renewable Stock Index": "Renewable stock index",
                           "Public Transport Subscriptions (k)": "Public transport subscriptions",
                           "Water Awareness Score": "Water awareness score", "City Anniversary": "City anniversary",
                           "Average Internet Speed": "Internet speed", "Number of Libraries": "Number of libraries"}}
CANONICAL = {task: {**{name: name for names in kinds.values() for name in names}, **AUTHORS_NAMES[task]}
             for task, kinds in FACTORS.items()}          # any spelling -> our name
NAME_RE = {task: "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
           for task, names in CANONICAL.items()}
UNIT = r"(?:%|st|nd|rd|th|Mbps)?(?![A-Za-z])"              # the authors' STG_H units, part of the value
PHRASE_RE = {task: re.compile(rf"\b(?P<name>{names}): (?P<value>-?\d+(?:\.\d+)?(?!\d)){UNIT}")
             for task, names in NAME_RE.items()}
KIND = {task: {name: kind for kind, names in kinds.items() for name in names} for task, kinds in FACTORS.items()}


def attribute_spans(text: str, task: str) -> list[tuple[str, str, int, int]]:
    """(name, "causal" | "spurious" | "irrelevant", start, end) of each 'Name: value' phrase in text, its unit
    included; the name is ours whichever spelling the text uses (AUTHORS_NAMES).

    Tasks without known factors (the downstream ones) have no attribute spans: [].
    """
    if task not in PHRASE_RE:
        return []
    spans = []
    for m in PHRASE_RE[task].finditer(text):
        name = CANONICAL[task][m["name"]]
        spans.append((name, KIND[task][name], m.start(), m.end()))
    return spans


def parse_attributes(text: str, task: str) -> dict:
    """{name: value} of the 'Name: value' phrases in text (int or float, as printed)."""
    values = {}
    for name, _, start, end in attribute_spans(text, task):
        value = PHRASE_RE[task].match(text, start)["value"]
        values[name] = float(value) if "." in value else int(value)
    return values


JSON_KINDS = {type(None): "null", bool: "true/false", list: "a list", dict: "an object"}   # not NoneType, dict


def read_records(path, flag: str | None = None) -> list[dict]:
    """Records of a JSONL file (cli.read_jsonl: a file that is missing, a folder or not UTF-8, a line that is not a
    JSON object raise InputError naming file and line, and `flag`, the option that named the file). Each record
    needs string input and target (a numeric target, as in the authors' STG_H files, is read as its text), and
    its `important`, when there, is a list of {effect: causes} objects whose causes are phrases: a string, a list
    of strings, or an object whose keys are the phrases (one record of the authors' gsm8k_val nests them so).
    A cause that is a number or true/false is refused: cat.find_phrase would match it as bare digits anywhere."""
    records = []
    for line_no, record in read_jsonl(path, flag):
        where = f"{flag} {path}:{line_no}" if flag else f"{path}:{line_no}"
        target = record.get("target")
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            if isinstance(target, float) and not math.isfinite(target):   # math.isfinite(10**400) overflows
                raise InputError(f"{where}: field 'target' is {target}; write the answer as a string")
            record["target"] = str(target)   # the authors' STG_H files hold the AQI as a number
        for field in ("input", "target"):
            if not isinstance(record.get(field), str):
                found = "nothing" if field not in record else JSON_KINDS.get(type(record[field]),
                                                                             type(record[field]).__name__)
                raise InputError(f"{where}: field {field!r} must be a string, found {found}; "
                                 'each record needs {"input": "...", "target": "..."}')
        if not record["target"].strip():   # an empty answer trains nothing and is "right" for an empty output
            raise InputError(f"{where}: field 'target' is empty; each record needs the answer it teaches or tests")
        important = record.get("important", [])
        if not (isinstance(important, list) and all(isinstance(d, dict) for d in important)):
            raise InputError(f"{where}: 'important' must be a list of {{effect: [causes]}} objects")
        for entry in important:
            for effect, causes in entry.items():
                for cause in causes if isinstance(causes, list) else [causes]:
                    if not isinstance(cause, str) and not (isinstance(cause, dict) and cause is causes):
                        raise InputError(f"{where}: 'important' gives the effect {effect!r} the cause "
                                         f"{json.dumps(cause)} ({type(cause).__name__}), not a phrase; write each "
                                         f'cause as the text it stands for, a string such as "Smoking: 8"')
        records.append(record)
    return records


# ----------------------------------------------------------------------------- data sets by name
DOWNSTREAM = ("mawps", "svamp", "asdiv", "gsm8k", "arc_e")
STG_TRAIN = {"stg_s": "stg_e", "stg_m": "stg_e", "stg_l": "stg_e", "stg_h": "stg_h"}   # name -> task
TASK_HINTS = [("stg_h", ("stg_h",)),                                 # a file stem holding a hint -> task
              ("stg_e", ("stg_e", "stg_s", "stg_m", "stg_l", "spurious_token_game")),
              *((task, (task,)) for task in DOWNSTREAM)]


@dataclass
class DataSet:
    name: str                  # "stg_s", "gsm8k", or a file stem
    task: str                  # "stg_e" | "stg_h" | one of DOWNSTREAM | "generic": picks the answer checker
    train: Path | None         # training records (STG's carry their rule-made `important`)
    val: Path | None           # validation records, where the task has them
    tests: dict[str, Path]     # {"iid": ..., "ood": ...} for STG, {"test": ...} elsewhere
    annotations: Path | None = None   # downstream tasks: annotate.py's output, merged in by training_records


def guess_task(stem: str) -> str:
    """The task a file name hints at ("gsm8k_test" -> "gsm8k"), else "generic"."""
    stem = stem.lower()
    return next((task for task, hints in TASK_HINTS if any(h in stem for h in hints)), "generic")


def parse_tests(text: str) -> dict[str, Path]:
    """--test "iid=a.jsonl,ood=b.jsonl" -> {"iid": Path("a.jsonl"), "ood": Path("b.jsonl")}; at least one, each file
    must exist and each split name, without a '/', be given once."""
    tests = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        split, sep, path = item.partition("=")
        if not sep or not split.strip() or not path.strip():
            raise InputError(f"--test {text!r}: write each test file as split=FILE, e.g. iid=test.jsonl,ood=ood.jsonl")
        if "/" in split or os.sep in split:   # the split names the files predictions_<data>_<split>.jsonl
            raise InputError(f"--test {text!r}: the split name {split.strip()!r} holds a '/'; name each split "
                             "without one, e.g. iid=test.jsonl")
        file = Path(path.strip())
        if not file.exists():
            raise InputError(f"--test: {file} (split {split.strip()!r}) is not a file")
        if not file.is_file():
            what = "is a folder" if file.is_dir() else NOT_REGULAR
            raise InputError(f"--test: {file} (split {split.strip()!r}): {what}; give the path of a JSONL file of test "
                             "records")
        if split.strip() in tests:   # a dict keeps one of them, and the results would carry the other's name
            raise InputError(f"--test {text!r}: the split name {split.strip()!r} is given twice; give each test "
                             f"file its own name, e.g. {split.strip()}={tests[split.strip()]},"
                             f"{split.strip()}2={path.strip()}")
        tests[split.strip()] = Path(path.strip())
    if not tests:   # nothing would be tested, and eval.py would write the data set's results as none
        raise InputError(f"--test {text!r}: names no test file; write split=FILE, e.g. iid=test.jsonl,ood=ood.jsonl, "
                         "or leave --test out for the data set's own test files")
    return tests


def resolve_data(name_or_path: str, data_dir="data", tests: str | None = None) -> DataSet:
    """A data set by name (stg_s|stg_m|stg_l|stg_h, generated when missing; mawps|svamp|asdiv|gsm8k|arc_e)
    or by the path of one JSONL file (used for testing too, unless `tests` names the test files: parse_tests)."""
    data = _resolve_data(name_or_path, Path(data_dir))
    return replace(data, tests=parse_tests(tests)) if tests else data


def _resolve_data(name_or_path: str, data_dir: Path) -> DataSet:
    if name_or_path in STG_TRAIN:
        task = STG_TRAIN[name_or_path]
        data = DataSet(name_or_path, task, data_dir / f"{name_or_path}_train.jsonl", None,
                       {split: data_dir / f"{task}_test_{split}.jsonl" for split in ("iid", "ood")})
        missing = [p for p in (data.train, *data.tests.values()) if not p.exists()]
        if missing and data_dir.exists() and not data_dir.is_dir():   # where they would be generated
            raise InputError(f"--data {name_or_path}: its files are generated in the folder {data_dir}, and {data_dir} "
                             "is a file here; move that file aside, or run from another folder")
        if missing:
            print(f"stg: {', '.join(map(str, missing))} missing; generating the STG files in {data_dir} (seed 42)")
            write_stg(data_dir, seed=42, only_missing=True)
        return data
    if name_or_path in DOWNSTREAM:
        task = name_or_path
        annotated = data_dir / f"{task}_train_annotated.jsonl"
        data = DataSet(task, task, data_dir / f"{task}_train.jsonl", data_dir / f"{task}_val.jsonl",
                       {"test": data_dir / f"{task}_test.jsonl"}, annotated if annotated.exists() else None)
        missing = [p for p in (data.train, data.val, data.tests["test"]) if not p.exists()]
        if missing:
            raise InputError(f"{', '.join(map(str, missing))} not found: run `python annotate.py fetch {task} "
                                    f"--out {data_dir}` to download and split {task}; `python annotate.py annotate "
                                    f"--task {task}` then writes {annotated} for CAT training")
        return data
    path = Path(name_or_path)
    if path.is_file():
        return DataSet(path.stem, guess_task(path.stem), path, None, {"test": path})
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give the path of a JSONL file of records, or a data set name")
    if path.exists():
        raise InputError(f"{path}: {NOT_REGULAR}; give the path of a JSONL file of records, or a data set name")
    if path.suffix == ".jsonl" or os.sep in name_or_path:
        raise InputError(f"{path}: no such file (expected a JSONL file of records, one object a line)")
    raise InputError(f"unknown data set {name_or_path!r}: expected one of {', '.join([*STG_TRAIN, *DOWNSTREAM])} "
                     f"or the path of an existing JSONL file")


def training_records(data: DataSet) -> list[dict]:
    """The records of data.train, in the file's order. Where annotate.py wrote annotations, each record takes the
    `important` field of its annotation (matched on input and target); records without one (rejected replies,
    an unfinished run) stay in and train on L_next only, so vanilla and CAT always see the same records."""
    records = read_records(data.train)
    if data.annotations is None:
        return records
    notes = {(r["input"], r["target"]): r["important"] for r in read_records(data.annotations) if "important" in r}
    keys = [(r["input"], r["target"]) for r in records]
    merged = [{**r, "important": notes[key]} if key in notes else r for r, key in zip(records, keys)]
    found = sum(key in notes for key in keys)
    print(f"{data.annotations}: {found} of {len(records)} records of {data.train} annotated; the other "
          f"{len(records) - found} (rejected or not yet annotated) train without the Re-Attention loss")
    unmatched = len(notes.keys() - set(keys))   # counted by key: a record repeated in data.train matches once
    if unmatched:
        print(f"warning: {unmatched} annotations of {data.annotations} match no record of {data.train} "
              f"(was the training file fetched again?); they are not used")
    return merged


# ----------------------------------------------------------------------------- command line
@dataclass
class StgConfig:
    out: str = "data"          # folder the JSONL files are written to
    seed: int = 42             # every file's stream is random.Random(f"{seed}/{file stem}")
    overwrite: bool = False    # replace files of --out that differ from what this seed makes (hand edits, another
                               # seed); without it such files are left as they are and nothing is written


def main(argv=None) -> None:
    cfg = StgConfig(**vars(config_parser(StgConfig, "Write the STG benchmark (CAT Appendix A) as JSONL files.")
                           .parse_args(argv)))
    check_output(cfg.out, "--out", folder=True)
    write_stg(cfg.out, cfg.seed, overwrite=cfg.overwrite)


if __name__ == "__main__":
    run_cli(main)
