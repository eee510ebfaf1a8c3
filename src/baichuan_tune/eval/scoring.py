"""Multiple-choice scoring without generation: one forward pass per batch of left-padded prompts; the logits
at the last prompt position are read at the ids of the four answer letters *as they follow the answer
prefix* ("答案：A" ends in the piece "A", "Answer: A" in "▁A"), softmaxed over the four, and the argmax is the
prediction. The few-shot head that every question of a subject shares is run once and its KV cache reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..serve.generation import context_length, model_device
from .prompts import answer_token_ids, encode_prompt
from .reading import SubjectData
from .tasks import LETTERS, Task

# ----------------------------------------------------------------------------- scoring


def _batches(order: list[int], lengths: list[int], batch_size: int, max_batch_tokens: int):
    """Consecutive runs of `order` (longest first) with at most batch_size rows and padded tokens."""
    batch: list[int] = []
    for i in order:
        width = max(lengths[j] for j in batch + [i])
        if batch and (len(batch) >= batch_size or width * (len(batch) + 1) > max_batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def score_prompts(model, prompts: list[list[int]], letter_ids: list[int], pad_id: int, batch_size: int = 8,
                  max_batch_tokens: int = 32768, share_prefix: bool = False) -> torch.Tensor:
    """Probabilities of the answer letters at the end of each prompt: [N, 4] (fp32, on CPU).

    Prompts are sorted longest first so a batch wastes little on padding, left-padded so the answer
    position is the last column for every row (the model restarts positions after the padding), and
    only the last position's logits are computed. With `share_prefix`, the token prefix that all prompts
    share (a subject's header and few-shot examples) runs once and its KV cache serves every batch.
    """
    prefix_len = common_prefix_length(prompts) if share_prefix and len(prompts) > 1 else 0
    if prefix_len >= MIN_SHARED_PREFIX:
        return _score_after_prefix(model, prompts, prefix_len, letter_ids, pad_id, batch_size, max_batch_tokens)
    device = model_device(model)
    lengths = [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    probs = torch.empty(len(prompts), len(letter_ids))
    letters = torch.tensor(letter_ids, device=device)
    for batch in _batches(order, lengths, batch_size, max_batch_tokens):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - lengths[i]:] = torch.tensor(prompts[i])
            mask[row, width - lengths[i]:] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
        logits = out.logits[:, -1].index_select(-1, letters).float()  # [B, 4]
        probs[batch] = torch.softmax(logits, dim=-1).cpu()
    return probs


# A shared prefix shorter than this is not worth a separate forward pass and a cache copy per batch.
MIN_SHARED_PREFIX = 16


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _cache_kwarg() -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); pass the KV cache by the current name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _body_and_head(model):
    """The decoder stack and the output head of a causal LM, also inside a PEFT wrapper (whose adapter
    layers sit in those modules, so they still apply)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


def _score_after_prefix(model, prompts, prefix_len, letter_ids, pad_id, batch_size, max_batch_tokens):
    """Run the shared prefix once, then the right-padded rests of the prompts in batches on its KV cache.

    transformers' DynamicCache holds the prefix keys/values; each batch gets them expanded (a view) to its
    rows. The attention mask covers prefix + rest; right padding keeps every real token at its position.
    The head runs only on each row's last real position (its hidden state is gathered first), since the
    rests end at different columns.
    """
    from transformers.cache_utils import DynamicCache

    body, head = _body_and_head(model)
    device, name = model_device(model), _cache_kwarg()
    prefix = torch.tensor([prompts[0][:prefix_len]], device=device)
    cache = getattr(body(input_ids=prefix, use_cache=True), name)
    layers = [(layer.keys, layer.values) for layer in cache.layers]  # each [1, H, P, D]
    rests = [p[prefix_len:] for p in prompts]
    lengths = [len(r) for r in rests]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    probs = torch.empty(len(prompts), len(letter_ids))
    letters = torch.tensor(letter_ids, device=device)
    with_prefix = [n + prefix_len for n in lengths]  # a row's cached prefix counts towards the token budget
    for batch in _batches(order, with_prefix, batch_size, max_batch_tokens):
        rows, width = len(batch), max(lengths[i] for i in batch)
        ids = torch.full((rows, width), pad_id, dtype=torch.long)
        mask = torch.zeros((rows, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(rests[i])
            mask[row, prefix_len: prefix_len + lengths[i]] = 1
        batch_cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                                   for k, v in layers])
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                      **{name: batch_cache}).last_hidden_state  # [B, W, hidden]
        last = torch.tensor([lengths[i] - 1 for i in batch], device=device)
        logits = head(hidden[torch.arange(rows, device=device), last])  # [B, vocab]
        probs[batch] = torch.softmax(logits.index_select(-1, letters).float(), dim=-1).cpu()
    return probs


