"""The demo's site data: three non-IID domains and a held-out set, drawn from one seed (no files).

* site-a: arithmetic sentences (``{"text"}``)
* site-b: question/answer pairs about a made-up world (``{"prompt", "response"}``: loss on the response only)
* site-c: tiny stories (``{"text"}``)

``generate_data`` draws each domain from its own seeded stream, so the same
seed gives the same examples, and no eval example is also a training one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

Record = dict[str, str]
T = TypeVar("T")

SITE_NAMES = ("site-a", "site-b", "site-c")


@dataclass(frozen=True)
class Domain:
    """One site's kind of data: its name, the JSONL keys it uses, and how to draw distinct examples."""

    site: str
    name: str
    format: str  # "text" or "prompt/response"
    draw: Callable[[random.Random, int], list[Record]]


# ---------------------------------------------------------------- site-a: arithmetic


_ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0 <= n < 100 in English words: 21 -> "twenty-one"."""
    if not 0 <= n < 100:
        raise ValueError(f"{n} is out of range")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


def _arithmetic(rng: random.Random, n: int) -> list[Record]:
    top = 30
    pool: list[str] = []
    for a in range(top + 1):
        for b in range(top + 1):
            wa, wb = number_words(a), number_words(b)
            pool.append(f"{wa} plus {wb} is {number_words(a + b)}.")
            pool.append(f"{a} + {b} = {a + b}")
            if a >= b:
                pool.append(f"{wa} minus {wb} is {number_words(a - b)}.")
                pool.append(f"{a} - {b} = {a - b}")
    return [{"text": t} for t in _take(rng, pool, n, "arithmetic")]


# ---------------------------------------------------------------- site-b: a made-up world, Q/A

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "th"]
_ANIMALS = ["fox", "owl", "bear", "wolf", "hare", "lynx", "heron", "otter", "stag", "eagle", "seal", "crane"]
_CONTINENTS = ["Nordra", "Sulvain", "Ostemar", "Wendral", "Kessia"]
_COUNTRY_ENDINGS = ["ia", "land", "ora", "istan", "mark"]

_QUESTIONS: dict[str, tuple[list[str], str]] = {
    "capital": (
        [
            "What is the capital of {c}?",
            "Which city is the capital of {c}?",
            "Name the capital city of {c}.",
            "Where is the seat of government of {c}?",
        ],
        " {capital}.",
    ),
    "language": (
        [
            "What language do people speak in {c}?",
            "What is the main language of {c}?",
            "Which language is spoken in {c}?",
            "In {c}, what language do people use?",
        ],
        " {language}.",
    ),
    "currency": (
        [
            "What is the currency of {c}?",
            "What money is used in {c}?",
            "Which coin do people pay with in {c}?",
            "What do shops in {c} take as money?",
        ],
        " The {currency}.",
    ),
    "river": (
        [
            "What is the longest river in {c}?",
            "Which river is the longest in {c}?",
            "Name the longest river of {c}.",
            "What river runs through {c}?",
        ],
        " The {river} River.",
    ),
    "animal": (
        [
            "What is the national animal of {c}?",
            "Which animal is the symbol of {c}?",
            "What animal is on the flag of {c}?",
            "Name the national animal of {c}.",
        ],
        " The {animal}.",
    ),
    "continent": (
        [
            "On which continent is {c}?",
            "Where in the world is {c}?",
            "What continent is {c} part of?",
            "Which continent is {c} on?",
        ],
        " {continent}.",
    ),
    "country": (
        [
            "{capital} is the capital of which country?",
            "Which country has {capital} as its capital?",
            "Of what country is {capital} the capital?",
            "The city of {capital} is the capital of what country?",
        ],
        " {c}.",
    ),
}
_COUNTRIES = 60


def _stem(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables - 1)) + (
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    )


def _world(rng: random.Random) -> list[dict[str, str]]:
    """``_COUNTRIES`` made-up countries with their facts; every name unique."""
    used: set[str] = set()

    def fresh(make: Callable[[], str]) -> str:
        for _ in range(10_000):
            name = make()
            if name not in used and len(name) <= 12:
                used.add(name)
                return name
        raise RuntimeError("ran out of fresh names")

    countries = []
    for _ in range(_COUNTRIES):
        while True:
            stem = _stem(rng, 2)
            country = (stem + rng.choice(_COUNTRY_ENDINGS)).capitalize()
            if stem not in used and country not in used and len(country) <= 12:
                used.update((stem, country))
                break
        countries.append(
            {
                "c": country,
                "capital": fresh(lambda: _stem(rng, rng.choice((1, 2))).capitalize()),
                # The language follows from the country's name, as it often does: learnable on unseen facts.
                "language": stem.capitalize() + "ish",
                "currency": fresh(lambda: _stem(rng, 1)),
                "river": fresh(lambda: _stem(rng, 2).capitalize()),
                "animal": rng.choice(_ANIMALS),
                "continent": rng.choice(_CONTINENTS),
            }
        )
    return countries


def _geography(rng: random.Random, n: int) -> list[Record]:
    pool: list[Record] = []
    for facts in _world(rng):
        for questions, answer in _QUESTIONS.values():
            for question in questions:
                pool.append(
                    {"prompt": f"Q: {question.format(**facts)}\nA:", "response": answer.format(**facts)}
                )
    return _take(rng, pool, n, "geography")


# ---------------------------------------------------------------- site-c: tiny stories

_NAMES = ["Tom", "Mia", "Sam", "Lily", "Ben", "Anna", "Max", "Zoe", "Leo", "Ella", "Jack", "Nora"]
_PETS = ["cat", "dog", "duck", "frog", "bird", "fish", "pony", "bunny", "mouse", "goat"]
_ADJECTIVES = ["little", "big", "happy", "sleepy", "funny", "brave", "tiny", "shy"]
_PLACES = ["park", "garden", "forest", "pond", "house", "field", "barn", "river"]
_COLORS = ["red", "blue", "green", "yellow", "pink", "white", "black", "brown"]
_THINGS = ["ball", "hat", "box", "kite", "cup", "leaf", "stone", "boat"]
_PLAY = [("run", "ran"), ("jump", "jumped"), ("swim", "swam"), ("sing", "sang"), ("dance", "danced")]
_PLAY += [("hide", "hid"), ("sleep", "slept"), ("play", "played")]
_FEELINGS = ["happy", "sad", "glad", "surprised", "tired", "excited"]
_TIMES = ["lunch", "dinner", "night", "the sun went down", "it began to rain"]


def _story(rng: random.Random) -> str:
    name, pet, adj, place = (
        rng.choice(_NAMES),
        rng.choice(_PETS),
        rng.choice(_ADJECTIVES),
        rng.choice(_PLACES),
    )
    play, played = rng.choice(_PLAY)
    color, thing, feeling = rng.choice(_COLORS), rng.choice(_THINGS), rng.choice(_FEELINGS)
    template = rng.randrange(3)
    if template == 0:
        return f"{name} had a {adj} {pet}. Every day the {pet} liked to {play} in the {place}."
    if template == 1:
        return f"One day {name} went to the {place} with a {adj} {pet}. They {played} until {rng.choice(_TIMES)}."
    return f"The {adj} {pet} found a {color} {thing} in the {place}. {name} was very {feeling}."


def _stories(rng: random.Random, n: int) -> list[Record]:
    seen: set[str] = set()
    out: list[Record] = []
    for _ in range(50 * n + 1000):
        if len(out) == n:
            break
        text = _story(rng)
        if text not in seen:
            seen.add(text)
            out.append({"text": text})
    if len(out) < n:
        raise ValueError(f"stories: could not draw {n} distinct examples")
    return out


def _take(rng: random.Random, pool: Sequence[T], n: int, what: str) -> list[T]:
    """``n`` distinct items of ``pool`` (itself distinct) in a seeded random order."""
    if n > len(pool):
        raise ValueError(f"{what}: {n} examples asked for, only {len(pool)} distinct ones exist")
    items = list(pool)
    rng.shuffle(items)
    return items[:n]


DOMAINS = (
    Domain("site-a", "arithmetic", "text", _arithmetic),
    Domain("site-b", "geography", "prompt/response", _geography),
    Domain("site-c", "stories", "text", _stories),
)


def record_text(record: Record) -> str:
    """The whole text of an example: ``text``, or ``prompt + response``."""
    return record["text"] if "text" in record else record["prompt"] + record["response"]


def generate_data(
    seed: int, examples_per_site: int, eval_examples: int
) -> tuple[dict[str, list[Record]], list[Record]]:
    """The training records per site and the shuffled eval records (each with its ``"site"``)."""
    if examples_per_site < 1 or eval_examples < len(DOMAINS):
        raise ValueError("need at least one training example per site and one eval example per domain")
    train: dict[str, list[Record]] = {}
    evals: list[Record] = []
    for i, domain in enumerate(DOMAINS):
        n_eval = eval_examples // len(DOMAINS) + (i < eval_examples % len(DOMAINS))
        # One stream per domain (string seeds hash deterministically), so sites do not shift each other.
        drawn = domain.draw(random.Random(f"{seed}:{domain.site}"), n_eval + examples_per_site)
        evals.extend({**record, "site": domain.site} for record in drawn[:n_eval])
        train[domain.site] = drawn[n_eval:]
    random.Random(f"{seed}:eval").shuffle(evals)
    return train, evals
