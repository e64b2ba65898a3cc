"""Records -> token ids, labels and CAT's A_adj (§4.1 Step 2), then right-padded batches (§4.2's inputs).

A record {"input", "target", "important"} is tokenised as [bos] + input + target + [eos], the input and the target
apart (docs/design.md, "Tokenising prompt and answer"), with each token's character span verified, so that
cat.adjacency (Eq. 4) maps the annotation's phrases onto the tokens of exactly these ids.
"""
import dataclasses
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import cat

# ---------------------------------------------------------------------------------------------
# Characters -> tokens: each token's character span, verified (byte-level tokenizers misreport some)


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
    """Each piece tokenised on its own: its ids and their verified character offsets into
    "".join(pieces). The one tokenisation of the project's records (encode)."""
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
    """Token ids and verified character offsets into "".join(pieces), the pieces tokenised apart."""
    pieces = piece_offsets([text] if isinstance(text, str) else list(text), tokenizer)
    return [i for ids, _ in pieces for i in ids], [span for _, spans in pieces for span in spans]


def token_adjacency(text: str | Sequence[str], important, tokenizer) -> tuple[list[int], torch.Tensor, dict]:
    """Text (or pieces tokenised apart) and its annotation -> ids, A_adj (T, T) bool (cat.adjacency, Eq. 4), stats."""
    ids, offsets = token_offsets(text, tokenizer)
    return (ids, *cat.adjacency([text] if isinstance(text, str) else list(text), offsets, important))


# ---------------------------------------------------------------------------------------------
# A record -> an Example; Examples -> a Batch

@dataclass
class Example:
    ids: list[int]                   # [bos] + input + target + [eos]
    labels: list[int]                # labels[t] = ids[t + 1] where that token is in L_next (target + eos), else -100
    adj: torch.Tensor | None         # (T, T) bool causal adjacency, unshifted; None = no annotation
    contrast: torch.Tensor | None = None   # (T, T) bool, unshifted: the tokens N_i averages over; None: every other
                                           # token, as Eq. 9 (not in the paper: --contrast, variants.py)
    n_cat_rows: int = field(default=0, init=False)   # rows of the shifted adjacency that L_attn counts
    n_cat_target_rows: int = field(default=0, init=False)   # those of them that predict a target token

    def __post_init__(self):
        if self.adj is not None:   # counted once here, so that a step knows its global row count without collating it
            causal, other = cat.causal_and_other(cat.shift_up(self.adj)[None])             # (1, T, T)
            if self.contrast is not None:
                other = other & cat.shift_up(self.contrast)[None]
            counted = (causal.any(-1) & other.any(-1))[0]                                   # (T,) Eq. 10's rows
            self.n_cat_rows = int(counted.sum())
            self.n_cat_target_rows = int(counted[self.n_prompt - 1:].sum())

    @property
    def n_prompt(self) -> int:
        """Tokens before the first target token: the prefix generation starts from."""
        return next(t for t, label in enumerate(self.labels) if label != -100) + 1

    @property
    def n_targets(self) -> int:
        return sum(label != -100 for label in self.labels)


def encode(record: dict, tok) -> tuple[Example, dict]:
    """One record -> Example, with A_adj of Eq. 4 over exactly its tokens; the prompt and the target tokenised apart
    (docs/design.md, "Tokenising prompt and answer"). Also the annotation's coverage stats (cat.adjacency)."""
    bos = [] if tok.bos_id is None else [tok.bos_id]
    pieces = [record["input"], record["target"]]
    (prompt, prompt_offsets), (answer, answer_offsets) = piece_offsets(pieces, tok.backend)
    stats, adj = {}, None
    if record.get("important"):   # §4.1 Eq. 4 over the same tokens
        adj, stats = cat.adjacency(pieces, prompt_offsets + answer_offsets, record["important"])
        adj = F.pad(adj, (len(bos), 1, len(bos), 1))       # zero rows/columns for bos and eos
    ids, n_prompt = bos + prompt + answer + [tok.eos_ids[0]], len(bos) + len(prompt)
    labels = [-100] * (n_prompt - 1) + ids[n_prompt:] + [-100]   # position t predicts token t + 1
    return Example(ids, labels, adj), stats


@dataclass
class Batch:
    """A right-padded micro-batch, built on the CPU by collate: everything the losses read, so that the step itself
    needs no host synchronisation (no .item(), no data-dependent shape) until its metrics are read."""
    ids: torch.Tensor                # (B, T) token ids, pad_id after each sequence
    pad_mask: torch.Tensor           # (B, T) bool, True = real token
    target_pos: torch.Tensor         # (N,) flat positions b·T + t whose next token is in L_next
    targets: torch.Tensor            # (N,) those next tokens
    cat_mask: torch.Tensor           # (B, T, T) bool, the shifted adjacency (§4.2): row i attends for token i+1; CPU
    contrast_mask: torch.Tensor | None   # (B, T, T) bool, shifted: the tokens N_i averages over (--contrast); CPU
    causal_rows: cat.CausalRows      # the rows of cat_mask that hold causal tokens, with their counts (fast path)
    annotated: bool                  # whether any row holds a causal token
    n_rows: int                      # rows that L_attn counts

    def to(self, device) -> "Batch":
        """The batch on `device` (pinned and asynchronous on CUDA); cat_mask stays on the CPU until the explicit
        path asks for it."""
        device = torch.device(device)
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" else \
            (lambda t: t.to(device))
        return dataclasses.replace(self, ids=move(self.ids), pad_mask=move(self.pad_mask),
                                   target_pos=move(self.target_pos), targets=move(self.targets),
                                   causal_rows=cat.CausalRows(*map(move, self.causal_rows)))


def collate(examples: list[Example], pad_id: int, multiple: int = 1) -> Batch:
    """Right-pad a micro-batch to a length that is a multiple of `multiple`; the loss positions and the CAT rows with
    their counts are found here, on the CPU."""
    B, T = len(examples), -(-max(len(ex.ids) for ex in examples) // multiple) * multiple
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    cat_mask = torch.zeros(B, T, T, dtype=torch.bool)
    contrast_mask = torch.zeros(B, T, T, dtype=torch.bool) if any(ex.contrast is not None for ex in examples) else None
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        ids[b, :n], labels[b, :n] = torch.tensor(ex.ids), torch.tensor(ex.labels)
        if ex.adj is not None:
            cat_mask[b, :n, :n] = cat.shift_up(ex.adj)              # §4.2: row i attends for token i+1
        if ex.contrast is not None:
            contrast_mask[b, :n, :n] = cat.shift_up(ex.contrast)
    pad_mask = torch.arange(T)[None, :] < torch.tensor([len(ex.ids) for ex in examples])[:, None]
    target_pos = (labels.flatten() != -100).nonzero().flatten()
    return Batch(ids, pad_mask, target_pos, labels.flatten()[target_pos], cat_mask, contrast_mask,
                 cat.causal_rows(cat_mask, pad_mask), bool(cat_mask.any()), sum(ex.n_cat_rows for ex in examples))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled record order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
