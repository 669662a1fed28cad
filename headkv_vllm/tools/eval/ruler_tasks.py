"""RULER-style synthetic long-context tasks, generated locally and seeded.

The task definitions, prompt wording and metrics follow NVIDIA's RULER benchmark
(Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"):

    niah_single      one key (an adjective-noun pair) with one 7-digit value hidden in essays; asked back
    niah_multikey    four keys with one value each in essays; one is asked (three distractors)
    niah_multivalue  one key with four values in essays; all four are asked
    niah_multiquery  four keys with one value each in essays; all four are asked
    vt               variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops) in
                     repeated noise sentences, after one worked example; every variable holding the value
    cwe              common words extraction: a numbered word list in which 10 words appear often (6
                     times each below 4096 tokens, 30 at and above; the others once, or 3 times), after
                     one worked example; the 10 most common
    fwe              frequent words extraction: coded 6-letter words with Zipf(2) counts; the 3 most
                     frequent ('...' is the most frequent and is noise)

Every task is scored with RULER's ``string_match_all``: the share of the expected strings
that the answer contains (case-insensitive). RULER's QA tasks (the one place it uses
``string_match_part``: 1 if any expected string is found) need downloaded data sets
and are left out; :func:`score` offers both metrics.

Differences from RULER: ``length`` is the prompt's size in tokens after the chat
template (RULER counts the answer budget in too); the answer prefix is the start of
the assistant's turn, which the model continues; vt's worked example has 5 noise
lines, not ~500 tokens, so short contexts keep room for the task; cwe's words never
contain one another (RULER's substring match would otherwise credit "art" in "party").

Haystack: the Paul Graham essays (:mod:`headkv_vllm.tools.common.haystack`). Words: the
adjective, noun and verb lists of the ``wonderwords`` package (as RULER uses), single
lower-case words only. Each sample draws from ``random.Random`` seeded with the seed,
task, length and index, so a sample never depends on which other samples are built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import string
from functools import lru_cache
from typing import Callable

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
# RULER's tokens_to_generate per task.
MAX_TOKENS = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
              "vt": 30, "cwe": 120, "fwe": 50}
METRIC = {task: "all" for task in TASKS}
# The assistant's turn holds the answer prefix; the model continues it.
CHAT_OPTIONS = {"add_generation_prompt": False, "continue_final_message": True}

# (keys, values per key, keys asked) of each needle task, as RULER's configuration.
NIAH_SHAPE = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1),
              "niah_multiquery": (4, 1, 4)}
NIAH_DEPTHS = [round(100 * i / 39) for i in range(40)]  # where needles may go, in percent of the sentences
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_HOPS = 4
VT_EXAMPLE_LINES = 5
CWE_COMMON = 10
FWE_WORD_LETTERS = 6
FWE_ZETA_2 = math.pi ** 2 / 6  # the normalisation of Zipf counts with exponent 2


@dataclasses.dataclass(frozen=True)
class Sample:
    task: str
    length: int  # target prompt tokens (the prompt is at most this long)
    index: int
    messages: list[dict]  # the user's turn, then the assistant's answer prefix
    outputs: list[str]  # the strings a correct answer contains
    metric: str  # "all" | "part"

    def fingerprint(self, max_tokens: int) -> str:
        """Identifies the request: --resume keeps an answer only when this is unchanged."""
        data = json.dumps([self.messages, self.outputs, self.metric, max_tokens], sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def score(answer: str, outputs: list[str], metric: str) -> float:
    """RULER's string match: "all" is the share of ``outputs`` found in ``answer``, "part"
    is 1 when any is; case-insensitive substring tests."""
    text = answer.lower()
    found = [o.lower() in text for o in outputs]
    if metric == "all":
        return sum(found) / len(found)
    if metric == "part":
        return float(any(found))
    raise ValueError(f"unknown metric {metric!r}; use 'all' or 'part'.")


@lru_cache(maxsize=None)
def _wonderwords(name: str) -> tuple[str, ...]:
    """The single lower-case words of one of wonderwords' lists ("adjective", "noun", "verb"), sorted."""
    from importlib import resources

    try:
        text = (resources.files("wonderwords") / "assets" / f"{name}list.txt").read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise RuntimeError("wonderwords is not installed: run `pip install -e '.[tools]'` "
                           "(or `bash scripts/setup.sh`).") from None
    return tuple(sorted({w.strip() for w in text.splitlines() if w.strip().isalpha() and w.strip().islower()}))


