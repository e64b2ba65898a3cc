"""CAT §4: word-level causal annotations -> token-level adjacency -> the Re-Attention loss.

Read beside §4 of the paper, top to bottom:
  §4.1 Step 2  token_adjacency: the annotation M = {effect: [causes]} as A_adj in {0,1}^{T x T} (Eq. 4)
  §4.2         shift_up: A_adj[i, j] <- A_adj[i+1, j], row i predicts token i+1 (Eq. 6)
  §4.2         average_attention: mean attention map over all layers and heads (Eq. 7)
  §4.2         causal_ratio: C_i, N_i (Eq. 8, 9); reattention_loss -> hinge: L_attn (Eq. 10)
  §4.2 (fast)  causal_rows / ratio_from_mass: C_i, N_i from the attention mass on causal tokens
  §5.1         gamma: the weight of L_attn in L_total = L_next + gamma * L_attn
Pure functions on strings and tensors: nothing here knows about models or files.
"""
import math
import os
import re
import unicodedata
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# -----------------------------------------------------------------------------
# §4.1 Step 2: characters -> tokens


def find_phrase(text: str, phrase: str) -> list[tuple[int, int]]:
    """CAT §4.1 Step 2: character spans [start, end) of `phrase` in `text`, exact first, then case-insensitive."""
    escaped = re.escape(phrase)
    # Whole words first, so that "8" is not found inside "48"; then any substring, for text without spaces.
    for pattern in (rf"(?<!\w){escaped}(?!\w)", escaped):
        for flags in (0, re.IGNORECASE):
            spans = [m.span() for m in re.finditer(pattern, text, flags)]
            if spans:
                return spans
    return []


def _offsets_agree(piece: str, offsets: list[tuple[int, int]], decoded: list[str]) -> bool:
    """Whether each token's offsets cover the text the token decodes to (tokens of a split character skipped)."""
    for (start, end), token_text in zip(offsets, decoded):
        if not 0 <= start <= end <= len(piece):
            return False
        token_text, word = token_text.strip(), piece[start:end].strip()
        if not token_text or "\ufffd" in token_text:    # only a space, or part of a multi-byte character
            continue
        if word != token_text and unicodedata.normalize("NFKC", word) != unicodedata.normalize("NFKC", token_text):
            return False
    return True


def _decoded_offsets(piece: str, ids: list[int], tokenizer) -> list[tuple[int, int]]:
    """Offsets from decoding the prefixes ids[:1], ids[:2], ...: token k adds the characters its prefix adds."""
    prefixes = tokenizer.decode_batch([ids[:k] for k in range(1, len(ids) + 1)], skip_special_tokens=False)
    if prefixes and prefixes[-1] != piece:
        raise ValueError(f"tokenizer offsets disagree with the text and decoding does not give it back either: "
                         f"{piece!r} decodes to {prefixes[-1]!r}; use a tokenizer that round-trips its text")
    offsets, done = [], 0                               # done: characters completed by the tokens so far
    for prefix in prefixes:
        complete = len(os.path.commonprefix([prefix, piece]))
        pending = int(len(prefix) > complete)           # the token starts a character that a later one completes
        offsets.append((done, min(complete + pending, len(piece))))
        done = max(done, complete)
    return offsets


def _trim(piece: str, start: int, end: int, shift: int) -> tuple[int, int]:
    """Span shifted by `shift`, without its surrounding whitespace (a token that is only whitespace keeps it)."""
    word = piece[start:end]
    core = word.strip()
    if core and len(core) < len(word):
        start += len(word) - len(word.lstrip())
        end = start + len(core)
    return shift + start, shift + end


