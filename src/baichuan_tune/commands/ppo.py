"""RLHF with PPO: sample answers, score them (reward model or rule), update the policy against a KL penalty.

    baichuan-tune ppo                                  # built-in demo: tiny default model, rule reward, CPU
    baichuan-tune ppo CONFIG.yaml --model DIR --dataset prompts.jsonl --reward_model outputs/rm
    torchrun --nproc_per_node 4 -m baichuan_tune.cli ppo CONFIG.yaml   # data-parallel on 4 GPUs of one node
    torchrun --nproc_per_node 4 -m baichuan_tune.cli ppo CONFIG.yaml --parallel fsdp   # the policy sharded
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

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..builtin import online_demo_model
from ..config import ConfigError, opt, parse_config
from ..train.methods import Method
from ..lazy import no_grad
from ..options import ModelOptions, PPOOptions, TrainOptions


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
class PPOConfig(PPOOptions, ModelOptions, TrainOptions):
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

    def validate(self) -> None:
        self.check_sampling()
        if self.rollout_batch_size < 1 or self.ppo_epochs < 1:
            raise ConfigError("rollout_batch_size and ppo_epochs must be at least 1")


def main(argv: list[str]) -> int:
    from ..options import with_demo

    argv, _ = with_demo(argv, _demo_argv, "PPO demo (rule reward: answer in Chinese, CPU)", PPOConfig)
    cfg = parse_config(PPOConfig, argv, prog="baichuan-tune ppo")
    from ..extras import check_extras

    check_extras("ppo", cfg)
    from ..train import distributed
    from ..train.adapters import count_parameters
    from ..train.engine import Engine
    from ..train.training import start_run, load_trainable, write_results
    from ..data.prompts import load_prompts
    from ..models.value_head import PolicyWithValue, ValueHead
    from ..train.adapters import frozen_copy
    from ..train.reward_setup import describe_reward, load_reward, parse_reward_kwargs

    # ---- setup
    dist, device, out, amp_dtype = start_run(cfg)
    lm, tokenizer = load_trainable(cfg, device, amp_dtype)
    reference = frozen_copy(lm) if cfg.finetuning_type in ("freeze", "full") else None
    reward = load_reward(cfg.reward_model, cfg.reward_function, parse_reward_kwargs(cfg.reward_kwargs), lm=lm,
                         base_model=cfg.model, finetuning_type=cfg.finetuning_type, template=cfg.template,
                         batch_size=cfg.per_device_train_batch_size, device=device, amp_dtype=amp_dtype)
    policy = PolicyWithValue(lm, ValueHead(lm.config.hidden_size).to(device))
    train_prompts, eval_prompts, report = distributed.main_first(dist, lambda: load_prompts(
        cfg.dataset, tokenizer, cfg.template, cfg.max_prompt_length, cfg.max_samples, cfg.val_size, cfg.seed, out))
    method = PPOMethod(cfg, policy, reference, reward, tokenizer, train_prompts, eval_prompts, dist, device, amp_dtype)
    schedule = _schedule(cfg, len(train_prompts), dist.world)
    engine = Engine(policy, method, cfg, out, schedule, dist, device, amp_dtype)
    trainable, total = count_parameters(policy)

    # ---- train
    results = engine.run(f"{report}; reward: {describe_reward(reward)}; {schedule.total_steps} PPO steps x "
                         f"{schedule.updates_per_step} updates; trainable {trainable / 1e6:.2f}M of {total / 1e6:.2f}M "
                         f"parameters ({cfg.finetuning_type})")
    distributed.shutdown(dist)

    # ---- save
    if not dist.main:
        return 0
    with engine.keep_state():  # the trained state stays on disk until the result is written
        _save(cfg, policy, tokenizer, out, engine.full_state)
        write_results(out, {**results, **_results(out, engine.step, engine.evals, method.kl_ctl), **report.counts})
    print(f"Done: policy in {out}")
    return 0


def _schedule(cfg, num_prompts: int, world: int):
    """One engine step per rollout batch (shared out among the processes); the PPO epochs' updates in it."""
    from ..train.engine import Schedule
    from ..train.training import TrainingError

    if cfg.rollout_batch_size % world:
        raise TrainingError(f"rollout_batch_size {cfg.rollout_batch_size} does not split into {world} processes' "
                            "equal shares; make it a multiple of the process count")
    share = cfg.rollout_batch_size // world
    if world > 1 and num_prompts < cfg.rollout_batch_size:
        raise TrainingError(f"{num_prompts} training prompts are fewer than one rollout batch of "
                            f"{cfg.rollout_batch_size}")
    per_epoch = math.ceil(num_prompts / cfg.rollout_batch_size) if world == 1 else num_prompts // cfg.rollout_batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(num_prompts / cfg.rollout_batch_size * cfg.num_train_epochs)
    minibatches = math.ceil(min(share, num_prompts) / cfg.per_device_train_batch_size)
    updates = cfg.ppo_epochs * math.ceil(minibatches / cfg.gradient_accumulation_steps)
    return Schedule(share, 1, per_epoch, total, updates)


