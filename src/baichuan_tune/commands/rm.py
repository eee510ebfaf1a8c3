"""Train a reward model (scalar head on a Baichuan backbone) on preference pairs; `rm score` scores answers.

    baichuan-tune rm                                   # built-in demo: tiny default model, demo pairs, CPU
    baichuan-tune rm CONFIG.yaml --model DIR --dataset pairs.json --finetuning_type lora
    torchrun --nproc_per_node 4 -m baichuan_tune.cli rm CONFIG.yaml   # data-parallel on 4 GPUs of one node
    baichuan-tune rm score --reward_model outputs/rm-demo --prompt "What is the capital of Japan?" \
        --response "The capital of Japan is Tokyo."
    baichuan-tune rm score --reward_model outputs/rm-demo --input answers.jsonl     # {prompt, response} records
    baichuan-tune rm score --reward_model outputs/rm-demo --input held_out_pairs.json  # pairs: + accuracy

The reward r(x, y) is a linear head read at the last non-padding token of prompt + answer, trained with
the pairwise loss -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) (Ouyang et al. 2022, eq. 1) with LoRA,
QLoRA, freeze or full training. Data: preference records of `dpo_zh_demo.json`'s form (conversations,
chosen, rejected), flat {prompt, chosen, rejected} JSONL, or OpenAI messages + chosen/rejected. Logs
pairwise accuracy and reward margin on the eval split (before training too). Writes into output_dir the
adapter (or full weights), `value_head.safetensors` and `reward_model.json`, plus checkpoints,
trainer_log.jsonl, training_loss.png, training_accuracy.png, TensorBoard events and train_results.json.
A score is relative, per prompt: compare answers to the same prompt (higher = preferred); scores of
different prompts are not calibrated against each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..config import ConfigError, opt, parse_config
from ..data.loading import DataOptions
from ..options import ModelOptions, TrainOptions

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs, not for --help
    import torch

# The built-in demo: LoRA on the tiny default model, scored on held-out pairs before and after training.
DEMO_OVERRIDES = [
    "--model", "default", "--finetuning_type", "lora", "--lora_rank", "16", "--lora_alpha", "32",
    "--output_dir", "outputs/rm-demo", "--num_train_epochs", "2", "--learning_rate", "2e-3",
    "--per_device_train_batch_size", "8", "--logging_steps", "5", "--save_steps", "100", "--val_size", "80",
    "--eval_steps", "20", "--cutoff_len", "64", "--device", "cpu",
    "--overwrite_output_dir", "true",
]


@dataclass
class RMConfig(ModelOptions, DataOptions, TrainOptions):
    output_dir: str = opt("outputs/rm", "folder for the reward model, checkpoints, logs and plots")
    learning_rate: float = opt(1e-4, "peak learning rate")
    num_train_epochs: float = opt(1.0, "passes over the training pairs")

@dataclass
class ScoreConfig:
    reward_model: str = opt("outputs/rm-demo", "reward model folder written by `baichuan-tune rm`")
    prompt: str = opt("", "a user prompt (with --response)")
    response: str = opt("", "the answer to --prompt to score")
    input: str = opt("", "a file of {prompt, response} records, or of preference pairs (scores both + accuracy)")
    base_model: str = opt("", "base model of an adapter reward model (default: the one it was trained on)")
    template: Literal["baichuan2", "baichuan", "human_assistant", "base"] | None = opt(
        None, "chat format of prompt + answer (default: the one the reward model was trained in)")
    batch_size: int = opt(8, "answers per forward pass")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "score":
        return score(argv[1:])
    from ..options import with_demo

    argv, demo = with_demo(argv, DEMO_OVERRIDES, "reward-model demo (tiny default model, CPU)", RMConfig)
    cfg = parse_config(RMConfig, argv, prog="baichuan-tune rm")
    from ..extras import check_extras

    check_extras("rm", cfg)
    from ..train import distributed
    from ..train.adapters import count_parameters
    from ..train.alignment import model_reference, write_demo_pairs
    from ..data.loading import load_pair_data
    from ..train.engine import Engine, schedule_for
    from ..train.methods import PairMethod, eval_results
    from ..train.training import start_run, final_dtype, load_trainable, plot_curves, write_results
    from ..models.value_head import RewardModel, ValueHead, save_reward_model

    # ---- setup
    dist, device, out, amp_dtype = start_run(cfg)
    files = cfg.dataset or [distributed.main_first(  # rank 0 writes the demo pairs; the others then read them
        dist, lambda: write_demo_pairs(out) if dist.main else str(out / "demo_pairs.json"))]
    lm, tokenizer = load_trainable(cfg, device, amp_dtype)
    train_set, val_set, report = distributed.main_first(  # rank 0 tokenises first and fills the cache
        dist, lambda: load_pair_data(files, tokenizer, **cfg.load_kwargs(cfg.seed)))
    rm = RewardModel(lm, ValueHead(lm.config.hidden_size).to(device)).train()
    trainable, total = count_parameters(rm)
    schedule = schedule_for(cfg, len(train_set), dist.world)
    engine = Engine(rm, PairMethod("rm", train_set, val_set, pairwise_loss), cfg, out, schedule, dist, device,
                    amp_dtype)

    # ---- train
    results = engine.run(f"{report}; {schedule.total_steps} optimizer steps; trainable {trainable / 1e6:.2f}M of "
                         f"{total / 1e6:.1f}M parameters ({cfg.finetuning_type})")
    distributed.shutdown(dist)

    # ---- save
    if not dist.main:
        return 0
    meta = {"adapter": cfg.finetuning_type in ("lora", "qlora"), "base_model": model_reference(cfg.model),
            "finetuning_type": cfg.finetuning_type, "template": cfg.template, "cutoff_len": cfg.cutoff_len}
    with engine.keep_state():  # the trained state stays on disk until the result is written
        save_reward_model(rm, tokenizer, out, meta, final_dtype(cfg), state_dict=engine.full_state)
        if cfg.plot_loss:
            plot_curves(out / "trainer_log.jsonl", out / "training_loss.png", ("loss", "eval_loss"), "reward model loss")
            plot_curves(out / "trainer_log.jsonl", out / "training_accuracy.png", ("accuracy", "eval_accuracy"),
                        "pairwise accuracy")
        write_results(out, {**results, **report.counts, **eval_results(engine.evals)})
    print(f"Done: reward model in {out} (score answers with: baichuan-tune rm score --reward_model {out} ...)")
    return 0


def pairwise_loss(rm, batch: dict) -> tuple[torch.Tensor, dict]:
    """InstructGPT's pairwise loss on one pair batch, with accuracy and margin for the log."""
    from ..train.losses import pairwise_accuracy, pairwise_rm_loss, reward_margin
    from ..train.methods import split_pairs

    chosen, rejected = split_pairs(rm(batch["input_ids"], batch["attention_mask"]))  # [B], [B]
    c, r = chosen.detach(), rejected.detach()
    metrics = {"accuracy": float(pairwise_accuracy(c, r)), "margin": float(reward_margin(c, r)),
               "chosen_reward": float(c.mean()), "rejected_reward": float(r.mean())}
    return pairwise_rm_loss(chosen, rejected), metrics


