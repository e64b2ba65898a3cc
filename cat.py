"""CAT §4, top to bottom in the paper's order: word-level causal annotations -> A_adj -> the Re-Attention loss.

  §4.1 Eq. 4   adjacency: the annotation M = {effect: [causes]} -> token spans -> A_adj in {0,1}^{T x T}
  §4.2 Eq. 6   shift_up: A_adj[i, j] <- A_adj[i+1, j], row i predicts token i+1
  §4.2 Eq. 7   average_attention: the mean over all layers and heads of what each layer's attention returns
  §4.2 Eq. 8-9 causal_ratio: C_i and N_i, from the sums over each row's causal and other tokens: attention_sums
               reads them off the map, mass_sums from the mass on the causal tokens alone (the fast path: no
               T x T map is formed)
  §4.2 Eq. 10  hinge: L_attn = sum_i max(0, alpha - C_i/N_i)
  §5.1         gamma: the weight of L_attn in L_total = L_next + gamma * L_attn (train.py)
Pure functions on strings and tensors. Token offsets come from batches.py, where records are tokenised; the loss's
variants that are not in the paper live in variants.py.
"""
import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

# -----------------------------------------------------------------------------
# §4.1 Step 2, Eq. 4: phrases -> token spans -> A_adj


def find_phrase(text: str, phrase: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of `phrase` in `text`, exact first, then case-insensitive."""
    escaped = re.escape(phrase)
    # Whole words first, so that "8" is not found inside "48"; then any substring, for text without spaces.
    for pattern in (rf"(?<!\w){escaped}(?!\w)", escaped):
        for flags in (0, re.IGNORECASE):
            spans = [m.span() for m in re.finditer(pattern, text, flags)]
            if spans:
                return spans
    return []


def tokens_in_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character span overlaps [start, end)."""
    return [k for k, (s, e) in enumerate(offsets) if s < end and e > start]


def relations(important) -> list[tuple[str, list[str]]]:
    """(effect, [causes]) pairs of the record field `important`: a list of {effect: [causes]} dicts."""
    entries = [important] if isinstance(important, dict) else list(important or [])
    pairs = []
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"important[{n}] should be a dict {{effect: [causes]}}, found {entry!r}")
        for key, values in entry.items():
            values = [values] if isinstance(values, (str, int, float)) else values
            pairs.append((str(key).strip(), [str(v).strip() for v in values]))
    return pairs


def adjacency(pieces: Sequence[str], offsets: Sequence[tuple[int, int]], important) -> tuple[Tensor, dict]:
    """Eq. 4: A_adj (T, T) bool, A[i, j] = 1 when token i lies in an effect and token j in one of its causes before
    it; offsets are the tokens' character spans in "".join(pieces) (batches.piece_offsets). Also the coverage stats."""
    full, answer_start = "".join(pieces), len("".join(pieces[:-1]))
    adj = np.zeros((len(offsets), len(offsets)), dtype=bool)
    spans: dict[str, list[tuple[int, int]]] = {}        # phrase -> its character spans, found once
    found, missing = 0, []
    for key, values in relations(important):                          # each (k^M, v^M) of M
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
            adj[np.ix_(rows, cols)] = True                                  # Eq. 4
    # Coverage for the caller to report: a phrase not found leaves its rows or columns empty, never silently.
    stats = {"found": found, "not_found": len(missing), "missing_phrases": missing, "edges": int(adj.sum())}
    return torch.from_numpy(adj), stats


# -----------------------------------------------------------------------------
# §4.2: the Re-Attention loss


def shift_up(adj: Tensor) -> Tensor:
    """Eq. 6: (..., T, T) -> (..., T, T), row i <- row i+1 (row i predicts token i+1), last row zero."""
    out = torch.zeros_like(adj)
    out[..., :-1, :] = adj[..., 1:, :]                                  # Eq. 6: A[i, j] = A[i+1, j]
    return out


