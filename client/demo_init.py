"""``gdfed demo init DIR``: everything a local demo federation needs, made here and deterministically.

Nothing is downloaded. From one seed this writes:

* ``DIR/model``: a byte-level BPE tokenizer trained on the demo corpus (wrapped in
  ``PreTrainedTokenizerFast``; it adds no special tokens itself, so the worker decides where
  ``<bos>``/``<eos>`` go) and a randomly initialised ~1M-parameter ``LlamaForCausalLM``
  in float32 safetensors. Both load with the ``Auto*`` classes offline.
* ``DIR/data/site-{a,b,c}.jsonl``: three non-IID training sets, different in domain and template:
  site-a arithmetic sentences (``{"text"}``), site-b question/answer pairs about a made-up world
  (``{"prompt", "response"}``: loss on the response only), site-c tiny stories (``{"text"}``).
* ``DIR/data/eval.jsonl``: a held-out set balanced across the three domains, none of its examples
  in a training file; each line also carries ``"site"`` (the site whose domain it is drawn from).
* ``DIR/data/all.jsonl``: the union of the three training files, shuffled, for a centralised baseline.
* ``DIR/demo.toml``: a manifest of what was made (paths relative to DIR).

Rerunning overwrites; the same seed gives byte-identical data and identical weights.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Record = dict[str, str]
T = TypeVar("T")

SITE_NAMES = ("site-a", "site-b", "site-c")
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
VOCAB_SIZE = 1024  # an upper bound: the BPE trainer stops earlier if no pair repeats
MAX_TOKENS = 48  # every example (with <bos> and <eos>) fits in this many tokens; checked
MAX_POSITIONS = 128
DEFAULT_EXAMPLES_PER_SITE = 1000
DEFAULT_EVAL_EXAMPLES = 300
# The base model is pretrained on another world's sentences, so the federation fine-tunes, as in life.
DEFAULT_PRETRAIN_STEPS = 400
PRETRAIN_SEED_OFFSET = 1000
PRETRAIN_EXAMPLES_PER_DOMAIN = 1500


@dataclass(frozen=True)
class DemoPaths:
    """Where ``init_demo`` puts things under ``root``."""

    root: Path
    model: Path
    data: Path
    sites: dict[str, Path]
    eval: Path
    union: Path


@dataclass(frozen=True)
class Domain:
    """One site's kind of data: its name, the JSONL keys it uses, and how to draw distinct examples."""

    site: str
    name: str
    format: str  # "text" or "prompt/response"
    draw: Callable[[random.Random, int], list[Record]]


@dataclass(frozen=True)
class DemoSummary:
    """What ``init_demo`` made, for the manifest and the printed summary."""

    paths: DemoPaths
    seed: int
    parameters: int
    vocab_size: int
    train_counts: dict[str, int]
    eval_counts: dict[str, int]
    max_tokens: int
    seconds: float


def demo_paths(root: Path) -> DemoPaths:
    """The layout under ``root`` (nothing is created)."""
    data = root / "data"
    return DemoPaths(
        root=root,
        model=root / "model",
        data=data,
        sites={site: data / f"{site}.jsonl" for site in SITE_NAMES},
        eval=data / "eval.jsonl",
        union=data / "all.jsonl",
    )


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


# ---------------------------------------------------------------- tokenizer and model


