"""Bad input, what a fifth sweep found: a model folder whose files are damaged or of the wrong kind (JSON that is no
object or not UTF-8, a tokenizer.json cut short, sizes and token ids of the wrong type, an index without its
weight_map, a pytorch_model.bin cut short, an adapter that names no base model or itself), a --test that names no
file or a split with a '/', experiments/tables.py's paths, and a target too large for a float. Each ends in one
`error:` line naming the file, field or flag, exit status 2, and nothing a user made is changed."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import cli
import eval as evaluation
import hf
import stg
from conftest import cli_error, experiment
from model import ModelArgs, Transformer

RECORD = {"input": "a a", "target": "b"}


def digest(folder: Path) -> dict[str, str]:
    """Every file under folder and the hash of its bytes: what 'nothing was changed' is checked against."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A 1-layer random model over a word-level tokenizer, saved in Hugging Face layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    args = ModelArgs(vocab_size=4, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, hidden_dim=64,
                     tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "model"
    hf.save_model(Transformer(args), hf.Tokenizer(backend, bos_id=0, eos_ids=[1], pad_id=1), folder)
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "test.jsonl"
    cli.write_jsonl(path, [RECORD])
    return path


def edit_json(name: str, change):
    """A damage: the model folder's JSON file `name`, read, changed by `change` (which may return a new value)."""
    def damage(folder: Path):
        value = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(change(value) or value))
    return damage


def write(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def utf16(name: str):
    return lambda folder: (folder / name).write_bytes((folder / name).read_text().encode("utf-16"))


def cut(name: str):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:100])


def no_eos(folder: Path):
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        value = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({k: v for k, v in value.items() if "eos" not in k}))


def sharded(weight_map):
    def damage(folder: Path):
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(weight_map))
    return damage


def as_bin(folder: Path):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a download cut short")


def adapter(config: dict):
    """The folder as a LoRA adapter of `config`, over a copy of itself beside it as its base model."""
    def damage(folder: Path):
        shutil.copytree(folder, folder.parent / "base")
        base = {"base_model_name_or_path": str(folder.parent / "base")} if "r" in config else {}
        config_here = {k: str(folder) if v == "<this folder>" else v for k, v in config.items()}
        (folder / "adapter_config.json").write_text(json.dumps({**base, **config_here}))
    return damage


# ----------------------------------------------------------------------------- 1. a model folder's files
@pytest.mark.parametrize("damage, message", [   # message: what the line says after the folder
    (write("config.json", b"[]"), "/config.json: holds a JSON list, not the object of named settings"),
    (write("tokenizer_config.json", b'"<s>"'), "/tokenizer_config.json: holds a JSON str, not the object"),
    (utf16("config.json"), "/config.json: UTF-16 text"),
    (write("tokenizer.json", b"{}"), "/tokenizer.json: not a tokenizer file the tokenizers library reads"),
    (cut("tokenizer.json"), "/tokenizer.json: not a tokenizer file the tokenizers library reads"),
    (edit_json("config.json", lambda c: c.update(vocab_size="4")), '/config.json: vocab_size is "4", where a size'),
    (edit_json("config.json", lambda c: c.update(hidden_size=None)), "/config.json: hidden_size is null, where a size"),
    (edit_json("config.json", lambda c: c.update(num_attention_heads=0, head_dim=None)),
     "/config.json: num_attention_heads is 0, where a size"),
    (edit_json("generation_config.json", lambda c: c.update(eos_token_id="</s>")),
     '/generation_config.json: eos_token_id is "</s>", where a token id'),
    (edit_json("config.json", lambda c: c.update(pad_token_id=[1.5])), "/config.json: pad_token_id is [1.5]"),
    (edit_json("tokenizer_config.json", lambda c: c.update(eos_token=1)), "/tokenizer_config.json: eos_token is 1"),
    (no_eos, ": no EOS token in tokenizer_config.json (eos_token), generation_config.json or config.json"),
    (sharded({"metadata": {}}), "/model.safetensors.index.json: no weight_map of tensor names"),
    (as_bin, "/pytorch_model.bin: not a readable PyTorch weights file"),
    (adapter({"target_modules": ["q_proj"]}),
     "/adapter_config.json: no base_model_name_or_path, the model the adapter was trained on"),
    (adapter({"base_model_name_or_path": "<this folder>"}),
     "/adapter_config.json: base_model_name_or_path names this folder itself"),
    (adapter({"r": None, "lora_alpha": 16, "target_modules": ["q_proj"]}),
     "/adapter_config.json: r null and lora_alpha 16: each must be a positive number"),
    (adapter({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "use_rslora": True}),
     "/adapter_config.json: only a list of target_modules and plain LoRA scaling"),
])
def test_a_damaged_model_folder_is_named_by_file_and_field(damage, message, saved_model, data, tmp_path, capsys):
    """Each was a traceback (AttributeError, UnicodeDecodeError, a bare Exception of tokenizers, TypeError deep in
    torch, ZeroDivisionError, KeyError, an unpickling error, RecursionError) or a ValueError."""
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    damage(folder)
    before = digest(folder)
    err = cli_error(lambda: evaluation.main(["--model", str(folder), "--data", str(data), "--out",
                                             str(tmp_path / "e"), "--device", "cpu", "--dtype", "float32"]), capsys)
    assert err.startswith(f"error: {folder}{message}"), err
    assert any(what in err for what in ("restore", "download", "write", "save it", "instead"))   # what to do
    assert digest(folder) == before                                         # the folder is left as it was


