"""cat.py against references: a hand-worked loss, a double loop written from §4.2, gradcheck, and token
spans checked by decoding the tokens back to the phrase, on three kinds of tokenizer."""
import json
import math
import random
import time

import pytest
import torch
from tokenizers import Tokenizer

import batches
import cat
import variants

LOSSES = {"hinge": cat.hinge, "div": variants.div_loss}   # Eq. 10, and the authors' published loss


def map_ratio(attn, mask, pad_mask=None, contrast=None) -> cat.CausalRatio:
    """C, N (Eq. 8, 9) the explicit path's way: sums over each row's causal and other tokens of the average map."""
    causal, other = cat.causal_and_other(mask, pad_mask)
    return cat.causal_ratio(*cat.attention_sums(attn, causal, variants.narrow_other(other, contrast)))


def loss(cn, alpha, kind="hinge"):
    return LOSSES[kind](cn, alpha)

# -----------------------------------------------------------------------------
# §4.2: the loss


def test_hand_worked_loss():
    # Row i attends over j <= i; the mask is already shifted. With alpha = 1:
    #   row 0: no causal token                                  -> not counted
    #   row 1: j = 0, 1 both causal, no other token             -> not counted
    #   row 2: causal j = 1: C = 0.3;  other j = 0, 2: N = (0.2 + 0.5) / 2 = 0.35
    #          C/N = 6/7, max(0, 1 - 6/7) = 1/7   (mask[2, 3] lies after i = 2 and is ignored)
    #   row 3: causal j = 0, 2: C = (0.1 + 0.3) / 2 = 0.2;  other j = 1, 3: N = (0.2 + 0.4) / 2 = 0.3
    #          C/N = 2/3, max(0, 1 - 2/3) = 1/3
    #   L_attn = 1/7 + 1/3 = 10/21.  With alpha = 0.8: row 2 gives 0, row 3 gives 0.8 - 2/3 = 2/15.
    attn = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                         [0.5, 0.5, 0.0, 0.0],
                         [0.2, 0.3, 0.5, 0.0],
                         [0.1, 0.2, 0.3, 0.4]])[None]
    mask = torch.tensor([[0, 0, 0, 0],
                         [1, 1, 0, 0],
                         [0, 1, 0, 1],
                         [1, 0, 1, 0]], dtype=torch.bool)[None]
    cn = map_ratio(attn, mask)
    assert cn.counted.tolist() == [[False, False, True, True]]
    torch.testing.assert_close(cn.ratio[0, 2:], torch.tensor([6 / 7, 2 / 3]))
    torch.testing.assert_close(loss(cn, 1.0), torch.tensor(10 / 21))
    torch.testing.assert_close(loss(cn, 0.8), torch.tensor(2 / 15))
    # The same from the causal mass of each row: 0, 1.0, 0.3, 0.4.
    torch.testing.assert_close(loss(mass_path(attn, mask), 1.0), torch.tensor(10 / 21))


def explicit_loss(attn, mask, alpha, pad_mask=None):
    return loss(map_ratio(attn, mask, pad_mask), alpha)


def mass_path(attn, mask, pad_mask=None) -> cat.CausalRatio:
    """C, N the fast path's way: the causal rows and their counts from the mask, the mass of each such row."""
    rows = cat.causal_rows(mask, pad_mask)
    mass = (attn * (mask & torch.ones_like(mask).tril())).sum(-1).gather(1, rows.rows)   # (B, R)
    return cat.causal_ratio(*cat.mass_sums(mass, rows))


def loop_rows(attn, mask, pad_mask, contrast=None):
    """C_i and N_i written straight from CAT §4.2 Eq. 8, 9, one row at a time: (C, N) of every real row that sees
    causal and other real tokens j <= i (with a contrast mask: other tokens it marks)."""
    for b in range(len(attn)):
        for i in range(len(attn[0])):
            if not pad_mask[b][i]:
                continue
            js = [j for j in range(i + 1) if pad_mask[b][j]]
            causal = [attn[b][i][j] for j in js if mask[b][i][j]]
            other = [attn[b][i][j] for j in js if not mask[b][i][j] and (contrast is None or contrast[b][i][j])]
            if causal and other:
                yield sum(causal) / len(causal), sum(other) / len(other)


