"""RLHF with PPO: sample answers, score them (reward model or rule), update the policy against a KL penalty.

    baichuan-tune ppo                                  # built-in demo: tiny default model, rule reward, CPU
    baichuan-tune ppo CONFIG.yaml --model DIR --dataset prompts.jsonl --reward_model outputs/rm
    baichuan-tune ppo --model DIR --dataset prompts.jsonl --reward_function baichuan_tune.rewards:contains_keyword \
        --reward_kwargs keyword=Paris

Each step samples one answer per prompt for `rollout_batch_size` prompts (batched, KV cache), scores
them, turns scores into per-token rewards with a KL penalty against the reference (fixed coefficient,
or adaptive toward `kl_target`), computes GAE advantages (whitened) and runs `ppo_epochs` epochs of the
clipped policy and value losses. With LoRA/QLoRA the policy, the critic (a value head on the policy),
the reward model (a second adapter, when it was trained on the same base) and the reference (the base
with adapters off) share one copy of the base weights. Prompts: any sft or preference file (answers are
dropped) or {"prompt": ...} records. Writes into output_dir the policy adapter (or full weights), the
critic head, checkpoints (--resume true), trainer_log.jsonl, ppo_reward.png, ppo_kl.png, TensorBoard
events and train_results.json. The policy should start from an SFT model: merge an sft adapter into its
base with `baichuan-tune export` and pass that folder as --model, so it is also the reference.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..builtin import SFT_DEMO_DIR
from ..config import ConfigError, opt, parse_config
from ..errors import DataError
from ..lazy import no_grad
from ..options import ModelOptions, TrainOptions

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs, not for --help
    import torch

# The built-in demo: LoRA, rewarded for answering in Chinese (a dense rule), 30 steps on CPU. It starts from
# the sft demo's model (outputs/sft-demo) when there is one: RLHF starts from a fine-tuned model.
DEMO_OVERRIDES = [
    "--finetuning_type", "lora", "--lora_rank", "16", "--lora_alpha", "32", "--output_dir", "outputs/ppo-demo",
    "--max_steps", "30", "--learning_rate", "3e-3", "--kl_coef", "0.05",
    "--reward_function", "baichuan_tune.rewards:chinese_ratio", "--rollout_batch_size", "32", "--ppo_epochs", "2",
    "--per_device_train_batch_size", "32", "--max_new_tokens", "12", "--val_size", "32", "--eval_steps", "10",
    "--save_steps", "100", "--device", "cpu", "--overwrite_output_dir", "true",
]


@dataclass
class PPOConfig(ModelOptions, TrainOptions):
    output_dir: str = opt("outputs/ppo", "folder for the policy, checkpoints, logs and plots")
    learning_rate: float = opt(1e-5, "peak learning rate")
    plot_loss: bool = opt(True, "write ppo_reward.png and ppo_kl.png")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input (0: rollouts and updates see the same policy)")
    per_device_train_batch_size: int = opt(4, "PPO mini-batch size (answers per forward/backward)")
    logging_steps: int = opt(1, "log every N PPO steps")
    save_steps: int = opt(50, "write a checkpoint every N PPO steps")
    num_train_epochs: float = opt(1.0, "passes over the prompts (when max_steps is -1)")
    max_steps: int = opt(-1, "stop after this many PPO steps (-1: num_train_epochs passes over the prompts)")
    eval_steps: int = opt(0, "answer the held-out prompts every N PPO steps (0: only before and after training)")
    # data
    dataset: list[str] = opt(factory=list, help="prompt files (.json/.jsonl): sft, preference or {prompt} records")
    template: Literal["baichuan2", "baichuan", "human_assistant", "base"] = opt("baichuan2", "chat format of prompts")
    max_prompt_length: int = opt(256, "keep the last N tokens of a longer prompt")
    max_samples: int = opt(0, "read at most this many prompts per file (0: all)")
    val_size: float = opt(0.0, "held-out prompts, a fraction (< 1) or a count: greedy answers scored every eval_steps")
    # reward
    reward_model: str = opt("", "reward model folder from `baichuan-tune rm`")
    reward_function: str = opt("", "rule reward: module:function or file.py:function (see baichuan_tune.rewards)")
    reward_kwargs: list[str] = opt(factory=list, help="key=value arguments for the reward function")
    normalize_reward: bool = opt(True, "scale scores by the running mean/std of all scores so far")
    reward_clip: float = opt(5.0, "clip (normalised) scores to [-reward_clip, reward_clip] (0: no clipping)")
    # rollout
    rollout_batch_size: int = opt(16, "prompts (answers) per PPO step")
    max_new_tokens: int = opt(64, "answer length limit")
    min_new_tokens: int = opt(0, "force at least this many answer tokens (= max_new_tokens: fixed length)")
    temperature: float = opt(1.0, "sampling temperature (pure sampling: no top-k/top-p, so PPO's log-probs match)")
    # PPO
    ppo_epochs: int = opt(4, "optimisation epochs over each rollout batch")
    gamma: float = opt(1.0, "discount factor")
    lam: float = opt(0.95, "GAE lambda")
    cliprange: float = opt(0.2, "policy ratio clip epsilon")
    cliprange_value: float = opt(0.2, "value clip epsilon")
    vf_coef: float = opt(0.1, "weight of the value loss")
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 per batch")
    kl_coef: float = opt(0.05, "KL penalty coefficient (initial value when adaptive)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "adaptive KL: target KL per answer (nats)")
    kl_horizon: float = opt(10000.0, "adaptive KL: horizon in answers")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("need max_new_tokens >= 1 and 0 <= min_new_tokens <= max_new_tokens")
        if self.rollout_batch_size < 1 or self.ppo_epochs < 1:
            raise ConfigError("rollout_batch_size and ppo_epochs must be at least 1")


def main(argv: list[str]) -> int:
    from ..options import with_demo

    argv, _ = with_demo(argv, _demo_argv, "PPO demo (rule reward: answer in Chinese, CPU)", PPOConfig)
    cfg = parse_config(PPOConfig, argv, prog="baichuan-tune ppo")
    from .. import losses as L
    from .. import rlhf
    from ..adapters import count_parameters
    from ..training import (Checkpoints, RunLog, load_trainable, log_resume, logged_evals, make_grad_scaler, make_optimizer,
                            make_scheduler, precision_dtype, prepare_output_dir, resolve_device, seed_everything,
                            write_results)
    from ..value_head import PolicyWithValue, ValueHead

    # ---- setup
    out = prepare_output_dir(cfg)
    seed_everything(cfg.seed)
    device, amp_dtype = resolve_device(cfg.device), precision_dtype(cfg)
    lm, tokenizer = load_trainable(cfg, device, amp_dtype)
    run = PPORun(cfg, device, amp_dtype, lm, tokenizer)
    run.reference = _frozen_copy(lm) if cfg.finetuning_type in ("freeze", "full") else None
    run.reward = _make_reward(cfg, lm, device, amp_dtype)
    run.policy = PolicyWithValue(lm, ValueHead(lm.config.hidden_size).to(device))
    run.train_prompts, run.eval_prompts, report = _load_prompts(cfg, tokenizer, out)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
        len(run.train_prompts) / cfg.rollout_batch_size * cfg.num_train_epochs)
    minibatches = math.ceil(min(cfg.rollout_batch_size, len(run.train_prompts)) / cfg.per_device_train_batch_size)
    updates_per_step = cfg.ppo_epochs * math.ceil(minibatches / cfg.gradient_accumulation_steps)
    run.optimizer = make_optimizer(run.policy, cfg)
    run.scheduler = make_scheduler(run.optimizer, cfg, total_steps * updates_per_step)
    run.scaler = make_grad_scaler(device, amp_dtype)
    run.kl_ctl = (L.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                  else L.FixedKLController(cfg.kl_coef))
    run.moments = L.RunningMoments() if cfg.normalize_reward else None
    checkpoints = Checkpoints(out, cfg.save_total_limit)
    if cfg.resume and checkpoints.latest() is not None:
        run.restore(checkpoints)
    trainable, total = count_parameters(run.policy)
    run.log = RunLog(out, total_steps, start_step=run.position.get("step", 0),
                     tensorboard=cfg.report_to == "tensorboard", desc="ppo")
    resumed = log_resume(run.log, checkpoints, run.position.get("step", 0))
    if run.position.get("step", 0):
        run.evals = logged_evals(out)  # the step-0 evaluation ran before the interruption
    run.log.write(f"{report}; reward: {_describe(run.reward)}; {total_steps} PPO steps x {updates_per_step} updates; "
                  f"trainable {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters ({cfg.finetuning_type})")
    run.sample_cfg = rlhf.rollout_generation_config(tokenizer, cfg.max_new_tokens, cfg.min_new_tokens,
                                                    cfg.temperature, greedy=False)
    run.greedy_cfg = rlhf.rollout_generation_config(tokenizer, cfg.max_new_tokens, cfg.min_new_tokens, 1.0, greedy=True)

    # ---- loop
    step = run.position.get("step", 0)
    if run.eval_prompts and step == 0:
        run.evaluate(step)
    while step < total_steps:
        step = _ppo_step(run, step, total_steps)
        if run.eval_prompts and cfg.eval_steps and step % cfg.eval_steps == 0:
            run.evaluate(step)
        if step % cfg.save_steps == 0 and step < total_steps:
            checkpoints.save(step, run.policy, run.optimizer, run.scheduler, run.scaler, run.state())
    if run.eval_prompts and (not run.evals or run.evals[-1]["step"] != step):
        run.evaluate(step)
    run.log.close()

    # ---- save
    _save(cfg, run.policy, tokenizer, out)
    write_results(out, {**_results(out, step, run.evals, run.kl_ctl), **report.counts, **resumed})
    print(f"Done: policy in {out}")
    return 0


@dataclass
class PPORun:
    """Everything one PPO run carries from step to step (models, optimiser, controllers, data, position)."""

    cfg: PPOConfig
    device: torch.device
    amp_dtype: torch.dtype | None
    lm: object
    tokenizer: object
    policy: object = None
    reference: object = None
    reward: object = None
    optimizer: object = None
    scheduler: object = None
    scaler: object = None
    kl_ctl: object = None
    moments: object = None
    log: object = None
    sample_cfg: object = None
    greedy_cfg: object = None
    train_prompts: list = field(default_factory=list)
    eval_prompts: list = field(default_factory=list)
    position: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0})
    evals: list = field(default_factory=list)

    def state(self) -> dict:
        """The checkpoint's position: where in the prompts, plus the KL coefficient and reward statistics."""
        state = {**self.position, "kl_controller": self.kl_ctl.state_dict()}
        if self.moments is not None:
            state["reward_moments"] = self.moments.state_dict()
        return state

    def restore(self, checkpoints) -> None:
        self.position = checkpoints.load(checkpoints.latest(), self.policy, self.optimizer, self.scheduler, self.scaler)
        self.kl_ctl.load_state_dict(self.position["kl_controller"])
        if self.moments is not None:
            self.moments.load_state_dict(self.position["reward_moments"])

    def evaluate(self, step: int) -> None:
        self.evals.append(_evaluate(self.lm, self.tokenizer, self.eval_prompts, self.reward, self.greedy_cfg,
                                    self.cfg, self.log, step))