class PPOMethod(Method):
    """PPO on the engine: each step samples answers to this process's share of the prompt batch, scores
    them, builds the experience (KL-penalised rewards, advantages whitened over all processes) and hands
    the engine the PPO epochs' mini-batches, whose step is the clipped policy + value loss."""

    name = "ppo"
    eval_before, eval_each_epoch = True, False
    bar_keys = ("reward", "kl")

    def __init__(self, cfg, policy, reference, reward, tokenizer, train_prompts, eval_prompts, dist, device,
                 amp_dtype):
        from ..train import losses as L
        from ..train import rlhf

        self.cfg, self.policy, self.reference, self.reward, self.tokenizer = cfg, policy, reference, reward, tokenizer
        self.train_set, self.val_set = train_prompts, eval_prompts
        self.dist, self.device, self.amp_dtype = dist, device, amp_dtype
        self.kl_ctl = (L.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else L.FixedKLController(cfg.kl_coef))
        self.moments = L.RunningMoments() if cfg.normalize_reward else None
        self.sample_cfg = rlhf.rollout_generation_config(tokenizer, cfg.max_new_tokens, cfg.min_new_tokens,
                                                         cfg.temperature, greedy=False)
        self.greedy_cfg = rlhf.rollout_generation_config(tokenizer, cfg.max_new_tokens, cfg.min_new_tokens, 1.0,
                                                         greedy=True)
        self.stats: dict = {}

    def plan(self, engine, batches):
        """Rollout, reward and experience of this step's prompts; the updates over that experience."""
        import torch

        from ..train import distributed, rlhf
        from ..train.sharded import gathered_for_generation

        cfg = self.cfg
        chosen = [self.train_set[i] for i in batches[0]]
        # Sharded: the whole policy on each process while it answers and scores (the reward adapter is on its base).
        with gathered_for_generation(self.policy):
            rollout = rlhf.generate_rollout(self.policy.lm, self.tokenizer, [p[0] for p in chosen],
                                            [p[1] for p in chosen], self.sample_cfg, [p[2] for p in chosen])
            raw = self.reward(rollout)
        everyone = distributed.gather(self.dist, raw.to(self.device)).cpu()  # the statistics see every answer
        scores = rlhf.normalized_scores(everyone, self.moments, cfg.reward_clip)
        scores = scores[self.dist.rank * len(raw) : (self.dist.rank + 1) * len(raw)]
        exp = rlhf.make_experience(self.policy, self.reference, rollout, scores, cfg, self.kl_ctl.value, self.device,
                                   self.amp_dtype, batch_size=cfg.per_device_train_batch_size, dist=self.dist)
        self.stats = self._statistics(exp, raw, everyone, rollout)
        self.kl_ctl.update(self.stats["kl"], n_steps=len(everyone))
        # The mini-batch order is fixed per step (and per process), so a resumed run shuffles alike.
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + engine.step + 7919 * self.dist.rank)
        self._update_start = time.perf_counter()
        return exp, rlhf.minibatch_groups(exp.input_ids.size(0), cfg.per_device_train_batch_size,
                                          cfg.gradient_accumulation_steps, cfg.ppo_epochs, generator)

    def _statistics(self, exp, raw, everyone, rollout) -> dict:
        """The step's rollout figures, averaged over the processes (the reward's over every answer)."""
        from ..train import rlhf

        local = rlhf.step_statistics(exp, raw, self.kl_ctl.value)
        keys = [k for k in local if k not in ("reward", "reward_std", "kl_coef")]
        summed = self.dist.sum([local[k] for k in keys], self.device)
        stats = {"reward": float(everyone.mean()), "reward_std": float(everyone.std(unbiased=False)),
                 **{k: v / self.dist.world for k, v in zip(keys, summed)}, "kl_coef": local["kl_coef"]}
        self._rollout_tps = int(rollout.response_mask.sum()) / max(rollout.seconds, 1e-9)
        return stats

    def collate(self, exp, rows, device):
        from ..train import rlhf

        return rlhf.experience_batch(exp, rows)

    def step(self, model, batch):
        from ..train import rlhf

        return rlhf.ppo_minibatch_loss(model, batch, self.cfg)

    def after_step(self, engine) -> dict:
        return {**{k: round(v, 5) for k, v in self.stats.items()},
                "update_s": round(time.perf_counter() - self._update_start, 3),
                "rollout_tokens_per_s": round(self._rollout_tps, 1)}

    @no_grad
    def evaluate(self, engine) -> dict:
        """Greedy answers to the held-out prompts (shared out among the processes): mean raw reward and length."""
        from ..train import rlhf
        from ..train.sharded import gathered_for_generation

        cfg, dist = self.cfg, self.dist
        mine = self.val_set[dist.rank :: dist.world]
        scores, lengths, example = 0.0, 0.0, None
        with gathered_for_generation(self.policy):  # the processes' shares may take different numbers of chunks
            for start in range(0, len(mine), cfg.rollout_batch_size):
                chunk = mine[start : start + cfg.rollout_batch_size]
                rollout = rlhf.generate_rollout(self.policy.lm, self.tokenizer, [p[0] for p in chunk],
                                                [p[1] for p in chunk], self.greedy_cfg, [p[2] for p in chunk])
                scores += float(self.reward(rollout).sum())
                lengths += float(rollout.response_mask.sum())
                example = example or (rollout.prompts[0], rollout.responses[0])
        scores, lengths = dist.sum([scores, lengths], self.device)
        record = {"eval_reward": round(scores / len(self.val_set), 5),
                  "eval_response_length": round(lengths / len(self.val_set), 2)}
        if example is not None:
            prompt, answer = (text if len(text) <= 80 else text[:77] + "..." for text in example)  # one line
            engine.log.write(f"step {engine.step}: held-out reward {record['eval_reward']:.4f}; "
                             f"e.g. {prompt!r} -> {answer!r}")
        return record

    def state_dict(self) -> dict:
        """The KL coefficient and the reward statistics, saved with the checkpoint's position."""
        state = {"kl_controller": self.kl_ctl.state_dict()}
        if self.moments is not None:
            state["reward_moments"] = self.moments.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])
        if self.moments is not None:
            self.moments.load_state_dict(state["reward_moments"])


