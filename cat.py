"""CAT §4: word-level causal annotations -> token-level adjacency -> the Re-Attention loss.

Read beside §4 of the paper, top to bottom:
  §4.1 Step 2  token_adjacency: the annotation M = {effect: [causes]} as A_adj in {0,1}^{T x T} (Eq. 4)
  §4.2         shift_up: A_adj[i, j] <- A_adj[i+1, j], row i predicts token i+1 (Eq. 6)
  §4.2         average_attention: mean attention map over all layers and heads (Eq. 7)
  §4.2         causal_ratio / hinge / reattention_loss: C_i, N_i (Eq. 8, 9) and L_attn (Eq. 10)
  §4.2 (fast)  causal_rows / ratio_from_mass: the same loss from the attention mass on causal tokens
  §5.1         gamma: the weight of L_attn in L_total = L_next + gamma * L_attn
Pure functions on strings and tensors: nothing here knows about models or files.
"""
import math
import os
import re
import unicodedata
from collections.abc import Sequence

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


def token_offsets(text: str | Sequence[str], tokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    """CAT §4.1 Step 2: token ids and verified character offsets into "".join(pieces), pieces tokenised apart."""
    pieces = [text] if isinstance(text, str) else list(text)
    ids, offsets, shift = [], [], 0
    for piece in pieces:
        enc = tokenizer.encode(piece, add_special_tokens=False)
        spans = enc.offsets
        decoded = tokenizer.decode_batch([[i] for i in enc.ids], skip_special_tokens=True)
        # Byte-level tokenizers report wrong offsets in some versions: check them, else derive them by decoding.
        if not _offsets_agree(piece, spans, decoded):
            spans = _decoded_offsets(piece, enc.ids, tokenizer)
        ids += enc.ids
        offsets += [_trim(piece, start, end, shift) for start, end in spans]
        shift += len(piece)
    return ids, offsets


def tokens_in_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """CAT §4.1 Step 2: indices of the tokens whose character span overlaps [start, end)."""
    return [k for k, (s, e) in enumerate(offsets) if s < end and e > start]


def _relations(important) -> list[tuple[str, list[str]]]:
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
    pieces = [text] if isinstance(text, str) else list(text)
    full, answer_start = "".join(pieces), len("".join(pieces[:-1]))
    adj = np.zeros((len(ids), len(ids)), dtype=bool)
    spans: dict[str, list[tuple[int, int]]] = {}        # phrase -> its character spans, found once
    found, missing = 0, []
    for key, values in _relations(important):
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
    return ids, torch.from_numpy(adj), stats


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


def _visible(mask: Tensor, pad_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(B, T, T) causal mask -> causal and other positions of each row among the real tokens j <= i."""
    T = mask.shape[-1]
    seen = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()   # (T, T) j <= i
    if pad_mask is not None:                                                 # (B, T) True = real token
        real = pad_mask.bool()
        seen = seen & real[..., :, None] & real[..., None, :]                # (B, T, T) real rows and columns
    causal = mask.bool() & seen
    return causal, seen & ~causal


def _ratio(causal_sum: Tensor, n_causal: Tensor, other_sum: Tensor, n_other: Tensor) -> tuple[Tensor, Tensor]:
    """C_i / N_i (B, T) from the attention sums and counts of each row; rows (B, T) hold both kinds of token."""
    rows = (n_causal > 0) & (n_other > 0)
    C = causal_sum / n_causal.clamp(min=1)                          # CAT §4.2 Eq. 8
    N = other_sum / n_other.clamp(min=1)                            # CAT §4.2 Eq. 9
    ratio = C / N.clamp(min=torch.finfo(N.dtype).tiny)              # N_i = 0: a large ratio, the hinge is zero
    return torch.where(rows, ratio, torch.zeros_like(ratio)), rows


def causal_ratio(avg_attn: Tensor, mask: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CAT §4.2 Eq. 8, 9: avg_attn (B, T, T), shifted mask (B, T, T) -> C_i/N_i (B, T) (0 off rows), rows (B, T)."""
    causal, other = _visible(mask, pad_mask)
    return _ratio((avg_attn * causal).sum(-1), causal.sum(-1), (avg_attn * other).sum(-1), other.sum(-1))


def hinge(ratio: Tensor, rows: Tensor, alpha: float) -> Tensor:
    """CAT §4.2 Eq. 10: sum_i max(0, alpha - C_i/N_i) over the rows (B, T), then the mean over the batch."""
    return (torch.relu(alpha - ratio) * rows).sum(-1).mean()


def reattention_loss(avg_attn: Tensor, mask: Tensor, alpha: float, pad_mask: Tensor | None = None) -> Tensor:
    """CAT §4.2 L_attn from the average attention map (B, T, T) and the shifted mask (B, T, T); a scalar."""
    return hinge(*causal_ratio(avg_attn, mask, pad_mask), alpha)


# -----------------------------------------------------------------------------
# §4.2, fast path. Each row of the average map sums to 1 over its real j <= i, so with mass_i = sum_j A_ij M_ij:
# C_i = mass_i / |M_i| and N_i = (1 - mass_i) / (n_i - |M_i|). The model then returns a (B, T) vector, not L maps.


def causal_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """CAT §4.2 fast path: the rows of mask (B, T, T) that hold causal tokens -> rows (B, R) long, their mask rows
    (B, R, T). R is the most such rows in one sequence; a sequence with fewer is filled up with empty rows."""
    has = mask.any(dim=-1)                                                 # (B, T)
    R = max(int(has.sum(-1).max()), 1)
    rows = torch.argsort((~has).int(), dim=-1, stable=True)[:, :R]         # rows with causal tokens first, in order
    return rows, mask.gather(1, rows[..., None].expand(-1, -1, mask.shape[-1]))


def ratio_from_mass(mass: Tensor, mask: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CAT §4.2 Eq. 8, 9 from the causal attention mass (B, T) and the shifted mask (B, T, T) -> ratio, rows (B, T)."""
    causal, other = _visible(mask, pad_mask)
    return _ratio(mass, causal.sum(-1), 1 - mass, other.sum(-1))


def reattention_loss_from_mass(mass: Tensor, mask: Tensor, alpha: float, pad_mask: Tensor | None = None) -> Tensor:
    """CAT §4.2 L_attn from the causal attention mass (B, T) and the shifted mask (B, T, T); a scalar."""
    return hinge(*ratio_from_mass(mass, mask, pad_mask), alpha)


# -----------------------------------------------------------------------------
# §5.1: L_total = L_next + gamma * L_attn


def gamma(epoch: int, schedule: str = "exp") -> float:
    """CAT §5.1: gamma = e^{-epoch}, epoch counted from 0; "constant" keeps gamma = 1 (Table 3 ablation)."""
    if schedule == "exp":
        return math.exp(-epoch)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown gamma schedule {schedule!r}: expected 'exp' or 'constant'")
