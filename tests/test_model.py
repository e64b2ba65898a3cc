"""model.py against Hugging Face transformers on tiny random models, plus generation, loading and saving."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf import Tokenizer, load_model, save_model
from model import KVCache, LoRAConfig, ModelArgs, Transformer, apply_lora, generate, linear_weights_in

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation (test-only)")

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
CONFIGS = {
    "llama_gqa": (transformers.LlamaConfig, dict(SMALL, rms_norm_eps=1e-5)),
    "qwen2_bias_tied": (transformers.Qwen2Config, dict(SMALL, tie_word_embeddings=True, rope_theta=1e6)),
    "llama31_rope_scaling": (transformers.LlamaConfig, dict(SMALL, rope_theta=500000.0, num_key_value_heads=1,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, dict(SMALL, sliding_window=None)),
}


def write_tokenizer(folder: Path, backend, **config) -> Path:
    """A tokenizer folder: tokenizer.json of a conftest tokenizer and a tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>", **config}))
    return folder


def hf_model(name: str, seed: int = 0, **overrides):
    """A tiny random transformers model; every weight, bias and norm randomised so none is trivially 0 or 1."""
    config_cls, kw = CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**{**kw, **overrides}),
                                                          attn_implementation="eager")
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in param_name else 0.0))
    return model.eval()


def hf_folder(tmp_path, name, byte_bpe, **save_kw):
    """Save a tiny random HF model with a tokenizer; return (hf model, folder)."""
    hf = hf_model(name)
    folder = tmp_path / name
    hf.save_pretrained(folder, **save_kw)
    write_tokenizer(folder, byte_bpe)
    return hf, folder


def batch():
    """Two rows, the second right-padded: ids (2, 12), mask (2, 12)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_attention_match_transformers(tmp_path, byte_bpe, name):
    hf, folder = hf_folder(tmp_path, name, byte_bpe)
    ours, _ = load_model(str(folder))
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_attentions=True)
        out = ours(ids, mask, return_attn=True)
        fused = ours(ids, mask)
    real = mask.bool()  # padding rows are never read; HF places their positions differently
    torch.testing.assert_close(out.logits[real], ref.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(fused.logits[real], ref.logits[real], atol=1e-4, rtol=0)
    assert len(out.attentions) == len(ref.attentions) == 2
    for layer, (p, q) in enumerate(zip(out.attentions, ref.attentions)):
        assert p.shape == q.shape == (2, 4, 12, 12), layer
        torch.testing.assert_close(p.transpose(1, 2)[real], q.transpose(1, 2)[real], atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads(tmp_path, byte_bpe):
    hf, folder = hf_folder(tmp_path, "llama_gqa", byte_bpe, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists() and len(list(folder.glob("*.safetensors"))) > 2
    ours, _ = load_model(str(folder))
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_pytorch_bin_converted_to_safetensors(tmp_path, byte_bpe):
    hf, folder = hf_folder(tmp_path, "llama_gqa", byte_bpe)
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    ours, _ = load_model(str(folder))
    assert (folder / "model.safetensors").exists()
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_rope_parameters_and_classic_keys_agree():
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    base = dict(SMALL, architectures=["LlamaForCausalLM"])
    classic = ModelArgs.from_hf_config({**base, "rope_theta": 5e5, "rope_scaling": rope})
    newer = ModelArgs.from_hf_config({**base, "rope_parameters": {**rope, "rope_theta": 5e5}})
    assert classic == newer and classic.rope_theta == 5e5 and classic.rope_scaling["factor"] == 8.0
    assert classic.head_dim == 16  # hidden_size // num_attention_heads when head_dim is absent
    assert ModelArgs.from_hf_config(classic.to_hf_config()) == classic


def greedy_by_recomputing(model, prompt, steps, eos_ids):
    """Reference: run the whole sequence again for every new token."""
    ids, new = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            token = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        if token in eos_ids:
            break
        ids.append(token)
        new.append(token)
    return new


def test_kv_cache_generation_matches_recomputation_and_left_padding():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf_config(dict(SMALL, architectures=["LlamaForCausalLM"]))).eval()
    prompts = [[5, 17, 99, 3, 42, 8, 7], [11, 12], [200, 201, 202, 9]]
    eos = [generate(model, prompts, 10, eos_ids=[-1], pad_id=0)[1][3]]  # the 4th token of row 1 is made its EOS
    batched = generate(model, prompts, 10, eos, pad_id=0)
    assert len(batched[1]) == 3 and max(map(len, batched)) > 3  # rows stop on their own
    for prompt, got in zip(prompts, batched):
        assert got == greedy_by_recomputing(model, prompt, 10, eos), prompt
        assert got == generate(model, [prompt], 10, eos, pad_id=0)[0], prompt


def test_rows_that_finish_leave_the_batch_without_changing_any_answer():
    """Eight prompts of different lengths whose rows stop at different steps: the finished rows leave the batch
    (a quarter at a time) and the cache with them, and every row still gets the tokens it gets alone."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf_config(dict(SMALL, architectures=["LlamaForCausalLM"]))).eval()
    prompts = [list(range(7 + i, 7 + i + n)) for i, n in enumerate([3, 9, 1, 5, 12, 2, 7, 4])]
    free = generate(model, prompts, 12, eos_ids=[-1], pad_id=0)
    eos = sorted({free[0][2], free[3][5], free[6][8]})       # three tokens that some rows write early, some late
    batched = generate(model, prompts, 12, eos, pad_id=0)
    lengths = [len(row) for row in batched]
    assert len(set(lengths)) >= 3 and max(lengths) == 12, lengths    # rows leave at several steps, some run on
    for prompt, row, got in zip(prompts, free, batched):
        expected = row[:next((i for i, t in enumerate(row) if t in eos), len(row))]
        assert got == expected == generate(model, [prompt], 12, eos, pad_id=0)[0], prompt


