"""Rule-based rewards for `baichuan-tune ppo --reward_function baichuan_tune.rewards:NAME`.

A reward function takes the prompts and the decoded answers of one rollout batch (plus keyword
arguments: `response_lengths`, the answers' token counts, and whatever `--reward_kwargs key=value`
gives) and returns one number per answer. Your own function in any importable module or `.py` file
works the same way (`--reward_function my_rewards.py:score`); accept `**kwargs` to ignore the extras.
"""

from __future__ import annotations


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def chinese_ratio(prompts: list[str], responses: list[str], **kwargs) -> list[float]:
    """Share of the answer's non-space characters that are Chinese (CJK unified ideographs); 0 when empty.

    A dense language-consistency reward: every answer gets a graded score, which suits a demo from a
    model that does not yet answer in a stable language.
    """
    scores = []
    for text in responses:
        chars = [c for c in text if not c.isspace()]
        scores.append(sum(map(_is_cjk, chars)) / len(chars) if chars else 0.0)
    return scores


def contains_keyword(prompts: list[str], responses: list[str], keyword: str = "", **kwargs) -> list[float]:
    """1.0 when the answer contains `keyword` (case-sensitive), else 0.0."""
    if not keyword:
        raise ValueError("contains_keyword needs --reward_kwargs keyword=WORD")
    return [1.0 if keyword in text else 0.0 for text in responses]


def shorter_than(prompts: list[str], responses: list[str], response_lengths: list[int] | None = None,
                 max_tokens: int = 16, **kwargs) -> list[float]:
    """min(1, max_tokens / length): full score up to `max_tokens` tokens (eos included), less the longer it runs."""
    if response_lengths is None:
        raise ValueError("shorter_than needs response_lengths (the ppo command passes them)")
    return [min(1.0, max_tokens / max(n, 1)) for n in response_lengths]
