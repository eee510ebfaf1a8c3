"""GRPO: online RL without a critic; each answer's reward is judged against the other answers to its prompt.

    baichuan-tune grpo                                 # built-in demo: tiny model, rule reward, CPU
    baichuan-tune grpo CONFIG.yaml --model DIR --dataset prompts.jsonl --reward_model outputs/rm
    baichuan-tune grpo --model DIR --dataset prompts.jsonl --num_generations 8 \
        --reward_function my_rewards.py:correct,baichuan_tune.rewards:shorter_than --reward_weights 1.0,0.2
    torchrun --nproc_per_node 4 -m baichuan_tune.cli grpo CONFIG.yaml  # data-parallel on 4 GPUs of one node
    torchrun --nproc_per_node 4 -m baichuan_tune.cli grpo CONFIG.yaml --parallel fsdp  # the policy sharded

Group relative policy optimisation (Shao et al. 2024, DeepSeekMath): each step samples `num_generations`
answers to each of `rollout_batch_size` prompts (batched, KV cache), scores them with reward functions
(several, weighted: the `module:function` / `file.py:function` interface of `ppo`) and/or a reward model,
takes A_i = (r_i - mean of the group) / std of the group as every token's advantage, and runs
`grpo_epochs` passes of the clipped objective over mini-batches, with an optional k3 KL to the
reference (`--beta`, 0 by default). Prompts as for `ppo`. Logged per step: reward mean/std, the mean
within-group std, the share of groups whose answers all scored alike (no signal), each reward part, the
KL to the reference per answer, clip fraction, response length; on held-out prompts the greedy answers'
reward and length. Writes the policy adapter (or full weights), checkpoints (--resume true continues
exactly), trainer_log.jsonl, grpo_reward.png, grpo_kl.png, TensorBoard events and train_results.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import ConfigError, opt, parse_config
from ..lazy import no_grad
from ..options import GRPOOptions, ModelOptions, TrainOptions
from ..train.methods import Method

# The built-in demo: LoRA, rewarded for answering in Chinese (a dense rule), 4 answers per prompt, a small KL weight
# (the untrained model's answers are near-uniform: without it the policy collapses onto a few Chinese tokens). It starts
# from the sft demo's model (outputs/sft-demo) when there is one, as the ppo demo does.
DEMO_OVERRIDES = [
    "--finetuning_type", "lora", "--lora_rank", "16", "--lora_alpha", "32", "--output_dir", "outputs/grpo-demo",
    "--max_steps", "20", "--learning_rate", "2e-3", "--beta", "0.04", "--reward_function",
    "baichuan_tune.rewards:chinese_ratio", "--rollout_batch_size", "8", "--num_generations", "4",
    "--per_device_train_batch_size", "16",
    "--max_new_tokens", "12", "--val_size", "32", "--eval_steps", "10", "--save_steps", "100", "--device", "cpu",
    "--overwrite_output_dir", "true",
]


@dataclass
class GRPOConfig(GRPOOptions, ModelOptions, TrainOptions):
    output_dir: str = opt("outputs/grpo", "folder for the policy, checkpoints, logs and plots")
    learning_rate: float = opt(1e-5, "peak learning rate")
    plot_loss: bool = opt(True, "write grpo_reward.png and grpo_kl.png")
    lora_dropout: float = opt(0.0, "dropout on the LoRA input (0: rollouts and updates see the same policy)")
    per_device_train_batch_size: int = opt(8, "answers per forward/backward of the updates")
    logging_steps: int = opt(1, "log every N GRPO steps")
    save_steps: int = opt(50, "write a checkpoint every N GRPO steps")
    num_train_epochs: float = opt(1.0, "passes over the prompts (when max_steps is -1)")
    max_steps: int = opt(-1, "stop after this many GRPO steps (-1: num_train_epochs passes over the prompts)")
    eval_steps: int = opt(0, "answer the held-out prompts every N GRPO steps (0: only before and after training)")
    # data
    dataset: list[str] = opt(factory=list, help="prompt files (.json/.jsonl): sft, preference or {prompt} records")
    template: Literal["baichuan2", "baichuan", "human_assistant", "base"] = opt("baichuan2", "chat format of prompts")
    max_prompt_length: int = opt(256, "keep the last N tokens of a longer prompt")
    max_samples: int = opt(0, "read at most this many prompts per file (0: all)")
    val_size: float = opt(0.0, "held-out prompts, a fraction (< 1) or a count: greedy answers scored every eval_steps")
    # reward
    reward_function: list[str] = opt(factory=list, help="rule rewards: module:function or file.py:function, comma-separated")
    reward_model: str = opt("", "reward model folder from `baichuan-tune rm` (its score is one more reward part)")
    reward_weights: list[float] = opt(factory=list, help="one weight per reward function, then the reward model's (default 1)")
    reward_kwargs: list[str] = opt(factory=list, help="key=value arguments passed to every reward function")

    def validate(self) -> None:
        self.check_sampling()
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2 (a group of one has no relative reward), "
                              f"got {self.num_generations}")
        if self.rollout_batch_size < 1 or self.grpo_epochs < 1:
            raise ConfigError("rollout_batch_size and grpo_epochs must be at least 1")
        if self.beta < 0 or self.cliprange <= 0:
            raise ConfigError("need beta >= 0 and cliprange > 0")
        parts = len(self.reward_function) + bool(self.reward_model)
        if not parts:
            raise ConfigError("give a reward: --reward_function module:function (several: comma-separated) and/or "
                              "--reward_model DIR")
        if self.reward_weights and len(self.reward_weights) != parts:
            raise ConfigError(f"reward_weights: {len(self.reward_weights)} weights for {parts} reward parts (one per "
                              "reward function, then one for the reward model)")


def main(argv: list[str]) -> int:
    from ..options import with_demo

    argv, _ = with_demo(argv, _demo_argv, "GRPO demo (rule reward: answer in Chinese, CPU)", GRPOConfig)
    cfg = parse_config(GRPOConfig, argv, prog="baichuan-tune grpo")
    from ..extras import check_extras

    check_extras("grpo", cfg)
    from ..train import distributed
    from ..train.adapters import count_parameters
    from ..train.engine import Engine
    from ..train.grpo import ResponseLM
    from ..train.training import start_run, load_trainable, write_results
    from ..data.prompts import load_prompts
    from ..train.adapters import frozen_copy

    # ---- setup
    dist, device, out, amp_dtype = start_run(cfg)
    lm, tokenizer = load_trainable(cfg, device, amp_dtype)
    reference = frozen_copy(lm) if cfg.finetuning_type in ("freeze", "full") else None
    reward = make_reward(cfg, lm, device, amp_dtype)
    train_prompts, eval_prompts, report = distributed.main_first(dist, lambda: load_prompts(
        cfg.dataset, tokenizer, cfg.template, cfg.max_prompt_length, cfg.max_samples, cfg.val_size, cfg.seed, out))
    policy = ResponseLM(lm)
    method = GRPOMethod(cfg, policy, reference, reward, tokenizer, train_prompts, eval_prompts, dist, device, amp_dtype)
    schedule = grpo_schedule(cfg, len(train_prompts), dist.world)
    engine = Engine(policy, method, cfg, out, schedule, dist, device, amp_dtype)
    trainable, total = count_parameters(policy)

    # ---- train
    results = engine.run(f"{report}; reward: {reward.describe()}; {cfg.num_generations} answers per prompt; "
                         f"{schedule.total_steps} GRPO steps x {schedule.updates_per_step} updates; trainable "
                         f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters ({cfg.finetuning_type})")
    distributed.shutdown(dist)

    # ---- save
    if not dist.main:
        return 0
    with engine.keep_state():  # the trained state stays on disk until the result is written
        _save(cfg, lm, tokenizer, out, _lm_state(engine.full_state))
        write_results(out, {**results, **_results(out, engine.evals), **report.counts})
    print(f"Done: policy in {out}")
    return 0


def _demo_argv(argv: list[str]) -> list[str]:
    """The demo's settings, then the user's own (a --reward_model or --reward_function replaces the demo's rule)."""
    from ..builtin import online_demo_model

    demo = list(DEMO_OVERRIDES)
    if any(a.startswith(("--reward_model", "--reward_function")) for a in argv):
        i = demo.index("--reward_function")
        del demo[i : i + 2]
    if not any(a.startswith("--model") for a in argv):
        demo += ["--model", online_demo_model()]
    return demo + list(argv)


def make_reward(cfg, lm, device, amp_dtype):
    """The weighted reward: each rule function, then the reward model (as ppo loads it) when given."""
    from ..train import rlhf
    from ..train.grpo import WeightedReward
    from ..train.reward_setup import load_reward, parse_reward_kwargs

    kwargs = parse_reward_kwargs(cfg.reward_kwargs)
    parts = [(spec.rpartition(":")[2] or spec, rlhf.FunctionReward(spec, kwargs)) for spec in cfg.reward_function]
    if cfg.reward_model:
        parts.append(("model", load_reward(
            cfg.reward_model, "", {}, lm=lm, base_model=cfg.model, finetuning_type=cfg.finetuning_type,
            template=cfg.template, batch_size=cfg.per_device_train_batch_size, device=device, amp_dtype=amp_dtype)))
    names = [name for name, _ in parts]
    parts = [(name if names.count(name) == 1 else f"{name}{i}", fn) for i, (name, fn) in enumerate(parts)]
    return WeightedReward(parts, list(cfg.reward_weights) or [1.0] * len(parts))


def grpo_schedule(cfg, num_prompts: int, world: int):
    """One engine step per prompt batch (shared out among the processes); its updates over P x G answers."""
    from ..train.engine import Schedule
    from ..train.training import TrainingError

    if cfg.rollout_batch_size % world:
        raise TrainingError(f"rollout_batch_size {cfg.rollout_batch_size} does not split into {world} processes' "
                            "equal shares; make it a multiple of the process count")
    if world > 1 and num_prompts < cfg.rollout_batch_size:
        raise TrainingError(f"{num_prompts} training prompts are fewer than one rollout batch of "
                            f"{cfg.rollout_batch_size}")
    share = cfg.rollout_batch_size // world
    per_epoch = math.ceil(num_prompts / cfg.rollout_batch_size) if world == 1 else num_prompts // cfg.rollout_batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(num_prompts / cfg.rollout_batch_size * cfg.num_train_epochs)
    minibatches = math.ceil(min(share, num_prompts) * cfg.num_generations / cfg.per_device_train_batch_size)
    updates = cfg.grpo_epochs * math.ceil(minibatches / cfg.gradient_accumulation_steps)
    return Schedule(share, 1, per_epoch, total, updates)


class GRPOMethod(Method):
    """GRPO on the engine: each step samples G answers to each prompt of this process's share, scores them,
    computes group-relative advantages and hands the engine the mini-batches of the clipped loss."""

    name = "grpo"
    eval_before, eval_each_epoch = True, False
    bar_keys = ("reward", "kl")

    def __init__(self, cfg, policy, reference, reward, tokenizer, train_prompts, eval_prompts, dist, device,
                 amp_dtype):
        from ..train import rlhf

        self.cfg, self.policy, self.reference, self.reward, self.tokenizer = cfg, policy, reference, reward, tokenizer
        self.train_set, self.val_set = train_prompts, eval_prompts
        self.dist, self.device, self.amp_dtype = dist, device, amp_dtype
        self.sample_cfg = rlhf.rollout_generation_config(tokenizer, cfg.max_new_tokens, cfg.min_new_tokens,
                                                         cfg.temperature, greedy=False)
        self.greedy_cfg = rlhf.rollout_generation_config(tokenizer, cfg.max_new_tokens, cfg.min_new_tokens, 1.0,
                                                         greedy=True)
        self.stats: dict = {}

    def plan(self, engine, batches):
        """G answers per prompt, their rewards and advantages; the updates over them."""
        import torch

        from ..train import distributed, rlhf
        from ..train.grpo import group_experience
        from ..train.sharded import gathered_for_generation

        cfg, g = self.cfg, self.cfg.num_generations
        chosen = [self.train_set[i] for i in batches[0] for _ in range(g)]  # each group's G answers consecutive
        # Sharded: the whole policy on each process while it answers and scores (the reward adapter is on its base).
        with gathered_for_generation(self.policy):
            rollout = rlhf.generate_rollout(self.policy.lm, self.tokenizer, [p[0] for p in chosen],
                                            [p[1] for p in chosen], self.sample_cfg, [p[2] for p in chosen])
            total, scores = self.reward(rollout)
        exp = group_experience(self.policy, self.reference, rollout, total, cfg, cfg.per_device_train_batch_size,
                               self.device, self.amp_dtype)
        everyone = distributed.gather(self.dist, total.to(self.device)).cpu()
        self.stats = self._statistics(exp, total, scores, everyone, rollout)
        # The mini-batch order is fixed per step (and per process), so a resumed run shuffles alike.
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + engine.step + 7919 * self.dist.rank)
        self._update_start = time.perf_counter()
        return exp, rlhf.minibatch_groups(exp.input_ids.size(0), cfg.per_device_train_batch_size,
                                          cfg.gradient_accumulation_steps, cfg.grpo_epochs, generator)

    def _statistics(self, exp, total, scores, everyone, rollout) -> dict:
        from ..train.grpo import group_statistics

        local = group_statistics(exp, total, scores, self.cfg.num_generations)
        keys = sorted(local)
        summed = self.dist.sum([local[k] for k in keys], self.device)
        self._rollout_tps = int(rollout.response_mask.sum()) / max(rollout.seconds, 1e-9)
        return {"reward": float(everyone.mean()), "reward_std": float(everyone.std(unbiased=False)),
                **{k: v / self.dist.world for k, v in zip(keys, summed)}}

    def collate(self, exp, rows, device):
        return exp.batch(rows)

    def step(self, model, batch):
        from ..train.grpo import grpo_minibatch_loss

        return grpo_minibatch_loss(model, batch, self.cfg)

    def after_step(self, engine) -> dict:
        return {**{k: round(v, 5) for k, v in self.stats.items()},
                "update_s": round(time.perf_counter() - self._update_start, 3),
                "rollout_tokens_per_s": round(self._rollout_tps, 1)}

    @no_grad
    def evaluate(self, engine) -> dict:
        """Greedy answers to the held-out prompts (shared out among the processes): mean reward and length."""
        from ..train import rlhf
        from ..train.sharded import gathered_for_generation

        cfg, dist = self.cfg, self.dist
        mine = self.val_set[dist.rank :: dist.world]
        scores, lengths, example = 0.0, 0.0, None
        with gathered_for_generation(self.policy):  # the processes' shares may take different numbers of chunks
            for start in range(0, len(mine), cfg.rollout_batch_size * cfg.num_generations):
                chunk = mine[start : start + cfg.rollout_batch_size * cfg.num_generations]
                rollout = rlhf.generate_rollout(self.policy.lm, self.tokenizer, [p[0] for p in chunk],
                                                [p[1] for p in chunk], self.greedy_cfg, [p[2] for p in chunk])
                scores += float(self.reward(rollout)[0].sum())
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


