"""The training pieces shared by sft, rm, dpo and ppo, each against a hand-computed value."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from baichuan_tune.train.adapters import freeze_all_but_last, lora_targets, prepare_for_training
from baichuan_tune.errors import BaichuanTuneError
from baichuan_tune.train.training import (Checkpoints, TrainingError, TrainOptions, batch_order, loss_is_bad,
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

    import baichuan_tune.train.training as training

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


def test_bench_sft_smoke_runs_ours_and_the_llama_baseline(tmp_path):
    """benchmarks/bench_sft.py on the tiny shape, CPU: one timed step each, both rows and the ratio written."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sft.py"
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(script), "--presets", "tiny-baichuan2-7b", "--device", "cpu",
                           "--methods", "lora", "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "32",
                           "--json", str(out)], capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["baichuan", "llama"]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert "RATIO lora tiny-baichuan2-7b" in done.stdout


# ----------------------------------------------------------------------------- failed writes and broken checkpoints
# The forms a full disk really takes (seen on a 64 KB tmpfs): the OS raises OSError(ENOSPC); safetensors'
# save_file raises SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)");
# torch.save raises RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534").

import errno  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

from baichuan_tune.errors import CheckpointError, WriteError  # noqa: E402


def enospc(path="x"):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def safetensors_full():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def torch_save_full():
    return RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _raise(exc):
    def writer(*args, **kwargs):
        raise exc
    return writer


@pytest.mark.parametrize("target,error,reason", [
    ("baichuan_tune.train.training.atomic_write_json", enospc(), "no space left on the disk"),
    ("safetensors.torch.save_file", safetensors_full(), "no space left on the disk"),
    ("torch.save", torch_save_full(), "the file was cut short ([enforce fail at inline_container.cc:672]"),
], ids=["oserror", "safetensors", "torch.save"])
def test_a_full_disk_during_a_checkpoint_is_one_clear_error(tmp_path, monkeypatch, target, error, reason):
    model = torch.nn.Linear(3, 3)
    optimizer, scheduler = _optim_state(model)
    store = Checkpoints(tmp_path, keep=2)
    store.save(6, model, optimizer, scheduler, None, {"epoch": 0, "batch": 6})
    monkeypatch.setattr(target, _raise(error))
    with pytest.raises(WriteError) as exc:
        store.save(8, model, optimizer, scheduler, None, {"epoch": 0, "batch": 8})
    text = str(exc.value)
    assert text.startswith(f"{tmp_path / 'checkpoint-8'}: could not write the checkpoint: {reason}")
    assert f"the latest complete checkpoint is still {tmp_path / 'checkpoint-6'}" in text and "--resume true" in text
    monkeypatch.undo()
    assert [p.name for p in store.all()] == ["checkpoint-6"] and not list(tmp_path.glob(".checkpoint-8*"))


def test_a_checkpoint_records_its_own_step_after_a_resume(tmp_path):
    model = torch.nn.Linear(3, 3)
    optimizer, scheduler = _optim_state(model)
    store = Checkpoints(tmp_path, keep=0)
    resumed_position = {"step": 4, "epoch": 0, "batch": 4}  # what resume() returned at step 4
    store.save(6, model, optimizer, scheduler, None, resumed_position)
    assert json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())["step"] == 6


def test_a_full_disk_while_logging_names_trainer_log_jsonl(tmp_path, monkeypatch):
    from baichuan_tune.train.training import RunLog

    log = RunLog(tmp_path, total_steps=4, tensorboard=False)
    real_open = Path.open

    class FullDisk:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            raise enospc(tmp_path / "trainer_log.jsonl")

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullDisk(real_open(self, *a, **k))
                        if self.name == "trainer_log.jsonl" else real_open(self, *a, **k))
    with pytest.raises(WriteError) as exc:
        log.log(3, loss=1.0)
    log.close()
    assert str(exc.value).startswith(f"{tmp_path / 'trainer_log.jsonl'}: could not write the training log: no space "
                                     "left on the disk; the run stopped at step 3")
    assert "--resume true" in str(exc.value)


