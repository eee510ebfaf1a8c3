"""Score a model on C-Eval, CMMLU or MMLU (n-shot multiple choice), or measure its perplexity on a text file.

    baichuan-tune eval --model DIR --task ceval --split val --data ceval.zip
    baichuan-tune eval --model DIR --adapter ADAPTER_DIR --quantization_bit 4 --task cmmlu --split test --data cmmlu.zip
    baichuan-tune eval --model DIR --task mmlu --split test --data mmlu/data --subjects anatomy astronomy
    baichuan-tune eval --model DIR --task ppl --data c4_demo.jsonl

`--data` is the benchmark as published: its .zip/.tar archive or unpacked folder (one CSV per subject and
split). Few-shot examples come from the dev split (`--n-shot 5`). Each question is scored by the model's
probability of the answer letters at the answer position. Accuracy per subject, per category and overall is
printed and written to OUTPUT/results.json with every prediction in OUTPUT/predictions.json (C-Eval test,
which publishes no answers: OUTPUT/submission.json in the leaderboard's form). `--max-questions N` and
`--subjects` make quick runs. For `--task ppl`, `--data` is a .txt file (one document) or .jsonl/.json
(one document per record, text in `--text-field`).

OUTPUT is `--output_dir`, by default eval_results/<model>[+<adapter>][-4bit|-8bit]/<task>-<split> (ppl:
.../ppl-<data file name>), so runs of other models, adapters or quantisations never replace each other's
results; a folder that already holds results is refused unless `--overwrite_output_dir true`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ..config import ConfigError, opt, parse_config


@dataclass
class EvalConfig:
    model: str = opt("default", "model folder, or 'default' for the built-in model")
    adapter: str | None = opt(None, "PEFT adapter folder to apply on top of the model (e.g. a LoRA from sft)")
    quantization_bit: int | None = opt(None, "load the weights in 4 or 8 bits with bitsandbytes")
    task: Literal["ceval", "cmmlu", "mmlu", "ppl"] = opt("ceval", "ceval, cmmlu, mmlu or ppl")
    split: Literal["dev", "val", "test"] = opt("val", "dev, val or test (CMMLU publishes dev and test)")
    data: str | None = opt(None, "benchmark archive or folder as published; for ppl a .txt/.jsonl/.json file")
    n_shot: int = opt(5, "few-shot examples per prompt, from the dev split")
    subjects: list[str] = opt(factory=list, help="only these subjects (comma or space separated)")
    max_questions: int | None = opt(None, "at most this many questions per subject (quick runs)")
    batch_size: int = opt(16, "prompts per forward pass")
    max_batch_tokens: int = opt(32768, "at most this many padded tokens per forward pass")
    max_length: int | None = opt(None, "context in tokens (default: the model's); longer prompts drop examples")
    share_prefix: bool = opt(True, "run a subject's shared header and examples once and reuse their KV cache")
    text_field: str = opt("text", "ppl: the field of a .jsonl/.json record that holds the text")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU)")
    device: str = opt("auto", "cuda, cpu or auto (cuda when available)")
    output_dir: str | None = opt(None, "folder for results.json (default: eval_results/<model>[+<adapter>][-4bit]/<task>-<split>)")
    overwrite_output_dir: bool = opt(False, "replace the results an earlier run left in the output folder")
    show_subjects: bool = opt(True, "print every subject's accuracy, not only the categories")
    progress: bool = opt(True, "show a progress bar (over subjects; ppl: over batches of text)")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("--data is required: the benchmark archive or folder (for ppl: a text/JSONL file)")
        if self.quantization_bit not in (None, 4, 8):
            raise ConfigError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")
        for key in ("batch_size", "max_batch_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
        if self.n_shot < 0:
            raise ConfigError("--n-shot cannot be negative")
        if self.max_questions is not None and self.max_questions < 1:
            raise ConfigError("--max-questions must be at least 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be at least 2")


def _join_list_values(argv: list[str], keys=("--subjects",)) -> list[str]:
    """`--subjects a b c` -> `--subjects a,b,c` (the config parser reads one value per flag)."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] in keys:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            out.append(",".join(values))
        i += 1
    return out


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run_name(cfg: EvalConfig) -> str:
    """The results folder's name for this model: <model>[+<adapter>][-4bit|-8bit], from the folders' names."""
    name = _folder_name(cfg.model) + (f"+{_folder_name(cfg.adapter)}" if cfg.adapter else "")
    return name + (f"-{cfg.quantization_bit}bit" if cfg.quantization_bit else "")


def _folder_name(path: str) -> str:
    return Path(path).name or Path(path).resolve().name  # "runs/sft/" -> "sft", "." -> the folder's own name


