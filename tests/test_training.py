"""The training pieces shared by sft, rm, dpo and ppo, each against a hand-computed value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from baichuan_tune.adapters import freeze_all_but_last, lora_targets, prepare_for_training
from baichuan_tune.errors import BaichuanTuneError
from baichuan_tune.training import (Checkpoints, TrainingError, TrainOptions, batch_order, loss_is_bad,
                                    make_optimizer, make_scheduler, optimizer_step, total_optimizer_steps)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    first = batch_order(10, 4, seed=1, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first == batch_order(10, 4, seed=1, epoch=0)
    assert first != batch_order(10, 4, seed=1, epoch=1)
    assert first != batch_order(10, 4, seed=2, epoch=0)


@pytest.mark.parametrize("samples,batch,accum,epochs,max_steps,expected", [
    (100, 4, 1, 3.0, -1, (25, 75)),
    (100, 4, 2, 3.0, -1, (12, 36)),   # 25 batches -> 12 full accumulation groups per epoch
    (100, 4, 2, 1.5, -1, (12, 18)),
    (100, 4, 1, 3.0, 10, (25, 10)),
    (3, 8, 4, 1.0, -1, (1, 1)),       # fewer batches than one group still makes one step
])
def test_total_optimizer_steps(samples, batch, accum, epochs, max_steps, expected):
    cfg = TrainOptions(per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                       num_train_epochs=epochs, max_steps=max_steps)
    assert total_optimizer_steps(cfg, samples) == expected


def learning_rates(cfg: TrainOptions, total_steps: int, steps: int) -> list[float]:
    """The learning rate of each of the first `steps` optimizer steps under make_scheduler."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_cosine_schedule_with_warmup_matches_the_formula():
    seen = learning_rates(TrainOptions(learning_rate=1.0, warmup_steps=2, lr_scheduler_type="cosine"), 10, 10)
    # warmup 0, 1/2; then 0.5 * (1 + cos(pi * (s - 2) / 8)) for s = 2..9
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 10)]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_constant_schedule_after_warmup():
    seen = learning_rates(TrainOptions(learning_rate=0.3, warmup_steps=3, lr_scheduler_type="constant"), 10, 6)
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3, 0.3])


def test_linear_schedule_with_warmup_matches_the_formula():
    seen = learning_rates(TrainOptions(learning_rate=2.0, warmup_ratio=0.25, lr_scheduler_type="linear"), 8, 8)
    # warmup ceil(0.25 * 8) = 2 steps: 0, 1; then 2 * (8 - s) / 6 for s = 2..7
    assert seen == pytest.approx([0.0, 1.0] + [2.0 * (8 - s) / 6 for s in range(2, 8)], abs=1e-12)


