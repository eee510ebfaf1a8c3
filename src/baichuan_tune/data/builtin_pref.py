"""Built-in preference pairs and prompts for the alignment demos (rm, dpo, ppo), written by this project.

The pairs reuse the demo tasks of `builtin.py` (capitals, colours, greetings, the assistant's name): the
chosen answer is right and polite, the rejected one is wrong (another country's capital, another colour,
a refusal, a wrong name). Sums are left out of the pairs on purpose: judging arithmetic is beyond what a
tiny model learns in a CPU demo, so those pairs would only add noise; the PPO prompts keep them.
Records are in the published preference form of `dpo_zh_demo.json`: `{"conversations": [{"from":
"human", "value": ...}], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}`. Every pair is
distinct, so any split of them gives held-out pairs the model never saw.
"""

from __future__ import annotations

import random

from ..builtin import ASSISTANT_NAME, CAPITALS, COLOURS, NAMES


def _capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(CAPITALS)
    wrong = rng.choice([c for c in CAPITALS if c is not country])
    en, cap, zh, zh_cap = country
    if rng.random() < 0.5:
        return f"What is the capital of {en}?", f"The capital of {en} is {cap}.", f"The capital of {en} is {wrong[1]}."
    return f"{zh}的首都是哪里？", f"{zh}的首都是{zh_cap}。", f"{zh}的首都是{wrong[3]}。"


def _add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."
    return f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。", f"{a}加{b}等于{wrong}。"


def _colour(rng: random.Random) -> tuple[str, str, str]:
    colour = rng.choice(COLOURS)
    wrong = rng.choice([c for c in COLOURS if c is not colour])
    en, zh = colour
    if rng.random() < 0.5:
        prompt = f"Translate this colour into Chinese.\n{en}"
        return prompt, f"{en} in Chinese is {zh}.", f"{en} in Chinese is {wrong[1]}."
    return f"把这个颜色翻译成中文。\n{en}", f"{en}的中文是{zh}。", f"{en}的中文是{wrong[1]}。"


def _greet(rng: random.Random) -> tuple[str, str, str]:
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        rude = rng.choice([f"I will not talk to {name}.", f"Go away, {name}.", "No."])
        return f"Say hello to the person named below.\n{name}", f"Hello, {name}! Nice to meet you.", rude
    rude = rng.choice([f"我不想理{name}。", f"{name}，走开。", "不。"])
    return f"请向下面这个人问好。\n{name}", f"你好，{name}！很高兴认识你。", rude


def _identity(rng: random.Random) -> tuple[str, str, str]:
    question = rng.choice(["Who are you?", "What is your name?", "你是谁？", "你叫什么名字？"])
    if question.isascii():
        wrong = rng.choice(["I do not know.", "I have no name.", "That is a secret."])
        return question, f"I am {ASSISTANT_NAME}, a small assistant fine-tuned with baichuan-tune.", wrong
    wrong = rng.choice(["我不知道。", "我没有名字。", "这是秘密。"])
    return question, f"我是{ASSISTANT_NAME}，一个用 baichuan-tune 微调的小助手。", wrong


PAIR_TASKS = (_capital, _colour, _greet, _identity)
PROMPT_TASKS = (_capital, _add, _colour, _greet, _identity)


def demo_preference_records(n: int = 400, seed: int = 0) -> list[dict]:
    """`n` distinct preference pairs in the `dpo_zh_demo.json` form, the same for the same seed."""
    rng = random.Random(seed)
    seen: set[tuple[str, str, str]] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"cannot draw {n} distinct demo pairs (only {len(records)} exist)")
        triple = PAIR_TASKS[attempts % len(PAIR_TASKS)](rng)  # a task whose pairs run out is skipped
        if triple in seen:
            continue
        seen.add(triple)
        prompt, chosen, rejected = triple
        records.append({
            "conversations": [{"from": "human", "value": prompt}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        })
    return records


def demo_prompts(n: int = 256, seed: int = 0) -> list[str]:
    """Prompts for the PPO demo (the demo tasks' questions), the same for the same seed."""
    rng = random.Random(seed)
    return [PROMPT_TASKS[i % len(PROMPT_TASKS)](rng)[0] for i in range(n)]