def _ppo_step(run: PPORun, step: int, total_steps: int) -> int:
    """Rollout, reward, experience and PPO epochs on the next batch of prompts; logs; returns the new step."""
    from .. import rlhf
    import torch

    from ..training import batch_order

    cfg, position = run.cfg, run.position
    batches = batch_order(len(run.train_prompts), cfg.rollout_batch_size, cfg.seed, position["epoch"])
    chosen = [run.train_prompts[i] for i in batches[position["batch"]]]
    rollout = rlhf.generate_rollout(run.lm, run.tokenizer, [p[0] for p in chosen], [p[1] for p in chosen],
                                    run.sample_cfg, [p[2] for p in chosen])
    raw = run.reward(rollout)
    scores = rlhf.normalized_scores(raw, run.moments, cfg.reward_clip)
    exp = rlhf.make_experience(run.policy, run.reference, rollout, scores, cfg, run.kl_ctl.value, run.device,
                               run.amp_dtype)
    stats = rlhf.step_statistics(exp, raw, run.kl_ctl.value)
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # mini-batch order, fixed per step
    metrics = rlhf.ppo_update(run.policy, exp, cfg, run.optimizer, run.scheduler, run.scaler, run.device,
                              run.amp_dtype, generator)
    update_s = time.perf_counter() - start
    run.kl_ctl.update(stats["kl"], n_steps=len(chosen))
    step += 1
    position["batch"] += 1
    if position["batch"] >= len(batches):
        position["epoch"], position["batch"] = position["epoch"] + 1, 0
    run.log.step(step, reward=stats["reward"], kl=stats["kl"])
    if step % cfg.logging_steps == 0 or step == total_steps:
        tokens = int(rollout.response_mask.sum())
        run.log.log(step, **{k: round(v, 5) for k, v in {**stats, **metrics}.items()},
                    lr=run.scheduler.get_last_lr()[0], update_s=round(update_s, 3),
                    rollout_tokens_per_s=round(tokens / max(rollout.seconds, 1e-9), 1))
    return step


