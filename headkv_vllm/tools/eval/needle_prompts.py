"""Needle-in-a-haystack prompts and their scoring.

A prompt is a chat: the question, the haystack document with the needle inserted at
a sentence boundary at ``depth`` percent of the document, and the question again.
``length`` is the prompt's size in tokens after the chat template (within a few
tokens: the document is decoded and re-tokenised by the server).
"""

from __future__ import annotations

from headkv_vllm.tools.common.haystack import haystack_text
from headkv_vllm.tools.common.needle import Needle, rouge1_recall, words

USER_TEMPLATE = ("Read the document and answer the question: {question}\n\nDocument:\n{document}\n\n"
                 "Question: {question}\nAnswer in one short sentence.")


class NeedlePrompts:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.haystack = tokenizer(haystack_text())["input_ids"]
        ends = {t for t in set(self.haystack) if tokenizer.decode([t]).rstrip().endswith((".", "?", "!"))}
        self._sentence_end = ends

    def overhead(self, needle: Needle) -> int:
        """Tokens of the chat around the document."""
        ids = self.tokenizer.apply_chat_template(self.messages(needle, ""), tokenize=True, **chat_options(needle))
        return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def messages(self, needle: Needle, document: str) -> list[dict]:
        chat = [{"role": "user", "content": USER_TEMPLATE.format(question=needle.question, document=document)}]
        if needle.answer_prefix:
            chat.append({"role": "assistant", "content": needle.answer_prefix})
        return chat

    def build(self, needle: Needle, length: int, depth: float, offset: int = 0) -> list[dict]:
        """The chat for ``needle`` at ``depth`` in a document from the haystack's token ``offset`` on."""
        needle_ids = self.tokenizer.encode(" " + needle.text, add_special_tokens=False)
        room = length - self.overhead(needle) - len(needle_ids)
        if room < 16:
            raise ValueError(f"--lengths: {length} tokens leave no room for a haystack around needle "
                             f"'{needle.name}'; use lengths >= {length - room + 16}.")
        if offset + room > len(self.haystack):
            raise ValueError(f"--lengths: {length} tokens exceed the haystack ({len(self.haystack) - offset} tokens "
                             f"from token {offset} on).")
        context = self.haystack[offset:offset + room]
        cut = round(room * depth / 100)
        while 0 < cut < room and context[cut - 1] not in self._sentence_end:
            cut -= 1
        document = self.tokenizer.decode(context[:cut] + needle_ids + context[cut:]).strip()
        return self.messages(needle, document)


def chat_options(needle: Needle) -> dict:
    """Chat-template options: a needle with an answer prefix continues the assistant's turn."""
    if needle.answer_prefix:
        return {"add_generation_prompt": False, "continue_final_message": True}
    return {"add_generation_prompt": True}


def contains_answer(response: str, needle: Needle) -> bool:
    """The answer appears in the response (case- and spacing-insensitive) and, for a
    needle with a distractor, the distractor does not."""
    said = " ".join(words(response))
    found = f" {' '.join(words(needle.answer))} " in f" {said} "
    fooled = needle.distractor is not None and f" {' '.join(words(needle.distractor))} " in f" {said} "
    return found and not fooled


def score(response: str, needle: Needle) -> dict:
    recall = rouge1_recall(response, needle.answer)
    if needle.distractor is not None and contains_answer(response, needle) is False and recall == 1.0:
        recall = 0.0  # named both options: no credit for a guess
    return {"contains": contains_answer(response, needle), "rouge1": recall}