def train_tokenizer(texts: Sequence[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE tokenizer (no text is ever unknown) with the four special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> int:
    """Wrap as ``PreTrainedTokenizerFast`` and save; returns the vocab size.

    The tokenizer adds no special tokens by itself (``add_bos_token`` and ``add_eos_token`` are off):
    the worker puts ``<bos>``/``<eos>`` where it wants them. A ``<bos>`` post-processor was tried and
    dropped: transformers 5 does not record it in ``add_bos_token``, and setting ``add_eos_token``
    later would silently rebuild the post-processor without it.
    """
    from transformers import PreTrainedTokenizerFast

    wrapper: Any = PreTrainedTokenizerFast  # untyped constructor (transformers 5)
    fast = wrapper(
        tokenizer_object=tokenizer,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(path))
    return len(fast)


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No transformers progress bars on stderr for the one-shard save."""
    from transformers.utils import logging

    hf_logging: Any = logging  # its progress-bar switches are untyped
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_model(tokenizer: Tokenizer, seed: int, path: Path) -> int:
    """A small random Llama for ``tokenizer``, saved as float32 safetensors; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def token_id(token: str) -> int:
        found = tokenizer.token_to_id(token)
        if found is None:
            raise RuntimeError(f"{token} is not in the tokenizer")
        return found

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=token_id(SPECIAL_TOKENS["pad"]),
        bos_token_id=token_id(SPECIAL_TOKENS["bos"]),
        eos_token_id=token_id(SPECIAL_TOKENS["eos"]),
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.nn.Module.float(model)  # float32 whatever the default dtype (its own .float() is untyped)
    with _quiet_progress():
        model.save_pretrained(str(path), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def pretrain(model_dir: Path, records: Sequence[Record], *, steps: int, seed: int) -> tuple[float, float]:
    """Teach the random model the domains' language on a separate corpus, so the demo is fine-tuning.

    The corpus comes from another seed: the same kinds of sentences, but another
    made-up world (other countries, capitals, animals), so what the sites then
    teach is new. One thread keeps the result bit-reproducible. Returns the
    first and last training loss.
    """
    import torch

    from client.data import batches, tokenize
    from client.model import load_model
    from client.train import train_steps
    from common.spec import TrainingSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        with _quiet_progress():
            loaded = load_model(model_dir, TrainingSpec(), torch.device("cpu"))
        examples = tokenize([{"text": record_text(r)} for r in records], loaded.tokenizer, MAX_TOKENS)
        losses: list[float] = []
        train_steps(
            loaded,
            batches(examples, 32, loaded.tokenizer.pad_token_id, seed),
            steps=steps,
            lr=3e-3,
            on_step=lambda step, loss: losses.append(loss),
        )
        with _quiet_progress():
            loaded.model.save_pretrained(str(model_dir), safe_serialization=True)
    finally:
        torch.set_num_threads(threads)
    return losses[0], losses[-1]


# ---------------------------------------------------------------- writing


def _write_jsonl(path: Path, records: Sequence[Record]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    # A JSON string (ASCII, \uXXXX escapes) is a valid TOML basic string.
    return json.dumps(str(value))


def _manifest(summary: DemoSummary) -> str:
    paths = summary.paths

    def rel(path: Path) -> str:
        return path.relative_to(paths.root).as_posix()

    def table(name: str, items: dict[str, object]) -> list[str]:
        return ["", f"[{name}]", *(f"{key} = {_toml_value(value)}" for key, value in items.items())]

    lines = [
        "# Written by `gdfed demo init` (client/demo_init.py); paths are relative to this file's folder.",
        f"seed = {summary.seed}",
        *table(
            "model",
            {
                "path": rel(paths.model),
                "architecture": "LlamaForCausalLM",
                "parameters": summary.parameters,
                "vocab_size": summary.vocab_size,
                "dtype": "float32",
                "tokenizer": "byte-level BPE; adds no special tokens itself",
            },
        ),
        *table(
            "data",
            {
                "eval": rel(paths.eval),
                "eval_examples": sum(summary.eval_counts.values()),
                "union": rel(paths.union),
                "union_examples": sum(summary.train_counts.values()),
                "max_tokens": summary.max_tokens,
            },
        ),
    ]
    for domain in DOMAINS:
        lines += table(
            f"sites.{domain.site}",
            {
                "path": rel(paths.sites[domain.site]),
                "domain": domain.name,
                "format": domain.format,
                "examples": summary.train_counts[domain.site],
                "eval_examples": summary.eval_counts[domain.site],
            },
        )
    return "\n".join(lines) + "\n"


def init_demo(
    root: Path,
    *,
    seed: int = 0,
    examples_per_site: int = DEFAULT_EXAMPLES_PER_SITE,
    eval_examples: int = DEFAULT_EVAL_EXAMPLES,
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
) -> DemoPaths:
    """Make (or remake) the demo under ``root``: tokenizer, model, site data, eval set and manifest."""
    return _init_demo(
        root,
        seed=seed,
        examples_per_site=examples_per_site,
        eval_examples=eval_examples,
        pretrain_steps=pretrain_steps,
    ).paths


def _init_demo(
    root: Path, *, seed: int, examples_per_site: int, eval_examples: int, pretrain_steps: int = 0
) -> DemoSummary:
    start = time.perf_counter()
    paths = demo_paths(Path(root))
    train, evals = generate_data(seed, examples_per_site, eval_examples)

    tokenizer = train_tokenizer([record_text(r) for site in SITE_NAMES for r in train[site]])
    all_records = [r for site in SITE_NAMES for r in train[site]] + evals
    # <bos> + text + <eos>: the longest sequence the worker can make from one example.
    max_tokens = max(len(e.ids) for e in tokenizer.encode_batch([record_text(r) for r in all_records])) + 2
    if max_tokens > MAX_TOKENS:
        raise RuntimeError(f"an example has {max_tokens} tokens, over the {MAX_TOKENS} allowed")

    paths.model.mkdir(parents=True, exist_ok=True)
    paths.data.mkdir(parents=True, exist_ok=True)
    vocab_size = save_tokenizer(tokenizer, paths.model)
    parameters = build_model(tokenizer, seed, paths.model)
    if pretrain_steps:
        corpus, _ = generate_data(seed + PRETRAIN_SEED_OFFSET, PRETRAIN_EXAMPLES_PER_DOMAIN, len(DOMAINS))
        pretrain(
            paths.model, [r for site in SITE_NAMES for r in corpus[site]], steps=pretrain_steps, seed=seed
        )

    for site in SITE_NAMES:
        _write_jsonl(paths.sites[site], train[site])
    _write_jsonl(paths.eval, evals)
    union = [r for site in SITE_NAMES for r in train[site]]
    random.Random(f"{seed}:union").shuffle(union)
    _write_jsonl(paths.union, union)

    summary = DemoSummary(
        paths=paths,
        seed=seed,
        parameters=parameters,
        vocab_size=vocab_size,
        train_counts={site: len(train[site]) for site in SITE_NAMES},
        eval_counts={site: sum(r["site"] == site for r in evals) for site in SITE_NAMES},
        max_tokens=max_tokens,
        seconds=time.perf_counter() - start,
    )
    (paths.root / "demo.toml").write_text(_manifest(summary), encoding="utf-8")
    return summary


# ---------------------------------------------------------------- the `gdfed demo` subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["init"], help="init: make the tokenizer, model and site data")
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder to make the demo in (overwritten)")
    parser.add_argument("--seed", type=int, default=0, help="one seed for data, tokenizer and weights")
    parser.add_argument(
        "--examples-per-site", type=int, default=DEFAULT_EXAMPLES_PER_SITE, help="training examples per site"
    )
    parser.add_argument(
        "--eval-examples", type=int, default=DEFAULT_EVAL_EXAMPLES, help="held-out examples, all domains"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=DEFAULT_PRETRAIN_STEPS,
        help="base-model pretraining steps (0 = none)",
    )


def run(args: argparse.Namespace) -> int:
    # A caller's own parser (client/demo.py's `gdfed demo`) may not define --eval-examples.
    eval_examples = getattr(args, "eval_examples", DEFAULT_EVAL_EXAMPLES)
    summary = _init_demo(
        args.dir,
        seed=args.seed,
        examples_per_site=args.examples_per_site,
        eval_examples=eval_examples,
        pretrain_steps=getattr(args, "pretrain_steps", DEFAULT_PRETRAIN_STEPS),
    )
    paths = summary.paths
    print(f"demo made in {paths.root} in {summary.seconds:.1f} s (seed {summary.seed})")
    print(
        f"model:  {paths.model}  LlamaForCausalLM, {summary.parameters:,} parameters, "
        f"vocab {summary.vocab_size}, float32"
    )
    for domain in DOMAINS:
        print(
            f"{domain.site}: {paths.sites[domain.site]}  {summary.train_counts[domain.site]} examples, "
            f"{domain.name} ({domain.format})"
        )
    print(f"eval:   {paths.eval}  {sum(summary.eval_counts.values())} examples across the three domains")
    print(f"union:  {paths.union}  {sum(summary.train_counts.values())} examples (centralised baseline)")
    print(f"manifest: {paths.root / 'demo.toml'}; longest example {summary.max_tokens} tokens")
    return 0
