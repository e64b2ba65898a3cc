"""What every command shares: a bad input ends in one line and exit status 2, flags come from a config dataclass and
are checked in one place (numbers, devices, output paths), files are written atomically, JSON and JSONL are read
and written in one place.

Nothing here knows about CAT, models or data sets."""
import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import tempfile
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes (an unknown flag, a value of the wrong type, an invalid choice) are answered as every
    other input error: one line naming it, exit status 2; argparse's own prints its whole usage text first."""

    def error(self, message):
        if "expected one argument" in message:   # "--lr -1" reads -1 as a flag of its own
            message += " (a value that starts with '-' is written --flag=-value)"
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        raise SystemExit(2)


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
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    is rewritten so (atomically), without it nothing is written (a dry run). A file that is not UTF-8 text raises
    InputError naming it (read_text)."""
    text = read_text(path, torn_tail=True)
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


def jsonl_text(records: list[dict]) -> str:
    """The text of a JSONL file: one JSON object a line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object a line, written atomically."""
    write_text(path, jsonl_text(records))


def refuse_to_replace(texts: dict[Path, str], overwrite: bool, flag: str = "--out") -> None:
    """Before files are written: an existing file that would change (a hand edit, another seed) is replaced only
    with --overwrite; without it InputError names the files and nothing is written. A file that would be written
    byte for byte as it is counts as no change, so running the same command again needs no --overwrite."""
    differing = []
    for path, text in texts.items():
        if path.is_dir():
            raise InputError(f"{flag}: {path} is a folder, where the file {path.name} is to be written; move it "
                             f"aside or choose another {flag}")
        if path.exists() and path.read_bytes() != text.encode("utf-8"):
            differing.append(path)
    if differing and not overwrite:
        names = ", ".join(str(p) for p in differing[:3]) + (f" and {len(differing) - 3} more" if len(differing) > 3
                                                             else "")
        raise InputError(f"{flag}: {names} already exist{'s' if len(differing) == 1 else ''} with other content "
                         f"(edited, or written with other settings); nothing was written. Replace "
                         f"{'it' if len(differing) == 1 else 'them'} with --overwrite, or choose another {flag}")


# ----------------------------------------------------------------------------- reading JSON and JSONL
NOT_REGULAR = "not a regular file (a device such as /dev/null, a FIFO or a socket)"   # a path that exists, no file


def read_text(path, flag: str | None = None, torn_tail: bool = False) -> str:
    """The text of a UTF-8 file (a UTF-8 byte-order mark is skipped). A missing file, a folder, an unreadable
    file, UTF-16 or other bytes that are not UTF-8 raise InputError naming the file (and `flag`, the option that
    named it) and, for a bad byte, its line. torn_tail, for append-only JSONL files: a last line without its newline
    that begins as an object may be a write cut inside a character, so its bytes are read leniently (the caller
    drops such a line)."""
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    try:
        if path.exists() and not path.is_file() and not path.is_dir():   # a FIFO's read would wait for a writer
            raise InputError(f"{name}: {NOT_REGULAR}; give the path of a file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a folder; give the path of a file") from None
    except OSError as error:
        raise InputError(f"{name}: cannot be read ({error.strerror})") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InputError(f"{name}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    tail = b""
    if torn_tail and not data.endswith(b"\n") and data[data.rfind(b"\n") + 1:].lstrip().startswith(b"{"):
        data, tail = data[:data.rfind(b"\n") + 1], data[data.rfind(b"\n") + 1:]
    try:
        text = data.decode("utf-8-sig") + tail.decode("utf-8" if data else "utf-8-sig", errors="replace")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        looks = " (it looks like UTF-16 or a binary file)" if b"\x00" in data else ""
        raise InputError(f"{name}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x}){looks}; save it as UTF-8"
                         ) from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise InputError(f"{name}:{line}: holds NUL bytes, so it is UTF-16 without a byte-order mark or a binary "
                         f"file; save it as UTF-8 text")
    return text


def _json_lines(path, flag: str | None, torn_ok: bool) -> tuple[list[tuple[int, dict]], bool]:
    """read_jsonl and read_jsonl_log: (line number, object) of each non-blank line, and whether a torn last line
    was left out (only with torn_ok)."""
    text = read_text(path, flag, torn_tail=torn_ok)
    name = f"{flag} {path}" if flag else str(path)
    lines = text.splitlines()
    rows, torn = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            # a last line without its newline that starts as a JSON object does: a write cut short by a kill
            if torn_ok and number == len(lines) and not text.endswith("\n") and line.lstrip().startswith("{"):
                torn = True
                continue
            hint = " (a JSON array or a pretty-printed file? write one object a line)" if line.strip() in "[{" else ""
            raise InputError(f"{name}:{number}: not valid JSON ({error.msg} at column {error.colno}){hint}; each "
                             f"line must be one JSON object") from None
        if not isinstance(value, dict):
            raise InputError(f"{name}:{number}: expected a JSON object, found {type(value).__name__}"
                             + (" (the whole file as one JSON array? write one object a line)"
                                if isinstance(value, list) else ""))
        rows.append((number, value))
    return rows, torn


def read_jsonl(path, flag: str | None = None) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file: every JSONL file the project reads goes
    through here. A file that is missing, a folder, not UTF-8 (read_text), a line that is not JSON or not a JSON
    object raise InputError naming the file (with `flag`, the option that named it) and the line."""
    return _json_lines(path, flag, torn_ok=False)[0]


