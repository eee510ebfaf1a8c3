"""KTO and GRPO step cost at a published shape, beside PPO's: step time and peak GPU memory with LoRA.

    python benchmarks/bench_align.py                        # on a GPU: Baichuan2-7B shape, kto then grpo, one JSON line each
    python benchmarks/bench_align.py --method grpo --prompts 4 --num_generations 8
    python benchmarks/bench_align.py --smoke                # CPU, tiny shape, 1 step each: proves the script runs

A random-weight model of the preset's shape in bf16 gets the memory layout the commands use with LoRA (r=8
on every linear layer, gradient checkpointing): the policy is adapter `default`, the reference the same
base with the adapter off, so the base weights exist once. Each step runs the commands' own functions.
KTO (`train/kto.py`): a batch of `--batch` labelled answers (prompt + answer of `--prompt_len` +
`--response_len` tokens) and their mismatched answers: the policy's log-probs of the mismatched pairs
(no gradient), the reference's of both, the policy's of the answers with gradient, kto_loss, backward,
one AdamW update. GRPO (`train/grpo.py`): `--prompts` x `--num_generations` answers sampled with the KV
cache at a fixed length, a rule reward (random scores: a rule costs nothing next to the model), policy
and reference log-probs, group advantages, then `--grpo_epochs` passes of the clipped loss over
mini-batches of `--mini_batch`. PPO's figures come from benchmarks/bench_ppo.py (same shape and LoRA).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baichuan_tune  # noqa: E402,F401
from bench_ppo import TARGETS, IdsOnly, sync  # noqa: E402
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402


def build(preset: str, device: str, dtype: torch.dtype):
    """The LoRA policy on a random-weight base (the reference: the adapter off)."""
    from peft import LoraConfig, get_peft_model

    with torch.device(device):
        base = BaichuanForCausalLM(preset_config(preset)).to(dtype)
    base.requires_grad_(False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                                         target_modules=TARGETS))
    lm.enable_input_require_grads()
    return lm


def optimizer_for(model, device: str):
    from baichuan_tune.train.training import TrainOptions, make_optimizer, make_scheduler

    opts = TrainOptions(learning_rate=1e-5, lr_scheduler_type="constant", bf16=device != "cpu")
    optimizer = make_optimizer(model, opts)
    return optimizer, make_scheduler(optimizer, opts, 10_000)


def kto_batch(args, vocab: int, generator: torch.Generator, device: str) -> dict:
    """B answers then their B mismatched answers (another row's answer) to the same prompts, as kto collates."""
    b, p, r = args.batch, args.prompt_len, args.response_len
    prompts = torch.randint(3, vocab, (b, p), generator=generator)
    answers = torch.randint(3, vocab, (b, r), generator=generator)
    ids = torch.cat([torch.cat([prompts, answers], 1), torch.cat([prompts, answers.roll(1, 0)], 1)])
    labels = ids.clone()
    labels[:, :p] = -100
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "index": torch.arange(b, device=device), "desirable": (torch.arange(b) % 2 == 0).to(device)}


def kto_step(lm, args, state, generator, device: str, amp_dtype) -> dict:
    from baichuan_tune.train.kto import kto_forward
    from baichuan_tune.train.training import autocast, optimizer_step

    cfg, reference, optimizer, scheduler = state
    batch = kto_batch(args, lm.config.vocab_size, generator, device)
    sync(device)
    start = time.perf_counter()
    lm.train()
    with autocast(torch.device(device), amp_dtype):
        out = kto_forward(lm, batch, reference, "train", None, beta=cfg["beta"])
    out.loss.backward()
    optimizer_step(lm, optimizer, scheduler, None, 1.0)
    sync(device)
    return {"step_s": time.perf_counter() - start, "tokens": int(batch["attention_mask"].sum()),
            "loss": float(out.loss.detach())}