# ----------------------------------------------------------------------------- rm score


def score(argv: list[str]) -> int:
    """`rm score`: print one JSON line per scored answer (and a summary line for a pair file)."""
    import json

    cfg = parse_config(ScoreConfig, argv, prog="baichuan-tune rm score")
    from ..extras import check_extras

    check_extras("rm score", cfg)
    from ..data.templates import choose_template, read_template_record
    from ..train.training import resolve_device
    from ..models.value_head import RewardScorer, load_reward_model, read_reward_meta

    if bool(cfg.input) == bool(cfg.prompt) or bool(cfg.prompt) != bool(cfg.response):
        raise ConfigError("give either --input FILE, or --prompt TEXT with --response ANSWER")
    meta = read_reward_meta(Path(cfg.reward_model))
    # template.json, else reward_model.json's field (folders written before template.json existed)
    recorded = read_template_record(cfg.reward_model) or meta.get("template")
    template = choose_template(recorded, cfg.template, cfg.reward_model) or "baichuan2"
    device = resolve_device(cfg.device)
    rm, tokenizer = load_reward_model(cfg.reward_model, dtype=cfg.dtype, device=str(device),
                                      base_model=cfg.base_model or None)
    scorer = RewardScorer(rm, tokenizer, template, meta.get("cutoff_len", 0), cfg.batch_size)
    if cfg.prompt:
        value = scorer.score([[("user", cfg.prompt)]], [cfg.response])[0]
        record = {"prompt": cfg.prompt, "response": cfg.response, "score": round(value, 5)}
        print(json.dumps(record, ensure_ascii=False))
        return 0
    if _is_pair_file(cfg.input):
        return _score_pairs(scorer, cfg.input)
    records = _answer_records(cfg.input)
    values = scorer.score([[("user", prompt)] for _, prompt, _ in records], [response for _, _, response in records])
    for (where, prompt, response), value in zip(records, values):
        print(json.dumps({"record": where, "prompt": prompt, "response": response, "score": round(value, 5)},
                         ensure_ascii=False))
    return 0


def _is_pair_file(path: str) -> bool:
    from ..data.sources import iter_json_records

    first = next(iter(iter_json_records(path)), None)
    return first is not None and isinstance(first[1], dict) and "chosen" in first[1]


def _score_pairs(scorer, path: str) -> int:
    """Score both answers of every pair; print each pair, then pairs / accuracy / margin."""
    import json

    from ..data.sources import load_dataset

    records = load_dataset([path], kind="pair").train
    chosen = scorer.score([r.prompt for r in records], [r.chosen for r in records])
    rejected = scorer.score([r.prompt for r in records], [r.rejected for r in records])
    for record, c, r in zip(records, chosen, rejected):
        print(json.dumps({"record": record.where, "chosen_score": round(c, 5), "rejected_score": round(r, 5)},
                         ensure_ascii=False))
    wins = sum(c > r for c, r in zip(chosen, rejected))
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(records)
    print(json.dumps({"pairs": len(records), "accuracy": round(wins / len(records), 4), "margin": round(margin, 5)}))
    return 0


def _answer_records(path: str) -> list[tuple[str, str, str]]:
    """(where, prompt, response) of every {prompt, response} record; a bad one is a DataError naming it."""
    from ..data.sources import iter_json_records
    from ..errors import DataError

    found = []
    for where, obj, line_error in iter_json_records(path):
        if line_error:
            raise DataError(line_error)
        for key in ("prompt", "response"):
            value = obj.get(key) if isinstance(obj, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}, field '{key}': expected a non-empty string")
        found.append((where, obj["prompt"], obj["response"]))
    if not found:
        raise DataError(f"{path}: no records")
    return found