def read_jsonl_log(path, flag: str | None = None) -> tuple[list[tuple[int, dict]], bool]:
    """read_jsonl for an append-only file that a kill may have cut mid-line: a last line without its newline that
    begins as an object and does not parse is left out, and the second value says so (True); the caller decides
    whether to rewrite the file without it. Any other bad line raises as in read_jsonl."""
    return _json_lines(path, flag, torn_ok=True)


def read_json(path, what_to_do: str) -> typing.Any:
    """A JSON file the project wrote itself (results.json, train_config.json). One that does not parse (a write cut
    short, a hand edit gone wrong) raises InputError naming the file, saying it is damaged and `what_to_do`; one
    that is missing, a folder or not UTF-8 raises as read_text does."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is damaged: not valid JSON ({error.msg} at line {error.lineno}, column "
                         f"{error.colno}); {what_to_do}") from None


# ----------------------------------------------------------------------------- checking flags
def flag_name(field_name: str, rename: dict | None = None) -> str:
    """The command-line flag of a config field: --field-name, or rename[field] (add_config_arguments)."""
    return (rename or {}).get(field_name, "--" + field_name.replace("_", "-"))


def check_numbers(cfg, rename: dict | None = None, infinite: typing.Iterable[str] = ()) -> None:
    """Every number of a config dataclass instance, before any work: no float field is NaN (argparse's float()
    reads "nan", and NaN passes every `<` range check), none is infinite unless named in `infinite` (where infinity
    means something, e.g. no cap), and every int fits in 64 bits (what torch, numpy and their seeds take). The
    ranges of each field stay the caller's. Raises InputError naming the flag (rename: as add_config_arguments)."""
    infinite = set(infinite)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, bool):
                continue
            flag = flag_name(f.name, rename)
            if isinstance(item, float) and math.isnan(item):
                raise InputError(f"{flag} {item}: not a number; give a number (see --help for its range)")
            if isinstance(item, float) and math.isinf(item) and f.name not in infinite:
                raise InputError(f"{flag} {item}: must be finite; give a number (see --help for its range)")
            if isinstance(item, int) and not -2 ** 63 <= item < 2 ** 63:
                raise InputError(f"{flag} {item}: out of range; give a number between -2**63 and 2**63 - 1")


def check_device(value: str) -> None:
    """A --device flag: auto, cpu, cuda or cuda:N, where a CUDA device (the N-th) exists; else InputError naming
    --device and what this machine has."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise InputError(f"--device {value!r}: choose auto, cpu, cuda or cuda:N")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {value}: no CUDA device is available here; use --device cpu (or auto)")
        count = torch.cuda.device_count()
        if ":" in value and int(value.split(":")[1]) >= count:
            raise InputError(f"--device {value}: this machine has {count} CUDA device{'s' if count > 1 else ''}, "
                             f"cuda:0 to cuda:{count - 1}")


def resolve_device(value: str) -> str:
    """The device a checked --device names: auto = cuda when a CUDA device is available, else cpu."""
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def check_output(path, flag: str, folder: bool) -> Path:
    """An output path checked before any work is done, so that a mistake does not surface after minutes of it:
    not empty, no file on the way to it ("out.txt/run"), a folder where a folder is needed (folder=True) and not a
    folder, a FIFO or a device (which the write would replace) where a file is written, and a place this process
    can write (the folder itself when it exists, else the nearest existing folder above it, where it will be made).
    Nothing is created. Raises InputError naming the flag; returns the path."""
    if not str(path).strip():
        raise InputError(f"{flag} is empty: give a {'folder' if folder else 'file'} path")
    path = Path(path)
    try:
        if folder and path.exists() and not path.is_dir():
            raise InputError(f"{flag} {path}: a file is there, where a folder is needed; choose another {flag}")
        if not folder and path.is_dir():
            raise InputError(f"{flag} {path}: a folder is there, where a file is to be written; give a file path")
        if not folder and path.exists() and not path.is_file():   # a write would replace it: a FIFO, /dev/null
            raise InputError(f"{flag} {path}: {NOT_REGULAR}; give the path of a file")
        absolute = Path(os.path.abspath(path))
        base = absolute if folder and absolute.is_dir() else next(p for p in absolute.parents if p.exists())
    except PermissionError as error:
        raise InputError(f"{flag} {path}: cannot be reached ({error.strerror}); choose another {flag}") from None
    if not base.is_dir():
        raise InputError(f"{flag} {path}: {base} is a file, so nothing can be made under it; choose another {flag}")
    try:   # os.access alone says yes to root on a read-only mount or in /proc: a file made and removed says it all
        if not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        handle, probe = tempfile.mkstemp(dir=base, prefix=".write-check-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"{flag} {path}: cannot write in {base} ({error.strerror}); choose another {flag}") from None
    return path


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