def piece_offsets(pieces: Sequence[str], tokenizer) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """CAT §4.1 Step 2: each piece tokenised on its own: its ids and their verified character offsets into
    "".join(pieces). The one tokenisation of the project's records (train.encode)."""
    out, shift = [], 0
    for piece in pieces:
        enc = tokenizer.encode(piece, add_special_tokens=False)
        spans = enc.offsets
        decoded = tokenizer.decode_batch([[i] for i in enc.ids], skip_special_tokens=True)
        # Byte-level tokenizers report wrong offsets in some versions: check them, else derive them by decoding.
        if not _offsets_agree(piece, spans, decoded):
            spans = _decoded_offsets(piece, enc.ids, tokenizer)
        out.append((enc.ids, [_trim(piece, start, end, shift) for start, end in spans]))
        shift += len(piece)
    return out


def token_offsets(text: str | Sequence[str], tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """CAT §4.1 Step 2: token ids and verified character offsets into "".join(pieces), pieces tokenised apart."""
    pieces = piece_offsets([text] if isinstance(text, str) else list(text), tokenizer)
    return [i for ids, _ in pieces for i in ids], [span for _, spans in pieces for span in spans]


def tokens_in_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """CAT §4.1 Step 2: indices of the tokens whose character span overlaps [start, end)."""
    return [k for k, (s, e) in enumerate(offsets) if s < end and e > start]


def relations(important) -> list[tuple[str, list[str]]]:
    """(effect, [causes]) pairs from the record field `important`: a list of {effect: [causes]} dicts."""
    entries = [important] if isinstance(important, dict) else list(important or [])
    relations = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"important[{n}] should be a dict {{effect: [causes]}}, found {entry!r}")
        for key, values in entry.items():
            values = [values] if isinstance(values, (str, int, float)) else values
            relations.append((str(key).strip(), [str(v).strip() for v in values]))
    return relations


def token_adjacency(text: str | Sequence[str], important: list[dict] | None,
                    tokenizer) -> tuple[list[int], Tensor, dict]:
    """CAT §4.1 Eq. 4: ids, A_adj (T, T) bool (A[i, j] = 1: i in an effect, j in a cause before it), stats."""
    ids, offsets = token_offsets(text, tokenizer)
    return (ids, *adjacency([text] if isinstance(text, str) else list(text), offsets, important))


def adjacency(pieces: Sequence[str], offsets: Sequence[tuple[int, int]], important) -> tuple[Tensor, dict]:
    """CAT §4.1 Eq. 4 from the tokens' character offsets into "".join(pieces): A_adj (T, T) bool, stats."""
    full, answer_start = "".join(pieces), len("".join(pieces[:-1]))
    adj = np.zeros((len(offsets), len(offsets)), dtype=bool)
    spans: dict[str, list[tuple[int, int]]] = {}        # phrase -> its character spans, found once
    found, missing = 0, []
    for key, values in relations(important):
        for phrase in (key, *values):
            if phrase not in spans:
                spans[phrase] = find_phrase(full, phrase) if phrase else []
            if spans[phrase]:
                found += 1
            else:
                missing.append(phrase)
        key_spans = spans[key]
        if len(pieces) > 1 and key.casefold() == pieces[-1].strip().casefold():
            # The key is the whole answer (e.g. the AQI "26" of STG_H): its look-alikes in the input are other numbers.
            key_spans = [span for span in key_spans if span[0] >= answer_start]
        for key_start, key_end in key_spans:
            rows = tokens_in_span(offsets, key_start, key_end)
            # A cause must come before the effect it causes: only value occurrences that end before this key.
            cols = [j for v in values for s, e in spans[v] if e <= key_start for j in tokens_in_span(offsets, s, e)]
            adj[np.ix_(rows, cols)] = True
    # Coverage for the caller to report: a phrase not found leaves its rows or columns empty, never silently.
    stats = {"found": found, "not_found": len(missing), "missing_phrases": missing, "edges": int(adj.sum())}
    return torch.from_numpy(adj), stats


# -----------------------------------------------------------------------------
# §4.2: the Re-Attention loss