def test_linear_weights_cast_once_give_autocasts_numbers_and_come_back():
    """Decoding under bf16 autocast holds the linear weights in bf16 for the block: the logits are autocast's to the
    bit, and afterwards every weight is its float32 self again, the tied lm_head tied again."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf_config(dict(SMALL, architectures=["Qwen2ForCausalLM"],
                                                      tie_word_embeddings=True))).eval()
    before = {name: p for name, p in model.named_parameters()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids).logits
        with linear_weights_in(model, torch.bfloat16):
            assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
            assert model.model.embed_tokens.weight.dtype == torch.float32     # embeddings and norms are not cast
            got = model(ids).logits
    assert torch.equal(got, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(model, [[5, 17, 99, 3], [11, 12]], 4, [-1], 0)                    # decodes inside such a block
    assert {name: p for name, p in model.named_parameters()} == before
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_decoding_holds_bf16_weights_and_puts_them_back_after_an_error():
    torch.manual_seed(0)
    model = apply_lora(Transformer(ModelArgs.from_hf_config(dict(SMALL, architectures=["LlamaForCausalLM"]))),
                       LoRAConfig(r=4, target_modules=("q_proj", "v_proj"))).eval()
    before = {name: p for name, p in model.named_parameters()}
    seen = []
    lora = model.model.layers[0].self_attn.q_proj
    hook = lora.lora_A.register_forward_hook(lambda module, *_: seen.append(module.weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generate(model, [[5, 17, 99, 3]], 3, [-1], 0)
    hook.remove()
    assert seen == [torch.bfloat16] * 3 and lora.base_layer.weight.dtype == torch.float32   # cast for the call only
    with pytest.raises(RuntimeError, match="stopped"), linear_weights_in(model, torch.bfloat16):
        assert lora.base_layer.weight.dtype == torch.bfloat16
        raise RuntimeError("stopped")
    assert {name: p for name, p in model.named_parameters()} == before
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_a_cache_too_small_says_so():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf_config(dict(SMALL, architectures=["LlamaForCausalLM"]))).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="do not fit in its size 4"):
        model(torch.randint(0, 256, (1, 5)), cache=KVCache(4))


def test_cache_step_equals_full_forward():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf_config(dict(SMALL, architectures=["Qwen2ForCausalLM"]))).eval()
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])  # first row left-padded
    with torch.no_grad():
        full = model(ids, mask).logits
        cache = KVCache(9)
        model(ids[:, :6], mask[:, :6], cache=cache)
        step = model(ids[:, 6:], mask, cache=cache).logits
    torch.testing.assert_close(step, full[:, 6:], atol=1e-5, rtol=0)


def test_save_load_round_trip_is_exact_and_transformers_reads_it(tmp_path, byte_bpe):
    _, folder = hf_folder(tmp_path, "qwen2_bias_tied", byte_bpe)
    ours, tokenizer = load_model(str(folder))
    save_model(ours, tokenizer, tmp_path / "saved")
    (tmp_path / "saved/metrics.jsonl").write_text("{}\n")
    save_model(ours, tokenizer, tmp_path / "saved")  # into an existing folder: its files replaced, others kept
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == [
        "config.json", "generation_config.json", "metrics.jsonl", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]  # and no temporary folder left behind
    again, tokenizer2 = load_model(str(tmp_path / "saved"))
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert (tokenizer2.bos_id, tokenizer2.eos_ids, tokenizer2.pad_id) == (tokenizer.bos_id, tokenizer.eos_ids,
                                                                         tokenizer.pad_id)
    ids, _ = batch()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
    # the tokenizer files alone: beside a config.json, transformers may rebuild the tokenizer class of the
    # model_type (Qwen2's pre-tokenizer), which this toy tokenizer was not trained with
    (tmp_path / "tokenizer").mkdir()
    tokenizer.save(tmp_path / "tokenizer")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    text = "Smoking: 8, Weight: 4 Answer: High Risk"
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eos_ids[0]


def test_wrong_shape_missing_tensor_alias_and_architecture_errors(tmp_path, byte_bpe):
    _, folder = hf_folder(tmp_path, "llama_gqa", byte_bpe)
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.weight"
    save_file({**tensors, name: torch.zeros(16, 64)}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name} has shape \(16, 64\).*expects \(32, 64\)"):
        load_model(str(folder))
    save_file({k: v for k, v in tensors.items() if k != name}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"missing tensor {name}, expected shape \(32, 64\)"):
        load_model(str(folder))
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_model("no-such-alias")
    with pytest.raises(ValueError, match="'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"):
        ModelArgs.from_hf_config(dict(SMALL, architectures=["GPT2LMHeadModel"]))


def test_unreachable_hub_suggests_a_local_folder(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match="could not download someone/some-model.*pass a local folder"):
        load_model("someone/some-model")


def test_tokenizer_special_ids(tmp_path, byte_bpe, sentencepiece_bpe):
    plain = Tokenizer.from_dir(write_tokenizer(tmp_path / "a", byte_bpe, pad_token=None))
    eos = byte_bpe.token_to_id("</s>")
    assert (plain.bos_id, plain.eos_ids, plain.pad_id) == (None, [eos], eos)  # pad falls back to eos
    assert plain.decode(plain.encode("Smoking: 8")) == "Smoking: 8"
    bos = Tokenizer.from_dir(write_tokenizer(tmp_path / "b", sentencepiece_bpe, add_bos_token=True, pad_token="<unk>"))
    assert (bos.bos_id, bos.pad_id) == (sentencepiece_bpe.token_to_id("<s>"), 0)
    # a post-processor that adds BOS (Llama-3 style) and several eos ids in generation_config.json
    from tokenizers import Tokenizer as Backend, processors
    backend = Backend.from_str(byte_bpe.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = write_tokenizer(tmp_path / "c", backend)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    (folder / "config.json").write_text(json.dumps({"pad_token_id": 0}))
    llama3 = Tokenizer.from_dir(folder)
    assert (llama3.bos_id, llama3.eos_ids, llama3.pad_id) == (1, [2, 0], 0)
    assert llama3.encode("Answer: ")[0] != 1  # encode adds no special token


def test_smollm2_logits_match_transformers(smollm2_dir):
    ours, tokenizer = load_model(str(smollm2_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("Smoking: 8, Weight: 4, Exercise: 2 Answer: High Risk")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_cli_continues_prompt_on_smollm2(smollm2_dir):
    result = subprocess.run([sys.executable, str(ROOT / "model.py"), "--model", str(smollm2_dir), "--prompt",
                             "The capital of France is", "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout, result.stdout
