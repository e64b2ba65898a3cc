"""One STG record through CAT §4, as Figure 2 lays it out, in a few seconds on a CPU, offline:

    python docs/worked_example.py [--alpha 1.5]

the word-level annotation → the token-level adjacency (Eq. 4) → its shift up one row (Eq. 6) → a tiny model's
attention averaged over layers and heads (Eq. 7) on the rows that predict the answer → C_i, N_i (Eq. 8, 9) →
the hinge max(0, α − C_i/N_i) (Eq. 10). Every number comes from the library's functions (cat.py, model.py,
train.py), never from a copy of them; the model is a small random one, so its attention is near uniform.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import batches  # noqa: E402
import runs  # noqa: E402
import cat  # noqa: E402
import stg  # noqa: E402
import train  # noqa: E402


def grid(matrix: torch.Tensor, labels: list[str], rows: list[int], cols: list[int], fmt) -> str:
    """A small table of matrix[rows][:, cols], rows and columns named by their tokens."""
    width = max(6, *(len(labels[j]) for j in cols))
    head = " " * 14 + "".join(f"{labels[j]:>{width}}" for j in cols)
    lines = [head] + [f"{i:>3} {labels[i]:>10}" + "".join(f"{fmt(matrix[i, j]):>{width}}" for j in cols)
                      for i in rows]
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--alpha", type=float, default=1.5, help="the hinge threshold α (default: %(default)s)")
    alpha = p.parse_args(argv).alpha
    records = stg.make_records("stg_s_train", 42)
    record = records[0]
    cfg = train.TrainConfig(scratch_dim=64, scratch_layers=2, scratch_heads=4, scratch_vocab=400)
    model, tok = runs.build_scratch([r["input"] + r["target"] for r in records], cfg)
    model.eval()
    out = [f"record: {record['input']}{record['target']}",
           f"§4.1 the word-level annotation (`important`): {record['important']}"]

    ex, stats = batches.encode(record, tok)                                 # A_adj over [bos] + input + target + eos
    labels = [tok.backend.id_to_token(i).replace("Ġ", "_") for i in ex.ids]
    rows = sorted(set(ex.adj.nonzero()[:, 0].tolist()))                   # the effect's tokens
    causes = sorted(set(ex.adj.nonzero()[:, 1].tolist()))                 # its causes' tokens
    _, offsets = batches.token_offsets([record["input"], record["target"]], tok.backend)
    start, end = cat.find_phrase(record["input"], "Yellow fingers")[0]     # a spurious attribute, for contrast
    end = record["input"].index(",", end) if "," in record["input"][end:] else end
    spurious = [j + int(tok.bos_id is not None) for j in cat.tokens_in_span(offsets, start, end)]
    cols = causes + spurious
    out += [f"\n§4.1 Eq. 4, A_adj (T = {len(ex.ids)} tokens; {stats['edges']} ones): the rows of the effect "
            f"{record['target']!r}, the columns of its causes and, for contrast, of the spurious Yellow fingers",
            grid(ex.adj.int(), labels, rows, cols, lambda v: str(int(v)))]

    shifted = cat.shift_up(ex.adj)                                        # row i now predicts token i + 1
    shifted_rows = [i - 1 for i in rows]
    out += ["\n§4.2 Eq. 6, shifted up one row: the row that *predicts* each answer token attends to the causes",
            grid(shifted.int(), labels, shifted_rows, cols, lambda v: str(int(v)))]

    batch = batches.collate([ex], tok.pad_id)
    with torch.no_grad():
        probs = model(batch.ids, return_attn=True).attentions            # L x (1, H, T, T)
    avg = cat.average_attention(probs)[0]                                 # (T, T), Eq. 7
    out += [f"\n§4.2 Eq. 7, the attention averaged over {len(probs)} layers and {probs[0].shape[1]} heads on those "
            "rows", grid(avg, labels, shifted_rows, cols, lambda v: f"{v:.3f}")]

    causal, other = cat.causal_and_other(shifted[None])                   # each row's causal and other j <= i
    cn = cat.causal_ratio(*cat.attention_sums(avg[None], causal, other))  # Eq. 8, 9
    out.append(f"\n§4.2 Eq. 8-10 with α = {alpha}:")
    for i in shifted_rows:
        C, N, ratio = cn.C[0, i].item(), cn.N[0, i].item(), cn.ratio[0, i].item()
        n_causal = int(shifted[i, :i + 1].sum())
        out.append(f"  row {i:>2} ({labels[i]:>8} → predicts {labels[i + 1]!r}): C = {C:.4f} (mean over {n_causal} "
                   f"causal tokens), N = {N:.4f} (over {i + 1 - n_causal} others), C/N = {ratio:.3f}, "
                   f"max(0, α − C/N) = {max(0.0, alpha - ratio):.3f}")
    with torch.no_grad():   # the default path: each layer returns its causal rows' mass per head, never the T x T map
        supervised = batch.causal_rows
        masses = model(batch.ids, causal_rows=supervised.rows, causal_row_mask=supervised.row_mask).attentions
    fast = cat.causal_ratio(*cat.mass_sums(cat.average_attention(masses), batch.causal_rows))    # Eq. 7, then Eq. 8, 9
    out += [f"  L_attn = {cat.hinge(cn, alpha).item():.4f} (the hinge summed over the rows); "
            f"on the default fast path, from the causal mass alone: {cat.hinge(fast, alpha).item():.4f}"]
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
