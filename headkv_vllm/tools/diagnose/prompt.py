"""A needle prompt of ``eval-needle`` as token ids, with the token positions the
needle diagnosis asks about: the needle's answer, the whole needle, the question's
last occurrence, and where the user's text ends (the chat template's end-of-turn and
assistant header come after it).

The ids are the rendered chat template tokenised without special tokens, which is
what vLLM's chat endpoint sends to the engine.
"""

from __future__ import annotations

import dataclasses

from headkv_vllm.tools.common.needle import Needle
from headkv_vllm.tools.eval.needle_prompts import NeedlePrompts, chat_options


class SpanError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class DiagnosisPrompt:
    needle: Needle
    length: int
    depth: float
    ids: tuple[int, ...]
    answer: tuple[int, ...]  # positions of the needle's answer tokens (inside the document)
    needle_tokens: tuple[int, ...]  # positions of the whole needle text
    question: tuple[int, ...]  # positions of the question's last occurrence (after the document)
    user_end: int  # positions >= user_end are the template after the user's text

    @property
    def n(self) -> int:
        return len(self.ids)


def token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, ...]:
    """Positions of the tokens whose character span overlaps ``[start, end)``."""
    return tuple(i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a)


def locate(text: str, part: str, what: str, start: int = 0, last: bool = False) -> int:
    at = text.rfind(part, start) if last else text.find(part, start)
    if at < 0:
        raise SpanError(f"{what} {part!r} is not in the rendered prompt; the needle text or chat template changed.")
    return at


def build_prompt(prompts: NeedlePrompts, needle: Needle, length: int, depth: float) -> DiagnosisPrompt:
    """The prompt eval-needle sends for (needle, length, depth), with its spans."""
    tokenizer = prompts.tokenizer
    messages = prompts.build(needle, length, depth)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **chat_options(needle))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    at = locate(text, needle.text, "needle")
    end = at + len(needle.text)
    answer_at = locate(text[:end].lower(), needle.answer.lower(), "answer", start=at)
    question_at = locate(text, needle.question, "question", last=True)
    user_text = messages[0]["content"]
    user_end_char = locate(text, user_text, "user text") + len(user_text)
    return DiagnosisPrompt(
        needle=needle, length=length, depth=depth, ids=tuple(enc["input_ids"]),
        answer=token_span(offsets, answer_at, answer_at + len(needle.answer)),
        needle_tokens=token_span(offsets, at, end),
        question=token_span(offsets, question_at, question_at + len(needle.question)),
        user_end=max(token_span(offsets, 0, user_end_char)) + 1,
    )


def window_positions(prompt: DiagnosisPrompt, window: int, window_end: str) -> range:
    """The window's positions: the last ``window`` prompt tokens ('last', the paper's and
    the engine's), or the last ``window`` tokens of the user's text ('user-text')."""
    end = prompt.n if window_end == "last" else prompt.user_end
    return range(max(0, end - window), end)


def window_info(tokenizer, prompt: DiagnosisPrompt, window: int, window_end: str) -> dict:
    """The window's text and how many of its tokens are template / the question's last occurrence."""
    pos = window_positions(prompt, window, window_end)
    question = set(prompt.question)
    return {"text": tokenizer.decode([prompt.ids[p] for p in pos]),
            "template_tokens": sum(p >= prompt.user_end for p in pos),
            "question_tokens": sum(p in question for p in pos)}
