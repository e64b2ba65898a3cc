"""train.py: the loop lowers the loss, CAT raises C/N, LoRA trains only the adapter, resume equals no interruption."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import batches
import hf
import runs
import variants
import cat
import cli
import stg
import train

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(stg_file, tmp_path, **kw) -> train.TrainConfig:
    base = dict(model="scratch", data=str(stg_file), scratch_dim=32, scratch_layers=2, scratch_heads=2,
                scratch_vocab=300, batch_size=8, epochs=2, lr=3e-3, out=str(tmp_path), eval=False)
    return train.TrainConfig(**{**base, **kw})


def fixed_batch(cfg, stg_file):
    records = stg.read_records(stg_file)[:8]
    data = stg.resolve_data(cfg.data)
    runs.resolve(cfg, data, "cpu")
    model, tok, lora_cfg = runs.build_model(cfg, records, "cpu", torch.float32)
    examples = runs.encode_all(records, tok, cfg)
    return model, batches.collate(examples, tok.pad_id)


def step_losses(model, batch, cfg) -> train.Losses:
    return train.losses(model, batch, cfg.alpha, attn=cfg.attn, measure=cfg.log_ratio, attn_loss=cfg.attn_loss)


def run_steps(model, batch, cfg, steps, gamma=1.0):
    """Plain AdamW steps on one fixed batch; returns the (L_next, L_attn, mean C/N) before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    model.eval()  # no dropout: the comparison is about the optimisation, not the noise
    history = []
    for _ in range(steps):
        out = step_losses(model, batch, cfg)
        history.append((out.l_next.item(), out.l_attn.item(), out.cn.ratio[out.cn.counted].mean().item()))
        (out.l_next + gamma * out.l_attn).backward()
        opt.step()
        opt.zero_grad()
    return history


