"""Several LoRA adapters on one base model, each row of a batch with its own (`serve --adapter name=path`).

PEFT can mix adapters in one batch (`adapter_names=`), but it splits the batch into per-adapter groups
on the host, which a CUDA graph replayed for every decoding step cannot follow as rows change hands.
`MultiLoRA` instead stacks every adapter's A and B matrices per target layer (adapter 0 = the base, all
zeros) and adds, through a forward hook on each target linear layer, the row's own low-rank update:
  y += scale[a] * (x @ A[a].T) @ B[a].T   with a = the row's adapter index (a device tensor),
the same formula as PEFT's LoRA layer (dropout is off at inference). A base row adds exactly zero.
Adapters of different ranks are zero-padded to the largest; a layer an adapter does not target has
zeros for it. Only plain LoRA is taken (no DoRA, no trained biases or extra modules): anything else is
refused by name.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.checkpoint import ADAPTER_WEIGHTS, check_adapter

_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def read_lora(folder: Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(adapter_config.json, {module name: {"A": [r, in], "B": [out, r]}}) of a PEFT LoRA adapter folder."""
    folder = check_adapter(folder)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    where = folder / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r}; serving several adapters takes LoRA only")
    for key, plain in (("use_dora", False), ("bias", "none"), ("modules_to_save", None), ("alpha_pattern", {}),
                       ("fan_in_fan_out", False)):
        if config.get(key) not in (plain, None) and config.get(key) != {} and config.get(key) != []:
            raise CheckpointError(f"{where}: {key}={config[key]!r} is not served beside other adapters; "
                                  f"serve this adapter alone (--adapter PATH) or merge it (export)")
    weights = next(folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file())
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise CheckpointError(f"{weights}: tensor {key!r} is not a LoRA A or B matrix; serve this adapter alone")
        modules.setdefault(match.group(1), {})[match.group(2)] = tensor
    return config, modules


def _scale(config: dict, rank: int) -> float:
    alpha = float(config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


class MultiLoRA:
    """The adapters in `folders` ({name: folder}) hooked onto `model`'s linear layers.

    `rows(index)`: inside it, row i of every forward uses adapter index[i] (1-based in `folders`' order,
    0 = the base); an index of one element applies to every row. Outside, the model is the base.
    `templates`: {name: the chat template recorded with that adapter, or None}.
    """

    def __init__(self, model, folders: dict[str, str | Path]):
        from ..data.templates import read_template_record
        from .fast_decode import causal_lm

        lm = causal_lm(model)
        if lm is not model:
            raise CheckpointError("several named adapters go on the plain base model, not on one loaded with "
                                  "--adapter PATH: name every adapter (--adapter NAME=PATH)")
        self.templates = {name: read_template_record(Path(folder)) for name, folder in folders.items()}
        read = {name: read_lora(Path(folder)) for name, folder in folders.items()}
        layers = dict(lm.named_modules())
        weight = lm.get_input_embeddings().weight
        self.index: torch.Tensor | None = None
        self.serial_index = torch.zeros(1, dtype=torch.long, device=weight.device)
        self._handles = []
        targets = sorted({m for _, modules in read.values() for m in modules})
        for module_name in targets:
            if module_name not in layers or not hasattr(layers[module_name], "in_features"):
                owner = next(name for name, (_, modules) in read.items() if module_name in modules)
                raise CheckpointError(f"{folders[owner]}: adapter layer {module_name!r} is not a linear layer of this model")
            self._hook(layers[module_name], module_name, read, weight.dtype, weight.device)

    def _hook(self, layer, module_name: str, read: dict, dtype, device) -> None:
        ranks = [modules[module_name]["A"].shape[0] for _, modules in read.values() if module_name in modules]
        rank, n = max(ranks), len(read) + 1
        a = torch.zeros(n, rank, layer.in_features, dtype=dtype, device=device)
        b = torch.zeros(n, layer.out_features, rank, dtype=dtype, device=device)
        scale = torch.zeros(n, 1, 1, dtype=dtype, device=device)
        for i, (config, modules) in enumerate(read.values(), start=1):
            if module_name in modules:
                pair = modules[module_name]
                r = pair["A"].shape[0]
                a[i, :r], b[i, :, :r] = pair["A"].to(dtype), pair["B"].to(dtype)
                scale[i] = _scale(config, r)
        self._handles.append(layer.register_forward_hook(self._update(a, b, scale)))

    def _update(self, a, b, scale):
        def hook(module, args, output):
            index = self.index
            if index is None:
                return None
            x = args[0]
            rows = x.shape[0]
            flat = x.reshape(rows, -1, x.shape[-1]).to(a.dtype)  # [B, T, in]
            pick_a, pick_b, pick_s = a[index], b[index], scale[index]
            if index.shape[0] != rows:
                pick_a, pick_b, pick_s = (t.expand(rows, *t.shape[1:]) for t in (pick_a, pick_b, pick_s))
            delta = torch.bmm(torch.bmm(flat, pick_a.transpose(1, 2)), pick_b.transpose(1, 2)) * pick_s
            return output + delta.reshape(output.shape).to(output.dtype)

        return hook

    @contextlib.contextmanager
    def rows(self, index: torch.Tensor):
        previous, self.index = self.index, index
        try:
            yield
        finally:
            self.index = previous

    def serving(self, adapter: int):
        """Every forward inside uses adapter `adapter` (through one persistent tensor, which a CUDA graph
        captured inside can keep)."""
        self.serial_index.fill_(adapter)
        return self.rows(self.serial_index)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