def shift_up(adj: Tensor) -> Tensor:
    """CAT §4.2 Eq. 6: (..., T, T) -> (..., T, T), row i <- row i+1 (row i predicts token i+1), last row zero."""
    out = torch.zeros_like(adj)
    out[..., :-1, :] = adj[..., 1:, :]
    return out


def average_attention(probs: list[Tensor]) -> Tensor:
    """CAT §4.2 Eq. 7: per-layer attention probabilities L x (B, H, T, T) -> mean over layers and heads (B, T, T)."""
    return sum(p.mean(dim=1) for p in probs) / len(probs)


def visible(cat_mask: Tensor, pad_mask: Tensor | None, contrast: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, T, T) CAT mask -> causal and other positions of each row among the real tokens j <= i; with a contrast
    mask (B, T, T), the other positions are only those it marks."""
    T = cat_mask.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool, device=cat_mask.device).tril()   # (T, T) j <= i
    if pad_mask is not None:                                                     # (B, T) True = real token
        real = pad_mask.bool()
        seen = seen & real[..., :, None] & real[..., None, :]                    # (B, T, T) real rows and columns
    causal = cat_mask.bool() & seen
    other = seen & ~causal
    return causal, other if contrast is None else other & contrast.bool()


class CausalRatio(NamedTuple):
    """C_i (Eq. 8) and N_i (Eq. 9) of each row, and the rows that count: those that see causal and other tokens."""
    C: Tensor          # (B, T), or (B, R) on the fast path
    N: Tensor          # (B, T) or (B, R)
    counted: Tensor    # (B, T) or (B, R) bool

    @property
    def ratio(self) -> Tensor:
        """C_i / N_i on the counted rows, 0 elsewhere; N_i = 0 gives a large ratio, so the hinge is zero, not NaN."""
        ratio = self.C / self.N.clamp(min=torch.finfo(self.N.dtype).tiny)
        return torch.where(self.counted, ratio, torch.zeros_like(ratio))


def counted_rows(n_causal: Tensor, n_other: Tensor) -> Tensor:
    """The rows L_attn counts: those that see at least one causal and one other token."""
    return (n_causal > 0) & (n_other > 0)


def _c_and_n(causal_sum: Tensor, n_causal: Tensor, other_sum: Tensor, n_other: Tensor) -> CausalRatio:
    """C_i and N_i from the attention sums and counts of each row."""
    return CausalRatio(causal_sum / n_causal.clamp(min=1),          # CAT §4.2 Eq. 8: mean over the causal j <= i
                       other_sum / n_other.clamp(min=1),            # CAT §4.2 Eq. 9: mean over the other j <= i
                       counted_rows(n_causal, n_other))


def causal_ratio(avg_attn: Tensor, cat_mask: Tensor, pad_mask: Tensor | None = None,
                 contrast: Tensor | None = None) -> CausalRatio:
    """CAT §4.2 Eq. 8, 9: the average map avg_attn (B, T, T) and the shifted CAT mask (B, T, T) -> C, N (B, T).
    Not in the paper: a shifted contrast mask (B, T, T) narrows Eq. 9's "other tokens" to the ones it marks (the
    other attributes of an STG record, train.py --contrast attributes; the input but its first token, --contrast
    input), so that C/N compares the causes with the alternatives to them, not with every token of the row."""
    causal, other = visible(cat_mask, pad_mask, contrast)
    return _c_and_n((avg_attn * causal).sum(-1), causal.sum(-1), (avg_attn * other).sum(-1), other.sum(-1))


def hinge(cn: CausalRatio, alpha: float) -> Tensor:
    """CAT §4.2 Eq. 10: sum_i max(0, alpha - C_i/N_i) over the counted rows of each sequence, mean over the batch."""
    return (torch.relu(alpha - cn.ratio) * cn.counted).sum(-1).mean()


def div_loss(cn: CausalRatio, alpha: float) -> Tensor:
    """The loss of the authors' published code (myloss.py, compute_attention_constraint_loss_batch, its default
    loss_type="div"), not Eq. 10: -log(1 + C_i) / log(1 + N_i) on each counted row with C_i/N_i < alpha (0 on the
    others), summed and divided by the number of counted rows in the batch."""
    below = cn.counted & (cn.ratio < alpha)
    per_row = -torch.log1p(cn.C) / torch.log1p(cn.N).clamp(min=torch.finfo(cn.N.dtype).tiny)
    return torch.where(below, per_row, torch.zeros_like(per_row)).sum() / cn.counted.sum().clamp(min=1)


ATTN_LOSSES = {"hinge": hinge, "div": div_loss}


def reattention_loss(cn: CausalRatio, alpha: float, kind: str = "hinge") -> Tensor:
    """CAT §4.2 L_attn of C_i and N_i: the paper's hinge (Eq. 10), or "div", the authors' code's loss; a scalar."""
    if kind not in ATTN_LOSSES:
        raise ValueError(f"unknown Re-Attention loss {kind!r}: expected one of {', '.join(ATTN_LOSSES)}")
    return ATTN_LOSSES[kind](cn, alpha)


