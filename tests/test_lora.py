"""Hand-written LoRA: x -> W0 x + (alpha/r)·B·A·x, merging, and PEFT-compatible adapters."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from hf import load_adapter, load_model, save_adapter
from model import LoRAConfig, LoRALinear, ModelArgs, Transformer, apply_lora, merge_lora

CONFIG = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=32, intermediate_size=48,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CFG = LoRAConfig(r=4, alpha=8, dropout=0.1)


def tiny_model(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs.from_hf_config(CONFIG)).eval()


def randomise_b(model, seed=1):
    """Give every B a non-zero value, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_(0, 0.1)
    return model


def ids():
    torch.manual_seed(2)
    return torch.randint(0, 128, (2, 10))


def test_zero_b_gives_base_output_and_only_lora_trains():
    base = tiny_model()
    lora = apply_lora(copy.deepcopy(base), CFG).eval()
    wrapped = [n for n, m in lora.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 2 * 6 and "model.layers.0.self_attn.o_proj" not in wrapped
    assert {n for n, p in lora.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}.weight" for n in wrapped for ab in "AB"}
    with torch.no_grad():
        torch.testing.assert_close(lora(ids()).logits, base(ids()).logits, atol=0, rtol=0)


def test_lora_linear_equals_formula_and_merge_is_idempotent():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(8, 6), LoRAConfig(r=2, alpha=4, dropout=0.0))
    layer.lora_B.weight.data.normal_()
    w0, x = layer.base_layer.weight.detach().clone(), torch.randn(3, 8)
    delta = 4 / 2 * layer.lora_B.weight @ layer.lora_A.weight                    # (alpha/r)·B·A
    expected = x @ (w0 + delta).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
    layer.merge()
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0 + delta, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_merged_equals_unmerged():
    lora = randomise_b(apply_lora(tiny_model(), CFG)).eval()
    with torch.no_grad():
        unmerged = lora(ids()).logits
        merged = merge_lora(copy.deepcopy(lora))
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids()).logits, unmerged, atol=1e-5, rtol=0)


def test_float32_lora_on_bfloat16_base():
    base = tiny_model().to(torch.bfloat16)
    lora = randomise_b(apply_lora(copy.deepcopy(base), CFG)).eval()
    for p in lora.parameters():
        if p.requires_grad:
            p.data = p.data.float()   # as training keeps them: float32 LoRA weights beside bfloat16 base weights
    with torch.no_grad():
        unmerged = lora(ids()).logits
        assert unmerged.dtype == torch.bfloat16
        assert (unmerged - base(ids()).logits).abs().max() > 0.01   # the adapter does change the output
        merged = merge_lora(lora)(ids()).logits
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=0.05, rtol=0.05)


def test_base_weights_unchanged_after_optimizer_step():
    lora = apply_lora(tiny_model(), CFG).train()
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    lora(ids()).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    after = lora.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed), changed
    assert any(".lora_B." in k for k in changed)  # B moved away from zero


def test_saved_adapter_loads_back_equal(tmp_path):
    lora = randomise_b(apply_lora(tiny_model(), CFG)).eval()
    save_adapter(lora, CFG, tmp_path / "adapter", base_model="some/base")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == \
        ("LORA", 4, 8, "some/base")
    keys = load_file(str(tmp_path / "adapter/adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 6
    again = load_adapter(tiny_model(), tmp_path / "adapter").eval()
    for k, v in lora.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    with torch.no_grad():
        torch.testing.assert_close(again(ids()).logits, lora(ids()).logits, atol=0, rtol=0)


def test_adapter_with_wrong_rank_is_refused(tmp_path):
    lora = randomise_b(apply_lora(tiny_model(), CFG))
    save_adapter(lora, CFG, tmp_path / "adapter", base_model="some/base")
    config_path = tmp_path / "adapter/adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "r": 8}))
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, (32|48)\), the config expects \(8, \1\)"):
        load_adapter(tiny_model(), tmp_path / "adapter")


# PEFT calls transformers' deprecated is_gradient_checkpointing (their interplay, not this project's code)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapter_matches_peft(tmp_path, byte_bpe):
    transformers = pytest.importorskip("transformers", reason="transformers is the base model of the oracle")
    peft = pytest.importorskip("peft", reason="PEFT is the reference LoRA implementation (test-only)")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{k: v for k, v in CONFIG.items()
                                                                   if k != "architectures"})).eval()
    hf.save_pretrained(tmp_path / "base")
    byte_bpe.save(str(tmp_path / "base/tokenizer.json"))
    (tmp_path / "base/tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    ours, _ = load_model(str(tmp_path / "base"))
    lora = randomise_b(apply_lora(ours, CFG)).eval()
    save_adapter(lora, CFG, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    reference = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    merged, _ = load_model(str(tmp_path / "adapter"))  # a folder with adapter_config.json: base + adapter, merged
    with torch.no_grad():
        expected = reference(input_ids=ids()).logits
        torch.testing.assert_close(lora(ids()).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(ids()).logits, expected, atol=1e-5, rtol=0)
