"""benchmarks/step.py: the CPU run end to end (workers in subprocesses), and its packed CAT batch against
train.collate of each record alone. No timing is asserted: only that the three variants computed the same step."""
import json
import sys
from pathlib import Path

import torch

import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step  # noqa: E402


def test_cpu_run_reports_three_variants_with_equal_losses(tmp_path):
    out = tmp_path / "step.json"
    step.main(["--shape", "tiny", "--batch", "2", "--seq-len", "96", "--repeats", "1", "--warmup", "0",
               "--threads", "1", "--dtype", "float32", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]["96"]
    assert set(rows) == set(step.VARIANTS)
    for name, row in rows.items():
        assert "error" not in row, f"{name}: {row.get('error')}"
        assert len(row["times_s"]) == 1 and row["median_s"] > 0, f"{name}: no timed step"
        assert row["peak_mem_bytes"] > 0 and row["mem_vs_vanilla"] > 0, f"{name}: no peak memory"
    # the same weights and tokens in three processes: L_next agrees, and the fast mass path gives the explicit L_attn
    assert abs(rows["explicit"]["l_next"] - rows["vanilla"]["l_next"]) < 1e-5
    assert abs(rows["fast"]["l_next"] - rows["vanilla"]["l_next"]) < 1e-5
    assert rows["explicit"]["l_attn"] > 0, "alpha should make the hinge active, else the comparison says nothing"
    assert abs(rows["fast"]["l_attn"] - rows["explicit"]["l_attn"]) < 1e-5, \
        f"fast L_attn {rows['fast']['l_attn']} != explicit {rows['explicit']['l_attn']}"
    assert rows["vanilla"]["l_attn"] == 0 and rows["vanilla"]["supervised_rows"] == 0


def labels_of(batch: train.Batch) -> torch.Tensor:
    """(B, T) labels, -100 off the loss positions: what position t predicts."""
    labels = torch.full(batch.ids.shape, -100, dtype=torch.long)
    labels.view(-1)[batch.target_pos] = batch.targets
    return labels


def test_packed_batch_is_collate_of_each_record_placed_side_by_side():
    _, tok = step.build(step.BenchConfig(shape="tiny"), "cpu")
    T = 250
    batch = step.packed_batch(tok, 2, T, "all", 42)
    ids, pad_mask, labels, mask = batch.ids, batch.pad_mask, labels_of(batch), batch.cat_mask
    assert ids.shape == labels.shape == (2, T) and mask.shape == (2, T, T) and bool(pad_mask.all())
    examples = [train.encode(r, tok)[0] for r in step.stg.make_records("stg_s_train", 42)]
    k = 0
    for b in range(2):
        t = 0
        while t + len(examples[k].ids) <= T:   # records that fit whole: the same tensors as collate of the record alone
            n = len(examples[k].ids)
            one = train.collate([examples[k]], tok.pad_id)
            ids1, labels1, mask1 = one.ids, labels_of(one), one.cat_mask
            assert torch.equal(ids[b, t:t + n], ids1[0]), f"row {b}, record {k}: ids differ"
            assert torch.equal(labels[b, t:t + n], labels1[0]), f"row {b}, record {k}: labels differ"
            assert torch.equal(mask[b, t:t + n, t:t + n], mask1[0]), f"row {b}, record {k}: CAT mask differs"
            assert not mask[b, t:t + n, :t].any(), f"row {b}, record {k}: mask reaches an earlier record"
            t, k = t + n, k + 1
        k += 1                                 # the record cut at T
    first = step.packed_batch(tok, 2, T, "first", 42).cat_mask
    n0 = len(examples[0].ids)
    assert torch.equal(first[0, :n0, :n0], mask[0, :n0, :n0]) and not first[0, n0:].any()