def test_a_model_folder_as_it_is_saved_still_loads(saved_model, tmp_path):
    """The checks above refuse nothing valid: null num_key_value_heads and head_dim are derived, a UTF-8
    byte-order mark is skipped, and a pad_token_id list gives its first id."""
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(num_key_value_heads=None, head_dim=None, pad_token_id=None)
    (folder / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode())
    model, tok = hf.load_model(str(folder))
    assert (model.args.n_kv_heads, model.args.head_dim, tok.eos_ids, tok.pad_id) == (2, 16, [1], 1)


# ----------------------------------------------------------------------------- 2. --test
@pytest.mark.parametrize("test, message", [
    (",,,", "--test ',,,': names no test file"),
    (" ", "--test ' ': names no test file"),
    ("a/b={data}", "the split name 'a/b' holds a '/'"),
    ("../x={data}", "the split name '../x' holds a '/'"),
])
def test_a_test_flag_that_names_no_file_or_a_split_with_a_slash_is_refused(test, message, saved_model, data,
                                                                           tmp_path, capsys):
    """',,,' evaluated nothing and wrote the data set's results in results.json as {} (those of an earlier evaluation
    were lost); 'a/b=FILE' wrote predictions_test_a/b.jsonl into a folder of its own."""
    out = tmp_path / "e"
    out.mkdir()
    results = {"test": {"test": {"accuracy": 0.5, "n": 2, "correct": 1, "unparsed": 0, "majority": 0.5}}}
    (out / "results.json").write_text(json.dumps(results))
    before = digest(out)
    err = cli_error(lambda: evaluation.main(["--model", str(saved_model), "--data", str(data), "--out", str(out),
                                             "--test", test.format(data=data), "--device", "cpu"]), capsys)
    assert err.startswith(f"error: --test {test.format(data=data)!r}: ") and message in err, err
    assert digest(out) == before
    with pytest.raises(cli.InputError, match=message.replace("(", r"\(")):
        stg.parse_tests(test.format(data=data))


# ----------------------------------------------------------------------------- 3. experiments/tables.py
@pytest.mark.parametrize("flags, message", [
    (["--results", "{tmp}/absent"], "--results {tmp}/absent: no such folder; give the folder that holds"),
    (["--results", "{tmp}/notes.txt"], "--results {tmp}/notes.txt: not a folder"),
    (["--out", "{tmp}/notes.txt/tables.md"], "--out {tmp}/notes.txt/tables.md: {tmp}/notes.txt is a file"),
    (["--out", "{tmp}/results"], "--out {tmp}/results: a folder is there, where a file is to be written"),
    (["--out", ""], "--out is empty"),
    (["--findings", "{tmp}/absent.md"], "--findings {tmp}/absent.md: no such file"),
    (["--readme", "{tmp}/results"], "--readme {tmp}/results: a folder is there"),
])
def test_tables_checks_its_paths_before_any_work(flags, message, tmp_path, capsys):
    """A --results that is no folder wrote empty tables without a word; an --out under a file or on a folder ended
    in a traceback, and a --findings that does not exist in '[Errno 2] ...', both after every summary was made and
    --out written."""
    (tmp_path / "results").mkdir()
    (tmp_path / "notes.txt").write_text("mine\n")
    before = digest(tmp_path)
    argv = ["--results", str(tmp_path / "results"), "--out", str(tmp_path / "tables.md"),
            *(f.replace("{tmp}", str(tmp_path)) for f in flags)]
    err = cli_error(lambda: experiment("tables").main(argv), capsys)
    assert err.startswith("error: " + message.replace("{tmp}", str(tmp_path))), err
    assert digest(tmp_path) == before


# ----------------------------------------------------------------------------- 4. a target too large for a float
def test_a_whole_number_target_of_any_size_is_read_as_its_text(tmp_path):
    """math.isfinite(10**400) raised OverflowError; a whole number is finite, and is read as its digits."""
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input": "a", "target": 10 ** 400}) + "\n")
    assert stg.read_records(path)[0]["target"] == str(10 ** 400)
    path.write_text('{"input": "a", "target": Infinity}\n')
    with pytest.raises(cli.InputError, match=r"t.jsonl:1: field 'target' is inf"):
        stg.read_records(path)
