"""The fast CAT path (the causal mass of the supervised rows only) against the explicit probabilities."""
import pytest
import torch

import cat
from model import ModelArgs, Transformer

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, rope_theta=10000.0)
ARCHS = ["LlamaForCausalLM", "Qwen2ForCausalLM"]
T = 12


def tiny_model(arch: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_hf_config(dict(SMALL, architectures=[arch]))).eval()
    with torch.no_grad():  # larger weights than the init, so attention is far from uniform
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
                p.normal_(0, 0.3)
    return model


def batch(padding_side: str):
    """ids (2, T); attention mask (2, T), the second row padded by 3; the CAT mask M (2, T, T) built by hand from
    3 row patterns, and the fast path's view of it: its non-empty rows (cat.causal_rows)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, T))
    mask = torch.ones(2, T, dtype=torch.long)
    if padding_side == "left":
        mask[1, :3] = 0
    else:
        mask[1, -3:] = 0
    cols = torch.zeros(2, T, 3)
    cols[:, [1, 2], 1] = 1           # pattern 1: tokens 1 and 2 are causes
    cols[:, [1, 2, 5, 6], 2] = 1     # pattern 2: tokens 1, 2, 5, 6; pattern 0: no cause
    group = torch.zeros(2, T, dtype=torch.long)
    group[:, 4:8] = 1
    group[:, 8:] = 2
    group[1, 3:5] = 2
    dense = torch.stack([cols[b][:, group[b]].T for b in range(2)])   # (2, T, T): M[b, i, j] = cols[b, j, group[b, i]]
    rows, row_mask, _, _ = cat.causal_rows(dense.bool())
    return ids, mask, rows, row_mask, dense


def mass_from_probs(attentions, dense, rows):
    """Reference, from the equation: mean over layers and heads of sum_j P_ij M_ij, at the causal rows (B, R)."""
    return torch.stack([(p * dense[:, None]).sum(-1).mean(1) for p in attentions]).mean(0).gather(1, rows)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_mass_equals_mass_of_explicit_probabilities(arch, padding_side):
    model = tiny_model(arch)
    ids, mask, rows, row_mask, dense = batch(padding_side)
    with torch.no_grad():
        explicit = model(ids, mask, return_attn=True)
        fast = model(ids, mask, causal_rows=rows, causal_row_mask=row_mask)
    reference = mass_from_probs(explicit.attentions, dense, rows)
    # each layer returns its causal rows' mass per head (B, H, R); Eq. 7 (cat.average_attention) averages them
    assert len(fast.attentions) == 3 and all(m.shape == (2, 4, rows.shape[1]) for m in fast.attentions)
    assert reference[0, :T - 4].min() > 0.01  # the test means something: rows 4.. hold mass on their causes
    torch.testing.assert_close(cat.average_attention(fast.attentions), reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="return_attn"):   # one of the two paths a call
        model(ids, mask, return_attn=True, causal_rows=rows, causal_row_mask=row_mask)
    torch.testing.assert_close(fast.logits, explicit.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_through_causal_mass_match_explicit_path(arch):
    model = tiny_model(arch)
    ids, mask, rows, row_mask, dense = batch("right")
    weight = torch.linspace(0.5, 2.0, rows.shape[1]) * mask.gather(1, rows)   # a function of the mass, on real rows

    def grads(mass):
        model.zero_grad()
        ((mass - 0.3) ** 2 * weight).sum().backward()
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}

    reference = grads(mass_from_probs(model(ids, mask, return_attn=True).attentions, dense, rows))
    fast = grads(cat.average_attention(model(ids, mask, causal_rows=rows, causal_row_mask=row_mask).attentions))
    assert sum(g is not None for g in reference.values()) > 10
    for name, g in reference.items():
        if g is None:   # parameters after the last attention (final MLP, norm, lm_head) do not move the mass
            assert fast[name] is None or fast[name].abs().max() == 0, name
        else:
            torch.testing.assert_close(fast[name], g, atol=1e-4, rtol=1e-4, msg=name)


def test_bfloat16_autocast_keeps_float32_probabilities():
    model = tiny_model("LlamaForCausalLM")
    ids, mask, rows, row_mask, dense = batch("right")
    with torch.no_grad():
        exact = mass_from_probs(model(ids, mask, return_attn=True).attentions, dense, rows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explicit = model(ids, mask, return_attn=True)
            fast = model(ids, mask, causal_rows=rows, causal_row_mask=row_mask)
    assert all(p.dtype == torch.float32 for p in explicit.attentions)
    torch.testing.assert_close(explicit.attentions[0].sum(-1), torch.ones(2, 4, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(mass_from_probs(explicit.attentions, dense, rows), exact, atol=3e-2, rtol=0)
    torch.testing.assert_close(cat.average_attention(fast.attentions), exact, atol=3e-2, rtol=0)