def _demo_argv(argv: list[str]) -> list[str]:
    """The demo's settings, then the user's own flags (a --reward_model replaces the demo's rule reward)."""
    demo = list(DEMO_OVERRIDES)
    if any(a.startswith("--reward_model") for a in argv):
        i = demo.index("--reward_function")
        del demo[i : i + 2]
    if not any(a.startswith("--model") for a in argv):
        demo += ["--model", _demo_model()]
    return demo + list(argv)


def _demo_model() -> str:
    if (SFT_DEMO_DIR / "config.json").is_file():
        print(f"Starting from the sft demo's model in {SFT_DEMO_DIR}.")
        return str(SFT_DEMO_DIR)
    print(f"No {SFT_DEMO_DIR} (run `baichuan-tune sft` first for the sft -> ppo pipeline): starting from the "
          "untrained default model, whose near-uniform answers improve slowly.")
    return "default"


def _frozen_copy(model):
    """Freeze/full training changes the base itself, so the reference is a separate frozen copy."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def _make_reward(cfg, lm, device, amp_dtype):
    """The configured reward: a rule function, the reward model as a second adapter, or a separate model."""
    from .. import rlhf
    from ..alignment import model_reference
    import torch

    from ..value_head import RewardScorer, load_head, load_reward_model, read_reward_meta

    if bool(cfg.reward_model) == bool(cfg.reward_function):
        raise ConfigError("give exactly one of --reward_model DIR and --reward_function module:function")
    if cfg.reward_function:
        return rlhf.FunctionReward(cfg.reward_function, _parse_kwargs(cfg.reward_kwargs))
    meta = read_reward_meta(Path(cfg.reward_model))
    shared = (meta["adapter"] and cfg.finetuning_type in ("lora", "qlora") and meta.get("template") == cfg.template
              and meta["base_model"] == model_reference(cfg.model))
    if shared:
        lm.load_adapter(cfg.reward_model, adapter_name="reward", is_trainable=False)
        head = load_head(Path(cfg.reward_model), meta["hidden_size"]).to(device)
        return rlhf.SharedAdapterReward(lm, head, cfg.per_device_train_batch_size)
    dtype = "bf16" if amp_dtype == torch.bfloat16 else "fp16" if amp_dtype == torch.float16 else "auto"
    rm, rm_tokenizer = load_reward_model(cfg.reward_model, dtype=dtype, device=str(device))
    scorer = RewardScorer(rm, rm_tokenizer, meta.get("template", "baichuan2"), meta.get("cutoff_len", 0),
                          cfg.per_device_train_batch_size)
    return rlhf.SeparateModelReward(scorer)


def _describe(reward) -> str:
    from .. import rlhf

    if isinstance(reward, rlhf.FunctionReward):
        return f"rule {reward.spec}"
    if isinstance(reward, rlhf.SharedAdapterReward):
        return "reward model as a second adapter on the policy's base"
    return "reward model loaded separately"


def _parse_kwargs(items: list[str]) -> dict:
    """["max_tokens=16", "keyword=Paris"] -> {"max_tokens": 16, "keyword": "Paris"} (JSON values when they parse)."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"reward_kwargs: expected key=value, got '{item}'")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return kwargs


