"""Models in Hugging Face layout: an alias, a folder or a hub id -> files -> model.Transformer and its Tokenizer, and
back (config.json, *.safetensors, tokenizer.json; a LoRA adapter in PEFT's layout). Weights load only through
safetensors (or torch.load(weights_only=True) for an old pytorch_model.bin, converted once); no remote code."""
import json
import os
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import load_file, save_file

from cli import InputError, atomic_files, atomic_path, read_text
from model import LoRAConfig, LoRALinear, ModelArgs, Transformer, apply_lora, merge_lora

ALIASES = {"tinyllama": "TinyLlama/TinyLlama_v1.1", "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B",
           "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
           "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json", "adapter_config.json"]
BIN_WEIGHTS = "pytorch_model*.bin"   # the older weights format: fetched only without safetensors, converted once


def _read_json(path: Path) -> dict:
    """A JSON object file of a model folder as a dict; {} when it does not exist. One that is not UTF-8 (cli.read_text),
    not JSON or not an object raises InputError naming it."""
    if not path.exists():
        return {}
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); restore the file from the model's "
                         "source") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: holds a JSON {type(value).__name__}, not the object of named settings a model "
                         "folder's file holds; restore the file from the model's source")
    return value


def _number(value) -> bool:
    """Whether a JSON value is a number (true and false are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _token(value) -> str | None:
    """A special token of tokenizer_config.json: a string, a dict with "content", or null."""
    return value.get("content") if isinstance(value, dict) else value


def _token_ids(config: dict, key: str, path: Path) -> list[int]:
    """A token id field of a model folder's JSON file (eos_token_id, pad_token_id: an id, a list of ids, or null) as
    a list; a value of another kind raises InputError naming the file and the field."""
    value = config.get(key)
    ids = value if isinstance(value, list) else [value]
    if not all(i is None or isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InputError(f"{path}: {key} is {json.dumps(value)}, where a token id (a whole number, 0 or more) or a "
                         "list of them belongs; restore the file from the model's source")
    return [i for i in ids if i is not None]


class Tokenizer:
    """Thin wrapper over tokenizers.Tokenizer with the model's special ids."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_id, eos_ids: list[int], pad_id: int, config=None):
        self.backend, self.bos_id, self.eos_ids, self.pad_id = backend, bos_id, eos_ids, pad_id
        self.config = config or {}  # tokenizer_config.json, written back by save()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: the model folder needs this tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as error:   # the tokenizers library raises a bare Exception for a file it cannot read
            raise InputError(f"{path / 'tokenizer.json'}: not a tokenizer file the tokenizers library reads ({error}); "
                             "it is damaged or incomplete: restore it from the model's source") from None
        config, gen, model_cfg = (_read_json(path / n) for n in
                                  ("tokenizer_config.json", "generation_config.json", "config.json"))

        def token_id(name):
            token = _token(config.get(name))
            if token is not None and not isinstance(token, str):
                raise InputError(f"{path / 'tokenizer_config.json'}: {name} is {json.dumps(token)}, where a token's "
                                 "text belongs; restore the file from the model's source")
            return backend.token_to_id(token) if token is not None else None

        # BOS when the model's tokenizer adds it: said in tokenizer_config, else done by the post-processor
        bos_id = token_id("bos_token") if config.get("add_bos_token") else None
        if "add_bos_token" not in config:
            plain, special = backend.encode("a", add_special_tokens=False).ids, backend.encode("a").ids
            bos_id = special[0] if len(special) > len(plain) and special[0] != plain[0] else None
        eos_ids = [token_id("eos_token")]  # the tokenizer's own first: it ends training texts
        for source, name in ((gen, "generation_config.json"), (model_cfg, "config.json")):
            eos_ids += _token_ids(source, "eos_token_id", path / name)
        eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        if not eos_ids:
            raise InputError(f"{path}: no EOS token in tokenizer_config.json (eos_token), generation_config.json or "
                             "config.json (eos_token_id), so no answer would end; restore them from the model's source")
        pads = [token_id("pad_token"), *_token_ids(gen, "pad_token_id", path / "generation_config.json"),
                *_token_ids(model_cfg, "pad_token_id", path / "config.json")]
        pad_id = next((i for i in pads if i is not None), eos_ids[0])
        return cls(backend, bos_id, eos_ids, pad_id, config)

    def save(self, out_dir) -> None:
        """tokenizer.json, tokenizer_config.json and generation_config.json, written together (cli.atomic_files)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.backend.id_to_token(self.eos_ids[0]),
                  "pad_token": self.backend.id_to_token(self.pad_id), **self.config,
                  "add_bos_token": self.bos_id is not None}   # read back by from_dir: the same prompt prefix
        if self.bos_id is not None:
            config.setdefault("bos_token", self.backend.id_to_token(self.bos_id))
        generation = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_ids, "pad_token_id": self.pad_id}
        with atomic_files(out_dir) as path:
            self.backend.save(str(path("tokenizer.json")))
            path("tokenizer_config.json").write_text(json.dumps(config, indent=2))
            path("generation_config.json").write_text(json.dumps(generation, indent=2))


def _check_tensors(expected: dict, found: dict, source, optional=()) -> None:
    """Raise naming the first missing, unexpected or mis-shaped tensor. expected: name -> shape."""
    for name in found:
        if name not in expected:
            raise InputError(f"{source}: unexpected tensor {name} {tuple(found[name].shape)}")
        if tuple(found[name].shape) != tuple(expected[name]):
            raise InputError(f"{source}: tensor {name} has shape {tuple(found[name].shape)}, "
                             f"the config expects {tuple(expected[name])}")
    for name in expected:
        if name not in found and name not in optional:
            raise InputError(f"{source}: missing tensor {name}, expected shape {tuple(expected[name])}")


def resolve(name_or_path: str) -> Path:
    """An alias, a local folder or a hub id -> a local folder."""
    name = ALIASES.get(name_or_path, name_or_path)
    if Path(name).is_dir():
        return Path(name)
    local = Path(name).parts[0] if Path(name).parts else ""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (local != name and Path(local).is_dir()):
        raise InputError(f"{name_or_path}: no such folder (a path, so it is not looked up on the hub)")
    if "/" not in name:
        raise InputError(f"{name_or_path!r} is neither a model folder nor a hub id (owner/name) "
                         f"nor an alias: {sorted(ALIASES)}")
    from huggingface_hub import snapshot_download
    try:
        folder = Path(snapshot_download(name, allow_patterns=HUB_FILES, token=os.environ.get("HF_TOKEN")))
        if not list(folder.glob("*.safetensors")) and not (folder / "adapter_config.json").exists():
            folder = Path(snapshot_download(name, allow_patterns=HUB_FILES + [BIN_WEIGHTS],
                                            token=os.environ.get("HF_TOKEN")))
    except Exception as error:
        raise RuntimeError(f"could not download {name} from the Hugging Face hub ({type(error).__name__}: {error}). "
                           "Gated models need HF_TOKEN; without a network, pass a local folder in HF layout "
                           "(config.json, *.safetensors, tokenizer.json)") from error
    return folder


def _read_weights(folder: Path, device) -> dict:
    """All tensors of a checkpoint: model.safetensors, shards listed in model.safetensors.index.json, or
    pytorch_model*.bin converted once to model.safetensors beside them."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) for f in weight_map.values())):
            raise InputError(f"{index}: no weight_map of tensor names to the files that hold them; restore the file "
                             "from the model's source")
        files = sorted({folder / f for f in weight_map.values()})
    elif bins := sorted(folder.glob(BIN_WEIGHTS)):
        tensors = {}
        for path in bins:
            try:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as error:   # torch raises several error types for a cut or foreign file
                raise InputError(f"{path}: not a readable PyTorch weights file ({type(error).__name__}: "
                                 f"{str(error)[:120]}); it is damaged or incomplete: download it again") from None
        with atomic_path(folder / "model.safetensors") as tmp:   # an interruption leaves no half file
            save_file({k: t.contiguous().clone() for k, t in tensors.items()}, str(tmp), metadata={"format": "pt"})
        files = [folder / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    tensors = {}
    for path in files:
        tensors.update(_load_safetensors(path, device))
    return tensors


def _load_safetensors(path: Path, device) -> dict:
    """The tensors of one safetensors file; a missing, damaged or empty one raises InputError naming it."""
    try:
        return load_file(str(path), device=str(device))
    except Exception as error:   # safetensors raises its own error type for a damaged or empty file
        raise InputError(f"{path}: not a readable safetensors file ({error}); it is damaged or incomplete: "
                         "download or save it again") from None


def source_files(name_or_path: str) -> list[Path]:
    """The files load_model makes a model from: weights, configuration and tokenizer files, and for a LoRA adapter
    its base model's too."""
    folder = resolve(name_or_path)
    files = sorted({path for pattern in HUB_FILES + [BIN_WEIGHTS] for path in folder.glob(pattern)})
    if (folder / "adapter_config.json").exists():
        files += source_files(_adapter_base(folder))
    return files


def _adapter_base(folder: Path) -> str:
    """The base model an adapter folder's adapter_config.json names; InputError naming the file when it names none."""
    base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if not (isinstance(base, str) and base.strip()):
        raise InputError(f"{folder / 'adapter_config.json'}: no base_model_name_or_path, the model the adapter was "
                         "trained on; write its folder, alias or hub id there")
    if Path(base).is_dir() and Path(base).resolve() == folder.resolve():   # it would be loaded over itself forever
        raise InputError(f"{folder / 'adapter_config.json'}: base_model_name_or_path names this folder itself; write "
                         "the folder, alias or hub id of the model the adapter was trained on")
    if (folder / base / "config.json").exists():   # a base saved inside the adapter's folder (a scratch LoRA run's)
        return str(folder / base)
    return base


def load_tokenizer(name_or_path: str) -> Tokenizer:
    """The tokenizer of an alias, a local folder or a hub id, without its weights."""
    return Tokenizer.from_dir(resolve(name_or_path))


def load_model(name_or_path: str, dtype=torch.float32, device="cpu") -> tuple[Transformer, Tokenizer]:
    """An alias, a local folder or a hub id; a folder with adapter_config.json is its base model plus the adapter,
    merged."""
    folder = resolve(name_or_path)
    if (folder / "adapter_config.json").exists():
        model, tokenizer = load_model(_adapter_base(folder), dtype, device)
        if (folder / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_dir(folder)
        return merge_lora(load_adapter(model, folder)), tokenizer
    if not (folder / "config.json").exists():
        raise InputError(f"{folder / 'config.json'} not found: a model folder in Hugging Face layout holds "
                         "config.json, *.safetensors and tokenizer.json")
    config = _read_json(folder / "config.json")            # names its own path when it is damaged
    try:
        args = ModelArgs.from_hf_config(config)
    except InputError as error:                             # its messages begin "config.json: ..."
        raise InputError(f"{folder}/{error}") from None
    with torch.device("meta"):  # no memory until the checkpoint's tensors are assigned
        model = Transformer(args)
    tensors = {k: v.to(dtype) for k, v in _read_weights(folder, device).items()
               if not k.endswith("rotary_emb.inv_freq")}  # older checkpoints stored RoPE's frequencies, recomputed here
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_tensors(expected, tensors, folder, optional={"lm_head.weight"} if args.tie_word_embeddings else ())
    if args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    # strict=False only for the tied lm_head.weight left out above: _check_tensors has already refused any missing,
    # unexpected or mis-shaped tensor, by name
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    return model, Tokenizer.from_dir(folder)


def save_model(model: Transformer, tokenizer: Tokenizer, out_dir) -> None:
    """config.json, model.safetensors and tokenizer files, in the layout transformers reads."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("save_model: the model holds LoRA layers; save_adapter them, or merge_lora first")
    tied = model.args.tie_word_embeddings
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
               if not (tied and k == "lm_head.weight")}
    config = {**model.args.to_hf_config(), "torch_dtype": str(model.lm_head.weight.dtype).removeprefix("torch."),
              "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_ids, "pad_token_id": tokenizer.pad_id}

    with atomic_files(out_dir) as path:   # all files renamed into place at the end; a run's metrics stay
        path("config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(path("model.safetensors")), metadata={"format": "pt"})
    tokenizer.save(out_dir)


def _lora_state(model: Transformer) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: Transformer, cfg: LoRAConfig, out_dir, base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors in PEFT's layout and key names."""
    tensors = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in _lora_state(model).items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules), "bias": "none",
              "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True}

    with atomic_files(out_dir) as path:
        path("adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(path("adapter_model.safetensors")), metadata={"format": "pt"})


def load_adapter(model: Transformer, adapter_dir) -> Transformer:
    """Wrap model with the LoRA layers of a PEFT-layout folder and load their weights (not merged)."""
    adapter_dir = Path(adapter_dir)
    config = _read_json(adapter_dir / "adapter_config.json")
    targets = config.get("target_modules")
    if not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)) or config.get("use_rslora"):
        raise InputError(f"{adapter_dir}/adapter_config.json: only a list of target_modules and plain LoRA "
                         "scaling (no use_rslora) are supported; merge the adapter into its base model and give that "
                         "folder instead")
    r, lora_alpha = config.get("r"), config.get("lora_alpha")
    if not (_number(r) and _number(lora_alpha) and r > 0 and lora_alpha > 0 and isinstance(r, int)):
        raise InputError(f"{adapter_dir}/adapter_config.json: r {json.dumps(r)} and lora_alpha "
                         f"{json.dumps(lora_alpha)}: each must be a positive number, r a whole one (the rank); "
                         "restore the file from where the adapter was saved")
    layers = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    if not layers & set(targets):   # an adapter of another architecture (GPT-2's c_attn)
        raise InputError(f"{adapter_dir}/adapter_config.json: target_modules {json.dumps(targets)} names no linear "
                         f"layer of the base model ({', '.join(sorted(layers))}), so the adapter is of another kind "
                         "of model; give it over the base model it was trained on")
    # lora_dropout is left out: it acts in training only, and an adapter is loaded to be merged and evaluated
    cfg = LoRAConfig(r=r, alpha=lora_alpha, dropout=0.0, target_modules=tuple(targets))
    apply_lora(model, cfg)
    device = model.lm_head.weight.device
    tensors = {k.removeprefix("base_model.model."): v.to(model.lm_head.weight.dtype) for k, v in
               _load_safetensors(adapter_dir / "adapter_model.safetensors", device).items()}
    expected = {k: v.shape for k, v in _lora_state(model).items()}
    _check_tensors(expected, tensors, adapter_dir / "adapter_model.safetensors")
    model.load_state_dict(tensors, strict=False)   # the base weights are loaded; _check_tensors checked the adapter's
    return model