@pytest.mark.parametrize("alpha,lora", [(0.0, False), (2.0, False), (2.0, True)], ids=["vanilla", "cat", "lora"])
def test_a_step_lowers_the_loss_on_a_fixed_batch(stg_file, tmp_path, alpha, lora):
    cfg = tiny_config(stg_file, tmp_path, alpha=alpha, lora=lora, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model, batch = fixed_batch(cfg, stg_file)
    history = run_steps(model, batch, cfg, steps=2)
    (before_next, before_attn, _), (after_next, after_attn, _) = history
    assert after_next + after_attn < before_next + before_attn, history


def test_cat_raises_the_causal_ratio_and_vanilla_does_not_touch_it(stg_file, tmp_path):
    """CAT with α above the starting C/N pushes attention onto the causal tokens within a few steps."""
    cfg = tiny_config(stg_file, tmp_path, alpha=3.0, lr=1e-2)
    model, batch = fixed_batch(cfg, stg_file)
    history = run_steps(model, batch, cfg, steps=8, gamma=10.0)
    first, last = history[0][2], history[-1][2]
    assert last > first + 0.2, f"mean C/N went {first:.3f} -> {last:.3f}"
    assert history[-1][1] < history[0][1]


def test_fast_and_explicit_attention_give_the_same_losses_and_gradients(stg_file, tmp_path):
    grads = {}
    for attn in ("fast", "explicit"):
        cfg = tiny_config(stg_file, tmp_path, alpha=2.0, attn=attn)
        model, batch = fixed_batch(cfg, stg_file)
        model.eval()
        out = step_losses(model, batch, cfg)
        (out.l_next + out.l_attn).backward()
        grads[attn] = (out.l_attn.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads["fast"][0] == pytest.approx(grads["explicit"][0], abs=1e-5)
    for name, g in grads["fast"][1].items():
        torch.testing.assert_close(g, grads["explicit"][1][name], atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("attn", ["fast", "explicit"])
def test_a_batch_padded_to_a_multiple_gives_the_same_losses_and_gradients(stg_file, tmp_path, attn):
    """--pad-multiple only appends pads after every sequence's last token: no real token sees them, L_next and L_attn
    read no pad row, so the losses and gradients are those of the unpadded batch."""
    cfg = tiny_config(stg_file, tmp_path, alpha=2.0, attn=attn)
    records = stg.read_records(stg_file)[:8]
    runs.resolve(cfg, stg.resolve_data(cfg.data), "cpu")
    model, tok, _ = runs.build_model(cfg, records, "cpu", torch.float32)
    model.eval()
    examples = runs.encode_all(records, tok, cfg)
    longest = max(len(ex.ids) for ex in examples)
    found = {}
    for multiple in (1, 16, 64):
        batch = batches.collate(examples, tok.pad_id, multiple)
        assert batch.ids.shape[1] % multiple == 0 and longest <= batch.ids.shape[1] < longest + multiple
        model.zero_grad()
        out = step_losses(model, batch, cfg)
        (out.l_next + out.l_attn).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        found[multiple] = (out.l_next.item(), out.l_attn.item(), grads)
    assert found[1][1] > 0, "the hinge must be active, else its padding says nothing"
    assert 64 - longest % 64 > 16, "the records' length should leave more than one pad block to 64"
    for multiple in (16, 64):
        assert found[multiple][0] == pytest.approx(found[1][0], rel=1e-6)
        assert found[multiple][1] == pytest.approx(found[1][1], rel=1e-6)
        for name, g in found[1][2].items():
            torch.testing.assert_close(found[multiple][2][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_collate_masks_only_target_tokens_and_shifts_the_adjacency(stg_file, tmp_path):
    cfg = tiny_config(stg_file, tmp_path, alpha=1.0)
    records = stg.read_records(stg_file)[:2]
    _, tok, _ = runs.build_model(cfg, records, "cpu", torch.float32)
    examples = runs.encode_all(records, tok, cfg)
    batch = batches.collate(examples, tok.pad_id)
    ids, pad_mask, mask = batch.ids, batch.pad_mask, batch.cat_mask
    T = ids.shape[1]
    for b, ex in enumerate(examples):
        n = len(ex.ids)
        target = tok.encode(records[b]["target"]) + [tok.eos_ids[0]]
        mine = (batch.target_pos >= b * T) & (batch.target_pos < (b + 1) * T)
        assert batch.targets[mine].tolist() == target
        assert (batch.target_pos[mine] - b * T).tolist() == list(range(ex.n_prompt - 1, n - 1)), "t predicts t + 1"
        assert pad_mask[b].sum() == n
        assert torch.equal(mask[b, :n - 1, :n], ex.adj[1:n, :n])     # row i holds adjacency row i+1
        # the fast path's rows are exactly the rows that hold causal tokens, each with its counts over j <= i
        has = mask[b].any(-1).nonzero().flatten().tolist()
        assert batch.causal_rows.rows[b, :len(has)].tolist() == has
        for r, i in enumerate(has):
            assert batch.causal_rows.n_causal[b, r] == mask[b, i, :i + 1].sum()
            assert batch.causal_rows.n_other[b, r] == i + 1 - mask[b, i, :i + 1].sum()
        # the row that predicts the first answer token attends to the three causal attributes
        row = mask[b, ex.n_prompt - 1]
        causal_text = tok.decode(ids[b][row].tolist())
        for phrase in records[b]["important"][0][records[b]["target"]]:
            assert phrase.replace(" ", "") in causal_text.replace(" ", "")


def test_lr_schedule_warms_up_then_decays_to_zero():
    cfg = train.TrainConfig(lr=1.0, warmup_ratio=0.1)
    lrs = [train.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="compares against Linux's /proc/self/status")
def test_peak_rss_matches_the_kernels_high_water_mark():
    """CPU runs log max_rss_gib: the process's peak resident memory, as /proc reports it (VmHWM, in kB)."""
    hwm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmHWM:"))
    assert runs.peak_rss_gib() == pytest.approx(hwm_kib / 2**20, rel=0.05)


def test_lora_run_trains_only_the_adapter_and_saves_peft_layout(stg_file, tmp_path):
    cfg = tiny_config(stg_file, tmp_path, alpha=2.0, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model, batch = fixed_batch(cfg, stg_file)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run_steps(model, batch, cfg, steps=2)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".lora_B." in n for n in changed), "the adapter trained"
    assert all(".lora_" in n for n in changed), f"base weights changed: {[n for n in changed if '.lora_' not in n]}"
    cfg = tiny_config(stg_file, tmp_path, alpha=2.0, lora=True, lora_r=4, lora_alpha=8, epochs=1)
    run = train.train(cfg)
    assert (run / "adapter_config.json").exists() and (run / "adapter_model.safetensors").exists()
    assert json.loads((run / "adapter_config.json").read_text())["r"] == 4


def test_a_scratch_lora_run_saves_its_base_and_loads_as_it_was_trained(stg_file, tmp_path, monkeypatch):
    """A scratch model exists only in its run: a LoRA run over one saves it in base/, which the adapter names, so
    that eval.py can load the run. Reference: the trained model the run tested itself with, merged."""
    import copy

    import eval as evaluation
    import model as M
    tested, trained = evaluation.evaluate, {}

    def keep(model, *args, **kwargs):
        trained.update(M.merge_lora(copy.deepcopy(model)).state_dict())
        return tested(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", keep)
    cfg = tiny_config(stg_file, tmp_path, lora=True, lora_r=4, lora_alpha=8, epochs=1, eval=True, eval_limit=1)
    run = train.train(cfg)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    loaded = hf.load_model(str(run))[0].state_dict()
    assert trained and loaded.keys() == trained.keys()
    for name, weight in loaded.items():
        torch.testing.assert_close(weight, trained[name], atol=0, rtol=0, msg=name)


def test_resume_equals_an_uninterrupted_run(stg_file, tmp_path, capsys):
    """Stop after 5 steps (mid-epoch, with dropout on), resume: same final weights and losses as one run. The
    resumed run's last lines say where it resumed, so that its minutes are not read as the whole run's."""
    whole = train.train(tiny_config(stg_file, tmp_path / "a", alpha=2.0, lora_dropout=0.1))
    cfg = tiny_config(stg_file, tmp_path / "b", alpha=2.0, lora_dropout=0.1, stop_after=5, save_every=1)
    part = train.train(cfg)
    assert not (part / "model.safetensors").exists()
    total = re.search(r": (\d+) steps in [\d.]+ min \(cat", capsys.readouterr().out).group(1)
    train.train(train.TrainConfig(resume=str(part)))
    assert f": {total} steps, resumed at step 5: " in capsys.readouterr().out
    a, b = (hf.load_model(str(run))[0].state_dict() for run in (whole, part))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)
    metrics = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, part)]
    assert all(m["max_rss_gib"] > 0 for m in metrics[0]), "CPU runs log their peak memory"
    assert [m["step"] for m in metrics[1]] == [m["step"] for m in metrics[0]]
    assert metrics[1][-1]["l_next"] == pytest.approx(metrics[0][-1]["l_next"], abs=1e-6)


def test_a_run_stopped_while_it_is_tested_resumes_and_is_tested_again(stg_file, tmp_path, monkeypatch):
    """Testing comes after the last checkpoint and may take hours (GSM8K's worked solutions): a run stopped then
    keeps that checkpoint, and --resume tests the same trained weights instead of training from nothing."""
    import eval as evaluation
    tested = evaluation.evaluate

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "evaluate", stopped)
    cfg = tiny_config(stg_file, tmp_path, epochs=1, save_every=0, eval=True, eval_limit=2)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    (run,) = [path.parent for path in tmp_path.glob("*/train_config.json")]
    steps = len((run / "metrics.jsonl").read_text().splitlines())   # every step of the one epoch, checkpointed
    assert steps > 0 and runs.folder_state(run) == f"a run interrupted at step {steps}"
    trained = hf.load_model(str(run))[0].state_dict()
    monkeypatch.setattr(evaluation, "evaluate", tested)
    train.train(train.TrainConfig(resume=str(run)))
    assert runs.folder_state(run) == "a finished run" and not (run / "checkpoint").exists()
    assert set(json.loads((run / "results.json").read_text())["stg_small"]) == {"test"}
    for name, weight in hf.load_model(str(run))[0].state_dict().items():
        torch.testing.assert_close(weight, trained[name], atol=0, rtol=0, msg=name)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == steps, "no step ran twice"


@pytest.mark.parametrize("save_every", [0, 3])
def test_a_test_stopped_midway_continues_from_the_answers_it_kept(stg_file, tmp_path, decoder, save_every):
    """A checkpoint saved at the last step names the weights under test: a run stopped in its second test split and
    resumed decodes that split only, and its predictions equal those of a run never stopped. With checkpoints every
    3 of the 5 steps the last one is older than the weights tested, so nothing is kept and everything is decoded
    again after the resume (which trains steps 4 and 5 again)."""
    cfg = dict(epochs=1, save_every=save_every, eval=True, eval_limit=2, val_frac=0.25)   # 36 records, 5 steps
    whole = train.train(tiny_config(stg_file, tmp_path / "whole", **cfg))
    decoder.batches.clear()
    decoder.stop[:] = [2]   # val is done (one batch), test is the next
    with pytest.raises(KeyboardInterrupt):
        train.train(tiny_config(stg_file, tmp_path / "stopped", **cfg))
    (run,) = [path.parent for path in (tmp_path / "stopped").glob("*/train_config.json")]
    assert runs.folder_state(run) == f"a run interrupted at step {5 if save_every == 0 else 3}"
    partial = run / "predictions_stg_small_val.partial.jsonl"
    assert len(partial.read_text().splitlines()) == 2 if save_every == 0 else not partial.exists()  # header, batch
    decoder.batches.clear()
    decoder.stop.clear()
    train.train(train.TrainConfig(resume=str(run)))
    assert not list(run.glob("*.partial.jsonl"))
    if save_every == 0:
        assert decoder.batches == [2], "only the test split is decoded again"
        for split in ("val", "test"):
            name = f"predictions_stg_small_{split}.jsonl"
            assert stg.read_records(run / name) == stg.read_records(whole / name)
        assert json.loads((run / "results.json").read_text()) == json.loads((whole / "results.json").read_text())
    else:
        assert decoder.batches == [2, 2], "val and test decoded again"


def test_a_lora_run_keeps_its_answers_for_the_same_base_model_only(stg_file, tmp_path, decoder):
    """A LoRA run's answers depend on its frozen base model too: a run stopped in its second test split and resumed
    after the base model's weights file was written again decodes both splits again."""
    base = train.train(tiny_config(stg_file, tmp_path / "base", epochs=1))       # a model folder in HF layout
    cfg = tiny_config(stg_file, tmp_path / "lora", model=str(base), lora=True, lora_r=2, lora_alpha=4, epochs=1,
                      eval=True, eval_limit=2, val_frac=0.25)
    decoder.stop[:] = [2]   # val is done (one batch), test is the next
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    (run,) = [path.parent for path in (tmp_path / "lora").glob("*/train_config.json")]
    assert (run / "predictions_stg_small_val.partial.jsonl").exists()
    stat = (base / "model.safetensors").stat()
    os.utime(base / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    decoder.batches.clear()
    decoder.stop.clear()
    train.train(train.TrainConfig(resume=str(run)))
    assert decoder.batches == [2, 2], "val and test decoded again"


def test_cat_without_annotations_stops_with_a_clear_message(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"input": "2 + 2 = Answer: ", "target": "4"}) + "\n")
    with pytest.raises(cli.InputError, match="important"):
        train.train(tiny_config(path, tmp_path, alpha=1.0))


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"input": "a", "target": "b"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl.*2"):
        train.train(tiny_config(path, tmp_path))


def test_cli_scratch_stg_s_one_epoch(tmp_path):
    """The README's embedded default, shortened to one epoch: trains, saves, evaluates IID and OOD."""
    cmd = [sys.executable, "train.py", "--model", "scratch", "--data", "stg_s", "--epochs", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "scratch-stg_s-vanilla-s42"
    assert (run / "model.safetensors").exists() and (run / "metrics.jsonl").exists()
    results = json.loads((run / "results.json").read_text())["stg_s"]
    assert {"iid", "ood"} <= set(results) and all(0 <= results[s]["accuracy"] <= 1 for s in ("iid", "ood"))


def test_a_saved_scratch_model_is_prompted_as_it_was_trained(stg_file, tmp_path):
    """eval.py on a saved run builds the training prefix: [bos] + encode(input), BOS read back from the files."""
    import eval as evaluation
    cfg = tiny_config(stg_file, tmp_path)
    records = stg.read_records(stg_file)[:2]
    model, tok, _ = runs.build_model(cfg, records, "cpu", torch.float32)
    hf.save_model(model, tok, tmp_path / "saved")
    _, reloaded = hf.load_model(str(tmp_path / "saved"))
    ex, _ = batches.encode(records[0], tok)
    assert reloaded.bos_id == tok.bos_id is not None
    assert evaluation.prompt_ids(reloaded, records[0]["input"]) == ex.ids[:ex.n_prompt]


def full_logits_losses(model, batch, alpha):
    """Reference L_next and L_attn: logits at every position (B, T, V) with a padding mask, labels -100 off the
    target, and the Re-Attention loss of the explicit maps, as the equations read."""
    labels = torch.full(batch.ids.shape, -100, dtype=torch.long)
    labels.view(-1)[batch.target_pos] = batch.targets
    out = model(batch.ids, batch.pad_mask.long(), return_attn=True)
    l_next = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), reduction="sum")
    causal, other = cat.causal_and_other(batch.cat_mask, batch.pad_mask)
    cn = cat.causal_ratio(*cat.attention_sums(cat.average_attention(out.attentions), causal, other))
    return l_next / len(batch.targets), cat.hinge(cn, alpha)