def output_dir(cfg: EvalConfig) -> Path:
    """--output_dir, or eval_results/<run name>/<task>-<split> (ppl: ppl-<data file name>)."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    part = f"ppl-{Path(cfg.data).stem}" if cfg.task == "ppl" else f"{cfg.task}-{cfg.split}"
    return Path("eval_results") / run_name(cfg) / part


def refuse_earlier_results(out_dir: Path, overwrite: bool) -> None:
    """An earlier run's results are never replaced by accident (another model's, say)."""
    if (out_dir / "results.json").exists() and not overwrite:
        raise ConfigError(f"{out_dir} already holds results (results.json of an earlier run); pass --overwrite_output_dir true "
                          "to replace them, or another --output_dir")


def main(argv: list[str]) -> int:
    cfg = parse_config(EvalConfig, _join_list_values(argv), prog="baichuan-tune eval")
    from ..extras import check_extras

    check_extras("eval", cfg)
    out_dir = output_dir(cfg)
    refuse_earlier_results(out_dir, cfg.overwrite_output_dir)
    from ..eval.perplexity import perplexity, read_texts
    from ..eval.reading import load_benchmark
    from ..eval.scoring import evaluate
    from ..eval.summary import format_table, submission, summarize
    from ..eval.tasks import get_task
    from ..io_utils import atomic_write_json
    from ..models.checkpoint import load_model_and_tokenizer, resolve_model_path
    from ..serve.generation import context_length

    # Read the data before the model: a bad file fails in a second, not after minutes of loading.
    if cfg.task == "ppl":
        texts = read_texts(cfg.data, cfg.text_field)
    else:
        task = get_task(cfg.task)
        subjects = load_benchmark(task, cfg.data, cfg.split, cfg.subjects or None, cfg.max_questions,
                                     need_shots=cfg.n_shot > 0)
    device = _device(cfg.device)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    start = time.time()
    model, tokenizer = load_model_and_tokenizer(resolve_model_path(cfg.model), dtype=dtype, device=device,
                                                quantize=cfg.quantization_bit, adapter=cfg.adapter)
    model.eval()
    print(f"loaded {cfg.model}" + (f" + {cfg.adapter}" if cfg.adapter else "") + f" in {time.time() - start:.1f}s")
    start = time.time()
    if cfg.task == "ppl":
        result = perplexity(model, tokenizer, texts, cfg.max_length, cfg.batch_size, progress=cfg.progress)
        print(f"perplexity {result['perplexity']:.4f} (NLL {result['nll_per_token']:.4f}/token) over "
              f"{result['tokens']} tokens of {result['documents']} documents, windows of {result['max_length']}")
        # No split and no few-shot examples in a perplexity run: null, in the config too, not their defaults.
        config = {**asdict(cfg), "split": None, "n_shot": None}
        atomic_write_json(out_dir / "results.json", {"task": "ppl", "split": None, "n_shot": None, "data": cfg.data,
                                                      "config": config, **result,
                                                      "seconds": round(time.time() - start, 2)})
        _remove_stale(out_dir, ("predictions.json", "submission.json"))
        print(f"wrote {out_dir / 'results.json'}")
        return 0
    results = evaluate(model, tokenizer, task, subjects, split=cfg.split, n_shot=cfg.n_shot,
                          max_length=cfg.max_length, batch_size=cfg.batch_size,
                          max_batch_tokens=cfg.max_batch_tokens, share_prefix=cfg.share_prefix,
                          progress=cfg.progress)
    seconds = time.time() - start
    summary = summarize(task, results)
    print(format_table(task, summary, show_subjects=cfg.show_subjects))
    _report_dropped(summary, cfg.max_length or context_length(model))
    questions = summary["overall"]["questions"]
    print(f"{questions} questions in {seconds:.1f}s ({questions / max(seconds, 1e-9):.1f} questions/s)")
    atomic_write_json(out_dir / "results.json", {
        "task": task.name, "split": cfg.split, "n_shot": cfg.n_shot, "config": asdict(cfg), **summary,
        "seconds": round(seconds, 2),
    })
    atomic_write_json(out_dir / "predictions.json", {r.subject: r.predictions for r in results})
    if summary["overall"]["accuracy"] is None:
        atomic_write_json(out_dir / "submission.json", submission(results))
        print(f"this split publishes no answers: predictions for the leaderboard in {out_dir / 'submission.json'}")
    else:
        _remove_stale(out_dir, ("submission.json",))
    print(f"wrote {out_dir / 'results.json'}")
    return 0


def _remove_stale(out_dir: Path, names: tuple[str, ...]) -> None:
    """After --overwrite_output_dir: files of the replaced run that this run does not write would no longer match."""
    for name in names:
        (out_dir / name).unlink(missing_ok=True)


def _report_dropped(summary: dict, max_length: int) -> None:
    if summary["shots_dropped"]:
        print(f"note: {summary['shots_dropped']} few-shot examples dropped from {summary['prompts_shortened']} "
              f"prompts to fit {max_length} tokens")
    if summary["truncated"]:
        print(f"note: {summary['truncated']} prompts longer than {max_length} tokens even with no examples were "
              "cut from the left")
