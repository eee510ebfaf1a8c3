"""Loading and saving Baichuan checkpoints in the published layout, with one clear error for bad input.

- `validate_checkpoint(path)` reads only config.json, the index and the shard headers (a `.bin` shard is
  opened with `torch.load(weights_only=True, mmap=True)`, which maps the file instead of reading it) and
  checks every tensor name and shape against the config, so a wrong folder, a missing or truncated shard
  or a mismatched tensor is reported before any heavy work, naming the file and the problem.
- `load_model` goes through transformers' `from_pretrained` (no `trust_remote_code`): shards are memory
  mapped and each tensor is materialised straight on the target device in the target dtype, so no second
  full copy of the weights is held in host memory.
- `save_pretrained_atomic` writes config.json, generation_config.json, the tokenizer files and the weights
  under the published names (`model.layers.{i}.self_attn.W_pack.weight`, ...), sharded with an index, into
  a temporary folder renamed into place.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import ConfigError
from ..errors import BaichuanTuneError, CheckpointError
from ..io_utils import atomic_dir
from ..options import LoadOptions  # noqa: F401  (chat and serve read it from here)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# (index file, single file, shard file pattern) in the order transformers prefers them.
WEIGHT_LAYOUTS = {
    "safetensors": ("model.safetensors.index.json", "model.safetensors", "model{suffix}.safetensors"),
    "bin": ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model{suffix}.bin"),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ----------------------------------------------------------------------------- names, paths, dtypes


def parse_dtype(name) -> torch.dtype | str:
    """"fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16" -> the torch dtype; "auto" (or None) -> "auto"
    (the dtype the checkpoint's config names). A torch dtype passes through."""
    if name is None:
        return "auto"
    if isinstance(name, torch.dtype):
        if name not in DTYPE_NAMES:
            raise ConfigError(f"dtype {name} is not supported; use one of {', '.join(DTYPE_NAMES.values())}")
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; valid names: {', '.join([*DTYPES, 'auto'])}")
    return DTYPES[key]


def resolve_model_path(name_or_path) -> Path:
    """"default" -> the built-in default model folder (written on first use); anything else is a folder."""
    if str(name_or_path) == "default":
        from ..builtin import default_model_dir

        return default_model_dir()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: is a file; pass the model folder that holds config.json and the weights")
    hint = ""
    if "/" in str(name_or_path) and not str(name_or_path).startswith((".", "/", "~")):
        hint = " (models are not downloaded here: download the checkpoint folder and pass its path)"
    raise CheckpointError(f"{path}: model folder not found{hint}")


# ----------------------------------------------------------------------------- validation


@dataclass
class CheckpointInfo:
    """What `validate_checkpoint` found: the parsed config and the weight files transformers will read."""

    path: Path
    config: object = field(repr=False)  # BaichuanConfig
    format: str = "bin"  # "safetensors" or "bin"
    files: list[Path] = field(default_factory=list, repr=False)
    total_bytes: int = 0


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object ({what})")
    return data


def read_config(path: Path):
    """The BaichuanConfig of a checkpoint folder, or CheckpointError naming config.json and the problem."""
    from . import BaichuanConfig

    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; {path} is not a model checkpoint folder")
    data = _read_json(config_file, "the model config")
    model_type = data.get("model_type")
    if model_type != "baichuan":
        hint = ""
        if model_type == "llama":
            hint = " (a LLaMA-layout folder: convert it with `baichuan-tune convert --to baichuan`)"
        raise CheckpointError(f"{config_file}: model_type is {model_type!r}, not 'baichuan'{hint}")
    for key in ("torch_dtype", "dtype"):
        if data.get(key) is not None and str(data[key]).removeprefix("torch.") not in DTYPES:
            raise CheckpointError(f"{config_file}: unknown {key} {data[key]!r}; valid: {', '.join(DTYPE_NAMES.values())}")
    _check_sizes(data, config_file)
    if data.get("norm_head") is None:  # the published configs: settle it with the tokenizer files beside it too
        from .configuration_baichuan import norm_head_of

        data = {**data, "norm_head": norm_head_of(data, Path(path), str(config_file))}
    try:
        return BaichuanConfig.from_dict(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{config_file}: {exc}") from None


# Fields that size tensors or positions: a string or a 0 here would otherwise fail deep inside the model.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "model_max_length")
_POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")


def _check_sizes(data: dict, config_file: Path) -> None:
    """Types and bounds of the sizes, before anything is built: an absurd size would otherwise hang the
    load while memory grows (10,000,000 layers) or overflow a storage size."""
    from .configuration_baichuan import size_problem

    for key in _POSITIVE_INTS + _POSITIVE_NUMBERS:
        value = data.get(key)
        if key not in data or (value is None and key in ("max_position_embeddings", "model_max_length")):
            continue  # absent: the default; a null context length: the other one names it
        kinds = int if key in _POSITIVE_INTS else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
            what = "a positive integer" if key in _POSITIVE_INTS else "a positive number"
            raise CheckpointError(f"{config_file}: {key} must be {what}, got {value!r}")
    problem = size_problem(data)
    if problem:
        raise CheckpointError(f"{config_file}: {problem}")


def find_weight_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, shard files, weight_map or None) of the weights transformers would load from `path`."""
    path = Path(path)
    for fmt, (index_name, single_name, _) in WEIGHT_LAYOUTS.items():
        index_file = path / index_name
        if index_file.is_file():
            weight_map = _read_json(index_file, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_file}: has no 'weight_map' of tensor name -> shard file")
            for name, shard in weight_map.items():
                # Shards sit beside the index: a path elsewhere is refused, not followed.
                if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
                    raise CheckpointError(f"{index_file}: weight_map gives {name} the shard {shard!r}, not a file "
                                          "name in this folder")
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (path / shard).is_file():
                    example = next(name for name, f in weight_map.items() if f == shard)
                    raise CheckpointError(f"{index_file}: names shard {shard} (holding e.g. {example}), which is missing")
            return fmt, [path / s for s in shards], weight_map
        if (path / single_name).is_file():
            return fmt, [path / single_name], None
    names = ", ".join(n for layout in WEIGHT_LAYOUTS.values() for n in layout[:2])
    raise CheckpointError(f"{path}: no weights found (looked for {names})")


def read_shard_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype | str]]:
    """{tensor name: (shape, dtype)} of one shard, reading only its header (or mapping a .bin)."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as fh:
                return {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for any bad header
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({_first_line(exc)})") from None
    state = _load_bin(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_bin(file: Path):
    # mmap maps the storages instead of reading them, so checking a 10 GB shard costs milliseconds.
    return load_torch_file(file, mmap=True)


def load_torch_file(file: Path, mmap: bool = False):
    """`torch.load(file, weights_only=True)` on the CPU, or CheckpointError naming the file: truncated or corrupt,
    or holding pickled objects that weights_only refuses (which one, and why)."""
    import re

    is_zip = zipfile.is_zipfile(file)  # a truncated file loses the zip directory at its end
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except Exception as exc:  # noqa: BLE001 - torch raises OSError/RuntimeError/UnpicklingError/EOFError here
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if refused:
            raise CheckpointError(
                f"{file}: holds pickled objects other than tensors ({refused.group(1)}); refused: unpickling them "
                "could run code from the file, and files are loaded with weights_only=True, never executing code"
            ) from None
        raise CheckpointError(f"{file}: corrupt or truncated PyTorch file ({_torch_reason(exc)})") from None


def load_safetensors_file(file: Path) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` on the CPU, or CheckpointError naming a missing, truncated or corrupt file."""
    from safetensors.torch import load_file

    if not Path(file).is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for any bad file
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({_first_line(exc)})") from None


def _torch_reason(exc: Exception) -> str:
    """The useful line of torch's load error (its first line is often only "Weights only load failed.")."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        return rest.splitlines()[0][:200] if rest else type(exc).__name__
    return _first_line(exc)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def expected_weights(config) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every stored tensor of a model with this config (built on the meta device)."""
    from . import BaichuanForCausalLM

    with torch.device("meta"):
        model = BaichuanForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _is_ignorable(name: str) -> bool:
    # Older RoPE code stored the rotary `inv_freq` buffer in checkpoints; it is recomputed from the config.
    return name.endswith("rotary_emb.inv_freq")


def _check_tensors(path: Path, config, found: dict[str, tuple[tuple, object, Path]]) -> None:
    expected = expected_weights(config)
    config_file = path / CONFIG_FILE
    for name in (n for n in expected if n in found):  # in model order, so the first report is stable
        shape, dtype, file = found[name]
        if shape != expected[name]:
            raise CheckpointError(
                f"{file}: tensor {name} has shape {list(shape)} but {config_file} needs {list(expected[name])}"
            )
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}, expected a floating-point dtype")
    missing = [name for name in expected if name not in found]
    if missing:
        hint = " (this looks like the LLaMA layout: convert it with `baichuan-tune convert --to baichuan`)" \
            if any(".q_proj." in name for name in found) else ""
        raise CheckpointError(
            f"{path}: {len(missing)} weights missing from the checkpoint files, e.g. {', '.join(missing[:3])}{hint}"
        )
    unexpected = [name for name in found if name not in expected and not _is_ignorable(name)]
    if unexpected:
        name = unexpected[0]
        raise CheckpointError(
            f"{found[name][2]}: tensor {name} is not part of a Baichuan model with {config_file} "
            f"({len(unexpected)} unknown tensors)"
        )


def validate_checkpoint(path) -> CheckpointInfo:
    """Check a checkpoint folder without loading its weights; raise CheckpointError naming file and problem."""
    path = resolve_model_path(path)
    config = read_config(path)
    fmt, files, weight_map = find_weight_files(path)
    found: dict[str, tuple[tuple, object, Path]] = {}
    for file in files:
        for name, (shape, dtype) in read_shard_header(file).items():
            found[name] = (shape, dtype, file)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in found or found[name][2].name != shard:
                raise CheckpointError(f"{path / WEIGHT_LAYOUTS[fmt][0]}: says {name} is in {shard}, but it is not there")
    _check_tensors(path, config, found)
    return CheckpointInfo(path, config, fmt, files, sum(f.stat().st_size for f in files))


# ----------------------------------------------------------------------------- loading


def _device_map(device):
    """A transformers `device_map` that puts every weight on `device` as it is read."""
    if device is None or str(device) == "cpu":
        return {"": torch.device("cpu")}
    if str(device) == "auto":
        return "auto"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device '{device}'; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device '{device}' requested but CUDA is not available on this machine")
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
    return {"": dev}


def _quantization_config(quantize, dtype, sharded: bool = False):
    """transformers' BitsAndBytesConfig for 4-bit (NF4, double quantisation) or 8-bit loading: the one
    `baichuan_tune.models.quantize` defines for both ways of quantising. 4-bit layers compute in `dtype` when it
    is fp16 (an fp16 run), else in bf16; `sharded` (FSDP2) stores the packed NF4 weights in that dtype too."""
    if quantize in (None, 0, "", "none", "None"):
        return None
    from .quantize import bnb_config, check_bits

    bits = int(quantize) if isinstance(quantize, str) and quantize.isdigit() else quantize
    compute = torch.float16 if dtype == torch.float16 else torch.bfloat16
    return bnb_config(check_bits(bits), compute_dtype=compute, quant_storage=compute if sharded else torch.uint8)


def load_model(path, dtype="auto", device="cpu", quantize=None, adapter=None):
    """A Baichuan model from a checkpoint folder, validated first, weights placed directly on `device`.

    dtype: fp32 | bf16 | fp16 | auto (the config's dtype); quantize: None, 4 or 8 (bitsandbytes);
    adapter: a PEFT adapter folder loaded on top (the result is a `PeftModel`).
    """
    path = resolve_model_path(path)
    info = validate_checkpoint(path)
    return _load_validated(path, dtype, device, quantize, adapter, info.config)


def _load_validated(path: Path, dtype, device, quantize, adapter, config, sharded: bool = False):
    # Importing this package registered model_type baichuan with the Auto classes. The config is the one
    # validation read (its variant settled with the folder's tokenizer files too), not a second reading.
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=parse_dtype(dtype), device_map=_device_map(device))
    quantization = _quantization_config(quantize, kwargs["dtype"], sharded)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        device_map = kwargs["device_map"]
        on_cpu = device_map[""].type == "cpu" if isinstance(device_map, dict) else not torch.cuda.is_available()
        if quantization.load_in_4bit and on_cpu:
            from .quantize import check_cpu_4bit_config

            check_cpu_4bit_config(config)
    adapter_dir = check_adapter(adapter) if adapter else None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not load the model ({_first_line(exc)})") from exc
    if adapter_dir is not None:
        model = _load_adapter(model, adapter_dir)
    _attach_template(model, path, adapter_dir)
    return model.eval()


def _attach_template(model, path: Path, adapter_dir: Path | None) -> None:
    """Give the model the template it was trained in: the adapter's record, else the checkpoint's
    (template.json, or the copy transformers read from generation_config.json); none: left as it is."""
    from ..data.templates import check_template_record, read_template_record, set_model_template

    recorded = (read_template_record(adapter_dir) if adapter_dir is not None else None) or read_template_record(path)
    if recorded is None and getattr(model.generation_config, "template", None) is not None:
        recorded = check_template_record(model.generation_config.template,
                                         f"{path / GENERATION_CONFIG_FILE}, field 'template'")
    set_model_template(model, recorded)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # PEFT's names, in the order it prefers


def check_adapter(adapter) -> Path:
    """The adapter folder, its config and weights read and checked; CheckpointError names a missing, truncated,
    corrupt or pickled-code file before the base model loads."""
    adapter_dir = Path(adapter).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter_dir / 'adapter_config.json'}: missing; {adapter_dir} is not a PEFT adapter folder")
    _read_json(adapter_dir / "adapter_config.json", "the PEFT adapter config")
    weights = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{adapter_dir}: no adapter weights (looked for {', '.join(ADAPTER_WEIGHTS)})")
    read_shard_header(weights)  # the header and the size it promises (.bin: every pickled object)
    return adapter_dir


def _load_adapter(model, adapter_dir: Path):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - PEFT passes on safetensors', torch's and its own errors alike
        if isinstance(exc, BaichuanTuneError):
            raise
        raise CheckpointError(f"{adapter_dir}: could not load the adapter ({_first_line(exc)})") from exc


def load_tokenizer(path):
    """The Baichuan tokenizer of a checkpoint folder (its published tokenizer.model + tokenizer_config.json)."""
    path = resolve_model_path(path)
    from .tokenization_baichuan import VOCAB_FILE, BaichuanTokenizer, check_sentencepiece_file

    check_sentencepiece_file(path / VOCAB_FILE, path)  # a missing/corrupt file: CheckpointError naming it
    if (path / "tokenizer_config.json").exists():
        _read_json(path / "tokenizer_config.json", "the tokenizer config")
    try:
        return BaichuanTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: could not load the tokenizer ({_first_line(exc)})") from exc


def load_model_and_tokenizer(path, **kwargs):
    """(model, tokenizer) from one folder; the tokenizer and the checkpoint are checked before the weights load.
    `sharded=True`: 4-bit weights stored for FSDP2 sharding (see `_quantization_config`)."""
    path = resolve_model_path(path)
    info = validate_checkpoint(path)
    tokenizer = load_tokenizer(path)
    model = _load_validated(
        path, kwargs.pop("dtype", "auto"), kwargs.pop("device", "cpu"), kwargs.pop("quantize", None),
        kwargs.pop("adapter", None), info.config, kwargs.pop("sharded", False),
    )
    if kwargs:
        raise TypeError(f"load_model_and_tokenizer() got unexpected arguments {sorted(kwargs)}")
    return model, tokenizer


# ----------------------------------------------------------------------------- saving



def _split_shards(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], pattern: str, shard_size):
    """huggingface_hub's shard plan, computed on meta tensors of the output dtype so sizes are exact."""
    from huggingface_hub import split_torch_state_dict_into_shards

    metas = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in specs.items()}
    try:
        return split_torch_state_dict_into_shards(metas, filename_pattern=pattern, max_shard_size=shard_size)
    except ValueError as exc:
        raise ConfigError(f"shard size {shard_size!r} is not a size such as 5GB or 500MB ({exc})") from None


def check_output_dir(out, overwrite: bool, inputs: dict[str, object]) -> Path:
    """`out` as a Path, or ConfigError if it is one of the `inputs` folders ({"--model": path, ...}) or already
    holds files while `overwrite` is off: an atomic save replaces the whole folder, whatever was in it."""
    out = Path(out).expanduser()
    for flag, other in inputs.items():
        other = Path(other).expanduser()
        if other.exists() and out.exists() and out.resolve() == other.resolve():
            raise ConfigError(f"--output_dir {out} is the {flag} folder; write the result somewhere else")
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not overwrite):
        raise ConfigError(f"--output_dir {out} already exists and is not empty; pass --overwrite_output_dir true to replace it")
    return out


def check_shard_size(shard_size) -> None:
    """Raise ConfigError now, before any heavy work, if `shard_size` is not a size such as 5GB."""
    _split_shards({}, "model{suffix}.safetensors", shard_size)


def write_shards(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    get_tensor: Callable[[str], torch.Tensor],
    out_dir,
    shard_size="5GB",
    safe_serialization: bool = True,
) -> list[Path]:
    """Write tensors `specs` {name: (shape, dtype)} as shards (+ index when several) into `out_dir`.

    `get_tensor(name)` is called one shard at a time and each tensor is copied to a contiguous CPU tensor
    of the spec's dtype, so peak extra memory is one shard. transformers 5 writes only safetensors, and
    huggingface_hub's `save_torch_state_dict` cannot cast per shard, hence this small writer around its
    shard planner.
    """
    out_dir = Path(out_dir)
    fmt = "safetensors" if safe_serialization else "bin"
    index_name, _, pattern = WEIGHT_LAYOUTS[fmt]
    split = _split_shards(specs, pattern, shard_size)
    written = []
    for filename, names in split.filename_to_tensors.items():
        # A copy per tensor: views (q/k/v rows of W_pack) must not drag their whole storage into the file.
        shard = {n: get_tensor(n).detach().to("cpu").to(specs[n][1]).clone().contiguous() for n in names}
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        else:
            torch.save(shard, out_dir / filename)
        written.append(out_dir / filename)
        del shard
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written


def save_state_dict(state_dict: dict, out_dir, dtype=None, shard_size="5GB", safe_serialization=True) -> list[Path]:
    """Write a state dict in the published layout; `dtype` (None: keep each tensor's) casts per shard."""
    target = None if dtype is None else parse_dtype(dtype)
    specs = {}
    for name, tensor in state_dict.items():
        cast = tensor.is_floating_point() and target not in (None, "auto")
        specs[name] = (tuple(tensor.shape), target if cast else tensor.dtype)
    return write_shards(specs, state_dict.__getitem__, out_dir, shard_size, safe_serialization)


def write_config(config, out_dir, dtype: torch.dtype) -> None:
    """config.json naming the weights' dtype both ways (`dtype` for transformers 5, `torch_dtype` before)."""
    import copy

    config = copy.deepcopy(config)
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    config_file = Path(out_dir) / CONFIG_FILE
    data = json.loads(config_file.read_text(encoding="utf-8"))
    data["torch_dtype"] = DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_generation_config(generation_config, out_dir: Path) -> None:
    try:
        generation_config.save_pretrained(str(out_dir))
    except ValueError:
        # transformers refuses to save a config whose settings conflict (e.g. the Chat models' temperature
        # once do_sample was switched off for greedy decoding); the file is still what the model used.
        generation_config.to_json_file(str(out_dir / GENERATION_CONFIG_FILE), use_diff=True)


def _check_saveable(model) -> None:
    if hasattr(model, "peft_config"):
        raise BaichuanTuneError(
            "save_pretrained_atomic got a PEFT model: merge it first (model.merge_and_unload()) or save the "
            "adapter with model.save_pretrained(folder)"
        )
    from .quantize import is_quantized

    if is_quantized(model) or getattr(model.config, "quantization_config", None):
        raise BaichuanTuneError("cannot save a bitsandbytes-quantized model in the published layout; load it unquantized")


def _write_template(model, out_dir: Path) -> None:
    """template.json beside config.json when the model carries a template (trained, or loaded with one)."""
    from ..data.templates import model_template, write_template_record

    name = model_template(model)
    if name is not None:
        write_template_record(out_dir, name)


def save_pretrained_atomic(model, tokenizer, out_dir, dtype=None, shard_size="5GB", safe_serialization=True,
                           state_dict: dict | None = None) -> Path:
    """Write model (+ tokenizer) into `out_dir` in the published layout, atomically (temp folder + rename).

    dtype: None keeps the model's dtype; safe_serialization False writes `pytorch_model-0000i-of-0000n.bin`
    shards with `pytorch_model.bin.index.json`, as the published checkpoints ship. `state_dict`: the weights to
    write instead of model.state_dict() (a sharded model's, gathered whole).
    """
    _check_saveable(model)
    check_shard_size(shard_size)
    target = None if dtype is None else parse_dtype(dtype)
    target = None if target == "auto" else target
    state_dict = model.state_dict() if state_dict is None else state_dict
    with atomic_dir(Path(out_dir)) as tmp:
        config = model.config
        if not getattr(config, "architectures", None):
            config = type(config).from_dict(config.to_dict())
            config.architectures = [type(model).__name__]
        write_config(config, tmp, target or model.dtype)
        if getattr(model, "generation_config", None) is not None:
            _write_generation_config(model.generation_config, tmp)
        _write_template(model, tmp)
        save_state_dict(state_dict, tmp, target, shard_size, safe_serialization)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)


__all__ = [
    "CheckpointInfo", "check_adapter", "load_safetensors_file", "load_torch_file", "expected_weights", "find_weight_files", "load_model", "load_model_and_tokenizer",
    "load_tokenizer", "parse_dtype", "read_config", "resolve_model_path", "save_pretrained_atomic",
    "save_state_dict", "validate_checkpoint", "check_output_dir", "check_shard_size", "write_config", "write_shards",
]
