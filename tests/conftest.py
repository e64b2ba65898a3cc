"""Shared fixtures: tokenizers built offline with `tokenizers`, and the SmolLM2 folder when it exists."""
import importlib
import os
import signal
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CORPUS = [
    "Here is the statistical data for a person. Please predict the probability of cancer.",
    "Yellow fingers: 3, Weight: 1, Room size: 4, Certain gene: 4, Clothing size: 1, Smoking: 2, "
    "Hormones: 2, Exercise: 5 Answer: Low Risk High Risk",
    "William has 2 bottle caps. He buys 41 more. How many bottle caps does William have in all? Answer: 43.0",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Café naïve façade — über straße 東京 ☕ emoji 🙂 résumé",
] * 20
SPECIALS = ["<unk>", "<s>", "</s>"]


def _train(tok: Tokenizer, vocab_size: int, **kw) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False, **kw)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def experiment(name: str):
    """A module of experiments/ (alpha_study, tables, ...), imported by name as its scripts import each other."""
    folder = str(ROOT / "experiments")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


@pytest.fixture
def ctrl_c():
    """Ctrl-C as a terminal delivers it, for a test that sends SIGINT: Python's own handler in this process, the
    default in the children it starts. A test run started with `&` from a script inherits SIGINT ignored, and so
    would every child, which Ctrl-C then would not reach."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)   # a child starts with the default
    yield
    signal.signal(signal.SIGINT, inherited)


@pytest.fixture(scope="session")
def byte_bpe() -> Tokenizer:
    """A GPT-2/Llama-3/SmolLM2-style byte-level BPE tokenizer ('Ġ' marks a leading space)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _train(tok, 400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="session")
def sentencepiece_bpe() -> Tokenizer:
    """A Llama-2/TinyLlama-style SentencePiece BPE tokenizer ('▁' marks a space, byte fallback)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return _train(tok, 400)


@pytest.fixture(scope="module")
def stg_file(tmp_path_factory, request) -> Path:
    """The first N records of the generated STG_S training file as a JSONL path; N is the test module's
    STG_RECORDS (default 48)."""
    import cli
    import stg
    path = tmp_path_factory.mktemp("data") / "stg_small.jsonl"
    cli.write_jsonl(path, stg.make_records("stg_s_train", 42)[:getattr(request.module, "STG_RECORDS", 48)])
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct folder that ../shared/tools/make-smollm2 builds (skips when absent)."""
    path = Path(os.environ.get("CAT_SMOLLM2_DIR", Path.home() / ".cache/cat-models/smollm2-135m-instruct"))
    if not (path / "model.safetensors").exists():
        pytest.skip(f"no SmolLM2 checkpoint at {path}: build it with ../shared/tools/make-smollm2 (CI does)")
    return path


@pytest.fixture
def decoder(monkeypatch):
    """eval.generate, replaced by one that records the size of each batch it decodes (.batches) and raises
    KeyboardInterrupt, as a stop of the process would, at the batch numbers listed in .stop."""
    import eval

    class Decoder:
        def __init__(self):
            self.decode, self.batches, self.stop = eval.generate, [], []

        def __call__(self, model, prompts, *args):
            self.batches.append(len(prompts))
            if len(self.batches) in self.stop:
                raise KeyboardInterrupt
            return self.decode(model, prompts, *args)

    monkeypatch.setattr(eval, "generate", Decoder())
    return eval.generate


def a_run(folder: Path, config: dict | None, results: dict) -> str:
    """A finished run folder as eval.py --compare reads it: results.json and, unless None, train_config.json."""
    import json
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    if config is not None:
        (folder / "train_config.json").write_text(json.dumps(config))
    return str(folder)


def cli_error(main, capsys) -> str:
    """Run a command's main() as its __main__ does (cli.run_cli): it must end in exit status 2 and one line
    'error: ...' on stderr, no traceback; that line is returned."""
    import cli
    capsys.readouterr()                                   # what ran before (progress bars) is not the error
    with pytest.raises(SystemExit) as stop:
        cli.run_cli(main)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err