@pytest.mark.parametrize("max_norm,expected", [(1.0, [-0.6, -0.8]), (0.0, [-3.0, -4.0]), (10.0, [-3.0, -4.0])])
def test_optimizer_step_clips_the_gradient_norm(max_norm, expected):
    """Gradient (3, 4) has norm 5: clipped to norm 1 it is (0.6, 0.8); 0 means no clipping."""
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.data.zero_()
    model.weight.grad = torch.tensor([[3.0, 4.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    norm = optimizer_step(model, optimizer, scheduler, None, max_norm)
    assert norm == pytest.approx(5.0)
    assert model.weight.data[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert model.weight.grad is None


def test_eight_bit_adamw_comes_from_bitsandbytes_and_trains():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Linear(64, 64)
    optimizer = make_optimizer(model, TrainOptions(optim="adamw_8bit", learning_rate=1e-2))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    before = model.weight.detach().clone()
    model(torch.randn(8, 64)).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(before, model.weight)


def test_nothing_to_train_is_an_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(TrainingError, match="nothing to train"):
        make_optimizer(model, TrainOptions())


def test_loss_guard():
    assert loss_is_bad(torch.tensor(1.5), 3, "stop", None) is False
    assert loss_is_bad(torch.tensor(float("inf")), 3, "skip", None) is True
    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 7; the last good checkpoint is ckpt-6"):
        loss_is_bad(torch.tensor(float("nan")), 7, "stop", Path("ckpt-6"))
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        loss_is_bad(torch.tensor(float("nan")), 1, "stop", None)


def _optim_state(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def test_checkpoints_rotate_and_a_failed_save_keeps_the_last_good_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    optimizer, scheduler = _optim_state(model)
    store = Checkpoints(tmp_path, keep=2)
    for step in (2, 4, 6):
        store.save(step, model, optimizer, scheduler, None, {"epoch": 0, "batch": step})
    assert [p.name for p in store.all()] == ["checkpoint-4", "checkpoint-6"]

    import baichuan_tune.training as training

    def broken_json(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(training, "atomic_write_json", broken_json)
    with pytest.raises(OSError, match="disk full"):
        store.save(8, model, optimizer, scheduler, None, {"epoch": 0, "batch": 8})
    assert store.latest().name == "checkpoint-6" and not (tmp_path / "checkpoint-8").exists()
    monkeypatch.undo()

    fresh = torch.nn.Linear(3, 3)
    fresh_opt, fresh_sched = _optim_state(fresh)
    position = store.load(store.latest(), fresh, fresh_opt, fresh_sched, None)
    assert position == {"step": 6, "epoch": 0, "batch": 6}
    assert torch.equal(fresh.weight, model.weight)


def test_lora_targets():
    assert lora_targets(["all"]) == ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_targets(["W_pack"]) == ["W_pack"]
    with pytest.raises(BaichuanTuneError, match="unknown module"):
        lora_targets(["q_proj"])


def test_freeze_trains_only_the_last_layers():
    model = tiny_model("tiny-baichuan2-7b")
    freeze_all_but_last(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    last = len(model.model.layers) - 1
    assert trainable and all(n.startswith(f"model.layers.{last}.") for n in trainable)
    assert len(trainable) == len(list(model.model.layers[last].parameters()))


def test_lora_trains_only_adapter_weights_on_the_chosen_modules():
    model = prepare_for_training(tiny_model("tiny-baichuan-13b"), "lora", lora_target=["W_pack", "down_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"W_pack", "down_proj"}



@pytest.mark.parametrize("finetuning_type", ["lora", "qlora"])
def test_adapters_and_checkpointing_warn_about_no_deprecated_transformers_names(finetuning_type, tmp_path):
    """PEFT reads `is_gradient_checkpointing` on every adapter wrap and load, and checkpointing used to be enabled
    by `gradient_checkpointing_enable`: both FutureWarnings of transformers, printed by every such command."""
    import warnings

    from baichuan_tune.builtin import default_model_dir
    from baichuan_tune.checkpoint import load_model

    if finetuning_type == "qlora":
        pytest.importorskip("bitsandbytes")
    base = default_model_dir()  # its shapes suit bitsandbytes' CPU kernels
    quantize = 4 if finetuning_type == "qlora" else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare_for_training(load_model(base, quantize=quantize), finetuning_type, lora_rank=2,
                                     gradient_checkpointing=True)
        model.save_pretrained(str(tmp_path / "adapter"))
        loaded = load_model(base, quantize=quantize, adapter=tmp_path / "adapter")
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    # checkpointing is on all the same, and the answer PEFT reads says so
    assert model.get_base_model().is_gradient_checkpointing and model.get_base_model().is_activation_checkpointing
    assert not loaded.get_base_model().is_gradient_checkpointing

def test_bench_sft_smoke_runs_ours_and_the_llama_baseline(tmp_path):
    """benchmarks/bench_sft.py on the tiny shape, CPU: one timed step each, both rows and the ratio written."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sft.py"
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(script), "--presets", "tiny-baichuan2-7b", "--device", "cpu",
                           "--methods", "lora", "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "32",
                           "--json", str(out)], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["baichuan", "llama"]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert "RATIO lora tiny-baichuan2-7b" in done.stdout
