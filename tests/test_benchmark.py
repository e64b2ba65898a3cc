"""benchmarks/step.py: the CPU run end to end (workers in subprocesses), and its packed CAT batch against
batches.collate of each record alone. benchmarks/generate.py: its plain loop against model.generate, and a run end to
end. No timing is asserted: only that the variants computed the same thing."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import batches
import hf
import model as M
import cli
import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import generate as decoding  # noqa: E402  (benchmarks/generate.py)
import step  # noqa: E402


def step_rows(tmp_path, *flags) -> dict:
    """benchmarks/step.py on the tiny shape, T = 96, one timed step per variant: {variant: row}."""
    out = tmp_path / "step.json"
    step.main(["--shape", "tiny", "--batch", "2", "--seq-len", "96", "--repeats", "1", "--warmup", "0",
               "--threads", "1", "--dtype", "float32", "--out", str(out), *flags])
    return json.loads(out.read_text())["results"]["96"]


def test_cpu_run_reports_three_variants_with_equal_losses(tmp_path):
    rows = step_rows(tmp_path)
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


def test_lora_steps_train_only_the_adapters_and_start_from_the_base_model(tmp_path):
    model, _ = step.build(step.BenchConfig(shape="tiny", lora=True), "cpu")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    targets = train.TrainConfig().lora_targets.split(",")
    assert len(trainable) == step.SHAPES["tiny"]["n_layers"] * len(targets) * 2, trainable   # A and B of each
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    lora, full = step_rows(tmp_path, "--lora"), step_rows(tmp_path)
    for name in step.VARIANTS:
        assert "error" not in lora[name], f"{name}: {lora[name].get('error')}"
        # B = 0 at the start (Hu et al. 2021), so the first step's losses are the full model's on the same weights
        assert abs(lora[name]["l_next"] - full[name]["l_next"]) < 1e-5, name
        assert abs(lora[name]["l_attn"] - full[name]["l_attn"]) < 1e-5, name
    with pytest.raises(SystemExit, match="leave out --lora"):
        step.main(["--shape", "tiny", "--lora", "--vs-transformers"])


def labels_of(batch: batches.Batch) -> torch.Tensor:
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
    examples = [batches.encode(r, tok)[0] for r in step.stg.make_records("stg_s_train", 42)]
    k = 0
    for b in range(2):
        t = 0
        while t + len(examples[k].ids) <= T:   # records that fit whole: the same tensors as collate of the record alone
            n = len(examples[k].ids)
            one = batches.collate([examples[k]], tok.pad_id)
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


# ---------------------------------------------------------------------------------------------
# benchmarks/generate.py: its plain loop is the reference that model.generate is timed against


def tiny_decoder(seed: int, vocab_size: int, dtype=torch.float64) -> M.Transformer:
    torch.manual_seed(seed)
    args = M.ModelArgs(vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                       hidden_dim=64)
    return M.Transformer(args).to(dtype).eval()


def test_plain_loop_answers_as_model_generate_does():
    """The baseline keeps every row to the end and grows its cache by torch.cat; rows that write EOS at different
    steps still get model.generate's tokens (float64: batch shapes cannot flip an argmax)."""
    model = tiny_decoder(0, 256)
    prompts = [list(range(7 + i, 7 + i + n)) for i, n in enumerate([3, 9, 1, 5, 12, 2, 7, 4])]
    free = M.generate(model, prompts, 12, eos_ids=[-1], pad_id=0)
    eos = sorted({free[0][2], free[3][5], free[6][8]})       # tokens that some rows write early, some late
    ours = M.generate(model, prompts, 12, eos, pad_id=0)
    assert len({len(row) for row in ours}) >= 3, "rows should end at several steps"
    assert decoding.plain_generate(model, prompts, 12, eos, pad_id=0) == ours


def test_decoding_benchmark_runs_end_to_end_and_refuses_weights_of_another_model(tmp_path, byte_bpe):
    """A tiny model folder, four records named as GSM8K's test file, full weights put over the model: both loops
    run every batch and the report holds what benchmarks/README.md quotes."""
    tok = hf.Tokenizer(byte_bpe, bos_id=byte_bpe.token_to_id("<s>"), eos_ids=[byte_bpe.token_to_id("</s>")],
                      pad_id=byte_bpe.token_to_id("</s>"))
    folder = tmp_path / "tiny"
    hf.save_model(tiny_decoder(0, byte_bpe.get_vocab_size(), torch.float32), tok, folder)
    weights = tmp_path / "trainable.safetensors"
    save_file({n: p.contiguous() for n, p in tiny_decoder(1, byte_bpe.get_vocab_size(),
                                                          torch.float32).named_parameters()}, str(weights))
    data = tmp_path / "gsm8k_test.jsonl"
    cli.write_jsonl(data, [{"input": f"Tom has {n} apples and buys {n + 2}. How many now?",
                            "target": f"{n} + {n + 2} = {2 * n + 2}\n#### {2 * n + 2}"} for n in range(1, 5)])
    out = tmp_path / "report.json"
    args = ["--model", str(folder), "--data", str(data), "--prompts", "3", "--batch", "2", "--max-new-tokens", "5",
            "--dtype", "float32", "--threads", "1", "--out", str(out)]
    figures = decoding.main(args + ["--weights", str(weights)])
    assert json.loads(out.read_text()) == figures
    assert figures["prompts"] == 3 and figures["task"] == "gsm8k" and figures["precision"] == "float32"
    assert figures["seconds"]["generate"] > 0 and figures["seconds"]["plain"] > 0
    assert 0 <= figures["answers_differ"] <= 3 and figures["new_tokens"]["max"] <= 5
    bad = tmp_path / "other.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(cli.InputError, match=r"other\.safetensors: tensor model\.layers\.0\.mlp\.up_proj\.weight"):
        decoding.main(args + ["--weights", str(bad)])
