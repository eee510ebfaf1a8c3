"""What a training method gives the engine: its data and its step (a function of (model, batch) alone).

`Method` holds the defaults; a method overrides what differs. The engine (engine.py) runs every method
alike: batches in the deterministic order of `training.batch_order`, accumulation, precision, clipping,
schedule, the NaN policy, evaluation, logs, checkpoints and resume. The methods here serve `sft`
(`SFTMethod`: next-token cross-entropy) and the preference trainers `rm` and `dpo` (`PairMethod` with
the command's pair loss); `ppo` adds a rollout hook (`plan`) in its command.
"""

from __future__ import annotations

from collections.abc import Callable

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `ppo --help` must not import torch
    import torch

StepFn = Callable[["torch.nn.Module", dict], tuple["torch.Tensor", dict]]


class Method:
    """The defaults: one optimizer update per step over `batches_per_step` micro-batches of `train_set`."""

    name = "train"
    eval_before = False  # evaluate once before the first step (the *_before numbers of the results)
    eval_each_epoch = True  # with eval_steps 0: evaluate at each epoch's end (else only before/after training)
    bar_keys: tuple[str, ...] = ("loss",)  # values shown on the progress bar

    def __init__(self, train_set, val_set=()):
        self.train_set, self.val_set = train_set, val_set

    def collate(self, dataset, indices: list[int], device: torch.device) -> dict:
        raise NotImplementedError

    def step(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, float metrics) of one micro-batch; `model` is what the engine trains (DDP-wrapped or not)."""
        raise NotImplementedError

    def eval_step(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.step(model, batch)

    def weight(self, batch: dict) -> int:
        """What one evaluation batch counts for in the held-out means."""
        return int(batch["input_ids"].size(0))

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].ne(0).sum())

    def fused_batch(self, dataset, group: list[list[int]], device: torch.device, max_tokens: int) -> dict | None:
        """One batch whose step gives the whole accumulation group's loss and gradients (None: the plain loop)."""
        return None

    def plan(self, engine, batches: list[list[int]]) -> tuple[object, list[list[list[int]]]]:
        """(dataset, updates) of one step: each update is a list of micro-batches (indices into dataset)."""
        return self.train_set, [batches]

    def after_step(self, engine) -> dict:
        """Extra values for the step's log record (after its updates)."""
        return {}

    def evaluate(self, engine) -> dict | None:
        """Held-out metrics computed by the method itself; None: the engine's weighted means of eval_step."""
        return None

    def state_dict(self) -> dict:
        """What the method carries from step to step, saved in the checkpoint's trainer_state.json."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SFTMethod(Method):
    """Supervised fine-tuning: the model's own next-token cross-entropy over the answer labels."""

    name = "sft"

    def __init__(self, train_set, val_set=(), z_loss: bool = False):
        super().__init__(train_set, val_set)
        self.z_loss = z_loss  # the model adds Baichuan2's z-loss: fused rows need its per-token weights too

    def fused_batch(self, dataset, group, device, max_tokens):
        from ..data.collate import fuse_micro_batches

        fused = fuse_micro_batches([[dataset[i] for i in mb] for mb in group], max_tokens, self.z_loss)
        return None if fused is None else {k: v.to(device) for k, v in fused.items()}

    def collate(self, dataset, indices, device):
        from ..data.collate import collate_padded

        return {k: v.to(device) for k, v in collate_padded([dataset[i] for i in indices]).items()}

    def step(self, model, batch):
        return model(**batch).loss, {}

    def weight(self, batch):
        return int(batch["labels"][:, 1:].ne(-100).sum())  # token-weighted: the mean over every label token


class PairMethod(Method):
    """A preference trainer (rm, dpo): `loss_fn(model, batch)` on batches of (prompt, chosen, rejected) pairs."""

    eval_before = True
    bar_keys = ("loss", "accuracy")

    def __init__(self, name: str, train_set, val_set, loss_fn: StepFn, eval_loss_fn: StepFn | None = None):
        super().__init__(train_set, val_set)
        self.name, self.loss_fn, self.eval_loss_fn = name, loss_fn, eval_loss_fn or loss_fn

    def collate(self, dataset, indices, device):
        return pair_batch(dataset, indices, device)

    def step(self, model, batch):
        return self.loss_fn(model, batch)

    def eval_step(self, model, batch):
        return self.eval_loss_fn(model, batch)

    def weight(self, batch):
        return int(batch["index"].numel())  # pair-weighted


def pair_batch(dataset, indices: list[int], device: torch.device) -> dict:
    """collate_pairs of dataset[indices] on `device`, plus `index` ([B] positions in the dataset)."""
    from ..data.collate import collate_pairs

    batch = {k: v.to(device) for k, v in collate_pairs([dataset[i] for i in indices]).items()}
    import torch

    batch["index"] = torch.tensor(indices, device=device)
    return batch


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, ...] rows of a pair batch -> ([B, ...] chosen, [B, ...] rejected)."""
    half = values.size(0) // 2
    return values[:half], values[half:]


def eval_results(evals: list) -> dict:
    """Held-out metrics for train_results.json: the first evaluation as `*_before`, the last as they are."""
    if not evals:
        return {}
    results = {f"{k}_before": v for k, v in evals[0].items() if k.startswith("eval_")}
    results.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
    return results
