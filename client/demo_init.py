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
The examples are drawn in ``client.demo_data`` and the tokenizer and model made in
``client.demo_model``; this module lays out the folder, writes it and its manifest,
and is the ``gdfed demo`` subcommand's ``init``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from client.demo_data import DOMAINS, SITE_NAMES, Record, generate_data, record_text
from client.demo_data import number_words as number_words  # re-exported: tests import it from here
from client.demo_model import MAX_TOKENS, build_model, pretrain, save_tokenizer, train_tokenizer

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