def average_attention(per_layer: list[Tensor]) -> Tensor:
    """Eq. 7: the mean over layers and heads of what each layer's attention returned, (B, H, ...) a layer: the
    softmax maps (B, H, T, S) -> (B, T, S); or, on the fast path, each causal row's attention mass on its causal
    tokens, m_i = sum_j P_ij A_adj[i, j] (B, H, R) -> (B, R). Both are linear in P, so the mean commutes with the
    sum over j: the mean of the masses is the mass of the mean map."""
    return torch.stack([p.mean(dim=1) for p in per_layer]).mean(dim=0)       # heads, then layers


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


def causal_ratio(on_causal: Tensor, n_causal: Tensor, on_other: Tensor, n_other: Tensor) -> CausalRatio:
    """Eq. 8, 9 from each row's attention on its causal tokens and on the others, and their counts j <= i."""
    return CausalRatio(on_causal / n_causal.clamp(min=1),         # Eq. 8: C_i, the mean over the causal j <= i
                       on_other / n_other.clamp(min=1),           # Eq. 9: N_i, the mean over the other j <= i
                       (n_causal > 0) & (n_other > 0))            # rows that see both kinds count in Eq. 10


def causal_and_other(cat_mask: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The shifted A_adj (B, T, T) -> each row's causal and other tokens among the real tokens j <= i (B, T, T)."""
    T = cat_mask.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool, device=cat_mask.device).tril()   # (T, T) j <= i
    if pad_mask is not None:                                                     # (B, T) True = real token
        real = pad_mask.bool()
        seen = seen & real[..., :, None] & real[..., None, :]                    # (B, T, T) real rows and columns
    causal = cat_mask.bool() & seen
    return causal, seen & ~causal


def attention_sums(avg_attn: Tensor, causal: Tensor, other: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sums and counts of Eq. 8, 9 read off the average map (B, T, T): (on_causal, n_causal, on_other, n_other)."""
    return (avg_attn * causal).sum(-1), causal.sum(-1), (avg_attn * other).sum(-1), other.sum(-1)


# The fast path. Each row of the average map P̄ sums to 1 over its real j <= i, so with m_i = sum_j P̄_ij A_adj[i, j]
# the attention on the other tokens is 1 - m_i: Eq. 8, 9 need only m_i of the R rows that hold causal tokens,
# which the model computes without forming the map (model.Attention.causal_mass). Which rows, and their counts
# |M_i| and n_i - |M_i|, come from the mask alone.


class CausalRows(NamedTuple):
    """The rows of a CAT mask (B, T, T) that hold causal tokens, and their counts among the real tokens j <= i."""
    rows: Tensor       # (B, R) long: row indices, rows with causal tokens first, in order; filled up with empty rows
    row_mask: Tensor   # (B, R, T) bool: those rows of the mask
    n_causal: Tensor   # (B, R) long: |M_i|, the causal tokens row i sees
    n_other: Tensor    # (B, R) long: n_i - |M_i|, the other tokens it sees


def causal_rows(cat_mask: Tensor, pad_mask: Tensor | None = None) -> CausalRows:
    """The rows of the shifted mask (B, T, T) that hold causal tokens, and their counts. R is the most such rows in
    one sequence (at least 1). Computed where the mask is built (batches.collate, on the CPU)."""
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


def mass_sums(mass: Tensor, rows: CausalRows) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sums and counts of Eq. 8, 9 from the causal rows' average causal mass m (B, R): the rest of each row's
    attention, 1 - m, lies on its other tokens."""
    return mass, rows.n_causal, 1 - mass, rows.n_other              # the fast path's identity


def hinge(cn: CausalRatio, alpha: float) -> Tensor:
    """Eq. 10: sum_i max(0, alpha - C_i/N_i) over the counted rows of each sequence, mean over the batch."""
    return (torch.relu(alpha - cn.ratio) * cn.counted).sum(-1).mean()      # Eq. 10


# -----------------------------------------------------------------------------
# §5.1: L_total = L_next + gamma * L_attn


def gamma(epoch: int, schedule: str = "exp") -> float:
    """§5.1: gamma = e^{-epoch}, epoch counted from 0; "constant" keeps gamma = 1 (Table 3 ablation)."""
    if schedule == "exp":
        return math.exp(-epoch)                                         # §5.1: γ = e^{-epoch}, 1 at epoch 0
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown gamma schedule {schedule!r}: expected 'exp' or 'constant'")