@lru_cache(maxsize=1)
def word_list() -> tuple[str, ...]:
    """cwe's words: wonderwords' adjectives, nouns and verbs, sorted."""
    return tuple(sorted(set(_wonderwords("adjective") + _wonderwords("noun") + _wonderwords("verb"))))


@lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    from headkv_vllm.tools.common.haystack import haystack_text

    return tuple(re.sub(r"\s+", " ", haystack_text()).strip().split(" "))


# A task's maker: (random source, size in units, target length) -> (user text, answer prefix, outputs).
Maker = Callable[[random.Random, int, int], tuple[str, str, list[str]]]


class RulerTasks:
    """Builds samples whose prompt, after ``tokenizer``'s chat template, is at most
    ``length`` tokens and within about one unit (an essay word, a noise line, a list word)
    of it."""

    def __init__(self, tokenizer, seed: int = 42):
        self.tokenizer = tokenizer
        self.seed = seed
        self._makers: dict[str, Maker] = {
            **{task: self._niah(*shape) for task, shape in NIAH_SHAPE.items()},
            "vt": self._vt, "cwe": self._cwe, "fwe": self._fwe}
        self._min_units = {**{task: 1 for task in NIAH_SHAPE}, "vt": VT_HOPS + 1, "cwe": CWE_COMMON + 1, "fwe": 100}
        # cwe draws distinct words; half the list leaves room for the words it skips
        self._max_units = {"cwe": len(word_list()) // 2}

    def build(self, task: str, length: int, index: int) -> Sample:
        if task not in self._makers:
            raise ValueError(f"--tasks: unknown task {task!r}; use some of {', '.join(TASKS)}.")
        make = self._makers[task]

        def at(units: int) -> tuple[list[dict], list[str], int]:
            rng = random.Random(f"{self.seed}:{task}:{length}:{index}")
            user, prefix, outputs = make(rng, units, length)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": prefix}]
            return messages, outputs, self.count_tokens(messages)

        lo = self._min_units[task]
        best = at(lo)
        if best[2] > length:
            raise ValueError(f"--lengths: {length} tokens leave no room for task {task} "
                             f"(its smallest prompt has {best[2]}); use lengths >= {best[2]}.")
        # Grow the size until the prompt is too long, then bisect; lo always fits.
        limit = self._max_units.get(task)
        hi = lo * 2
        while (limit is None or hi < limit) and (trial := at(hi))[2] <= length:
            lo, best, hi = hi, trial, hi * 2
        if limit is not None and hi >= limit:
            if at(limit)[2] <= length:
                raise ValueError(f"--lengths: {length} tokens is too long for task {task}: its word list runs out "
                                 f"at {limit} distinct words; use shorter lengths or leave {task} out.")
            hi = limit
        while hi - lo > 1:
            mid = (lo + hi) // 2
            trial = at(mid)
            if trial[2] <= length:
                lo, best = mid, trial
            else:
                hi = mid
        messages, outputs, _ = best
        return Sample(task, length, index, messages, outputs, METRIC[task])

    def count_tokens(self, messages: list[dict]) -> int:
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, **CHAT_OPTIONS)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # --- needle in a haystack -------------------------------------------------------------

    def _niah(self, num_keys: int, num_values: int, num_queries: int) -> Maker:
        def make(rng: random.Random, units: int, length: int) -> tuple[str, str, list[str]]:
            adjectives, nouns = _wonderwords("adjective"), _wonderwords("noun")
            keys: list[str] = []
            while len(keys) < num_keys:
                key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
                if key not in keys:
                    keys.append(key)
            values = [[str(rng.randint(10**6, 10**7 - 1)) for _ in range(num_values)] for _ in keys]
            needles = [f"One of the special magic numbers for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
            rng.shuffle(needles)
            asked = rng.sample(range(num_keys), num_queries)
            query = _and_list([keys[i] for i in asked])
            outputs = [v for i in asked for v in values[i]]
            depths = sorted(rng.sample(NIAH_DEPTHS, len(needles)))
            context = _insert_sentences(_essay(units), needles, depths)
            if num_values * num_queries == 1:
                user = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                        f"I will quiz you about the number afterwards.\n{context}\n"
                        f"What is the special magic number for {query} mentioned in the provided text?")
                prefix = f"The special magic number for {query} mentioned in the provided text is"
            else:
                user = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                        f"I will quiz you about the numbers afterwards.\n{context}\n"
                        f"What are all the special magic numbers for {query} mentioned in the provided text?")
                prefix = f"The special magic numbers for {query} mentioned in the provided text are"
            return user, prefix, outputs

        return make

    # --- variable tracking ------------------------------------------------------------------

    def _vt(self, rng: random.Random, units: int, length: int) -> tuple[str, str, list[str]]:
        example_context, example_value, example_names = _vt_chain(rng, VT_EXAMPLE_LINES)
        context, value, names = _vt_chain(rng, units)
        example = (_vt_question(example_context, example_value) + " " + _vt_prefix(example_value) + " "
                   + " ".join(example_names))
        return example + "\n" + _vt_question(context, value), _vt_prefix(value), names

    # --- common words extraction ---------------------------------------------------------------

    def _cwe(self, rng: random.Random, units: int, length: int) -> tuple[str, str, list[str]]:
        """``units`` distinct words, CWE_COMMON of them common."""
        if length < 4096:
            example_shape, shape = (20, 3, 1), (6, 1)
        else:
            example_shape, shape = (40, 10, 3), (30, 3)
        example_size, *example_repeats = example_shape
        example_list, example_common = _cwe_list(rng, example_size, *example_repeats)
        word_list_text, common = _cwe_list(rng, units, *shape)
        example = (_cwe_question(example_list) + " " + _cwe_prefix() + " " + _numbered(example_common))
        return example + "\n" + _cwe_question(word_list_text), _cwe_prefix(), common

    # --- frequent words extraction ---------------------------------------------------------------

    def _fwe(self, rng: random.Random, units: int, length: int) -> tuple[str, str, list[str]]:
        """About ``units`` coded words in all, from a vocabulary of length // 50 words (as RULER)."""
        vocab_size = max(8, length // 50)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORD_LETTERS)))
        ranked = sorted(vocab)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent "word" is noise
        text = [w for k, w in enumerate(ranked, start=1) for _ in range(int(units * k ** -2 / FWE_ZETA_2))]
        rng.shuffle(text)
        user = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                f"frequently appeared coded words. {' '.join(text)}\nQuestion: Do not provide any explanation. "
                "Please ignore the dots '....'. What are the three most frequently appeared words in the above "
                "coded text?")
        return user, "Answer: According to the coded text above, the three most frequently appeared words are:", \
            ranked[1:4]


