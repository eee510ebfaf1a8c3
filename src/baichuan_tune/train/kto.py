"""KTO on the engine (Ethayarajh et al. 2024): batches of labelled answers, each row with a mismatched answer
(another row's answer to its prompt) for the KL estimate z0; the loss is `losses.kto_loss`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import no_grad
from .methods import Method

if TYPE_CHECKING:
    import torch


class KTOMethod(Method):
    """KTO on the engine: batches of labelled answers, each with its mismatched answer for z0."""

    name = "kto"
    eval_before = True
    bar_keys = ("loss", "accuracy", "kl")

    def __init__(self, train_set, val_set, reference, dist, device, amp_dtype, *, beta: float,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__(train_set, val_set)
        self.reference, self.dist, self.device, self.amp_dtype = reference, dist, device, amp_dtype
        self.weights = {"beta": beta, "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}

    def collate(self, dataset, indices, device):
        import torch

        from .methods import pair_batch

        batch = pair_batch(dataset, indices, device)  # rows: B prompt + answer, then B prompt + mismatched answer
        batch["desirable"] = torch.tensor([bool(dataset[i]["label"]) for i in indices], device=device)
        return batch

    def weight(self, batch):
        return int(batch["index"].numel())

    def step(self, model, batch):
        out = kto_forward(model, batch, self.reference, "train", self.dist, **self.weights)
        return out.loss, {"accuracy": float(sign_agreement(out.rewards, batch["desirable"]).float().mean()),
                          "kl": float(out.kl)}

    @no_grad
    def evaluate(self, engine) -> dict:
        """Exact held-out figures (shared out among the processes): loss, accuracy, margin, mean rewards, z0."""
        from .training import autocast

        model, val, dist = engine.model, self.val_set, self.dist
        was_training = model.training
        model.eval()
        mine, size = list(range(dist.rank, len(val), dist.world)), engine.schedule.batch_size
        sums = [0.0] * 8  # loss, answers, right, desirable reward sum and count, undesirable ditto, z0 x answers
        for k in range(0, len(mine), size):
            batch = self.collate(val, mine[k : k + size], self.device)
            with autocast(self.device, self.amp_dtype):
                out = kto_forward(model, batch, self.reference, "eval", None, **self.weights)
            good, n = batch["desirable"], batch["index"].numel()
            parts = [float(out.loss) * n, n, float(sign_agreement(out.rewards, good).sum()),
                     float(out.rewards[good].sum()), float(good.sum()), float(out.rewards[~good].sum()),
                     float((~good).sum()), float(out.kl) * n]
            sums = [a + b for a, b in zip(sums, parts)]
        model.train(was_training)
        loss, n, right, good_sum, good_n, bad_sum, bad_n, kl = dist.sum(sums, self.device)
        good_mean, bad_mean = good_sum / max(good_n, 1), bad_sum / max(bad_n, 1)
        return {"eval_loss": round(loss / max(n, 1), 5), "eval_accuracy": round(right / max(n, 1), 5),
                "eval_margin": round(good_mean - bad_mean, 5), "eval_desirable_reward": round(good_mean, 5),
                "eval_undesirable_reward": round(bad_mean, 5), "eval_kl": round(kl / max(n, 1), 5)}


def sign_agreement(rewards: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """[B] bool: the implicit reward is > 0 for a desirable answer, < 0 for an undesirable one (0 counts as wrong)."""
    return (rewards > 0) & desirable | (rewards < 0) & ~desirable


def kto_forward(model, batch: dict, reference, split: str, dist, *, beta: float, desirable_weight: float = 1.0,
                undesirable_weight: float = 1.0):
    """KTOLoss of one batch: the policy's log-probs of its answers (with gradient) and of the mismatched answers
    (without), the reference's of both, z0 averaged over the processes when `dist` has several."""
    import torch

    from .losses import kto_kl_estimate, kto_loss, sequence_logps

    n = batch["index"].numel()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():  # z0 takes no gradient (sec. 4.1); before the graded forward, for DDP's bookkeeping
        mismatched = sequence_logps(model(input_ids=ids[n:], attention_mask=mask[n:]).logits, labels[n:])
    logits = model(input_ids=ids[:n], attention_mask=mask[:n]).logits
    policy = sequence_logps(logits, labels[:n])
    ref, ref_mismatched = reference.logps(batch, split, average=False)
    z0 = kto_kl_estimate(mismatched, ref_mismatched)
    if dist is not None and dist.world > 1:  # the global batch's estimate (equal shares): clamp the mean of means
        mean = dist.sum([float((mismatched - ref_mismatched).float().mean())], z0.device)[0] / dist.world
        z0 = z0.new_tensor(max(mean, 0.0))
    return kto_loss(policy, ref, batch["desirable"], z0, beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight)