def test_a_full_disk_while_peft_writes_the_model_card_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from baichuan_tune.builtin import DEFAULT_TOKENIZER
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer
    from baichuan_tune.train.training import save_final

    model = prepare_for_training(tiny_model(), "lora", lora_rank=2)
    monkeypatch.setattr(ModelCard, "save", lambda self, path: (_ for _ in ()).throw(enospc(path)))
    with pytest.raises(WriteError) as exc:
        save_final(model, BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER)), tmp_path, "lora")
    assert str(exc.value) == f"{tmp_path}: could not write the adapter: no space left on the disk"
    assert not (tmp_path / "adapter_model.safetensors").exists()  # nothing half-written under the final names


def _two_checkpoints(tmp_path):
    """checkpoint-2 and checkpoint-4 of a Linear model; returns (store, weights at step 2)."""
    model = torch.nn.Linear(3, 3)
    optimizer, scheduler = _optim_state(model)
    store = Checkpoints(tmp_path, keep=0)
    store.save(2, model, optimizer, scheduler, None, {"epoch": 0, "batch": 2})
    at_two = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    store.save(4, model, optimizer, scheduler, None, {"epoch": 0, "batch": 4})
    return store, at_two


class Pickled:
    """Any Python object: unpickling one can run code, which weights_only loading refuses."""


@pytest.mark.parametrize("damage,message", [
    ("truncate", "checkpoint-4/trainable.safetensors: corrupt or truncated safetensors file"),
    ("pickle", f"checkpoint-4/training_state.pt: holds pickled objects other than tensors ({__name__}.Pickled); "
               "refused: unpickling them could run code from the file, and files are loaded with weights_only=True"),
    ("truncate-state", "checkpoint-4/training_state.pt: corrupt or truncated PyTorch file"),
])
def test_resume_skips_a_broken_checkpoint_with_a_warning(tmp_path, caplog, damage, message):
    store, at_two = _two_checkpoints(tmp_path)
    latest = tmp_path / "checkpoint-4"
    if damage == "truncate":
        data = (latest / "trainable.safetensors").read_bytes()
        (latest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "pickle":
        state = torch.load(latest / "training_state.pt", weights_only=True)
        torch.save(state | {"extra": Pickled()}, latest / "training_state.pt")
    else:
        data = (latest / "training_state.pt").read_bytes()
        (latest / "training_state.pt").write_bytes(data[:-100])
    fresh = torch.nn.Linear(3, 3)
    optimizer, scheduler = _optim_state(fresh)
    with caplog.at_level(logging.WARNING, logger="baichuan_tune.train.training"):
        position = store.resume(fresh, optimizer, scheduler, None)
    assert position == {"step": 2, "epoch": 0, "batch": 2}
    assert torch.equal(fresh.weight, at_two)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "baichuan_tune.train.training"]
    assert message in warning and warning.endswith("; resuming from checkpoint-2 instead")


def test_resume_with_no_readable_checkpoint_names_each(tmp_path):
    store, _ = _two_checkpoints(tmp_path)
    for step in (2, 4):
        file = tmp_path / f"checkpoint-{step}" / "trainable.safetensors"
        file.write_bytes(file.read_bytes()[:40])
    fresh = torch.nn.Linear(3, 3)
    with pytest.raises(CheckpointError) as exc:
        store.resume(fresh, *_optim_state(fresh), None)
    text = str(exc.value)
    assert text.startswith(f"no checkpoint in {tmp_path} can be resumed from: ")
    assert "checkpoint-4/trainable.safetensors: corrupt" in text and "checkpoint-2/trainable.safetensors: corrupt" in text