def test_logits_at_the_loss_positions_equal_the_full_logits_path(stg_file, tmp_path):
    """L_next from the lm_head applied at the target positions only equals the full (B, T, V) path: loss and
    gradients, float32, the fast CAT path against the explicit maps."""
    cfg = tiny_config(stg_file, tmp_path, alpha=2.0, dtype="float32")
    model, batch = fixed_batch(cfg, stg_file)
    model.eval()
    grads = []
    for compute in (lambda: full_logits_losses(model, batch, cfg.alpha),
                    lambda: (lambda o: (o.l_next, o.l_attn))(step_losses(model, batch, cfg))):
        model.zero_grad()
        l_next, l_attn = compute()
        (l_next + l_attn).backward()
        grads.append((l_next.item(), l_attn.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref_next, ref_attn, ref), (got_next, got_attn, got) = grads
    assert ref_attn > 0 and got_next == pytest.approx(ref_next, abs=1e-5)
    assert got_attn == pytest.approx(ref_attn, abs=1e-5)
    assert len(batch.targets) < batch.ids.numel() / 10, "the test means something: few loss positions"
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_a_bfloat16_step_stays_close_to_the_float32_step(stg_file, tmp_path):
    """--dtype bfloat16 (autocast, float32 weights, float32 softmax and losses) against float32 on the same batch.
    Tolerance: bf16 keeps 8 significant bits, a relative rounding of 2^-9 ≈ 0.2% on every matmul input; through
    2 layers and the head these add to well under 1% of the losses and gradients. 2% on the losses and a gradient
    cosine of 0.99 leave room for that and still catch a real error (a bf16 softmax or loss is off by more)."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(stg_file, tmp_path, alpha=2.0, dtype=dtype)
        model, batch = fixed_batch(cfg, stg_file)
        model.eval()
        with cli.autocast("cpu", cfg.dtype):
            out = step_losses(model, batch, cfg)
            (out.l_next + out.l_attn).backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[dtype] = (out.l_next.item(), out.l_attn.item(), grad, out.l_next.dtype)
    (n32, a32, g32, _), (n16, a16, g16, loss_dtype) = results["float32"], results["bfloat16"]
    assert loss_dtype == torch.float32, "the losses are computed in float32 under autocast"
    assert a32 > 0 and n16 == pytest.approx(n32, rel=2e-2) and a16 == pytest.approx(a32, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
    assert not torch.equal(g16, g32), "bf16 autocast was in effect"


def test_auto_precision_is_bf16_where_the_cpu_has_native_bf16_and_is_recorded(stg_file, tmp_path):
    assert cli.precision("cpu", "auto") == ("bfloat16" if cli.native_bf16_cpu() else "float32")
    assert cli.precision("cuda", "auto") == "bfloat16" and cli.precision("cpu", "float32") == "float32"
    run = train.train(tiny_config(stg_file, tmp_path, epochs=1))
    assert json.loads((run / "train_config.json").read_text())["dtype"] == cli.precision("cpu", "auto")


def test_row_counts_match_a_loop_over_the_shifted_adjacency(tmp_path):
    """Eq. 10 sums one hinge term per counted row: the rows inside the prompt and those predicting the answer,
    counted against a plain loop over the shifted adjacency (a row counts when it sees a causal and another token)."""
    records = [{"input": "Tom has 3 apples and buys 4 more. How many apples now?", "target": "Answer: 7.0",
                "important": [{"4 more": ["3 apples"]}, {"7.0": ["3 apples", "4 more"]}]},
               {"input": "Tom has 3 apples.", "target": "Answer: 3.0", "important": [{"3.0": ["3 apples"]}]},
               {"input": "No annotation here.", "target": "Answer: 1.0"}]
    cfg = train.TrainConfig(model="scratch", data=str(tmp_path / "x.jsonl"), scratch_dim=32, scratch_layers=2,
                            scratch_heads=2, scratch_vocab=300)
    _, tok, _ = runs.build_model(cfg, records, "cpu", None)
    examples = runs.encode_all(records, tok, cfg)
    expected = []
    for ex in examples[:2]:
        adj, rows, answer = cat.shift_up(ex.adj), 0, 0
        for i in range(len(ex.ids)):
            causal = sum(bool(adj[i, j]) for j in range(i + 1))
            if causal and causal < i + 1:
                rows += 1
                answer += i >= ex.n_prompt - 1           # row i predicts token i + 1, a target token from n_prompt on
        expected.append((rows, answer))
    assert [(ex.n_cat_rows, ex.n_cat_target_rows) for ex in examples[:2]] == expected
    target = tok.backend.encode("Answer: 7.0", add_special_tokens=False)
    ids_7 = sum(end > len("Answer: ") for _, end in target.offsets)     # the tokens of "7.0" in the target
    assert expected[0][1] == ids_7 and expected[0][0] > ids_7     # the answer's rows, and more inside the prompt
    counts = variants.row_counts(examples)
    assert counts["annotated"] == 2                                  # the record without annotation is not averaged
    assert counts["rows"] == pytest.approx((expected[0][0] + expected[1][0]) / 2)
    assert counts["target_rows"] == pytest.approx((expected[0][1] + expected[1][1]) / 2)


# --contrast attributes (not in the paper): N_i over the record's other attributes instead of every other token

CONTRAST_RECORD = {"input": "Here is the statistical data for a person. Please predict the probability of cancer. "
                            "Room size: 3, Smoking: 7, Hormones: 7, Weight: 2, Yellow fingers: 9, Exercise: 4, "
                            "Certain gene: 1, Clothing size: 5 Answer: ",
                   "target": "High Risk", "important": [{"High Risk": ["Smoking: 7", "Weight: 2", "Exercise: 4"]}]}
OTHER_ATTRIBUTES = ["Room size: 3", "Hormones: 7", "Yellow fingers: 9", "Certain gene: 1", "Clothing size: 5"]


def test_attribute_contrast_lists_the_other_attributes_in_the_layout_of_important():
    assert variants.attribute_contrast(CONTRAST_RECORD, "stg_e") == [{"High Risk": OTHER_ATTRIBUTES}]
    assert variants.attribute_contrast(CONTRAST_RECORD, "mawps") == [{"High Risk": []}]   # no known attributes


# The authors' STG_H layout (made-up values): their spelling of the 14 attributes, units, causes as bare values
STG_H_AUTHORS = {"input": "Industrial Emissions: 47.9; Vehicle Emissions: 28.9; Coal Dependency: 41.9%; "
                          "Agricultural Burning: 19.2; Urban Green Coverage: 73.8%; Meteorological Dispersion: 74.0. "
                          "Ice Cream Sales Index: 26.0; Allergy Complaints Level: 3.6; Renewable Stock Index: 51; "
                          "Public Transport Subscriptions (k): 4.2; Water Awareness Score: -6.9. "
                          "City Anniversary: 38th; Average Internet Speed: 114.2Mbps; Number of Libraries: 17. "
                          "Given these diverse conditions, what is the projected Air Quality Index (AQI) on a 0-100 "
                          "scale? Answer: ",
                 "target": 32, "important": [{"Answer: 32": ["47.9", "28.9", "41.9%", "19.2", "73.8%", "74.0"]}]}


def test_attribute_contrast_covers_the_14_attributes_of_the_authors_stg_h_layout():
    text = STG_H_AUTHORS["input"]
    spans = stg.attribute_spans(text, "stg_h")
    assert [name for name, *_ in spans] == [*stg.H_CAUSAL, *stg.H_SPURIOUS, *stg.H_IRRELEVANT]   # ours, in order
    assert [kind for _, kind, *_ in spans] == ["causal"] * 6 + ["spurious"] * 5 + ["irrelevant"] * 3
    assert [text[s:e] for *_, s, e in spans][2::9] == ["Coal Dependency: 41.9%", "City Anniversary: 38th"]
    assert stg.parse_attributes(text, "stg_h")["Internet speed"] == 114.2
    # a cause given as its bare value ("41.9%") keeps its whole attribute out of the contrast, and the others are
    # given by their values too, so that C_i and N_i both average over values
    others = ["26.0", "3.6", "51", "4.2", "-6.9", "38th", "114.2Mbps", "17"]
    assert variants.attribute_contrast(STG_H_AUTHORS, "stg_h") == [{"Answer: 32": others}]
    assert stg.attribute_spans("Number of Libraries: 17stones", "stg_h") == []      # a unit ends at a word's end


def test_contrast_attributes_refuses_records_whose_attributes_it_does_not_know(tmp_path, capsys):
    record = {**CONTRAST_RECORD, "input": CONTRAST_RECORD["input"].replace("Room size", "Room area")
              .replace("Hormones", "Hormone").replace("Yellow fingers", "Yellow nails")
              .replace("Certain gene", "Gene").replace("Clothing size", "Shoe size")}
    cfg = train.TrainConfig(model="scratch", data=str(tmp_path / "stg_s.jsonl"), scratch_dim=32, scratch_layers=2,
                            scratch_heads=2, scratch_vocab=300, contrast="attributes", attn="explicit")
    _, tok, _ = runs.build_model(cfg, [record], "cpu", None)
    with pytest.raises(cli.InputError, match=r"--contrast attributes: no annotated record .* \(e\.g\. the one whose "
                                             r"input begins 'Here is the statistical data"):
        runs.encode_all([record], tok, cfg, "stg_e")
    runs.encode_all([record, CONTRAST_RECORD], tok, cfg, "stg_e")            # one of two: said, not refused
    assert "--contrast attributes: 1 of 2 annotated records have no other attribute" in capsys.readouterr().out
    longer = {**record, "input": "These are this year's figures, written down at the clinic. " + record["input"]}
    cfg.max_len = len(runs.encode_all([CONTRAST_RECORD], tok, cfg, "stg_e")[0].ids)
    assert len(runs.encode_all([longer, CONTRAST_RECORD], tok, cfg, "stg_e")) == 1   # `longer` is skipped ...
    assert "have no other attribute" not in capsys.readouterr().out                    # ... and not counted


def test_the_contrast_mask_marks_the_other_attributes_on_the_causal_rows(tmp_path):
    cfg = train.TrainConfig(model="scratch", data=str(tmp_path / "stg_s.jsonl"), scratch_dim=32, scratch_layers=2,
                            scratch_heads=2, scratch_vocab=300, contrast="attributes", attn="explicit")
    _, tok, _ = runs.build_model(cfg, [CONTRAST_RECORD], "cpu", None)
    ex, = runs.encode_all([CONTRAST_RECORD], tok, cfg, "stg_e")
    plain, _ = batches.encode(CONTRAST_RECORD, tok)
    assert torch.equal(ex.adj, plain.adj)                                  # the causal adjacency is untouched
    assert torch.equal(ex.contrast.any(-1), ex.adj.any(-1))                # the same rows: the answer's tokens
    assert not (ex.contrast & ex.adj).any()
    row = ex.contrast[ex.n_prompt]                                         # the first answer token's row
    text = tok.decode([ex.ids[j] for j in row.nonzero().flatten().tolist()]).replace(" ", "")
    assert text == "".join(OTHER_ATTRIBUTES).replace(" ", "")
    # the rows L_attn counts, against a loop over the shifted masks: those seeing a cause and a contrast token
    adj, contrast = cat.shift_up(ex.adj), cat.shift_up(ex.contrast)
    rows = [i for i in range(len(ex.ids)) if adj[i, :i + 1].any() and (contrast[i, :i + 1] & ~adj[i, :i + 1]).any()]
    assert ex.n_cat_rows == len(rows) == ex.n_cat_target_rows > 0


@pytest.mark.parametrize("contrast", ["attributes", "input"])
def test_contrast_losses_equal_a_loop_over_the_models_attention(stg_file, tmp_path, contrast):
    cfg = tiny_config(stg_file, tmp_path, alpha=2.0, contrast=contrast, attn="explicit")
    records = stg.read_records(stg_file)[:4]
    runs.resolve(cfg, stg.resolve_data(cfg.data), "cpu")
    model, tok, _ = runs.build_model(cfg, records, "cpu", torch.float32)
    model.eval()
    batch = batches.collate(runs.encode_all(records, tok, cfg, "stg_e"), tok.pad_id)
    out = train.losses(model, batch, cfg.alpha, attn="explicit")
    with torch.no_grad():
        probs = model(batch.ids, return_attn=True).attentions        # L x (B, H, T, T)
    avg = sum(p.mean(1) for p in probs) / len(probs)
    expected, ratios = 0.0, []
    for b in range(len(records)):
        for i in range(int(batch.pad_mask[b].sum())):
            causal = [avg[b, i, j] for j in range(i + 1) if batch.cat_mask[b, i, j]]
            other = [avg[b, i, j] for j in range(i + 1) if batch.contrast_mask[b, i, j] and not batch.cat_mask[b, i, j]]
            if causal and other:
                ratios.append(float(sum(causal) / len(causal) / (sum(other) / len(other))))
                expected += max(0.0, cfg.alpha - ratios[-1])
    assert out.l_attn.item() == pytest.approx(expected / len(records), rel=1e-5)
    assert out.cn.ratio[out.cn.counted].tolist() == pytest.approx(ratios, rel=1e-5)
    with pytest.raises(ValueError, match="explicit"):
        train.losses(model, batch, cfg.alpha, attn="fast")


def test_the_input_contrast_marks_the_input_but_its_first_token_on_every_row(tmp_path):
    path = tmp_path / "mawps_train.jsonl"        # any task: the input contrast needs no "Name: value" structure
    record = {"input": "Tom has 3 apples and buys 4 more. ", "target": "Answer: 7.0",
              "important": [{"7.0": ["3 apples", "4 more"]}, {"4 more": ["buys"]}]}
    cfg = train.TrainConfig(model="scratch", data=str(path), scratch_dim=32, scratch_layers=2, scratch_heads=2,
                            scratch_vocab=300, contrast="input", attn="explicit")
    _, tok, _ = runs.build_model(cfg, [record], "cpu", None)
    ex, = runs.encode_all([record], tok, cfg, "mawps")
    plain, _ = batches.encode(record, tok)
    assert torch.equal(ex.adj, plain.adj) and ex.ids == plain.ids          # the causal adjacency is untouched
    columns = list(range(1, ex.n_prompt))                                  # bos and the answer left out
    assert ex.ids[0] == tok.bos_id and all(row.nonzero().flatten().tolist() == columns for row in ex.contrast)
    assert tok.decode([ex.ids[j] for j in columns]) == record["input"]     # the whole input, nothing else
    # the rows L_attn counts, against a loop: those seeing a cause and another input token; rows inside the prompt too
    adj, contrast = cat.shift_up(ex.adj), cat.shift_up(ex.contrast)
    rows = [i for i in range(len(ex.ids)) if adj[i, :i + 1].any() and (contrast[i, :i + 1] & ~adj[i, :i + 1]).any()]
    assert ex.n_cat_rows == len(rows) > ex.n_cat_target_rows > 0


# --rows target (not in the paper): Eq. 10 over the rows that predict an answer token only

MATH_RECORDS = [{"input": "Tom has 3 apples and buys 4 more. ", "target": "Answer: 7.0",
                 "important": [{"7.0": ["3 apples", "4 more"]}, {"4 more": ["buys"]}]},
                {"input": "Ann had 9 pens and gave away 2. ", "target": "Answer: 7.0",
                 "important": [{"7.0": ["9 pens", "gave away 2"]}, {"gave away 2": ["Ann had"]}]}]


def test_rows_target_keeps_the_answer_rows_of_the_adjacency_and_drops_those_inside_the_input(tmp_path):
    cfg = train.TrainConfig(model="scratch", data=str(tmp_path / "mawps_train.jsonl"), scratch_dim=32,
                            scratch_layers=2, scratch_heads=2, scratch_vocab=300, rows="target")
    _, tok, _ = runs.build_model(cfg, MATH_RECORDS, "cpu", None)
    # the second record has causes on both sides of the boundary: the input's last token and the answer's first
    boundary = {"input": "Tom has 3 apples and buys 4 more", "target": "7.0",
                "important": [{"7.0": ["3 apples", "4 more"]}, {"4 more": ["buys"]}]}
    for record in (MATH_RECORDS[0], boundary):
        ex, = runs.encode_all([record], tok, cfg, "mawps")
        plain, _ = batches.encode(record, tok)
        assert ex.ids == plain.ids and ex.labels == plain.labels
        adj, full = cat.shift_up(ex.adj), cat.shift_up(plain.adj)
        kept = [i for i in range(len(ex.ids)) if adj[i].any()]
        answer = [i for i in range(len(ex.ids)) if full[i].any() and i >= plain.n_prompt - 1]  # row i predicts i + 1
        assert kept == answer and all(torch.equal(adj[i], full[i]) for i in kept)
        causes = tok.decode([ex.ids[j] for j in adj[kept[0]].nonzero().flatten().tolist()])
        assert causes.replace(" ", "") == "3apples4more"                 # "7.0" is caused by the two quantities
        assert ex.n_cat_rows == ex.n_cat_target_rows == plain.n_cat_target_rows < plain.n_cat_rows
    assert full[plain.n_prompt - 2].any() and answer[0] == plain.n_prompt - 1    # the boundary's rows, both sides


def test_rows_target_loss_equals_the_hinge_over_the_answer_rows_of_the_full_mask(tmp_path):
    path = tmp_path / "mawps_train.jsonl"
    cli.write_jsonl(path, MATH_RECORDS)
    cfg = train.TrainConfig(model="scratch", data=str(path), scratch_dim=32, scratch_layers=2, scratch_heads=2,
                            scratch_vocab=300, rows="target", alpha=3.0)
    model, tok, _ = runs.build_model(cfg, MATH_RECORDS, "cpu", torch.float32)
    model.eval()
    batch = batches.collate(runs.encode_all(MATH_RECORDS, tok, cfg, "mawps"), tok.pad_id)
    full = batches.collate([batches.encode(r, tok)[0] for r in MATH_RECORDS], tok.pad_id)     # the paper's rows
    with torch.no_grad():
        probs = model(full.ids, return_attn=True).attentions
    avg = sum(p.mean(1) for p in probs) / len(probs)
    n_prompt = [batches.encode(r, tok)[0].n_prompt for r in MATH_RECORDS]
    expected = 0.0
    for b in range(len(MATH_RECORDS)):
        for i in range(n_prompt[b] - 1, int(full.pad_mask[b].sum())):          # the answer's rows only
            causal = [avg[b, i, j] for j in range(i + 1) if full.cat_mask[b, i, j]]
            other = [avg[b, i, j] for j in range(i + 1) if not full.cat_mask[b, i, j]]
            if causal and other:
                expected += max(0.0, cfg.alpha - float(sum(causal) / len(causal) / (sum(other) / len(other))))
    for attn in ("fast", "explicit"):
        out = train.losses(model, batch, cfg.alpha, attn=attn)
        assert out.l_attn.item() == pytest.approx(expected / len(MATH_RECORDS), rel=1e-5)
    assert train.losses(model, full, cfg.alpha).l_attn.item() > out.l_attn.item()   # the input's rows add to it


def test_contrast_attributes_refuses_data_without_attributes(tmp_path, capsys):
    path = tmp_path / "mawps_train.jsonl"
    cli.write_jsonl(path, [{"input": "Tom has 3 apples.", "target": "Answer: 3.0",
                            "important": [{"3.0": ["3 apples"]}]}])
    cfg = train.TrainConfig(model="scratch", data=str(path), contrast="attributes", attn="explicit", alpha=1.0,
                            out=str(tmp_path / "runs"))
    with pytest.raises(cli.InputError, match="not STG data"):
        runs.setup(cfg, train.losses, train.adamw)


@pytest.mark.parametrize("attn", ["fast", "explicit"])
def test_a_default_training_step_goes_through_the_papers_functions(stg_file, tmp_path, monkeypatch, attn):
    """train_step's L_attn is computed by cat.average_attention (Eq. 7), cat.causal_ratio (Eq. 8, 9) and cat.hinge
    (Eq. 10) on both paths: the default one (fast, the causal mass of the causal rows) and the explicit maps."""
    calls = {}

    def spy(name):
        original = getattr(cat, name)

        def wrapped(*args, **kw):
            out = original(*args, **kw)
            calls.setdefault(name, []).append((args, out))
            return out
        monkeypatch.setattr(cat, name, wrapped)

    for name in ("average_attention", "causal_ratio", "hinge"):
        spy(name)
    cfg = tiny_config(stg_file, tmp_path, alpha=2.0, **({} if attn == "fast" else {"attn": "explicit"}))
    assert train.TrainConfig().attn == "fast"   # the default path is the one tested first
    run, step = runs.setup(cfg, train.losses, train.adamw)
    calls.clear()                               # setup measured the starting C/N through them too
    record = train.train_step(run, step)
    per_layer, avg = calls["average_attention"][0]
    B, H, L = len(run.examples[:cfg.batch_size]), 2, 2
    assert len(per_layer[0]) == L
    if attn == "fast":   # each layer hands Eq. 7 its causal rows' mass per head (B, H, R): no T × T map
        assert per_layer[0][0].dim() == 3 and per_layer[0][0].shape[:2] == (B, H) and avg.dim() == 2
    else:                # each layer hands Eq. 7 its full map (B, H, T, T)
        assert per_layer[0][0].dim() == 4 and avg.dim() == 3
    cn = calls["causal_ratio"][0][1]
    assert cn.counted.any()
    hinge_args, l_attn = calls["hinge"][0]
    assert hinge_args[0] is cn and hinge_args[1] == 2.0
    assert record["l_attn"] == pytest.approx(l_attn.item(), rel=1e-6) and record["l_attn"] > 0


def test_progress_in_a_log_file_is_plain_lines_not_a_redrawn_bar(capsys):
    """Written to a file (not a terminal), the loop's progress is a plain line every `every` seconds and at the last
    step, never a tqdm bar redrawn with carriage returns into one endless line."""
    progress = runs.Progress("run", total=3, initial=0, every=0.0)
    for step in range(3):
        progress.update({"epoch": 0, "l_next": 1.5 - step, "l_attn": 0.25, "tokens_per_s": 100.0})
    progress.close()
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "\r" not in captured.out + captured.err and len(lines) == 3
    assert lines[-1].startswith("run: step 3/3, ep 0, l_next -0.500, l_attn 0.250, tok_s 100")
    quiet = runs.Progress("run", total=3, initial=1, every=3600.0)      # a line only at the last step
    for _ in range(2):
        quiet.update({"epoch": 0, "l_next": 1.0, "l_attn": 0.0, "tokens_per_s": 1.0})
    assert capsys.readouterr().out.count("\n") == 1


def test_every_committed_runs_train_config_still_loads():
    """The runs committed under results/ were written by earlier train.py's (one named gamma_schedule `gamma`):
    each train_config.json must still load as a TrainConfig, as --resume and the tables read it."""
    paths = sorted((ROOT / "results").glob("**/train_config.json"))
    assert len(paths) > 100
    for path in paths:
        saved = json.loads(path.read_text())
        cfg = runs.saved_config(train.TrainConfig(resume=str(path.parent)), saved)
        cli.check_numbers(cfg)
        assert cfg.gamma_schedule == saved.get("gamma_schedule", saved.get("gamma", "exp")), path
