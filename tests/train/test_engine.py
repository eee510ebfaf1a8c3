"""The training engine against a plain hand-written loop, on a toy regression method (no language model)."""

from __future__ import annotations

import json

import pytest
import torch

from baichuan_tune.train.distributed import Dist
from baichuan_tune.train.engine import Engine, schedule_for
from baichuan_tune.train.methods import Method
from baichuan_tune.train.training import TrainingError, TrainOptions, batch_order


class Regression(Method):
    """Mean squared error of a linear model on (x, y) pairs; `poison` steps return a NaN loss."""

    name = "toy"

    def __init__(self, x, y, poison=()):
        super().__init__(list(range(len(x))))
        self.x, self.y, self.poison, self.calls = x, y, set(poison), 0

    def collate(self, dataset, indices, device):
        return {"x": self.x[indices], "y": self.y[indices], "attention_mask": torch.ones(len(indices), 3)}

    def step(self, model, batch):
        self.calls += 1
        loss = torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])
        return (loss * float("nan") if self.calls in self.poison else loss), {"y_mean": float(batch["y"].mean())}


def data(n=10):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, generator=gen), torch.randn(n, generator=gen)


def options(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                num_train_epochs=2, learning_rate=0.1, warmup_steps=1, max_grad_norm=0.5, weight_decay=0.01,
                logging_steps=1, save_steps=0, report_to="none")
    return TrainOptions(**{**base, **kw})


def run_engine(tmp_path, method, opts):
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    engine = Engine(model, method, opts, tmp_path, schedule_for(opts, len(method.train_set), 1), Dist(),
                    torch.device("cpu"), None)
    return model, engine, engine.run()


def test_engine_equals_a_plain_loop_with_accumulation_clipping_and_schedule(tmp_path):
    x, y = data()
    opts = options(tmp_path)
    model, _, results = run_engine(tmp_path, Regression(x, y), opts)

    torch.manual_seed(1)
    ref = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(ref.parameters(), lr=0.1, weight_decay=0.01)
    from transformers import get_scheduler

    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=4)
    losses = []
    for epoch in range(2):  # 5 batches of 2 per epoch, 2 per step: 2 steps, the fifth batch dropped
        order = batch_order(10, 2, opts.seed, epoch)
        for i in (0, 2):
            step_loss = 0.0
            for indices in order[i : i + 2]:
                loss = torch.nn.functional.mse_loss(ref(x[indices]).squeeze(-1), y[indices])
                (loss / 2).backward()
                step_loss += float(loss.detach()) / 2
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(step_loss)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    log = [json.loads(line) for line in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == pytest.approx([round(v, 5) for v in losses], abs=1e-5)
    assert {"lr", "grad_norm", "epoch", "tokens_per_s", "y_mean"} <= set(log[0])
    assert results["global_step"] == 4 and results["tokens"] == 4 * 4 * 3  # 4 steps x 4 samples x 3 "tokens"


def test_nan_policy_skip_drops_the_update_and_keeps_the_schedule_stop_names_the_step(tmp_path):
    x, y = data()
    opts = options(tmp_path / "skip", gradient_accumulation_steps=1, nan_policy="skip", max_steps=3, warmup_steps=0)
    # Forward call k is step k's; calls 2 and 3 are NaN: those steps change nothing, yet the schedule moves on.
    clean, _, _ = run_engine(tmp_path / "clean", Regression(x, y), options(tmp_path / "clean",
                                                                          gradient_accumulation_steps=1, max_steps=1,
                                                                          warmup_steps=0))
    skipped, engine, results = run_engine(tmp_path / "skip", Regression(x, y, poison={2, 3}), opts)
    assert results["skipped_steps"] == 2 and results["global_step"] == 3
    for a, b in zip(clean.parameters(), skipped.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert engine.scheduler.last_epoch == 3
    with pytest.raises(TrainingError, match="loss is nan at optimizer step 2; no checkpoint was written yet"):
        run_engine(tmp_path / "stop", Regression(x, y, poison={2}), options(tmp_path / "stop", max_steps=3,
                                                                              gradient_accumulation_steps=1))


class FusedRegression(Regression):
    """Regression whose accumulation group fuses into one batch: each row weighs 1 / (G x its micro-batch's size)."""

    def fused_batch(self, dataset, group, device, max_tokens):
        rows = [i for mb in group for i in mb]
        w = torch.tensor([1 / (len(group) * len(mb)) for mb in group for _ in mb])
        return {"x": self.x[rows], "y": self.y[rows], "w": w, "attention_mask": torch.ones(len(rows), 3)}

    def step(self, model, batch):
        if "w" not in batch:
            return super().step(model, batch)
        self.calls += 1
        return (batch["w"] * (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum(), {}


def test_fused_update_equals_the_plain_loop_and_every_process_must_agree(tmp_path):
    x, y = data()
    runs = {}
    for fuse in (False, True):
        method = FusedRegression(x, y)
        model, engine, _ = run_engine(tmp_path / str(fuse), method, options(tmp_path / str(fuse), fuse_accumulation=fuse,
                                                                            gradient_accumulation_steps=4))
        runs[fuse] = (model, method.calls, [r["loss"] for r in map(json.loads, (
            tmp_path / str(fuse) / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r])
    (plain, plain_calls, plain_losses), (fused, fused_calls, fused_losses) = runs[False], runs[True]
    assert fused_calls * 4 == plain_calls  # one pass per update instead of four
    assert fused_losses == pytest.approx(plain_losses, rel=1e-6)
    torch.testing.assert_close(fused.weight, plain.weight, rtol=1e-6, atol=1e-7)

    class HalfAgrees(Dist):  # the other process of two could not fuse its part
        def sum(self, values, device):
            return [float(v) for v in values]

    opts = options(tmp_path / "ddp")
    engine = Engine(torch.nn.Linear(3, 1), FusedRegression(x, y), opts, tmp_path / "ddp", schedule_for(opts, 10, 1),
                    HalfAgrees(world=2), torch.device("cpu"), None)
    assert engine._fused_batch(list(range(10)), [[0, 1], [2, 3]]) is None
    engine.dist = Dist()
    assert engine._fused_batch(list(range(10)), [[0, 1], [2, 3]]) is not None