def test_the_end_state_is_kept_until_the_result_is_written(tmp_path):
    from baichuan_tune.train.training import end_state_kept

    model = torch.nn.Linear(3, 3)
    optimizer, scheduler = _optim_state(model)
    store = Checkpoints(tmp_path, keep=1)
    store.save(2, model, optimizer, scheduler, None, {"epoch": 0, "batch": 2})
    with end_state_kept(store, 5, model, optimizer, scheduler, None, {"epoch": 1, "batch": 0}) as kept:
        assert json.loads((kept / "trainer_state.json").read_text()) == {"epoch": 1, "batch": 0, "step": 5,
                                                                          "end_of_run": True}
        assert [p.name for p in store.all()] == ["checkpoint-2", "checkpoint-5"]  # no rotation for it
    assert [p.name for p in store.all()] == ["checkpoint-2"]

    with pytest.raises(WriteError) as exc:
        with end_state_kept(store, 5, model, optimizer, scheduler, None, {"epoch": 1, "batch": 0}):
            raise WriteError(f"{tmp_path}: could not write the model: no space left on the disk")
    assert str(exc.value) == (f"{tmp_path}: could not write the model: no space left on the disk. The trained state "
                              f"is kept in {tmp_path / 'checkpoint-5'}: free some space, then run the same command "
                              "again with --resume true to write the result")
    assert store.latest().name == "checkpoint-5"

    # A resumed run that ends on a regular checkpoint's step leaves that checkpoint as it was.
    store.save(7, model, optimizer, scheduler, None, {"epoch": 2, "batch": 0})
    before = (tmp_path / "checkpoint-7" / "trainer_state.json").read_text()
    with end_state_kept(store, 7, model, optimizer, scheduler, None, {"epoch": 2, "batch": 0}):
        pass
    assert (tmp_path / "checkpoint-7" / "trainer_state.json").read_text() == before


def test_group_by_length_batches_similar_lengths_deterministically():
    """group_by_length: the same samples once each, batches of near-equal length (far less padding than
    the plain order), and the same order for the same (seed, epoch), another for the next epoch."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (1000,), generator=gen).tolist()
    grouped = batch_order(1000, 4, seed=3, epoch=0, lengths=lengths)
    plain = batch_order(1000, 4, seed=3, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert grouped == batch_order(1000, 4, seed=3, epoch=0, lengths=lengths)
    assert grouped != batch_order(1000, 4, seed=3, epoch=1, lengths=lengths)

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(grouped) < 0.1 * padding(plain)


def test_bench_recipes_smoke_runs_the_recipe_through_sft_and_the_trainer_baseline(tmp_path, shared_data):
    """benchmarks/bench_recipes.py --smoke: the 7B recipe on a tiny published-config checkpoint and the real
    BELLE file, through sft and through transformers' Trainer + PEFT on the converted Llama; rows and ratio."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_recipes.py"
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(script), "--shared", str(shared_data.parent), "--smoke",
                           "--recipes", "7b-qlora-belle", "--no-packing", "--steps", "2", "--warmup", "1",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["run"] for r in rows] == ["baseline", "ours"]
    assert rows[0]["timed_tokens"] == rows[1]["timed_tokens"] > 0  # both trained on the same samples, in order
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss_last"]) for r in rows)
    assert "RATIO 7b-qlora-belle ours ''/baseline" in done.stdout


@pytest.mark.parametrize("finetuning_type", ["lora", "qlora"])
def test_adapters_and_checkpointing_warn_about_no_deprecated_transformers_names(finetuning_type, tmp_path):
    """PEFT reads `is_gradient_checkpointing` on every adapter wrap and load, and checkpointing used to be enabled
    by `gradient_checkpointing_enable`: both FutureWarnings of transformers, printed by every such command."""
    import warnings

    from baichuan_tune.builtin import default_model_dir
    from baichuan_tune.models.checkpoint import load_model

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


@pytest.mark.parametrize("amp, flag, kept", [(torch.bfloat16, True, torch.bfloat16), (torch.float16, True, torch.float16),
                                             (torch.float16, False, None), (None, True, None)])
def test_qlora_half_frozen_keeps_the_training_half_dtype(amp, flag, kept):
    """bf16 and fp16 runs alike keep QLoRA's frozen embeddings/norms/head in their half dtype; fp32 runs
    and the switch turned off take PEFT's fp32 upcast."""
    from baichuan_tune.options import ModelOptions
    from baichuan_tune.train.training import fast_path_kwargs

    assert fast_path_kwargs(ModelOptions(qlora_half_frozen=flag), amp)["qlora_keep_dtype"] == kept
