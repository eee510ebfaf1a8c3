"""The frozen reference policy of DPO and KTO: its log-probabilities of each pair's answers.

With LoRA/QLoRA it is the policy's own base with the adapter off, computed per batch; with freeze/full the
weights change in place, so the initial model's log-probabilities of every pair are computed once before
training into a table saved with the run (REFERENCE_FILE), which a resumed run reads back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..lazy import no_grad

if TYPE_CHECKING:
    import torch

REFERENCE_FILE = "reference_logps.pt"


class Reference:
    """Log-probabilities of the frozen reference policy for a pair batch.

    LoRA/QLoRA: the policy's own base with the adapter disabled, computed per batch. Freeze/full: the
    weights change in place, so the initial model's log-probabilities of every pair are computed once,
    before training, and saved with the run (a resumed run reads them back).
    """

    def __init__(self, model, *, needed: bool, adapter_off: bool, out: Path, datasets: dict, model_name: str,
                 batch_size: int, device, amp_dtype, dist=None):
        self.needed, self.adapter_off = needed, adapter_off  # needed: False for the reference-free losses
        self.model, self.table = model, None
        if self.needed and not self.adapter_off:
            # Under torchrun every process starts from the same weights and needs the rows of its own pairs,
            # which change every epoch: rank 0 computes the whole table once, the others read it back.
            from .distributed import Dist, main_first

            self.table = main_first(dist or Dist(), lambda: self._precomputed(
                Path(out) / REFERENCE_FILE, datasets, fingerprint(model_name, datasets), batch_size, device, amp_dtype))

    def describe(self) -> str:
        if not self.needed:
            return "none (reference-free)"
        return "the base with the adapter off" if self.adapter_off else "log-probs precomputed before training"

    @no_grad
    def logps(self, batch: dict, split: str, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] chosen, [B] rejected) reference log-probabilities (sums, or per-token means)."""
        from .losses import sequence_logps
        from .methods import split_pairs

        if self.table is not None:
            kind = "avg" if average else "sum"
            index = batch["index"].cpu()
            return (self.table[f"{split}_chosen_{kind}"][index].to(batch["index"].device),
                    self.table[f"{split}_rejected_{kind}"][index].to(batch["index"].device))
        with self.model.disable_adapter():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return split_pairs(sequence_logps(logits, batch["labels"], average=average))

    def _precomputed(self, path: Path, datasets: dict, fingerprint: str, batch_size: int, device, amp_dtype) -> dict:
        import torch

        from ..io_utils import atomic_write_bytes

        if path.is_file():
            # Reused only for the same model and the same tokenised pairs: a table left by an earlier run on
            # other data (--overwrite_output_dir keeps it, a run without checkpoints is not refused) would
            # silently give every pair another pair's reference.
            table = torch.load(path, weights_only=True, map_location="cpu")
            if table.get("fingerprint") == fingerprint:
                return table
            print(f"{path}: written for another model or other pairs; computing the reference again")
        table = {"fingerprint": fingerprint}
        for split, dataset in datasets.items():
            table.update(reference_table(self.model, dataset, split, batch_size, device, amp_dtype))
        import io

        buffer = io.BytesIO()
        torch.save(table, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return table


def fingerprint(model_name: str, datasets: dict) -> str:
    """sha256 of the reference model's name and every split's token ids, identifying a reference table."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(str(model_name).encode())
    for split, dataset in sorted(datasets.items()):
        digest.update(f"|{split}:{len(dataset)}".encode())
        for i in range(len(dataset)):
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                ids = np.asarray(dataset[i][key], dtype=np.int64)
                digest.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return digest.hexdigest()


@no_grad
def reference_table(model, dataset, split: str, batch_size: int, device, amp_dtype) -> dict:
    """Sum and per-token-mean log-probabilities of every chosen/rejected answer of `dataset` ([N] each)."""
    import torch

    from .losses import sequence_logps
    from .methods import pair_batch, split_pairs
    from .training import autocast

    was_training = model.training
    model.eval()
    keys = [f"{split}_{side}_{kind}" for side in ("chosen", "rejected") for kind in ("sum", "avg")]
    parts: dict[str, list] = {key: [] for key in keys}
    for start in range(0, len(dataset), batch_size):
        batch = pair_batch(dataset, list(range(start, min(start + batch_size, len(dataset)))), device)
        with autocast(device, amp_dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for kind, average in (("sum", False), ("avg", True)):
            chosen, rejected = split_pairs(sequence_logps(logits, batch["labels"], average=average).cpu())
            parts[f"{split}_chosen_{kind}"].append(chosen)
            parts[f"{split}_rejected_{kind}"].append(rejected)
    model.train(was_training)
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}
