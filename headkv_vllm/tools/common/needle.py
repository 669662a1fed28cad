"""A needle (a fact hidden in a haystack, the question that asks for it, and what a
correct answer says), and how an answer's words are compared with it. Shared by the
head-scoring probes (``probes.py``) and ``eval-needle`` (``eval_needles.py``).
"""

from __future__ import annotations

import collections
import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Needle:
    name: str
    kind: str  # "retrieval" | "reasoning"
    sentences: tuple[str, ...]  # inserted together, in this order, one space apart
    question: str
    answer: str  # the words a correct answer contains
    distractor: str | None = None  # reasoning: the other person's attribute; naming it is wrong
    target: int | None = None  # reasoning: the sentence that answers (the R2 probe's c2); None: the whole needle
    answer_prefix: str = ""  # the answer starts with this, given in the prompt; the model continues it

    @property
    def text(self) -> str:
        return " ".join(self.sentences)

    def as_dict(self) -> dict:
        """The needle as eval-needle records it (and compares on --resume)."""
        return {"name": self.name, "kind": self.kind, "text": self.text, "question": self.question,
                "answer": self.answer, "distractor": self.distractor, "answer_prefix": self.answer_prefix}


def words(text: str) -> list[str]:
    """Lower-case words: runs of letters, digits and underscores; anything else (spaces,
    punctuation, apostrophes, hyphens) separates them."""
    return re.findall(r"\w+", text.lower())


def rouge1_recall(answer: str, reference: str) -> float:
    """Share of the reference's words (with multiplicity) that the answer contains; 0 for no reference words."""
    ref = collections.Counter(words(reference))
    if not ref:
        return 0.0
    overlap = collections.Counter(words(answer)) & ref
    return sum(overlap.values()) / sum(ref.values())
