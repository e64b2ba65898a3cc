"""Past the paper: the variants of CAT's loss that the studies tried, and where each enters the paper's path.

  flag                    what it changes                                   enters at
  --alpha-scale K         α = K × the median C/N before the first step      runs.setup: place_alpha
  --attn-loss div         Eq. 10 -> the authors' published loss             train.losses: div_loss
  --contrast attributes   Eq. 9's N_i over the record's other attributes    runs.encode_all: adapt sets
  --contrast input        Eq. 9's N_i over the input but its first token      Example.contrast, which batches carry
                                                                              to train.losses: narrow_other
  --rows target           Eq. 10 over the rows that predict the answer      runs.encode_all: adapt clears A_adj's
                                                                              input rows
  (every run)             how many rows Eq. 10 sums a record                runs.setup: row_counts

Each docstring names the finding it produced; the numbers are on the findings page (docs/findings.md).
"""
import dataclasses

import torch

import cat
import batches
import stg

# -----------------------------------------------------------------------------
# α against the model (--alpha-scale)


@torch.no_grad()
def starting_ratios(losses, model, examples: list, pad_id: int, device, autocast, n: int = 64,
                    attn: str = "fast") -> torch.Tensor:
    """C_i/N_i on the causal rows of up to n annotated records before training, read by `losses` (train.losses):
    α acts on the rows below it. A pretrained model can start above the paper's whole α range, where the hinge is
    zero on almost every row and CAT trains as vanilla (docs/findings.md, "The earlier grid")."""
    annotated = [ex for ex in examples if ex.n_cat_rows][:n]
    ratios = []
    was_training = model.training
    model.eval()
    for i in range(0, len(annotated), 8):
        with autocast:
            batch = batches.collate(annotated[i:i + 8], pad_id).to(device)
            cn = losses(model, batch, alpha=0.0, measure=True, attn=attn).cn
        ratios.append(cn.ratio[cn.counted].float().cpu())
    model.train(was_training)
    return torch.cat(ratios) if ratios else torch.zeros(0)


def place_alpha(cfg, ratios: torch.Tensor) -> None:
    """Print where the model starts (docs/design.md, "What α means"), and with --alpha-scale set α from it: k<K> in
    the studies, α = K × the starting median. With it CAT as published moved the attention as the paper says and
    OOD accuracy a little, up to the majority answer (docs/findings.md, "The α study")."""
    if not len(ratios):
        return
    q10, q50, q90 = torch.quantile(ratios, torch.tensor([0.1, 0.5, 0.9])).tolist()
    cfg.extra["cn_ratio_at_start"] = {"p10": q10, "median": q50, "p90": q90, "rows": len(ratios)}
    if cfg.alpha_scale > 0:
        cfg.alpha = cfg.alpha_scale * q50
        print(f"--alpha-scale {cfg.alpha_scale:g}: α = {cfg.alpha_scale:g} × median C/N {q50:.3f} = {cfg.alpha:.3f}")
    print(f"C/N on the causal rows before training: median {q50:.2f} (10th percentile {q10:.2f}, 90th {q90:.2f}), "
          f"{len(ratios)} rows" + (f"; the hinge acts on rows with C/N < α = {cfg.alpha:.3g} "
                                   f"({(ratios < cfg.alpha).float().mean():.0%} of them now)" if cfg.alpha > 0 else ""))


# -----------------------------------------------------------------------------
# The authors' published loss (--attn-loss div)


def div_loss(cn: cat.CausalRatio, alpha: float) -> torch.Tensor:
    """The loss of the authors' published code (myloss.py, compute_attention_constraint_loss_batch, its default
    loss_type="div"), not Eq. 10: -log(1 + C_i) / log(1 + N_i) on each counted row with C_i/N_i < alpha (0 on the
    others), summed and divided by the number of counted rows in the batch. Validation chose it on STG_M, where it
    was ahead of vanilla OOD up to the majority answer, and on STG_S in float32, where it was level
    (docs/findings.md, "The α study")."""
    below = cn.counted & (cn.ratio < alpha)
    per_row = -torch.log1p(cn.C) / torch.log1p(cn.N).clamp(min=torch.finfo(cn.N.dtype).tiny)
    return torch.where(below, per_row, torch.zeros_like(per_row)).sum() / cn.counted.sum().clamp(min=1)


# -----------------------------------------------------------------------------
# Eq. 9's other tokens (--contrast) and Eq. 10's rows (--rows): an encoded record adapted