def _lm_state(full_state: dict | None) -> dict | None:
    """A sharded run's gathered ResponseLM state as the LM's own (None: the LM's own weights are whole)."""
    return None if full_state is None else {k.removeprefix("lm."): v for k, v in full_state.items()}


def _save(cfg, lm, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    from ..train.training import final_dtype, plot_curves, save_final

    if "reward" in getattr(lm, "peft_config", {}):
        lm.delete_adapter("reward")  # the result is the policy alone
    save_final(lm, tokenizer, out, cfg.finetuning_type, final_dtype(cfg), cfg.template, state_dict=state_dict)
    if cfg.plot_loss:
        plot_curves(out / "trainer_log.jsonl", out / "grpo_reward.png", ("reward", "eval_reward"), "GRPO reward")
        plot_curves(out / "trainer_log.jsonl", out / "grpo_kl.png", ("kl",), "KL(policy || reference) per answer")


def _results(out: Path, evals: list) -> dict:
    from ..train.training import read_log

    records = [r for r in read_log(out / "trainer_log.jsonl") if "reward" in r]
    results = {}
    if records:
        results.update(reward_first=records[0]["reward"], reward_last=records[-1]["reward"],
                       kl_last=records[-1]["kl"], kl_max=max(r["kl"] for r in records))
    if evals:
        results.update(eval_reward_before=evals[0]["eval_reward"], eval_reward=evals[-1]["eval_reward"],
                       eval_response_length=evals[-1]["eval_response_length"])
    return results