def loop_loss(attn, mask, alpha, pad_mask, contrast=None):
    """L_attn of Eq. 10, a plain sum over the rows of loop_rows; mean over the batch."""
    return sum(max(0.0, alpha - C / N) for C, N in loop_rows(attn, mask, pad_mask, contrast)) / len(attn)


def random_batch(B=3, T=7, seed=0, dtype=torch.float64):
    """Random positive maps, random masks and a pad mask with right, left and no padding."""
    g = torch.Generator().manual_seed(seed)
    attn = torch.rand(B, T, T, generator=g, dtype=dtype) + 0.05
    mask = torch.rand(B, T, T, generator=g) < 0.3
    pad_mask = torch.ones(B, T, dtype=torch.bool)
    pad_mask[0, T - 2:] = False            # right padding
    pad_mask[1, :3] = False                # left padding
    return attn, mask, pad_mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_double_loop(seed):
    attn, mask, pad_mask = random_batch(seed=seed)
    for alpha in (0.3, 1.0, 3.0):
        expected = loop_loss(attn.tolist(), mask.tolist(), alpha, pad_mask.tolist())
        got = explicit_loss(attn, mask, alpha, pad_mask)
        assert got.item() == pytest.approx(expected, rel=1e-12), f"alpha={alpha}"
    expected = loop_loss(attn.tolist(), mask.tolist(), 3.0, [[True] * 7] * 3)
    assert explicit_loss(attn, mask, 3.0).item() == pytest.approx(expected, rel=1e-12)


def loop_div(attn, mask, alpha, pad_mask, contrast=None):
    """The authors' loss (myloss.py, loss_type="div"), one row at a time: on each row that sees causal and other
    tokens, -log(1 + C_i) / log(1 + N_i) where C_i/N_i < alpha, else 0; the sum divided by the count of such rows."""
    rows = list(loop_rows(attn, mask, pad_mask, contrast))
    total = sum(-math.log(1 + C) / math.log(1 + N) for C, N in rows if C / N < alpha)
    return total / len(rows) if rows else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_div_loss_equals_the_authors_loop(seed):
    attn, mask, pad_mask = random_batch(seed=seed)
    for alpha in (0.3, 1.0, 3.0):
        expected = loop_div(attn.tolist(), mask.tolist(), alpha, pad_mask.tolist())
        got = loss(map_ratio(attn, mask, pad_mask), alpha, "div")
        assert got.item() == pytest.approx(expected, rel=1e-12), f"alpha={alpha}"
    assert expected < 0, "alpha 3 puts rows below it: the test compares non-zero losses"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_contrast_mask_narrows_the_other_tokens_as_the_loop_does(seed):
    """Not in the paper (train.py --contrast): N_i averages over the other tokens the contrast mask marks only."""
    attn, mask, pad_mask = random_batch(seed=seed)
    contrast = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed + 10)) < 0.5
    for kind, loop in (("hinge", loop_loss), ("div", loop_div)):
        for alpha in (0.3, 1.0, 3.0):
            expected = loop(attn.tolist(), mask.tolist(), alpha, pad_mask.tolist(), contrast.tolist())
            got = loss(map_ratio(attn, mask, pad_mask, contrast), alpha, kind)
            assert got.item() == pytest.approx(expected, rel=1e-12), f"{kind}, alpha={alpha}"
        narrowed = loop(attn.tolist(), mask.tolist(), 3.0, pad_mask.tolist(), contrast.tolist())
        assert narrowed != pytest.approx(loop(attn.tolist(), mask.tolist(), 3.0, pad_mask.tolist()), rel=1e-6)
    # marking every token is Eq. 9 itself
    everything = torch.ones_like(mask)
    torch.testing.assert_close(map_ratio(attn, mask, pad_mask, everything).ratio,
                               map_ratio(attn, mask, pad_mask).ratio, rtol=0, atol=0)


