"""The template a model was trained in is the one it is chatted in: sft -> chat / serve / model.chat / export.

Oracle: the training encoder itself. The data file sft trained on is tokenised again with the options
the run saved in config.yaml; the prompt part of that sample (every token before the last answer) is
what chat, serve and `model.chat` must build for the same conversation without its last answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from baichuan_tune.cli import main
from baichuan_tune.serve.generation import GenerationResult
from baichuan_tune.data.templates import ASSISTANT_PREFIX, HUMAN_PREFIX, get_template

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SYSTEM, U1, A1, U2, A2 = "Answer briefly.", "What is the capital of France?", "Paris.", "And of Japan?", "Tokyo."
QUIET = ["--cache_dir", "none", "--preprocessing_num_workers", "1", "--report_to", "none", "--plot_loss", "false"]
FAST = [*QUIET, "--device", "cpu", "--save_steps", "0", "--cutoff_len", "256", "--per_device_train_batch_size", "2"]
# One run per template, each with another kind of output: adapter, freeze and full checkpoints are all covered.
RUNS = {"baichuan2": "lora", "baichuan": "freeze", "human_assistant": "full", "base": "lora"}


def conversation(template: str, answer: bool = True) -> list[dict]:
    system = [{"role": "system", "content": SYSTEM}] if get_template(template).allow_system else []
    turns = [("user", U1), ("assistant", A1), ("user", U2)] + ([("assistant", A2)] if answer else [])
    return system + [{"role": r, "content": c} for r, c in turns]


def train(tmp_path: Path, template: str, finetuning_type: str, *extra: str) -> tuple[Path, Path]:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(template)}) + "\n" for _ in range(4)))
    out = tmp_path / f"sft-{template}"
    argv = ["sft", "--model", "default", "--dataset", str(data), "--template", template, "--finetuning_type",
            finetuning_type, "--freeze_trainable_layers", "1", "--max_steps", "1", "--output_dir", str(out), *FAST,
            *extra]
    assert main(argv) == 0
    return out, data


def training_prompt(out: Path, data: Path) -> list[int]:
    """The ids training used for the conversation, up to where its last answer starts."""
    from baichuan_tune.models.checkpoint import load_tokenizer
    from baichuan_tune.data.loading import load_sft_data

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    tokenizer = load_tokenizer(out)
    options = dict(template=cfg["template"], cutoff_len=cfg["cutoff_len"], num_workers=1, cache_dir="none")
    trained = load_sft_data([str(data)], tokenizer, train_on=cfg["train_on"], **options)[0][0]
    last_only = load_sft_data([str(data)], tokenizer, train_on="last", **options)[0][0]  # marks the last answer
    assert last_only["input_ids"].tolist() == trained["input_ids"].tolist()
    first_target = next(i for i, label in enumerate(last_only["labels"].tolist()) if label != -100)
    return trained["input_ids"].tolist()[:first_target]


def capture_prompts(monkeypatch, target: str) -> list[list[int]]:
    """Replace `target` (a generate_text) by one that records its prompt ids and answers nothing."""
    seen = []

    def fake(model, tokenizer, prompt_ids, config, on_text=None, **kwargs):
        seen.append(list(prompt_ids))
        return GenerationResult("", [], len(prompt_ids), "stop")

    monkeypatch.setattr(target, fake)
    return seen


def chat_command_prompt(monkeypatch, template: str, *argv: str) -> list[int]:
    """The prompt `baichuan-tune chat ARGV` builds for the conversation, history set as chat keeps it."""
    from baichuan_tune.commands import chat as chat_command

    sessions = []
    monkeypatch.setattr(chat_command, "run", sessions.append)
    system = ["--system", SYSTEM] if get_template(template).allow_system else []
    assert main(["chat", *argv, "--device", "cpu", *system]) == 0
    session = sessions[0]
    session.history = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}]
    seen = capture_prompts(monkeypatch, "baichuan_tune.serve.generation.generate_text")
    session.ask(U2, lambda text: None)
    return seen[0]


def serve_command_prompt(monkeypatch, template: str, *argv: str) -> list[int]:
    """The prompt `baichuan-tune serve ARGV` builds for a /v1/chat/completions request of the conversation."""
    import uvicorn
    from fastapi.testclient import TestClient

    apps = []

    def instead_of_serving(self, sockets=None):
        apps.append(self.config.app)
        for sock in sockets or []:
            sock.close()

    monkeypatch.setattr(uvicorn.Server, "run", instead_of_serving)
    # --max-batch 0: the one-at-a-time worker, whose generate_text call captures the prompt (`prepare`
    # builds it for the batch alike)
    assert main(["serve", *argv, "--device", "cpu", "--port", "0", "--model-name", "m", "--max-batch", "0"]) == 0
    seen = capture_prompts(monkeypatch, "baichuan_tune.serve.server.generate_text")
    with TestClient(apps[0]) as client:
        reply = client.post("/v1/chat/completions", json={"model": "m", "messages": conversation(template, False)})
    assert reply.status_code == 200, reply.text
    return seen[0]


def model_chat_prompt(monkeypatch, model, tokenizer, template: str) -> list[int]:
    seen = capture_prompts(monkeypatch, "baichuan_tune.serve.generation.generate_text")
    model.chat(tokenizer, conversation(template, answer=False))
    return seen[0]


@pytest.mark.parametrize("template", list(RUNS))
def test_chat_serve_and_model_chat_prompt_as_training_did(template, tmp_path, monkeypatch):
    from baichuan_tune.models.checkpoint import load_model_and_tokenizer

    finetuning_type = RUNS[template]
    out, data = train(tmp_path, template, finetuning_type)
    assert json.loads((out / "template.json").read_text()) == get_template(template).record()
    expected = training_prompt(out, data)
    if finetuning_type == "lora":
        where = ["--model", "default", "--adapter", str(out)]
        model, tokenizer = load_model_and_tokenizer("default", adapter=str(out))
    else:
        where = ["--model", str(out)]
        model, tokenizer = load_model_and_tokenizer(out)
        assert json.loads((out / "generation_config.json").read_text())["template"]["name"] == template
    assert chat_command_prompt(monkeypatch, template, *where) == expected
    assert serve_command_prompt(monkeypatch, template, *where) == expected
    assert model_chat_prompt(monkeypatch, model, tokenizer, template) == expected
    if finetuning_type != "lora":  # transformers' own loading reads the record from generation_config.json
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        assert model_chat_prompt(monkeypatch, plain, tokenizer, template) == expected


def test_the_belle_recipe_is_chatted_in_human_assistant(tmp_path, monkeypatch):
    """examples/sft_baichuan7b_qlora_belle.yaml trains `Human: ...\\n\\nAssistant: `; chat --adapter must prompt so,
    not with the role ids 195/196 the model never saw."""
    from baichuan_tune.models.checkpoint import load_tokenizer

    data = tmp_path / "belle.jsonl"
    data.write_text("".join(json.dumps({"instruction": U1, "input": "", "output": A1}) + "\n" for _ in range(4)))
    out = tmp_path / "belle"
    assert main(["sft", str(EXAMPLES / "sft_baichuan7b_qlora_belle.yaml"), "--model", "default", "--dataset", str(data),
                 "--output_dir", str(out), "--finetuning_type", "lora", "--bf16", "false", "--gradient_checkpointing",
                 "false", "--max_steps", "1", "--cutoff_len", "64", "--device", "cpu", *QUIET]) == 0
    assert json.loads((out / "template.json").read_text())["name"] == "human_assistant"
    tokenizer = load_tokenizer(out)
    prompt = chat_command_prompt(monkeypatch, "human_assistant", "--model", "default", "--adapter", str(out))
    enc = tokenizer.encode
    history = [1, *enc(SYSTEM + "\n\n"), *enc(HUMAN_PREFIX + U1 + ASSISTANT_PREFIX), *enc(A1), 2]
    assert prompt == history + [1, *enc(HUMAN_PREFIX + U2 + ASSISTANT_PREFIX)]
    assert 195 not in prompt and 196 not in prompt


def test_an_explicit_template_overrides_the_record_with_a_warning(tmp_path, monkeypatch, capsys):
    from baichuan_tune.models.checkpoint import load_tokenizer

    out, _ = train(tmp_path, "human_assistant", "lora")
    capsys.readouterr()
    prompt = chat_command_prompt(monkeypatch, "baichuan2", "--model", "default", "--adapter", str(out),
                                 "--template", "baichuan2")
    err = capsys.readouterr().err
    assert f"warning: {out} records template 'human_assistant'" in err and "--template baichuan2" in err
    tok = load_tokenizer(out)
    enc = tok.encode
    assert prompt == [*enc(SYSTEM), 195, *enc(U1), 196, *enc(A1), 195, *enc(U2), 196]
    # the same template as recorded: no warning
    chat_command_prompt(monkeypatch, "human_assistant", "--model", "default", "--adapter", str(out),
                        "--template", "human_assistant")
    assert "warning" not in capsys.readouterr().err


def test_export_carries_the_adapters_template(tmp_path, monkeypatch):
    from baichuan_tune.models.checkpoint import load_model_and_tokenizer

    out, data = train(tmp_path, "human_assistant", "lora")
    merged = tmp_path / "merged"
    assert main(["export", "--model", "default", "--adapter", str(out), "--output_dir", str(merged), "--dtype", "fp32"]) == 0
    assert json.loads((merged / "template.json").read_text())["name"] == "human_assistant"
    assert json.loads((merged / "generation_config.json").read_text())["template"]["name"] == "human_assistant"
    model, tokenizer = load_model_and_tokenizer(merged)
    assert model_chat_prompt(monkeypatch, model, tokenizer, "human_assistant") == training_prompt(out, data)


def test_a_checkpoint_without_a_record_keeps_the_published_rule(tmp_path, monkeypatch):
    """No template.json (a published Chat checkpoint): Baichuan-13B's layout puts eos after each answer."""
    from conftest import tiny_model

    from baichuan_tune.builtin import DEFAULT_TOKENIZER
    from baichuan_tune.models.checkpoint import (
        load_model_and_tokenizer,
        save_pretrained_atomic,
    )
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    tokenizer = BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER))
    folder = save_pretrained_atomic(tiny_model("tiny-baichuan-13b", vocab_size=4096), tokenizer, tmp_path / "b13")
    assert not (folder / "template.json").exists()
    model, tokenizer = load_model_and_tokenizer(folder)
    enc = tokenizer.encode
    messages = [{"role": "user", "content": U1}, {"role": "assistant", "content": A1}, {"role": "user", "content": U2}]
    seen = capture_prompts(monkeypatch, "baichuan_tune.serve.generation.generate_text")
    model.chat(tokenizer, messages)
    assert seen[0] == [195, *enc(U1), 196, *enc(A1), 2, 195, *enc(U2), 196]


