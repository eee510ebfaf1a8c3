"""Sharded training with FSDP2 (`--parallel fsdp`): each process holds 1/N of the weights, gradients and
optimizer states, and gathers a layer's weights only while it computes that layer.

    torchrun --nproc_per_node 8 -m baichuan_tune.cli sft config.yaml --parallel fsdp

`shard_model` puts every decoder layer, the token embedding and the LM head each in its own FSDP2 group and
the rest (final norm, a reward model's value head) in the root group: one unit's full weights are gathered
at a time (and the next one prefetched), in forward and again in backward. Frozen weights (LoRA's base, freeze's lower layers) are sharded too; only the
trainable ones get gradients and optimizer states.

`ShardedCheckpoints` writes checkpoint-<step>/ with `torch.distributed.checkpoint` (every process writes
its shards, so output_dir must be one folder that every node sees), beside the scheduler state, each
process's RNG state and the position, as `training.Checkpoints` does. A sharded checkpoint resumes on as
many processes as wrote it (the batch position is counted in that many shards); another number is refused.
`full_state_dict` gathers the trained weights on rank 0 for the result in the published layout or a PEFT
adapter.

`gathered_for_generation` (ppo and grpo rollouts, their held-out answers): every unit's whole weights on every
process for the length of a generation, so that each process decodes its own prompts, for as many steps as
they take, without a collective per token (which would wait forever once one process's answers have ended).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import CheckpointError
from .distributed import Dist
from .training import Checkpoints, read_trainer_state, write_trainer_state

STATE = "sharded"  # the DCP folder inside checkpoint-<step>


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (any module class named *DecoderLayer), in order."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def shard_model(model, param_dtype: torch.dtype | None = None):
    """Apply FSDP2 `fully_shard` to each decoder layer, then to the root; returns the model (sharded in place).

    `param_dtype`: the dtype the gathered weights compute in (bf16 under --bf16); the shards and the optimizer
    stay in the dtype they were loaded in (fp32 master weights for full/freeze)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    if not layers:
        from .training import TrainingError

        raise TrainingError(f"--parallel fsdp: {type(model).__name__} has no decoder layer to shard")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    for unit in _embedding_and_head(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _embedding_and_head(model) -> list[torch.nn.Module]:
    """The token embedding and the LM head, each a unit of its own: in the root group (which FSDP2 keeps
    gathered from forward through backward) their 2 x vocab x width weights would stay whole all step. A head
    tied to the embedding stays in the root with it (one parameter cannot be in two units)."""
    found = {name.rsplit(".", 1)[-1]: m for name, m in model.named_modules()
             if name.endswith(("embed_tokens", "lm_head")) and getattr(m, "weight", None) is not None}
    units = list(found.values())
    if len(units) == 2 and units[0].weight is units[1].weight:
        return []
    return units


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gathered_for_generation(model):
    """Within the block every FSDP2 unit of `model` holds its whole weights (every process gathers them on
    entry, together, then computes on its own); on exit each process frees them again. A no-op for a model
    that is not sharded. Submodules may be called directly inside it (the policy's LM without its root)."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    # The first forward through an FSDP2 module makes it the root; a generation calling the LM inside the
    # root before any training forward would otherwise make the first layer a root of its own.
    model._get_fsdp_state()._lazy_init()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)  # each decoding step would free the weights again
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            # As shard_model left them: the root keeps its weights from forward through backward.
            unit.set_reshard_after_forward(unit is not model, recurse=False)


def full_state_dict(model, trainable_only: bool) -> dict:
    """Every process takes part; rank 0 gets the whole state dict on the CPU (the others an empty dict).
    `trainable_only` (an adapter is the result): the frozen base is not gathered."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def _options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen base weights never change: they come from the base model, not the checkpoint.
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


class ShardedCheckpoints(Checkpoints):
    """checkpoint-<step>/ of a sharded run: `sharded/` (DCP: trainable weights and optimizer states),
    `scheduler.pt`, `rng-<rank>.pt` and `trainer_state.json` (written last: a folder without it is incomplete).

    Written under a hidden name and renamed by rank 0 once every process has written its part, so a kill
    mid-save leaves the previous checkpoint as the latest complete one."""

    def __init__(self, output_dir: Path, keep: int, dist: Dist):
        super().__init__(output_dir, keep)
        self.dist = dist

    def save(self, step: int, model, optimizer, scheduler, scaler, position: dict, end_of_run: bool = False) -> Path:
        """Every process calls this. Returns checkpoint-<step>."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from .training import _rng_state

        final, tmp = self.output_dir / f"checkpoint-{step}", self.output_dir / f".checkpoint-{step}.tmp"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        weights, optim = get_state_dict(model, optimizer, options=_options())
        dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(tmp / STATE))
        torch.save(_rng_state(), tmp / f"rng-{self.dist.rank}.pt")
        self.dist.barrier()
        if self.dist.main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            write_trainer_state(tmp, position, step, end_of_run, sharded_processes=self.dist.world)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self.prune(end_of_run)
        self.dist.barrier()
        return final

    def resume(self, model, optimizer, scheduler, scaler) -> dict | None:
        """Restore the latest complete checkpoint (every process); None when there is none yet."""
        path = self.latest()
        if path is None:
            if self.dist.main:
                print(f"resume: no checkpoint in {self.output_dir} yet, starting from step 0")
            return None
        return self.load(path, model, optimizer, scheduler)

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from ..models.checkpoint import load_torch_file
        from .training import TrainingError, _set_rng_state

        position = read_trainer_state(path)
        saved_world = position.get("sharded_processes")
        if saved_world is None:
            raise TrainingError(f"{path}: written by a run without --parallel fsdp; resume it with --parallel ddp")
        if saved_world != self.dist.world:
            raise TrainingError(f"{path}: this sharded checkpoint was written by {saved_world} process(es); resume "
                                f"it with as many (this run has {self.dist.world}): the saved batch position counts "
                                "that many shards of each global batch")
        weights, optim = get_state_dict(model, optimizer, options=_options())
        state = {"model": weights, "optimizer": optim}
        try:
            dcp.load(state, checkpoint_id=str(path / STATE))
        except Exception as exc:  # DCP reports a missing or unreadable shard in its own terms
            raise CheckpointError(f"{path / STATE}: cannot be read ({exc})") from None
        # dcp.load filled every trainable key asked for (a missing one is an error there); the frozen base,
        # which is not in the checkpoint, must not count as missing here (LoRA, freeze).
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=_options(strict=False))
        scheduler.load_state_dict(load_torch_file(path / "scheduler.pt"))
        _set_rng_state(load_torch_file(path / f"rng-{self.dist.rank}.pt"))
        self.resumed_from = Path(path)
        return position

