"""What every command shares: a bad input ends in one line and exit status 2, flags come from a config dataclass,
files are written atomically, JSONL is read and written in one place.

Nothing here knows about CAT, models or data sets."""
import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import types
import typing
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch


class InputError(ValueError):
    """Bad input a user can fix (a file, a field, a flag): the message names it and says what to do."""


def run_cli(main) -> None:
    """Run a command line's main(): input errors end in one line naming what to fix and exit status 2; any other
    exception is a bug and keeps its traceback."""
    try:
        main()
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def field_comments(cls) -> dict[str, str]:
    """The comment beside each field of a dataclass (and its continuation lines): its --help text."""
    comments, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s+(\w+): [^#]*#\s?(.*)", line):
            name, comments[m[1]] = m[1], m[2]
        elif name and (m := re.match(r"\s+#\s?(.*)", line)):
            comments[name] += " " + m[1]
        elif not line.strip():   # a blank line ends a comment: what follows it heads a group of fields
            name = None
    return comments


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=(), rename=None) -> None:
    """argparse mapped one-to-one onto a config dataclass: every field a flag (--field-name, or rename[field])
    with the dataclass default, its help the field's comment; booleans get --flag / --no-flag."""
    comments, rename = field_comments(cls), rename or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = rename.get(f.name, "--" + f.name.replace("_", "-"))
        text = comments.get(f.name, "") + " (default: %(default)s)"
        kind = f.type
        if typing.get_origin(kind) in (typing.Union, types.UnionType):                    # int | None -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=text)
        elif typing.get_origin(kind) is list or kind is list:
            parser.add_argument(flag, dest=f.name, nargs="+", default=f.default_factory(), help=text)
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            parser.add_argument(flag, dest=f.name, type=kind, default=default, help=text)


def config_parser(cls, description: str, skip=(), rename=None) -> argparse.ArgumentParser:
    """A command line of one config dataclass (add_config_arguments), the module docstring as its description."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, cls, skip, rename)
    return parser


@contextmanager
def atomic_path(path):
    """A temporary path beside `path` to write to; renamed onto `path` when the block ends without error, so that
    an interruption leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_files(folder):
    """Several files of one folder written together: name -> a temporary path for each (atomic_path); all of
    them are renamed into place when the block ends without error, and the folder's other files stay."""
    with ExitStack() as stack:
        yield lambda name: stack.enter_context(atomic_path(Path(folder) / name))


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def complete_lines(path, repair: bool = True) -> list[str]:
    """The lines of an append-only JSONL file (metrics.jsonl, annotate.py's output). A last line without its
    newline is kept when it parses and dropped when it does not (a kill during the write); with repair the file
    is rewritten so (atomically), without it nothing is written (a dry run)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text or text.endswith("\n"):
        return text.splitlines()
    lines = text.splitlines()
    try:
        json.loads(lines[-1])
    except json.JSONDecodeError:
        print(f"{path}: the last line is incomplete (an interrupted write); it is dropped")
        lines = lines[:-1]
    if repair:
        write_text(Path(path), "".join(line + "\n" for line in lines))
    return lines


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object a line, written atomically."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----------------------------------------------------------------------------- device and precision
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (x86 AVX512-BF16 or AMX, read from /proc/cpuinfo):
    there bf16 autocast runs matmuls about twice as fast as float32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def precision(device, dtype: str = "auto") -> str:
    """The compute precision a run uses on `device`: "bfloat16" (autocast, float32 master weights) or "float32".
    auto = bfloat16 on CUDA and on CPUs with native bf16 matmuls, float32 elsewhere."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r}: choose auto, float32 or bfloat16")
    if dtype != "auto":
        return dtype
    device = torch.device(device)
    return "bfloat16" if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu()) else "float32"


def autocast(device, dtype: str):
    """The autocast context of precision(device, dtype): matmuls in bf16; softmax, norms and losses stay float32
    here because the code casts them (scores.float(), RMSNorm, logits.float())."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
