"""PPO step cost at a published shape: rollout tokens/s, experience and update time, peak GPU memory.

    python benchmarks/bench_ppo.py                       # on a GPU: Baichuan2-7B shape, LoRA, 16 prompts
    python benchmarks/bench_ppo.py --preset tiny-baichuan2-7b --device cpu --steps 1 --warmup 0   # smoke test

A random-weight model of the preset's shape in bf16 gets the memory layout `baichuan-tune ppo` uses with
LoRA: the policy is LoRA adapter `default` (r=8 on every linear layer), the critic a value head on the
policy's hidden states, the reward model a second LoRA adapter `reward` with its own head, and the
reference the same base with the adapters off, so the base weights exist once. Each step runs the
command's own functions (`baichuan_tune.train.rlhf`): sampled rollouts with the KV cache at a fixed answer
length (min_new_tokens = max_new_tokens), reward-model scoring, policy/reference log-probs and values,
GAE, and `ppo_epochs` epochs of clipped policy + value updates (gradient checkpointing on). Prompts are
random token ids; answers are not decoded (the benchmark has no tokenizer of the 125,696-id vocabulary).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import baichuan_tune  # noqa: E402,F401
from baichuan_tune.train import rlhf
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402
from baichuan_tune.models.value_head import PolicyWithValue, ValueHead  # noqa: E402

TARGETS = ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]


class IdsOnly:
    """The few tokenizer attributes a rollout needs; answers are 'decoded' as their length."""

    eos_token_id, pad_token_id, bos_token_id = 2, 0, 1

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["x" * int((row != 0).sum()) for row in ids]


def build(preset: str, device: str, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    config = preset_config(preset)
    with torch.device(device):
        base = BaichuanForCausalLM(config).to(dtype)
    base.requires_grad_(False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    lm = get_peft_model(base, lora)
    lm.add_adapter("reward", LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=TARGETS))
    lm.set_adapter("default")
    for name, p in lm.named_parameters():
        p.requires_grad_("lora_" in name and ".default." in name)
    lm.enable_input_require_grads()
    policy = PolicyWithValue(lm, ValueHead(config.hidden_size).to(device))
    reward = rlhf.SharedAdapterReward(lm, ValueHead(config.hidden_size).to(device), batch_size=8)
    return policy, reward, config


def ppo_options(args):
    """(PPO settings, optimizer settings) of the timed run."""
    from baichuan_tune.train.training import TrainOptions

    return (rlhf.PPOOptions(ppo_epochs=args.ppo_epochs),
            TrainOptions(learning_rate=1e-5, lr_scheduler_type="constant", bf16=args.device != "cpu"))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_step(policy, reward, cfg, args, optimizer, scheduler, generator, gen_config, device, amp_dtype) -> dict:
    vocab = policy.lm.config.vocab_size
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=generator).tolist()
    sync(device)
    rollout = rlhf.generate_rollout(policy.lm, IdsOnly(), prompts, ["p"] * args.batch, gen_config)
    sync(device)
    start = time.perf_counter()
    scores = reward(rollout)
    exp = rlhf.make_experience(policy, None, rollout, scores, cfg, 0.05, torch.device(device), amp_dtype,
                               batch_size=args.mini_batch)
    sync(device)
    experience_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = rlhf.ppo_update(policy, exp, cfg, optimizer, scheduler, None, torch.device(device), amp_dtype, generator,
                              minibatch_size=args.mini_batch)
    sync(device)
    update_s = time.perf_counter() - start
    tokens = int(rollout.response_mask.sum())
    return {"rollout_s": rollout.seconds, "rollout_tokens": tokens, "experience_s": experience_s,
            "update_s": update_s, "policy_loss": metrics["policy_loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="baichuan2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=16, help="prompts (answers) per PPO step")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--response_len", type=int, default=128, help="fixed answer length")
    parser.add_argument("--mini_batch", type=int, default=4, help="answers per update forward/backward")
    parser.add_argument("--ppo_epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed PPO steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed PPO steps first")
    args = parser.parse_args()

    from baichuan_tune.train.training import make_optimizer, make_scheduler

    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    amp_dtype = torch.bfloat16 if cuda else None
    policy, reward, _ = build(args.preset, args.device, dtype)
    cfg, train_opts = ppo_options(args)
    optimizer = make_optimizer(policy, train_opts)
    scheduler = make_scheduler(optimizer, train_opts, 10_000)
    gen_config = rlhf.rollout_generation_config(IdsOnly(), args.response_len, args.response_len, 1.0, greedy=False)
    generator = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**30
    runs = []
    for i in range(args.warmup + args.steps):
        result = one_step(policy, reward, cfg, args, optimizer, scheduler, generator, gen_config, args.device, amp_dtype)
        if i >= args.warmup:
            runs.append(result)
    rollout_tps = [r["rollout_tokens"] / r["rollout_s"] for r in runs]
    report = {
        "preset": args.preset, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch": args.batch, "prompt_len": args.prompt_len, "response_len": args.response_len,
        "mini_batch": args.mini_batch, "ppo_epochs": args.ppo_epochs, "steps": len(runs),
        "answer_tokens_per_step": runs[0]["rollout_tokens"],
        "rollout_tokens_per_s": round(statistics.median(rollout_tps), 1),
        "rollout_s": round(statistics.median(r["rollout_s"] for r in runs), 3),
        "experience_s": round(statistics.median(r["experience_s"] for r in runs), 3),
        "update_s": round(statistics.median(r["update_s"] for r in runs), 3),
        "step_s": round(statistics.median(r["rollout_s"] + r["experience_s"] + r["update_s"] for r in runs), 3),
        "trainable_params_M": round(sum(p.numel() for p in policy.parameters() if p.requires_grad) / 1e6, 2),
    }
    if cuda:
        report["resident_weights_GiB"] = round(resident, 2)
        report["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
