"""The two needle-in-a-haystack probes that score heads (docs/method.md section 1):
needles, the trial grid, prompts, and when an answer counts as correct.

- "R" (retrieval): a plain fact. Correct when the answer's ROUGE-1 recall against
  the needle is > 0.5 (the method's rule) AND its recall against the needle's answer
  words is > 0.5 too: restating the question alone ("The password to the vault is
  the password") already recalls half of a needle's words.
- "R2" (retrieval-reasoning): two people, one attribute each, and a question that
  needs a reasoning step to pick the right sentence (the target, c2) over the other
  (the distractor, c1). The answer starts after a given prefix that restates the
  question ("The favorite fruit of the older person is"), which is how small chat
  models begin their answer anyway; so the decoded steps are the answer itself, and
  the method's QA-F1 > 0.5 compares the answer with the attribute, not with a
  restated question.

Prompts are built from token ids, so the needle's token span is exact.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import re
import string

from headkv_vllm.tools.common.needle import Needle, rouge1_recall

PROBES = ("R", "R2")
MIN_CORRECT = 0.5  # both rules: recall (R) or F1 (R2) must exceed this


R_NEEDLES = (
    Needle(
        "soup-ingredient", "retrieval",
        ("The secret ingredient in Grandma Rosa's soup is a spoonful of smoked paprika.",),
        "What is the secret ingredient in Grandma Rosa's soup?",
        "smoked paprika",
    ),
    Needle(
        "valley-visit", "retrieval",
        ("The best time to visit the Kestrel Valley is early October, when the maple trees turn red.",),
        "When is the best time to visit the Kestrel Valley?",
        "early October",
    ),
    Needle(
        "lighthouse-pet", "retrieval",
        ("The lighthouse keeper on Marrow Island keeps a green parrot named Captain Biscuit.",),
        "What pet does the lighthouse keeper on Marrow Island keep?",
        "green parrot named Captain Biscuit",
    ),
)

R2_NEEDLES = (  # the answer is the first person's in one, the second person's in the other
    Needle(
        "sport-of-younger", "reasoning",
        ("Daniel is 19 years old.", "Grace is 24 years old.", "Daniel's favorite sport is tennis.", "Grace's favorite sport is rowing."),
        "What is the favorite sport of the younger person?",
        "tennis",
        distractor="rowing",
        target=2,
        answer_prefix="The favorite sport of the younger person is",
    ),
    Needle(
        "flower-of-older", "reasoning",
        ("Oliver is 45 years old.", "Sophie is 52 years old.", "Oliver's favorite flower is the tulip.", "Sophie's favorite flower is the lily."),
        "What is the favorite flower of the older person?",
        "lily",
        distractor="tulip",
        target=3,
        answer_prefix="The favorite flower of the older person is",
    ),
)

NEEDLES = {"R": R_NEEDLES, "R2": R2_NEEDLES}

INTRO = "Read the text and answer the question.\n\n<text>\n"
OUTRO = "\n</text>\n\nQuestion: {question} Answer in one sentence."


@dataclasses.dataclass(frozen=True)
class Trial:
    needle: int  # index into NEEDLES[probe]
    length: int  # prompt tokens, template and question included
    depth: float  # percent of the haystack before the needle

    @property
    def key(self) -> str:
        return f"{self.needle}/{self.length}/{self.depth:g}"


def depths(num: int) -> list[float]:
    """linspace(0, 100, num), as the method's grid."""
    return [round(100 * i / (num - 1), 1) if num > 1 else 0.0 for i in range(num)]


def lengths(low: int, high: int, num: int) -> list[int]:
    return [round(low + (high - low) * i / (num - 1)) if num > 1 else high for i in range(num)]


def grid(probe: str, context_lengths: list[int], depth_percents: list[float]) -> list[Trial]:
    return [Trial(n, length, d) for n in range(len(NEEDLES[probe])) for length in context_lengths for d in depth_percents]


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    needle_span: tuple[int, int]  # [start, end) of the whole needle
    target_span: tuple[int, int]  # the span credited: the needle (R) or its target sentence (R2)


class PromptBuilder:
    """Token-level prompts: chat template (if the tokenizer has one) around
    INTRO + haystack with the needle + OUTRO, then the needle's answer prefix."""

    def __init__(self, tokenizer, haystack: str):
        self.tok = tokenizer
        self.haystack = self._encode(haystack)
        ends = {i for i in set(self.haystack) if tokenizer.decode([i]).rstrip().endswith((".", "?", "!"))}
        self.sentence_starts = [0] + [p + 1 for p, t in enumerate(self.haystack) if t in ends]
        if getattr(tokenizer, "chat_template", None):
            marker = "\x00HAYSTACK\x00"
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
            )
            self.before, self.after = text.split(marker)
            self.head_special = False
        else:
            self.before, self.after = "", "\nAnswer:"
            self.head_special = True

    def _encode(self, text: str, special: bool = False) -> list[int]:
        return self.tok(text, add_special_tokens=special).input_ids

    def needle_parts(self, needle: Needle) -> list[list[int]]:
        return [self._encode(" " + s) for s in needle.sentences]

    def target_length(self, needle: Needle) -> int:
        parts = self.needle_parts(needle)
        return sum(map(len, parts)) if needle.target is None else len(parts[needle.target])

    def build(self, needle: Needle, length: int, depth: float) -> Prompt:
        head = self._encode(self.before + INTRO, special=self.head_special)
        tail = self._encode(OUTRO.format(question=needle.question) + self.after)
        if needle.answer_prefix:
            tail += self._encode(("" if self.after.endswith("\n") else " ") + needle.answer_prefix)
        parts = self.needle_parts(needle)
        needle_ids = [t for p in parts for t in p]
        room = length - len(head) - len(tail) - len(needle_ids)
        if room < 0:
            raise ValueError(f"context length {length} is too short for the prompt around the needle ({length - room} tokens).")
        if room > len(self.haystack):
            raise ValueError(f"context length {length} needs {room} haystack tokens; the haystack has {len(self.haystack)}.")
        cut = self._sentence_start(room, depth)
        ids = head + self.haystack[:cut] + needle_ids + self.haystack[cut:room] + tail
        start = len(head) + cut
        target = needle.target
        if target is None:
            span = (start, start + len(needle_ids))
        else:
            offset = start + sum(len(p) for p in parts[:target])
            span = (offset, offset + len(parts[target]))
        return Prompt(ids, (start, start + len(needle_ids)), span)

    def _sentence_start(self, room: int, depth: float) -> int:
        """The last sentence start at or before ``depth`` percent of ``room`` haystack tokens."""
        want = round(room * depth / 100)
        if want >= room:
            return room
        return self.sentence_starts[bisect.bisect_right(self.sentence_starts, want) - 1]


PUNCTUATION = set(string.punctuation)


def _qa_tokens(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return text.split()


def qa_f1(answer: str, gold: str) -> float:
    """Token F1 after SQuAD normalisation (lower case, no punctuation, no articles)."""
    pred, ref = _qa_tokens(answer), _qa_tokens(gold)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_correct(probe: str, needle: Needle, answer: str) -> bool:
    if probe == "R":
        return rouge1_recall(answer, needle.text) > MIN_CORRECT and rouge1_recall(answer, needle.answer) > MIN_CORRECT
    return qa_f1(answer, needle.answer) > MIN_CORRECT