# -----------------------------------------------------------------------------
# §4.2, fast path. Each row of the average map sums to 1 over its real j <= i, so with mass_i = sum_j A_ij M_ij:
# C_i = mass_i / |M_i| and N_i = (1 - mass_i) / (n_i - |M_i|). The model then returns a (B, R) vector of the R rows
# that hold causal tokens, not L maps; which rows, and their counts |M_i| and n_i - |M_i|, come from the mask alone.


class CausalRows(NamedTuple):
    """The rows of a CAT mask (B, T, T) that hold causal tokens, and their counts among the real tokens j <= i."""
    rows: Tensor       # (B, R) long: row indices, rows with causal tokens first, in order; filled up with empty rows
    row_mask: Tensor   # (B, R, T) bool: those rows of the mask
    n_causal: Tensor   # (B, R) long: |M_i|, the causal tokens row i sees
    n_other: Tensor    # (B, R) long: n_i - |M_i|, the other tokens it sees


def causal_rows(cat_mask: Tensor, pad_mask: Tensor | None = None) -> CausalRows:
    """CAT §4.2 fast path: the rows of the shifted mask (B, T, T) that hold causal tokens, and their counts. R is the
    most such rows in one sequence (at least 1). Computed where the mask is built (train.collate, on the CPU)."""
    B, T, _ = cat_mask.shape
    has = cat_mask.any(dim=-1)                                                 # (B, T)
    R = max(int(has.sum(-1).max()), 1)
    rows = torch.argsort((~has).int(), dim=-1, stable=True)[:, :R]             # rows with causal tokens first
    row_mask = cat_mask.gather(1, rows[..., None].expand(-1, -1, T))           # (B, R, T)
    seen = torch.arange(T, device=cat_mask.device) <= rows[..., None]          # (B, R, T) j <= i
    if pad_mask is not None:                                                   # real rows, real columns
        real = pad_mask.bool()
        seen = seen & real.gather(1, rows)[..., None] & real[:, None, :]
    causal = row_mask & seen
    return CausalRows(rows, row_mask, causal.sum(-1), (seen & ~causal).sum(-1))


def ratio_from_mass(mass: Tensor, n_causal: Tensor, n_other: Tensor) -> CausalRatio:
    """CAT §4.2 Eq. 8, 9 from the causal attention mass (B, R) of the causal rows and their counts (B, R)."""
    return _c_and_n(mass, n_causal, 1 - mass, n_other)


# -----------------------------------------------------------------------------
# §5.1: L_total = L_next + gamma * L_attn


def gamma(epoch: int, schedule: str = "exp") -> float:
    """CAT §5.1: gamma = e^{-epoch}, epoch counted from 0; "constant" keeps gamma = 1 (Table 3 ablation)."""
    if schedule == "exp":
        return math.exp(-epoch)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown gamma schedule {schedule!r}: expected 'exp' or 'constant'")