# ----------------------------------------------------------------------------- prompts


def _load_prompts(cfg, tokenizer, out: Path) -> tuple[list, list, str]:
    """(train, held-out) prompts as (token ids, text of the last user turn, all turns), split with cfg.seed, and
    the data line (counted as sft, rm and dpo count theirs)."""
    from ..data import data_report
    from ..templates import get_template

    files = list(cfg.dataset)
    if not files:
        from ..builtin_pref import demo_prompts
        from ..io_utils import atomic_write_text

        demo_file = out / "demo_prompts.jsonl"
        atomic_write_text(demo_file, "".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n"
                                             for p in demo_prompts()))
        files = [str(demo_file)]
    template = get_template(cfg.template)
    prompts, read, truncated = [], {}, 0
    for path in files:
        for turns in _prompt_turns(path, cfg.max_samples, template.input_join):
            ids = template.encode_prompt(tokenizer, turns)
            truncated += len(ids) > cfg.max_prompt_length
            prompts.append((ids[-cfg.max_prompt_length :], turns[-1][1], turns))
            read[path] = read.get(path, 0) + 1
    count = int(cfg.val_size) if cfg.val_size >= 1 else round(cfg.val_size * len(prompts))
    if count >= len(prompts):
        raise DataError(f"val_size {cfg.val_size} leaves no training prompts (of {len(prompts)})")
    held = set(random.Random(cfg.seed).sample(range(len(prompts)), count))
    train, held_out = [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]
    return train, held_out, data_report(read, len(train), len(held_out), "prompts", truncated=truncated)


