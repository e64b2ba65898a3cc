"""Bad input, what a fifth sweep found: a model folder whose files are damaged or of the wrong kind (JSON that is no
object or not UTF-8, a tokenizer.json cut short, sizes and token ids of the wrong type, an index without its
weight_map, a pytorch_model.bin cut short, an adapter that names no base model or itself), a --test that names no
file or a split with a '/', experiments/tables.py's paths, and a target too large for a float. And what a sixth
found: config.json's other numbers and switches, an adapter of another kind of model, model.py's and stg_grid.py's
flags, an odd head size from --scratch-dim, a FIFO as an output file, the other experiments' --out, a --test split
named 'val' beside --val-frac, a 'data' file where STG files are made, damaged train_config.json and
study_config.json fields, and a study continued in another study's folder. Each ends in one `error:` line naming
the file, field or flag, exit status 2, and nothing a user made is changed."""
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

import cli
import eval as evaluation
import hf
import model as M
import stg
import train
from conftest import a_run, cli_error, experiment
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
    # a linear RoPE scaling without its factor was a KeyError, a number written as a string a TypeError deep in
    # torch; tie_word_embeddings "false" read as true and tied an untied model's output layer without a word
    (edit_json("config.json", lambda c: c.update(rope_scaling={"rope_type": "linear"})),
     "/config.json: rope_scaling's factor is missing, where a positive number belongs"
     "; restore the file from the model's source"),
    (edit_json("config.json", lambda c: c.update(rms_norm_eps="1e-5")),
     '/config.json: rms_norm_eps is "1e-5", where a positive number belongs'
     "; restore the file from the model's source"),
    (edit_json("config.json", lambda c: c.update(tie_word_embeddings="false")),
     '/config.json: tie_word_embeddings is "false", where true or false belongs'
     "; restore the file from the model's source"),
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
    assert not (tmp_path / "e").exists()                                    # nor anything written for it


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


# ----------------------------------------------------------------------------- 5. the sixth sweep: model files
@pytest.mark.parametrize("config, message", [
    ({"r": 8, "lora_alpha": 16, "target_modules": ["c_attn"]},
     '/adapter_config.json: target_modules ["c_attn"] names no linear layer of the base model (down_proj, '
     "gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj), so the adapter is of another kind of model; "
     "give it over the base model it was trained on"),
    ({"r": 8.5, "lora_alpha": 16, "target_modules": ["q_proj"]},
     "/adapter_config.json: r 8.5 and lora_alpha 16: each must be a positive number, r a whole one (the rank); "
     "restore the file from where the adapter was saved"),
])
def test_an_adapter_of_another_model_or_a_fractional_rank_is_named(config, message, saved_model, data, tmp_path,
                                                                   capsys):
    """GPT-2's target_modules ended in apply_lora's ValueError, a rank of 8.5 in a TypeError of torch.empty."""
    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    adapter(config)(folder)
    before = digest(tmp_path)
    err = cli_error(lambda: evaluation.main(["--model", str(folder), "--data", str(data), "--out",
                                             str(tmp_path / "e"), "--device", "cpu", "--dtype", "float32"]), capsys)
    assert err == f"error: {folder}{message}", err
    assert digest(tmp_path) == before