def test_loss_is_zero_with_graph_when_no_row_qualifies():
    attn = torch.rand(2, 5, 5, requires_grad=True)
    loss = explicit_loss(attn, torch.zeros(2, 5, 5, dtype=torch.bool), 0.3)
    loss.backward()
    assert loss.item() == 0.0 and attn.grad is not None and not attn.grad.any()


def test_zero_other_attention_gives_no_nan():
    # Row 1: all attention on the causal token, N_1 = 0 -> the ratio is huge and the hinge zero, never NaN.
    attn = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], requires_grad=True)
    mask = torch.tensor([[[0, 0], [1, 0]]], dtype=torch.bool)
    loss = explicit_loss(attn, mask, 0.5)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(attn.grad).all()


def test_gradcheck_float64():
    attn, mask, pad_mask = random_batch(B=2, T=5, seed=3)
    attn.requires_grad_(True)
    rows = cat.causal_rows(mask, pad_mask)
    mass = torch.linspace(0.05, 0.3, rows.rows.numel(), dtype=torch.float64).view(rows.rows.shape).requires_grad_(True)
    from_mass = lambda m: loss(cat.causal_ratio(*cat.mass_sums(m, rows)), 2.0)  # noqa: E731
    assert explicit_loss(attn, mask, 2.0, pad_mask) > 0
    assert from_mass(mass) > 0
    assert torch.autograd.gradcheck(lambda a: explicit_loss(a, mask, 2.0, pad_mask), (attn,))
    assert torch.autograd.gradcheck(from_mass, (mass,))