@dataclass
class SubjectResult:
    subject: str
    name: str
    category: str
    questions: int
    correct: int | None  # None where the split has no answers
    shots_dropped: int  # few-shot examples dropped to fit the context, summed over questions
    prompts_shortened: int  # prompts that lost at least one example
    truncated: int  # prompts cut from the left even with no examples
    predictions: list[dict]

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None or not self.questions else 100.0 * self.correct / self.questions


def evaluate_subject(model, tokenizer, task: Task, data: SubjectData, letter_ids: list[int], n_shot: int,
                     max_length: int, batch_size: int, max_batch_tokens: int, eval_split: str,
                     share_prefix: bool = True) -> SubjectResult:
    prompts, dropped = [], []
    truncated = 0
    for q in data.questions:
        # Evaluating dev itself: a question is never its own example.
        pool = [s for s in data.shots if s is not q] if eval_split == "dev" else data.shots
        ids, n_dropped, cut = encode_prompt(task, tokenizer, data.name, pool[:n_shot], q, max_length)
        prompts.append(ids)
        dropped.append(n_dropped)
        truncated += cut
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probs = torch.empty(len(prompts), len(letter_ids))
    for n_dropped in sorted(set(dropped)):  # prompts with the same examples share a prefix
        group = [i for i, d in enumerate(dropped) if d == n_dropped]
        probs[group] = score_prompts(model, [prompts[i] for i in group], letter_ids, pad_id, batch_size,
                                     max_batch_tokens, share_prefix)
    preds = probs.argmax(dim=-1).tolist()
    has_answers = all(q.answer is not None for q in data.questions)
    predictions = [
        {"id": q.id, "prediction": LETTERS[p], "answer": q.answer, "probs": [round(x, 6) for x in row]}
        for q, p, row in zip(data.questions, preds, probs.tolist())
    ]
    correct = sum(LETTERS[p] == q.answer for q, p in zip(data.questions, preds)) if has_answers else None
    return SubjectResult(data.subject, data.name, data.category, len(data.questions), correct,
                         sum(dropped), sum(d > 0 for d in dropped), truncated, predictions)


def evaluate(model, tokenizer, task: Task, subjects: list[SubjectData], *, split: str, n_shot: int = 5,
             max_length: int | None = None, batch_size: int = 8, max_batch_tokens: int = 32768,
             share_prefix: bool = True, progress: bool = True) -> list[SubjectResult]:
    """Score every subject; a progress bar runs over subjects. `share_prefix`: see `score_prompts`."""
    from tqdm.auto import tqdm

    max_length = max_length or context_length(model)
    letter_ids = answer_token_ids(task, tokenizer)
    results = []
    bar = tqdm(subjects, desc=f"{task.title} {split}", unit="subject", disable=not progress)
    for data in bar:
        bar.set_postfix_str(data.subject)
        results.append(evaluate_subject(model, tokenizer, task, data, letter_ids, n_shot, max_length,
                                        batch_size, max_batch_tokens, split, share_prefix))
    bar.close()
    return results