@pytest.mark.parametrize("flags, message", [(["--device", "gpu"], "--device 'gpu': choose auto, cpu, cuda or cuda:N"),
                                            (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1")])
def test_model_py_checks_its_flags_before_the_weights(flags, message, saved_model, tmp_path, capsys, monkeypatch):
    """--device gpu was read as a damaged model.safetensors ("download or save it again"), --max-new-tokens -1 a
    traceback of torch.full."""
    before = digest(saved_model)
    monkeypatch.setattr(sys, "argv", ["model.py", "--model", str(saved_model), "--prompt", "a b", *flags])
    assert cli_error(M.main, capsys) == f"error: {message}"
    assert digest(saved_model) == before


# ----------------------------------------------------------------------------- 6. the sixth sweep: train.py
TINY = ["--model", "scratch", "--scratch-layers", "1", "--scratch-vocab", "300", "--batch-size", "8", "--epochs", "1",
        "--no-save"]


def test_scratch_heads_of_an_odd_size_are_refused_before_work(stg_file, tmp_path, capsys):
    """--scratch-dim 6 --scratch-heads 2 (heads of 3) passed the multiple check and ended in a shape error of RoPE,
    which rotates a head's dimensions in pairs."""
    argv = [*TINY, "--scratch-dim", "6", "--scratch-heads", "2", "--data", str(stg_file), "--out", str(tmp_path / "r")]
    err = cli_error(lambda: train.train(train.parse_args(argv)), capsys)
    assert err == ("error: --scratch-dim 6 / --scratch-heads 2 gives heads of 3 dimensions, an odd number: RoPE "
                   "rotates them in pairs; choose them so that each head has an even number")
    assert not (tmp_path / "r").exists()


def test_a_test_split_named_val_beside_val_frac_is_refused(stg_file, tmp_path, capsys):
    """--test val=FILE took the place of the validation split --val-frac carves out: that split was written to
    val.jsonl and never evaluated, and results.json's "val" was the other file's."""
    mine = tmp_path / "mine.jsonl"
    cli.write_jsonl(mine, stg.make_records("stg_e_test_ood", 42)[:4])
    argv = [*TINY, "--scratch-dim", "32", "--scratch-heads", "2", "--data", str(stg_file), "--out",
            str(tmp_path / "r"), "--test", f"val={mine}", "--val-frac", "0.25", "--eval-limit", "2"]
    err = cli_error(lambda: train.train(train.parse_args(argv)), capsys)
    assert err == (f"error: --test: the split name 'val' ({mine}) is the name of the validation split that "
                   f"--val-frac 0.25 carves out; name that test file otherwise (e.g. dev={mine}), or leave out "
                   "--val-frac")
    assert not (tmp_path / "r").exists()


def test_a_file_named_data_where_stg_files_are_made_is_named(saved_model, tmp_path, capsys, monkeypatch):
    """--data stg_s makes its files in data/ when they are missing: a file of that name was a FileExistsError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").write_text("mine\n")
    err = cli_error(lambda: evaluation.main(["--model", str(saved_model), "--data", "stg_s", "--out",
                                             str(tmp_path / "e")]), capsys)
    assert err == ("error: --data stg_s: its files are generated in the folder data, and data is a file here; move "
                   "that file aside, or run from another folder")
    assert (tmp_path / "data").read_text() == "mine\n" and not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- 7. the sixth sweep: output files
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_output_file_that_is_a_fifo_or_a_device_is_refused(tmp_path, capsys):
    """tables.py --out PIPE replaced the FIFO with a regular file (as root, --out /dev/null would replace the device
    node); eval.py --compare --out PIPE waited forever to read it."""
    (tmp_path / "results").mkdir()
    pipe = tmp_path / "pipe.md"
    os.mkfifo(pipe)
    err = cli_error(lambda: experiment("tables").main(["--results", str(tmp_path / "results"), "--out", str(pipe)]),
                    capsys)
    assert err == f"error: --out {pipe}: {cli.NOT_REGULAR}; give the path of a file"
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    with pytest.raises(cli.InputError, match="not a regular file"):
        cli.check_output(os.devnull, "--out", folder=False)


def fake_study(tmp_path: Path, **fields) -> tuple[Path, Path]:
    """A study folder of alpha_study.py on MAWPS without runs yet, and the authors' data folder it reads."""
    authors = tmp_path / "authors"
    for stem in ("mawps_train", "mawps_val", "mawps_test"):
        cli.write_jsonl(authors / "MAWPS" / f"{stem}.jsonl", [RECORD])
    study = experiment("alpha_study")
    folder = tmp_path / "mawps-smollm2"
    folder.mkdir()
    config = study.StudyConfig(model="/models/a", authors_data=str(authors), data="mawps", settings="vanilla",
                               seeds="42", out=str(folder), **fields)
    (folder / "study_config.json").write_text(json.dumps({**dataclasses.asdict(config), "revision": "abc"}))
    return folder, authors


@pytest.mark.parametrize("script", ["copies", "attributes", "row_counts", "verdict"])
def test_the_experiments_check_their_out_before_any_work(script, saved_model, tmp_path, capsys):
    """Each wrote --out last, after reading every study (or tokenising every record): an --out under a file ended
    there in a traceback (FileExistsError)."""
    folder, authors = fake_study(tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    out = tmp_path / "notes.txt" / "table.md"
    argv = {"copies": ["--studies", str(folder)],
            "attributes": ["--studies", str(folder), "--split", "test", "--no-figure"],
            "row_counts": ["--model", str(saved_model), "--authors-data", str(authors), "--data", "mawps"],
            "verdict": ["--results", str(tmp_path)]}[script]
    before = digest(tmp_path)
    err = cli_error(lambda: experiment(script).main([*argv, "--out", str(out)]), capsys)
    assert err == f"error: --out {out}: {tmp_path / 'notes.txt'} is a file, so nothing can be made under it; choose " \
                  "another --out"
    assert digest(tmp_path) == before


# ----------------------------------------------------------------------------- 8. the sixth sweep: experiments
@pytest.mark.parametrize("flags, message", [
    (["--seeds", "a,b"], "--seeds 'a,b': comma-separated whole numbers, e.g. 42,1,2"),
    (["--alphas", "x"], "--alphas 'x': comma-separated numbers, e.g. 0.05,0.15"),
    (["--alphas", "nan"], "--jobs must be ≥ 1 and --alphas a list of α > 0"),
    (["--val-frac", "1.5"], "--val-frac 1.5: must be between 0 and 1"),
    (["--out", "{tmp}/notes.txt/grid"], "--out {tmp}/notes.txt/grid: {tmp}/notes.txt is a file, so nothing can be "
                                        "made under it; choose another --out"),
])
def test_stg_grid_checks_its_flags_before_any_run(flags, message, tmp_path, capsys, monkeypatch):
    """--seeds a,b and --alphas x were tracebacks (ValueError), the first after grid_config.json was written; an
    --out under a file one of mkdir; --alphas nan and --val-frac 1.5 started runs that each failed in its log."""
    grid = experiment("stg_grid")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(grid, "run_pool", lambda *args: pytest.fail("a run was started"))
    (tmp_path / "notes.txt").write_text("mine\n")
    before = digest(tmp_path)
    argv = ["--data", "stg_s", "--seeds", "42", "--alphas", "2", "--out", str(tmp_path / "grid"),
            *(f.replace("{tmp}", str(tmp_path)) for f in flags)]
    err = cli_error(lambda: grid.main(argv), capsys)
    assert err.startswith("error: " + message.replace("{tmp}", str(tmp_path))), err
    assert digest(tmp_path) == before and not (tmp_path / "grid").exists()


@pytest.mark.parametrize("field, message", [("alpha", 'alpha is "0.6", not the float train.py writes'),
                                            ("model", "model is 5, not the str train.py writes")])
def test_compare_names_a_train_config_field_of_the_wrong_type(field, message, tmp_path, capsys):
    """'"alpha": "0.6"' ended in a ValueError of the row label's format, '"model": 5' in a TypeError of Path."""
    config = {"model": "m", "alpha": 0.5, **{field: {"alpha": "0.6", "model": 5}[field]}}
    run = Path(a_run(tmp_path / "run", config, {"d": {"test": {"accuracy": 0.5, "majority": 0.5, "n": 2}}}))
    err = cli_error(lambda: evaluation.main(["--compare", str(run), "--out", str(tmp_path / "t.md")]), capsys)
    assert err == (f"error: {run / 'train_config.json'} is damaged: {message}; train.py writes it when a run starts: "
                   f"restore it from a copy, or leave {run} out of --compare")
    assert not (tmp_path / "t.md").exists()


@pytest.mark.parametrize("text, message", [
    ('{\n<<<<<<< HEAD\n"model": "m"\n}\n', "not valid JSON (Expecting property name enclosed in double quotes at "
                                            "line 2, column 1)"),
    ('{"model": "m", "seed": 42}', "'seed' is no setting of alpha_study.py's"),
    ('{"model": "m", "seeds": 42}', "seeds is 42, not the str alpha_study.py writes"),
])
def test_a_damaged_study_config_is_named(text, message, tmp_path, capsys):
    """A merge conflict in a committed study_config.json was a JSONDecodeError in tables.py (and copies.py,
    attributes.py, verdict.py), a key of another name a TypeError of StudyConfig, seeds as a number an
    AttributeError."""
    folder = tmp_path / "results" / "mawps-smollm2"
    folder.mkdir(parents=True)
    (folder / "study_config.json").write_text(text)
    before = digest(tmp_path)
    err = cli_error(lambda: experiment("tables").main(["--results", str(tmp_path / "results"), "--out",
                                                       str(tmp_path / "t.md")]), capsys)
    assert err == f"error: {folder / 'study_config.json'} is damaged: {message}; restore it from git"
    assert digest(tmp_path) == before


@pytest.mark.parametrize("flags, flag, value, saved", [
    (["--model", "/models/b"], "--model", "/models/b", '"/models/a"'),
    (["--model", "/models/a", "--val-frac", "0.3"], "--val-frac", "0.3", "0.2"),
    (["--model", "/models/a", "--", "--dtype", "float32"], "the train.py flags after --", "--dtype float32", "[]"),
])
def test_a_study_continued_in_another_studys_folder_is_refused(flags, flag, value, saved, tmp_path, capsys,
                                                               monkeypatch):
    """study_config.json was rewritten with the new flags, and the finished runs of the study there (of another
    model, validation share or train.py flags) were skipped as if they were the new study's."""
    study = experiment("alpha_study")
    folder, authors = fake_study(tmp_path)
    config = folder / "study_config.json"
    monkeypatch.setattr(study, "run_job", lambda *args, **kw: {"status": "skipped"})
    before = digest(tmp_path)
    argv = ["--authors-data", str(authors), "--data", "mawps", "--settings", "vanilla", "--seeds", "42", "--out",
            str(folder)]
    err = cli_error(lambda: study.main([*argv, *flags]), capsys)
    assert err == (f"error: {flag} {value}: {config} has {saved}, and the study's finished runs would count as this "
                   f"study's; give this study another --out, or the study's own {flag}")
    assert digest(tmp_path) == before
    study.main([*argv, "--model", "/models/a"])                # the study's own flags continue it
    assert json.loads(config.read_text())["model"] == "/models/a"