def softmax_attention(B, T, L, H, pad_mask, seed):
    """Per-layer (B, H, T, T) softmax attention over the real j <= i (rows of padding over j <= i)."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & pad_mask[:, None, :]      # (B, T, T)
    allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.ones(T, T, dtype=torch.bool).tril())
    probs = []
    for _ in range(L):
        scores = torch.randn(B, H, T, T, generator=g, dtype=torch.float64) * 2
        probs.append(scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1))
    return probs


@pytest.mark.parametrize("seed", [0, 1])
def test_mass_path_equals_explicit_path(seed):
    B, T, L, H = 3, 9, 2, 3
    _, mask, pad_mask = random_batch(B, T, seed)
    probs = softmax_attention(B, T, L, H, pad_mask, seed)
    avg = cat.average_attention(probs)
    torch.testing.assert_close(avg, torch.stack(probs).mean(dim=(0, 2)))
    # What the model returns on the fast path: the layer/head mean of sum_j P_ij M_ij, for the rows with causes.
    rows = cat.causal_rows(mask, pad_mask)
    mass, per_layer = torch.zeros(rows.rows.shape, dtype=torch.float64), []
    for p in probs:
        p_rows = p.gather(2, rows.rows[:, None, :, None].expand(B, H, -1, T))               # (B, H, R, T)
        per_layer.append((p_rows * rows.row_mask[:, None]).sum(-1))                         # (B, H, R)
        mass += per_layer[-1].mean(1) / L
    torch.testing.assert_close(mass, (avg * mask).sum(-1).gather(1, rows.rows))
    # Eq. 7 over what the fast path's layers return, the per-head causal mass: the same as the mass of the mean map
    torch.testing.assert_close(cat.average_attention(per_layer), mass)
    cn = map_ratio(avg, mask, pad_mask)
    cn_m = cat.causal_ratio(*cat.mass_sums(mass, rows))
    assert torch.equal(cn.counted.gather(1, rows.rows), cn_m.counted) and cn.counted.sum() == cn_m.counted.sum() > 0
    torch.testing.assert_close(cn_m.ratio, cn.ratio.gather(1, rows.rows))
    for alpha in (0.5, 1.5):
        for kind in LOSSES:
            expected = loss(cn, alpha, kind)
            torch.testing.assert_close(loss(cn_m, alpha, kind), expected)
    assert loss(cn, 1.5) > 0


def test_causal_rows_select_the_rows_with_causes():
    _, mask, _ = random_batch(B=3, T=8, seed=4)
    mask[1] = False                                         # a sequence with no annotation at all
    mask[2, :5] = False                                     # one with fewer such rows than the others
    rows, row_mask, _, _ = cat.causal_rows(mask)
    B, R = rows.shape
    assert R == int(mask.any(-1).sum(-1).max()) and rows.dtype == torch.long
    for b in range(B):
        expected = mask[b].any(-1).nonzero().flatten().tolist()
        assert rows[b, :len(expected)].tolist() == expected, "rows with causes first, in order"
        assert not row_mask[b, len(expected):].any(), "filler rows are empty"
        assert len(set(rows[b].tolist())) == R, "distinct rows, so that placing the masses back is exact"
        for r in range(R):
            assert torch.equal(row_mask[b, r], mask[b, rows[b, r]])


def test_shift_up():
    adj = torch.arange(2 * 16).view(2, 4, 4)
    out = cat.shift_up(adj)
    assert torch.equal(out[:, :3], adj[:, 1:]) and not out[:, 3].any()


def test_gamma():
    assert [cat.gamma(e) for e in range(3)] == [1.0, math.exp(-1), math.exp(-2)]
    assert cat.gamma(5, "constant") == 1.0
    with pytest.raises(ValueError, match="constant"):
        cat.gamma(0, "linear")


# -----------------------------------------------------------------------------
# §4.1 Step 2: the adjacency


@pytest.fixture(params=["byte_bpe", "sentencepiece_bpe", "smollm2"])
def tokenizer(request):
    if request.param == "smollm2":
        return Tokenizer.from_file(str(request.getfixturevalue("smollm2_dir") / "tokenizer.json"))
    return request.getfixturevalue(request.param)


INPUT = ("Here is the statistical data for a person. Smoking: 8, Café naïve: 2, 東京 ☕ 🙂, Weight: 1, "
         "Smoking: 8, Room size: 4 Answer: ")
TARGET = "High Risk"
IMPORTANT = [{"High Risk": ["Smoking: 8", "Weight: 1", "Room size: 4", "Exercise: 9"]},
             {"Weight: 1": ["Café naïve: 2", "東京", "Room size: 4"]}]


def occurrence_tokens(tokenizer, ids, offsets, full, phrase):
    """Token indices of each occurrence of `phrase`, checked by decoding: they spell it, and no fewer would."""
    found = []
    for start, end in cat.find_phrase(full, phrase):
        toks = cat.tokens_in_span(offsets, start, end)
        assert toks == list(range(toks[0], toks[-1] + 1)), f"{phrase!r}: tokens {toks} not contiguous"
        assert phrase in tokenizer.decode(ids[toks[0]:toks[-1] + 1]), f"{phrase!r}: tokens {toks} miss part of it"
        assert phrase not in tokenizer.decode(ids[toks[0] + 1:toks[-1] + 1]), f"{phrase!r}: first token not needed"
        assert phrase not in tokenizer.decode(ids[toks[0]:toks[-1]]), f"{phrase!r}: last token not needed"
        found.append(toks)
    return found


def test_token_adjacency_cases(tokenizer):
    ids, adj, stats = batches.token_adjacency([INPUT, TARGET], IMPORTANT, tokenizer)
    pieces = [tokenizer.encode(p, add_special_tokens=False).ids for p in (INPUT, TARGET)]
    assert ids == pieces[0] + pieces[1], "each piece is tokenised on its own"
    assert adj.shape == (len(ids), len(ids)) and adj.dtype == torch.bool

    _, offsets = batches.token_offsets([INPUT, TARGET], tokenizer)
    spans = {p: occurrence_tokens(tokenizer, ids, offsets, INPUT + TARGET, p)
             for p in ["High Risk", "Smoking: 8", "Weight: 1", "Room size: 4", "Café naïve: 2", "東京"]}
    assert len(spans["Smoking: 8"]) == 2, "the phrase occurs twice"
    assert all(len(t) > 1 for t in spans["Room size: 4"]), "a phrase split into several tokens"
    assert min(spans["High Risk"][0]) >= len(pieces[0]), "the key sits in the target"

    expected = torch.zeros_like(adj)
    for i in spans["High Risk"][0]:
        for p in ["Smoking: 8", "Weight: 1", "Room size: 4"]:     # both occurrences of Smoking: 8
            for toks in spans[p]:
                expected[i, toks] = True
    for i in spans["Weight: 1"][0]:                               # Room size: 4 comes after Weight: 1: no edge
        for toks in spans["Café naïve: 2"] + spans["東京"]:
            expected[i, toks] = True
    assert torch.equal(adj, expected), f"differs at {(adj ^ expected).nonzero().tolist()}"
    assert stats == {"found": 8, "not_found": 1, "missing_phrases": ["Exercise: 9"], "edges": int(expected.sum())}


def test_a_key_that_is_the_whole_answer_is_not_matched_in_the_input(byte_bpe):
    """STG_H: the answer "26" must not also supervise the "26" of "City anniversary: 26" in the input."""
    text = ["Industrial emissions: 40.0, City anniversary: 26, Vehicle emissions: 31.5 Answer: ", "26"]
    ids, adj, _ = batches.token_adjacency(text, [{"26": ["Industrial emissions: 40.0", "Vehicle emissions: 31.5"]}],
                                      byte_bpe)
    n_input = len(byte_bpe.encode(text[0], add_special_tokens=False).ids)
    rows = adj.any(dim=1).nonzero().flatten().tolist()
    assert rows and min(rows) >= n_input, f"rows {rows} reach into the input ({n_input} tokens)"


def test_find_phrase():
    text = "He has 48 caps and buys 8 more. Answer: 56. high risk, High Risk"
    assert cat.find_phrase(text, "8") == [(24, 25)], "whole numbers, not the 8 of 48"
    assert cat.find_phrase(text, "High Risk") == [(55, 64)], "exact first"
    assert cat.find_phrase(text, "HIGH RISK") == [(44, 53), (55, 64)], "then case-insensitive"
    assert cat.find_phrase("東京都", "東京") == [(0, 2)], "then inside words, for text without spaces"
    assert cat.find_phrase(text, "Exercise") == []


class WrongOffsets:
    """A tokenizer that reports UTF-8 byte offsets instead of character offsets, as buggy versions did."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text, add_special_tokens=False):
        enc = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        byte = lambda k: len(text[:k].encode())
        return type("Encoding", (), {"ids": enc.ids, "offsets": [(byte(s), byte(e)) for s, e in enc.offsets]})

    def decode_batch(self, sequences, skip_special_tokens=False):
        return self.tokenizer.decode_batch(sequences, skip_special_tokens=skip_special_tokens)