def _prompt_turns(path: str, max_samples: int, input_join: str = "\n") -> list:
    """Prompt turn lists of one file: {prompt} records directly, others through the data module's readers."""
    from .. import data

    first = next(iter(data.iter_json_records(path)), None)
    if first is None:
        raise DataError(f"{path}: no records")
    obj = first[1]
    if isinstance(obj, dict) and "prompt" in obj and "chosen" not in obj:
        return _plain_prompts(path, max_samples)
    if isinstance(obj, dict) and "chosen" in obj:
        pairs = data.load_dataset([path], kind="pair", max_samples=max_samples, input_join=input_join).train
        return [r.prompt for r in pairs]
    records = data.load_dataset([path], kind="prompt", max_samples=max_samples, input_join=input_join).train
    turns = [r.turns[:-1] for r in records if r.turns[-1][0] == "assistant"]
    if not turns:
        raise DataError(f"{path}: no prompts found (plain-text records have no prompt to answer)")
    return turns


def _plain_prompts(path: str, max_samples: int) -> list:
    from .. import data

    prompts = []
    for where, obj, line_error in data.iter_json_records(path):
        if line_error:
            raise DataError(line_error)
        text = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}, field 'prompt': expected a non-empty string, got {type(text).__name__}")
        prompts.append([("user", text)])
        if max_samples and len(prompts) >= max_samples:
            break
    return prompts


# ----------------------------------------------------------------------------- eval, save


@no_grad
def _evaluate(lm, tokenizer, prompts, reward, greedy_cfg, cfg, log, step: int) -> dict:
    """Greedy answers to the held-out prompts: mean raw reward and answer length."""
    from .. import rlhf

    scores, lengths, example = [], [], None
    for start in range(0, len(prompts), cfg.rollout_batch_size):
        chunk = prompts[start : start + cfg.rollout_batch_size]
        rollout = rlhf.generate_rollout(lm, tokenizer, [p[0] for p in chunk], [p[1] for p in chunk], greedy_cfg,
                                        [p[2] for p in chunk])
        scores += reward(rollout).tolist()
        lengths += rollout.response_mask.sum(1).tolist()
        example = example or (rollout.prompts[0], rollout.responses[0])
    record = {"eval_reward": round(sum(scores) / len(scores), 5),
              "eval_response_length": round(sum(lengths) / len(lengths), 2)}
    log.log(step, **record)
    prompt, answer = (text if len(text) <= 80 else text[:77] + "..." for text in example)  # one line, not a page
    log.write(f"step {step}: held-out reward {record['eval_reward']:.4f}; e.g. {prompt!r} -> {answer!r}")
    return {"step": step, **record}


def _save(cfg, policy, tokenizer, out: Path) -> None:
    from safetensors.torch import save_file

    from ..io_utils import atomic_dir
    from ..training import final_dtype, plot_curves, save_final
    from ..value_head import HEAD_FILE

    if "reward" in getattr(policy.lm, "peft_config", {}):
        policy.lm.delete_adapter("reward")  # the result is the policy alone
    save_final(policy.lm, tokenizer, out, cfg.finetuning_type, final_dtype(cfg))
    with atomic_dir(out / "critic") as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in policy.v_head.state_dict().items()},
                  str(tmp / HEAD_FILE))
    if cfg.plot_loss:
        plot_curves(out / "trainer_log.jsonl", out / "ppo_reward.png", ("reward", "eval_reward"), "PPO reward")
        plot_curves(out / "trainer_log.jsonl", out / "ppo_kl.png", ("kl",), "KL(policy || reference) per answer")


def _results(out: Path, step: int, evals: list, kl_ctl) -> dict:
    from ..training import read_log

    records = [r for r in read_log(out / "trainer_log.jsonl") if "reward" in r]
    results = {"global_step": step, "kl_coef": kl_ctl.value}
    if records:
        results.update(reward_first=records[0]["reward"], reward_last=records[-1]["reward"],
                       kl_last=records[-1]["kl"], kl_max=max(r["kl"] for r in records))
    if evals:
        results.update(eval_reward_before=evals[0]["eval_reward"], eval_reward=evals[-1]["eval_reward"],
                       eval_response_length=evals[-1]["eval_response_length"])
    return results
