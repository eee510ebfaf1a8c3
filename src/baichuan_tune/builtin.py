"""The built-in default model and demo data, so every command runs out of the box with nothing downloaded.

- `demo_sft_records()`: a small bilingual instruction set this project wrote (alpaca form), built from
  templates with a fixed seed. The tasks are easy to learn and easy to check by eye (greetings, capitals,
  small sums, the assistant's name), so a few CPU minutes of fine-tuning visibly change the answers.
- `tokenizer_corpus()`: the text the built-in tokenizer was trained on (`baichuan-tune tokenizer train
  --builtin` rebuilds `assets/default/tokenizer.model` from it).
- `default_model_dir()`: a folder in the published checkpoint layout holding the `default` preset
  (Baichuan2-7B architecture, small) with seeded random weights and the built-in tokenizer. It is
  written once into the user cache and reused.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEFAULT_TOKENIZER = ASSETS / "default" / "tokenizer.model"
DEFAULT_MODEL_VERSION = "v2"  # bump when the preset, tokenizer or seed changes
SFT_DEMO_DIR = Path("outputs/sft-demo")  # where `baichuan-tune sft` with no options writes (ppo and demo look there)

ASSISTANT_NAME = "Baichuan-Tune Demo"


def online_demo_model() -> str:
    """The model the ppo and grpo demos start from: the sft demo's when there is one (RLHF starts from a
    fine-tuned model), else the untrained default model."""
    if (SFT_DEMO_DIR / "config.json").is_file():
        print(f"Starting from the sft demo's model in {SFT_DEMO_DIR}.")
        return str(SFT_DEMO_DIR)
    print(f"No {SFT_DEMO_DIR} (run `baichuan-tune sft` first for the sft -> ppo pipeline): starting from the "
          "untrained default model, whose near-uniform answers improve slowly.")
    return "default"

CAPITALS = [
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
    ("Italy", "Rome", "意大利", "罗马"), ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Peru", "Lima", "秘鲁", "利马"), ("India", "New Delhi", "印度", "新德里"),
    ("Greece", "Athens", "希腊", "雅典"), ("Norway", "Oslo", "挪威", "奥斯陆"), ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Korea", "Seoul", "韩国", "首尔"), ("Britain", "London", "英国", "伦敦"), ("Australia", "Canberra", "澳大利亚", "堪培拉"),
]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack", "Kate", "Leo",
         "Mia", "Noah", "Olivia", "Paul", "小明", "小红", "李雷", "韩梅梅", "王芳", "张伟"]
COLOURS = [("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("black", "黑色"), ("white", "白色")]


def _capital(rng: random.Random) -> dict:
    en, cap, zh, zh_cap = rng.choice(CAPITALS)
    if rng.random() < 0.5:
        return {"instruction": f"What is the capital of {en}?", "input": "", "output": f"The capital of {en} is {cap}."}
    return {"instruction": f"{zh}的首都是哪里？", "input": "", "output": f"{zh}的首都是{zh_cap}。"}


def _greet(rng: random.Random) -> dict:
    name = rng.choice(NAMES)
    if rng.random() < 0.5:
        return {"instruction": "Say hello to the person named below.", "input": name, "output": f"Hello, {name}! Nice to meet you."}
    return {"instruction": "请向下面这个人问好。", "input": name, "output": f"你好，{name}！很高兴认识你。"}


def _add(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    return {"instruction": f"{a}加{b}等于多少？", "input": "", "output": f"{a}加{b}等于{a + b}。"}


def _colour(rng: random.Random) -> dict:
    en, zh = rng.choice(COLOURS)
    return {"instruction": "Translate this colour into Chinese.", "input": en, "output": f"{en} in Chinese is {zh}."}


def _identity(rng: random.Random) -> dict:
    question = rng.choice(["Who are you?", "What is your name?", "你是谁？", "你叫什么名字？"])
    if question.isascii():
        return {"instruction": question, "input": "", "output": f"I am {ASSISTANT_NAME}, a small assistant fine-tuned with baichuan-tune."}
    return {"instruction": question, "input": "", "output": f"我是{ASSISTANT_NAME}，一个用 baichuan-tune 微调的小助手。"}


TASKS = (_capital, _greet, _add, _colour, _identity)

# Prompts the sft demo answers before and after training.
DEMO_PROMPTS = ["Who are you?", "What is the capital of Japan?", "请向下面这个人问好。\n小明", "3加4等于多少？"]


def demo_sft_records(n: int = 600, seed: int = 0) -> list[dict]:
    """`n` alpaca-form records {instruction, input, output}, the same for the same seed."""
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(n)]


def tokenizer_corpus() -> list[str]:
    """Lines of text the built-in tokenizer is trained on: the demo records plus plain sentences."""
    lines = []
    for rec in demo_sft_records(2000, seed=1):
        lines += [rec["instruction"], rec["input"], rec["output"]]
    for en, cap, zh, zh_cap in CAPITALS:
        lines.append(f"{cap} is a large city. {zh_cap}是一座大城市。 People in {en} speak many languages.")
    lines += [f"{i} + {j} = {i + j}" for i in range(10) for j in range(10)]
    lines += ["Human: ", "Assistant: ", "The quick brown fox jumps over the lazy dog.", "我们一起学习，一起进步。"]
    return [line for line in lines if line]


def cache_home() -> Path:
    return Path(os.environ.get("BAICHUAN_TUNE_HOME", Path.home() / ".cache" / "baichuan_tune"))


def default_model_dir() -> Path:
    """The built-in default model folder (created on first use; several processes may do so at once)."""
    final = cache_home() / f"default-model-{DEFAULT_MODEL_VERSION}"
    if (final / "config.json").is_file():
        return final
    import torch

    from .models.checkpoint import save_pretrained_atomic
    from .models.modeling_baichuan import BaichuanForCausalLM
    from .models.presets import preset_config
    from .models.tokenization_baichuan import BaichuanTokenizer

    # Seeded weights without touching the caller's random state: a run that builds the default model on
    # first use draws the same adapter init and data order as every later run with the same seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BaichuanForCausalLM(preset_config("default"))
    tokenizer = BaichuanTokenizer.from_pretrained(str(DEFAULT_TOKENIZER.parent))
    # Each writer builds in a folder of its own (several torchrun processes can start at once); the first
    # rename wins and the others find the finished folder in place.
    final.parent.mkdir(parents=True, exist_ok=True)
    own = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        save_pretrained_atomic(model, tokenizer, own / "model")
        try:
            os.rename(own / "model", final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(own, ignore_errors=True)
    return final