def attribute_contrast(record: dict, task: str) -> list[dict]:
    """--contrast attributes: for each effect of the record's `important`, its input's other "Name: value" phrases
    (stg.attribute_spans), in `important`'s own layout, so that cat.adjacency marks them. With N_i over them, C/N
    compares the causes with the alternatives to them, where the paper's N_i, over every other token, is satisfied
    by attending to the whole list, spurious copies included; it is the one change that took OOD accuracy far past
    vanilla's and the majority answer (docs/findings.md, "In short")."""
    text, relations = record["input"], cat.relations(record.get("important"))
    named = [cause for _, values in relations for cause in values]
    # where the causes stand in the input, as cat.adjacency finds them: a whole phrase ("Smoking: 8") or, in the
    # authors' STG_H files, a bare value ("41.9%") inside its phrase; an attribute that holds one is not an other
    causes = [span for cause in named for span in cat.find_phrase(text, cause)]
    # causes named by value alone are contrasted with the others' values alone, so that C_i and N_i both average
    # over value tokens, not values against names and values
    by_value = bool(named) and not any(": " in cause for cause in named)
    others = []
    for _, _, start, end in stg.attribute_spans(text, task):
        if not any(s < end and e > start for s, e in causes):
            others.append(text[stg.PHRASE_RE[task].match(text, start).start("value") if by_value else start:end])
    return [{effect: others} for effect, _ in relations]


def input_contrast(n_tokens: int, n_prompt: int) -> torch.Tensor:
    """--contrast input: every row's N_i over the input's tokens but the sequence's first, where a pretrained model
    parks the attention it does not need (the attention sink), and not over the answer; so C/N can no longer rise by
    moving attention off the sink onto every input token. Needs no annotation beyond Eq. 4's. It stayed within the
    noise of vanilla, as the paper's N_i does (docs/findings.md, "In short"). (T, T) bool, unshifted, the same
    columns in every row."""
    mask = torch.zeros(n_tokens, n_tokens, dtype=torch.bool)
    mask[:, 1:n_prompt] = True
    return mask


def adapt(example: batches.Example, record: dict, tok, contrast: str = "all", rows: str = "all",
          task: str = "generic") -> batches.Example:
    """An encoded record (batches.encode) with --contrast's mask and --rows' rows; "all" and "all" leave it as it is.
    --rows target clears the rows of the input's tokens, so that once shifted only the rows that predict an answer
    token hold causes: the assistant-LLM annotations link phrases inside the question, ten times STG's rows a
    record, and the hinge over them made every downstream task worse; over the answer's rows the harm was gone on
    MAWPS and SVAMP, and so was any gain (docs/findings.md, "Table 2 and Table 5")."""
    if example.adj is None:
        return example
    adj, mask, n_prompt = example.adj, None, example.n_prompt
    if rows == "target":
        adj = adj.clone()
        adj[:n_prompt] = False
    if contrast == "input":
        mask = input_contrast(len(example.ids), n_prompt)
    elif contrast == "attributes":   # the same construction as A_adj (Eq. 4), the other attributes as the causes
        pieces = [record["input"], record["target"]]
        offsets = [span for _, spans in batches.piece_offsets(pieces, tok.backend) for span in spans]
        mask, _ = cat.adjacency(pieces, offsets, attribute_contrast(record, task))
        bos = int(tok.bos_id is not None)
        mask = torch.nn.functional.pad(mask, (bos, 1, bos, 1))
    return dataclasses.replace(example, adj=adj, contrast=mask)


def narrow_other(other: torch.Tensor, contrast: torch.Tensor | None) -> torch.Tensor:
    """Eq. 9's other tokens of each row (B, T, T), narrowed to those the shifted contrast mask marks (--contrast)."""
    return other if contrast is None else other & contrast.to(other.device)


# -----------------------------------------------------------------------------
# How many rows Eq. 10 sums


def row_counts(examples: list) -> dict:
    """How many rows L_attn runs over: per annotated record, the rows it counts (those that see a causal and another
    token) and those of them that predict a target token (the others sit inside the prompt). Eq. 10 sums over them,
    so the hinge's size beside L_next grows with their number (results/row_counts.md); the div loss averages."""
    annotated = [ex for ex in examples if ex.n_cat_rows]
    if not annotated:
        return {"annotated": 0, "rows": 0.0, "target_rows": 0.0}
    return {"annotated": len(annotated), "rows": sum(ex.n_cat_rows for ex in annotated) / len(annotated),
            "target_rows": sum(ex.n_cat_target_rows for ex in annotated) / len(annotated)}