def grpo_step(lm, args, state, generator, device: str, amp_dtype) -> dict:
    from baichuan_tune.train import rlhf
    from baichuan_tune.train.grpo import ResponseLM, group_experience, grpo_minibatch_loss
    from baichuan_tune.train.training import autocast, optimizer_step

    opts, gen_config, optimizer, scheduler = state
    prompts = torch.randint(3, lm.config.vocab_size, (args.prompts, args.prompt_len), generator=generator).tolist()
    prompts = [p for p in prompts for _ in range(args.num_generations)]
    sync(device)
    start = time.perf_counter()
    rollout = rlhf.generate_rollout(lm, IdsOnly(), prompts, ["p"] * len(prompts), gen_config)
    rewards = torch.rand(len(prompts), generator=generator)
    exp = group_experience(lm, None, rollout, rewards, opts, args.mini_batch, torch.device(device), amp_dtype)
    sync(device)
    experience_s = time.perf_counter() - start - rollout.seconds
    update_start, policy = time.perf_counter(), ResponseLM(lm).train()
    for group in rlhf.minibatch_groups(len(prompts), args.mini_batch, 1, opts.grpo_epochs, generator):
        for rows in group:
            with autocast(torch.device(device), amp_dtype):
                loss, _ = grpo_minibatch_loss(policy, exp.batch(rows), opts)
            loss.backward()
        optimizer_step(lm, optimizer, scheduler, None, 1.0)
    sync(device)
    update_s = time.perf_counter() - update_start
    return {"rollout_s": rollout.seconds, "rollout_tokens": int(rollout.response_mask.sum()),
            "experience_s": experience_s, "update_s": update_s, "step_s": time.perf_counter() - start}


def setup(method: str, lm, args, device: str):
    optimizer, scheduler = optimizer_for(lm, device)
    if method == "kto":
        from baichuan_tune.train.reference import Reference
        cfg = {"beta": 0.1}  # kto's default
        return cfg, Reference(
            lm, needed=True, adapter_off=True, out=Path("."), datasets={}, model_name="random", batch_size=args.batch,
            device=torch.device(device), amp_dtype=None), optimizer, scheduler
    from baichuan_tune.options import GRPOOptions
    from baichuan_tune.train import rlhf

    opts = GRPOOptions(num_generations=args.num_generations, grpo_epochs=args.grpo_epochs, beta=args.beta)
    gen_config = rlhf.rollout_generation_config(IdsOnly(), args.response_len, args.response_len, 1.0, greedy=False)
    return opts, gen_config, optimizer, scheduler


def run(method: str, args) -> dict:
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    dtype, amp_dtype = (torch.bfloat16, torch.bfloat16) if cuda else (torch.float32, None)
    lm = build(args.preset, args.device, dtype)
    state = setup(method, lm, args, args.device)
    generator = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**30
    step = kto_step if method == "kto" else grpo_step
    runs = [step(lm, args, state, generator, args.device, amp_dtype) for _ in range(args.warmup + args.steps)]
    runs = runs[args.warmup :]
    report = {"method": method, "preset": args.preset, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "prompt_len": args.prompt_len, "response_len": args.response_len, "steps": len(runs),
              "step_s": round(statistics.median(r["step_s"] for r in runs), 3),
              "trainable_params_M": round(sum(p.numel() for p in lm.parameters() if p.requires_grad) / 1e6, 2)}
    if method == "kto":
        report.update(batch=args.batch, tokens_per_step=runs[0]["tokens"],
                      tokens_per_s=round(runs[0]["tokens"] / report["step_s"], 1))
    else:
        report.update(prompts=args.prompts, num_generations=args.num_generations, mini_batch=args.mini_batch,
                      grpo_epochs=args.grpo_epochs, beta=args.beta, answer_tokens_per_step=runs[0]["rollout_tokens"],
                      **{k: round(statistics.median(r[k] for r in runs), 3)
                         for k in ("rollout_s", "experience_s", "update_s")})
    if cuda:
        report["resident_weights_GiB"] = round(resident, 2)
        report["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del lm, state
    if cuda:
        torch.cuda.empty_cache()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["kto", "grpo", "both"], default="both")
    parser.add_argument("--preset", default="baichuan2-7b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt_len", type=int, default=128)
    parser.add_argument("--response_len", type=int, default=128, help="answer length (fixed for grpo's sampling)")
    parser.add_argument("--batch", type=int, default=8, help="kto: labelled answers per step (x2 rows with mismatches)")
    parser.add_argument("--prompts", type=int, default=4, help="grpo: prompts per step")
    parser.add_argument("--num_generations", type=int, default=4, help="grpo: answers per prompt (4 x 4 = ppo's 16)")
    parser.add_argument("--mini_batch", type=int, default=4, help="grpo: answers per update forward/backward")
    parser.add_argument("--grpo_epochs", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.0, help="grpo: KL weight (the reference log-probs are computed either way)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny-baichuan2-7b, short sequences, 1 step, no warm-up")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.device, args.steps, args.warmup = "tiny-baichuan2-7b", "cpu", 1, 0
        args.prompt_len, args.response_len = 16, 8
    for method in (["kto", "grpo"] if args.method == "both" else [args.method]):
        print(json.dumps(run(method, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