def test_fallback_offsets_from_decoding(tokenizer):
    pieces = [INPUT, TARGET]
    wrong = WrongOffsets(tokenizer)
    reported = [o for p in pieces for o in wrong.encode(p).offsets]
    assert reported != [o for p in pieces for o in tokenizer.encode(p, add_special_tokens=False).offsets]
    assert batches.token_offsets(pieces, wrong) == batches.token_offsets(pieces, tokenizer)
    assert torch.equal(batches.token_adjacency(pieces, IMPORTANT, wrong)[1],
                       batches.token_adjacency(pieces, IMPORTANT, tokenizer)[1])


def test_fallback_refuses_text_it_cannot_recover(byte_bpe):
    class Lossy(WrongOffsets):
        def decode_batch(self, sequences, skip_special_tokens=False):
            return [s.lower() for s in super().decode_batch(sequences, skip_special_tokens)]
    with pytest.raises(ValueError, match="round-trips"):
        batches.token_offsets("Café naïve: 2, Smoking: 8", Lossy(byte_bpe))


def test_records_in_the_published_format_load_unchanged(byte_bpe):
    lines = [
        '{"input": "Here is the statistical data for a person. Please predict the probability of cancer. '
        'Smoking: 8, Weight: 4, Yellow fingers: 12, Exercise: 2 Answer: ", "target": "High Risk", '
        '"important": [{"High Risk": ["Smoking: 8", "Weight: 4", "Exercise: 2"]}]}',
        '{"input": "William has 2 bottle caps. He buys 41 more. How many bottle caps does William have in all? '
        'Answer: ", "target": "43.0", "important": [{"43.0": ["2", 41, "buys"]}, {"41": ["2"]}]}',
        '{"input": "No annotation here. Answer: ", "target": "1"}',
    ]
    for line in lines:
        record = json.loads(line)
        ids, adj, stats = batches.token_adjacency([record["input"], record["target"]], record.get("important"), byte_bpe)
        assert stats["not_found"] == 0 and adj.shape == (len(ids), len(ids))
        assert (stats["edges"] > 0) == ("important" in record)
    with pytest.raises(ValueError, match=r"important\[0\]"):
        batches.token_adjacency("text", [["High Risk", "Smoking: 8"]], byte_bpe)