def _demo_argv(argv: list[str]) -> list[str]:
    """The demo's settings, then the user's own flags (a --reward_model replaces the demo's rule reward)."""
    demo = list(DEMO_OVERRIDES)
    if any(a.startswith("--reward_model") for a in argv):
        i = demo.index("--reward_function")
        del demo[i : i + 2]
    if not any(a.startswith("--model") for a in argv):
        demo += ["--model", online_demo_model()]
    return demo + list(argv)


def _save(cfg, policy, tokenizer, out: Path, full_state: dict | None = None) -> None:
    from safetensors.torch import save_file

    from ..io_utils import atomic_dir, clear_write_errors
    from ..train.training import final_dtype, plot_curves, save_final
    from ..models.value_head import HEAD_FILE

    if "reward" in getattr(policy.lm, "peft_config", {}):
        policy.lm.delete_adapter("reward")  # the result is the policy alone
    # A sharded run's weights, gathered on rank 0, are the policy's state dict: split into the LM's and the head's.
    whole = policy.state_dict() if full_state is None else full_state
    lm_state = None if full_state is None else {k[3:]: v for k, v in full_state.items() if k.startswith("lm.")}
    head = {k[7:]: v for k, v in whole.items() if k.startswith("v_head.")}
    save_final(policy.lm, tokenizer, out, cfg.finetuning_type, final_dtype(cfg), cfg.template, state_dict=lm_state)
    with clear_write_errors(out / "critic", "the critic head"), atomic_dir(out / "critic") as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()}, str(tmp / HEAD_FILE))
    if cfg.plot_loss:
        plot_curves(out / "trainer_log.jsonl", out / "ppo_reward.png", ("reward", "eval_reward"), "PPO reward")
        plot_curves(out / "trainer_log.jsonl", out / "ppo_kl.png", ("kl",), "KL(policy || reference) per answer")


def _results(out: Path, step: int, evals: list, kl_ctl) -> dict:
    from ..train.training import read_log

    records = [r for r in read_log(out / "trainer_log.jsonl") if "reward" in r]
    results = {"global_step": step, "kl_coef": kl_ctl.value}
    if records:
        results.update(reward_first=records[0]["reward"], reward_last=records[-1]["reward"],
                       kl_last=records[-1]["kl"], kl_max=max(r["kl"] for r in records))
    if evals:
        results.update(eval_reward_before=evals[0]["eval_reward"], eval_reward=evals[-1]["eval_reward"],
                       eval_response_length=evals[-1]["eval_response_length"])
    return results
