"""Several processes, one model each: data-parallel training under `torchrun` (torch.distributed + DDP).

    torchrun --nproc_per_node 4 -m baichuan_tune.cli sft config.yaml      # 4 GPUs of one node

`torchrun` starts one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` joins them (NCCL on
GPUs, gloo on CPUs) and gives each process its own device. Every process holds the whole model (LoRA and
QLoRA fit one card; this is not model sharding), takes its own slice of each global batch of
`per_device_train_batch_size x world` samples, and DDP averages the gradients, so a step equals one
process's step on the global batch when every sample carries as many labelled tokens. `--parallel fsdp`
shards the model instead (sharded.py); the data are shared out the same way. Only rank 0 writes
logs, checkpoints and the result. Run by plain `python`, everything here is a no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: list[int]) -> list[int]:
        """This process's part of a global batch (equal parts; the caller drops a short last batch)."""
        size = len(global_batch) // self.world
        return global_batch[self.rank * size : (self.rank + 1) * size]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over all processes."""
        if self.world == 1:
            return list(values)
        import torch.distributed as td

        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        td.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """(this process's place, its device): joins the torchrun group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    import torch.distributed as td

    dist = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        # Rank 0 tokenises the data and writes checkpoints while the others wait at a barrier: allow an hour.
        td.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    return dist, device


def main_first(dist: Dist, work):
    """work() on rank 0, then on the other processes: rank 0 fills a cache (tokenised data, a table) that the
    others then read instead of computing it again at the same time."""
    if not dist.main:
        dist.barrier()
    result = work()
    if dist.main:
        dist.barrier()
    return result


def gather(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor` (all of one shape), concatenated along dim 0 in rank order."""
    if dist.world == 1:
        return tensor
    import torch.distributed as td

    parts = [torch.empty_like(tensor) for _ in range(dist.world)]
    td.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def wrap(model, dist: Dist, device: torch.device):
    """The model in DistributedDataParallel when there are several processes, else as it is."""
    if dist.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def no_sync(model, sync: bool):
    """DDP's no_sync() (FSDP2: no gradient reduce-scatter) for the micro-batches of an accumulation group before
    its last one."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@contextmanager
def _fsdp_no_sync(model):
    """FSDP2 keeps the unreduced gradients of these micro-batches; the last one's backward reduces them all."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def shutdown(dist: Dist) -> None:
    """Leave the group. Drop every DistributedDataParallel wrapper first: one still alive while the group is
    destroyed can deadlock gloo's worker thread against the interpreter lock (the process never exits)."""
    if dist.world > 1:
        import gc

        import torch.distributed as td

        gc.collect()
        if td.is_initialized():
            td.barrier()
            td.destroy_process_group()