def _and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + ", and " + items[-1]


def _essay(words: int) -> str:
    essay = _essay_words()
    repeats = -(-words // len(essay))
    return " ".join((essay * repeats)[:words])


def _insert_sentences(text: str, inserts: list[str], depths: list[int]) -> str:
    """``inserts`` placed between the sentences of ``text`` at ``depths`` (sorted percentages)."""
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    parts, start = [], 0
    for insert, depth in zip(inserts, depths):
        cut = int(len(sentences) * depth / 100)
        parts += sentences[start:cut] + [insert]
        start = cut
    return " ".join(parts + sentences[start:])


def _vt_chain(rng: random.Random, noise_lines: int) -> tuple[str, str, list[str]]:
    """Noise lines with one chain of VT_HOPS assignments inserted in order: the text,
    the value and the variables that hold it."""
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(names, names[1:])]
    lines = [NOISE] * noise_lines
    for j, at in enumerate(sorted(rng.sample(range(noise_lines), len(chain)))):
        lines.insert(at + j, chain[j])
    return "\n".join(lines), value, names


def _vt_question(context: str, value: str) -> str:
    return ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
            f"{context}\nQuestion: Find all variables that are assigned the value {value} in the text above.")


def _vt_prefix(value: str) -> str:
    return (f"Answer: According to the chain(s) of variable assignment in the text above, {VT_HOPS + 1} variables "
            f"are assigned the value {value}, they are:")


def _cwe_list(rng: random.Random, size: int, common_repeats: int, other_repeats: int) -> tuple[str, list[str]]:
    """A numbered list of ``size`` distinct words, CWE_COMMON of them ``common_repeats``
    times and the rest ``other_repeats`` times, shuffled; and the common words. No word
    contains a common word or is contained in one."""
    words = word_list()
    pool = rng.sample(words, len(words))
    common: list[str] = []
    for w in pool:
        if len(common) == CWE_COMMON:
            break
        if not any(w in c or c in w for c in common):
            common.append(w)
    others = [w for w in pool if w not in common and not any(w in c or c in w for c in common)][:size - CWE_COMMON]
    entries = common * common_repeats + others * other_repeats
    rng.shuffle(entries)
    return _numbered(entries), common


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i}. {w}" for i, w in enumerate(words, start=1))


def _cwe_question(numbered: str) -> str:
    return ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
            f"ones that appear most often.\n{numbered}\nQuestion: What are the {CWE_COMMON} most common words in the "
            "above list?")


def _cwe_prefix() -> str:
    return f"Answer: The top {CWE_COMMON} words that appear most often in the list are:"