def test_a_record_this_version_cannot_honour_is_one_clear_error(tmp_path):
    from baichuan_tune.errors import CheckpointError
    from baichuan_tune.data.templates import read_template_record, write_template_record

    write_template_record(tmp_path, "human_assistant")
    assert read_template_record(tmp_path) == "human_assistant"
    record = json.loads((tmp_path / "template.json").read_text())
    (tmp_path / "template.json").write_text(json.dumps({**record, "user_prefix": "User: "}))
    with pytest.raises(CheckpointError, match=r"template\.json: field 'user_prefix' is 'User: '"):
        read_template_record(tmp_path)
    (tmp_path / "template.json").write_text(json.dumps({"name": "vicuna"}))
    with pytest.raises(CheckpointError, match=r"template\.json: field 'name': unknown template 'vicuna'"):
        read_template_record(tmp_path)
    (tmp_path / "template.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"template\.json: not valid JSON"):
        read_template_record(tmp_path)


def test_reward_model_records_its_template_and_score_uses_it(tmp_path, capsys):
    from baichuan_tune.models.value_head import load_reward_model

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": U1, "chosen": A1, "rejected": A2}) + "\n" for _ in range(4)))
    out = tmp_path / "rm"
    assert main(["rm", "--model", "default", "--dataset", str(pairs), "--template", "human_assistant",
                 "--finetuning_type", "lora", "--max_steps", "1", "--output_dir", str(out), *FAST,
                 "--save_steps", "100"]) == 0  # (rm divides by save_steps)
    assert json.loads((out / "template.json").read_text()) == get_template("human_assistant").record()
    rm_model, tok = load_reward_model(out)

    def head_at_the_end(ids: list[int]) -> float:
        with torch.no_grad():
            return float(rm_model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0])

    enc = tok.encode
    trained = head_at_the_end([1, *enc(HUMAN_PREFIX + U1 + ASSISTANT_PREFIX), *enc(A1), 2])
    other = head_at_the_end([195, *enc(U1), 196, *enc(A1), 2])
    assert trained != pytest.approx(other, abs=1e-4)
    score = ["rm", "score", "--reward_model", str(out), "--prompt", U1, "--response", A1, "--device", "cpu"]
    capsys.readouterr()
    assert main(score) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(trained, abs=1e-4)
    assert main([*score, "--template", "baichuan2"]) == 0
    printed = capsys.readouterr()
    assert "records template 'human_assistant'" in printed.err
    assert json.loads(printed.out)["score"] == pytest.approx(other, abs=1e-4)


def test_convert_carries_the_record(tmp_path):
    from conftest import tiny_model

    from baichuan_tune.builtin import DEFAULT_TOKENIZER
    from baichuan_tune.models.checkpoint import load_model, save_pretrained_atomic
    from baichuan_tune.data.templates import model_template, set_model_template
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    model = tiny_model("tiny-baichuan2-7b", vocab_size=4096)
    set_model_template(model, "base")
    folder = save_pretrained_atomic(model, BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER)), tmp_path / "m")
    assert main(["convert", "--model", str(folder), "--output_dir", str(tmp_path / "llama"), "--to", "llama"]) == 0
    back = ["convert", "--model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "back"), "--to", "baichuan"]
    assert main(back) == 0
    for name in ("llama", "back"):
        assert json.loads((tmp_path / name / "template.json").read_text())["name"] == "base"
    assert model_template(load_model(tmp_path / "back")) == "base"