ATTRIBUTES = ["Smoking", "Weight", "Exercise",                    # causal: the three annotated
              "Yellow fingers", "Clothing size", "Hormones", "Certain gene", "Room size"]


def stg_like_records(n, seed=0):
    """STG_E-like records: eight "Name: value" attributes in random order, the three causal ones annotated."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        values = {name: rng.randint(1, 10) for name in ATTRIBUTES}
        order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        text = ", ".join(f"{name}: {values[name]}" for name in order)
        target = rng.choice(["High Risk", "Low Risk"])
        records.append({"input": "Here is the statistical data for a person. Please predict the probability of "
                                 f"cancer. {text} Answer: ", "target": target,
                        "important": [{target: [f"{name}: {values[name]}" for name in ATTRIBUTES[:3]]}]})
    return records


def test_adjacency_of_many_stg_like_records_finds_every_phrase(tokenizer):
    """1,000 records in random attribute orders: every phrase found, every causal token a column of the answer's
    rows, nothing else (its time is printed with -s; timing belongs to benchmarks, not to a test)."""
    records = stg_like_records(1000)
    start = time.perf_counter()
    results = [batches.token_adjacency([r["input"], r["target"]], r["important"], tokenizer) for r in records]
    print(f"\ntoken_adjacency: 1000 STG-like records in {time.perf_counter() - start:.3f} s")
    for record, (ids, adj, stats) in zip(records, results):
        assert stats["not_found"] == 0 and stats["edges"] > 0
        _, offsets = batches.token_offsets([record["input"], record["target"]], tokenizer)
        answer_start = len(record["input"])
        rows = {i for i, j in adj.nonzero().tolist()}
        assert rows and all(offsets[i][0] >= answer_start for i in rows), "only the answer's tokens are rows"
        causes = record["important"][0][record["target"]]
        spans = [span for phrase in causes for span in cat.find_phrase(record["input"], phrase)]
        expected = {j for s, e in spans for j in cat.tokens_in_span(offsets, s, e)}
        assert {j for _, j in adj.nonzero().tolist()} == expected


def test_the_worked_example_runs_and_its_two_paths_agree():
    """docs/worked_example.py: one record through §4 with the library's functions; the loss it prints from the
    average map equals the one from the causal mass (the fast path)."""
    import re
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs"))
    import worked_example
    text = worked_example.main(["--alpha", "1.5"])
    explicit, fast = map(float, re.search(r"L_attn = ([\d.]+) .*: ([\d.]+)$", text, re.MULTILINE).groups())
    assert explicit > 0 and explicit == pytest.approx(fast, abs=1e-4)
    assert "Smoking" in text and "C/N" in text
