"""``client.demo_init``: the local demo's tokenizer, model and non-IID site data, made offline and deterministically."""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing here may reach a hub: everything loads from the folder init_demo writes. Set before
# transformers is imported anywhere in this process (huggingface_hub reads it at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
from safetensors.torch import load_file

from client.demo_init import DemoPaths, add_arguments, demo_paths, init_demo, number_words, run

PER_SITE = 100
EVAL = 90
PRETRAIN = 5  # enough to run the pretraining path (and check it is deterministic), not to wait for it


def load(demo: DemoPaths) -> tuple[Any, Any]:
    """Tokenizer and model through the Auto classes, offline (typed Any: transformers' hints fight mypy here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.model), AutoModelForCausalLM.from_pretrained(demo.model)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def content(record: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The example itself, without eval.jsonl's extra ``site`` key."""
    return tuple(sorted((k, v) for k, v in record.items() if k != "site"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return init_demo(
        tmp_path_factory.mktemp("demo"),
        seed=0,
        examples_per_site=PER_SITE,
        eval_examples=EVAL,
        pretrain_steps=PRETRAIN,
    )


def test_import_is_cheap() -> None:
    code = "import sys, client.demo_init; print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_number_words() -> None:
    assert [number_words(n) for n in (0, 13, 20, 21, 47, 60)] == [
        "zero",
        "thirteen",
        "twenty",
        "twenty-one",
        "forty-seven",
        "sixty",
    ]


def test_layout_and_manifest(demo: DemoPaths) -> None:
    assert demo == demo_paths(demo.root)
    assert sorted(demo.sites) == ["site-a", "site-b", "site-c"]
    for path in [*demo.sites.values(), demo.eval, demo.union]:
        assert path.is_file() and path.parent == demo.data
    assert (demo.model / "model.safetensors").is_file()
    assert (demo.model / "tokenizer.json").is_file()

    manifest = tomllib.loads((demo.root / "demo.toml").read_text(encoding="utf-8"))
    assert manifest["seed"] == 0
    assert demo.root / manifest["model"]["path"] == demo.model
    assert demo.root / manifest["data"]["eval"] == demo.eval
    assert demo.root / manifest["data"]["union"] == demo.union
    assert manifest["data"]["eval_examples"] == EVAL
    assert manifest["data"]["union_examples"] == 3 * PER_SITE
    assert manifest["data"]["max_tokens"] <= 48
    for site, path in demo.sites.items():
        entry = manifest["sites"][site]
        assert demo.root / entry["path"] == path
        assert entry["examples"] == PER_SITE == len(read_jsonl(path))
        assert entry["eval_examples"] == EVAL // 3
    weights = load_file(demo.model / "model.safetensors")
    assert manifest["model"]["parameters"] == sum(t.numel() for t in weights.values())


def test_model_and_tokenizer_load_offline_and_generate(demo: DemoPaths) -> None:
    tokenizer, model = load(demo)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 512 <= len(tokenizer) <= 1024 and config.vocab_size == len(tokenizer)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (128, 4, 4)
    assert config.max_position_embeddings == 128 and not config.tie_word_embeddings
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 500_000 <= model.num_parameters() <= 3_000_000
    specials = {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
    }
    assert len(set(specials.values())) == 4 and None not in specials.values()
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        specials["pad"],
        specials["bos"],
        specials["eos"],
    )

    text = "Q: What is the capital of Veloria?\nA: Tarsk. 12 + 9 = 21 ünïcode"
    ids = tokenizer(text)["input_ids"]
    assert specials["unk"] not in ids  # byte-level: nothing is unknown
    assert tokenizer.decode(ids) == text  # and it adds no special tokens of its own

    batch = tokenizer(["12 + 9 =", "One day Tom went to the"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_prompt_response_token_boundary(demo: DemoPaths) -> None:
    """Tokenising prompt and response apart gives the same ids as the whole, so masking the prompt is exact."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.model)
    for record in read_jsonl(demo.sites["site-b"])[:50]:
        whole = tokenizer(record["prompt"] + record["response"])["input_ids"]
        assert tokenizer(record["prompt"])["input_ids"] + tokenizer(record["response"])["input_ids"] == whole


def test_sites_differ_in_domain_and_format(demo: DemoPaths) -> None:
    sites = {site: read_jsonl(path) for site, path in demo.sites.items()}
    assert all(set(r) == {"text"} for r in sites["site-a"] + sites["site-c"])
    assert all(set(r) == {"prompt", "response"} for r in sites["site-b"])
    assert all(r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:") for r in sites["site-b"])
    assert all(r["response"].startswith(" ") and r["response"].endswith(".") for r in sites["site-b"])
    assert all(re.search(r"\d| plus | minus ", r["text"]) for r in sites["site-a"])

    def top_words(records: list[dict[str, str]]) -> set[str]:
        words = collections.Counter(
            w for r in records for v in r.values() for w in re.findall(r"[a-z]+", v.lower())
        )
        return {w for w, _ in words.most_common(10)}

    tops = {site: top_words(records) for site, records in sites.items()}
    for one, other in [("site-a", "site-b"), ("site-a", "site-c"), ("site-b", "site-c")]:
        assert len(tops[one] & tops[other]) <= 3, (one, other, tops[one] & tops[other])


def test_eval_is_held_out_balanced_and_union_is_the_training_sets(demo: DemoPaths) -> None:
    training = [r for path in demo.sites.values() for r in read_jsonl(path)]
    evals = read_jsonl(demo.eval)
    assert len(evals) == EVAL
    assert collections.Counter(r["site"] for r in evals) == {"site-a": 30, "site-b": 30, "site-c": 30}
    assert not {content(r) for r in evals} & {content(r) for r in training}
    assert len({content(r) for r in training}) == len(training)  # no duplicates within or across sites

    def lines(path: Path) -> list[str]:
        return path.read_text(encoding="utf-8").splitlines()

    union = lines(demo.union)
    assert sorted(union) == sorted(line for path in demo.sites.values() for line in lines(path))
    assert union[:PER_SITE] != lines(demo.sites["site-a"])  # shuffled, not concatenated


def test_cli_overwrites_and_the_same_seed_gives_the_same_bytes_and_weights(
    demo: DemoPaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # First a different demo (another seed, more examples) in the same folder: the CLI must replace it.
    other = init_demo(tmp_path, seed=1, examples_per_site=PER_SITE + 50, eval_examples=EVAL, pretrain_steps=0)
    other_site_b = other.sites["site-b"].read_bytes()
    other_embed = load_file(other.model / "model.safetensors")["model.embed_tokens.weight"]

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = [
        "init",
        str(tmp_path),
        "--seed",
        "0",
        "--examples-per-site",
        str(PER_SITE),
        "--eval-examples",
        str(EVAL),
        "--pretrain-steps",
        str(PRETRAIN),
    ]
    assert run(parser.parse_args(words)) == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "site-b" in printed and str(tmp_path) in printed

    again = demo_paths(tmp_path)
    for mine, theirs in [
        *zip(demo.sites.values(), again.sites.values(), strict=True),
        (demo.eval, again.eval),
    ]:
        assert mine.read_bytes() == theirs.read_bytes()
    assert demo.union.read_bytes() == again.union.read_bytes()
    assert (demo.root / "demo.toml").read_bytes() == (again.root / "demo.toml").read_bytes()
    assert (demo.model / "tokenizer.json").read_bytes() == (again.model / "tokenizer.json").read_bytes()
    first, second = load_file(demo.model / "model.safetensors"), load_file(again.model / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)

    assert other_site_b != demo.sites["site-b"].read_bytes()
    assert not torch.equal(other_embed, first["model.embed_tokens.weight"])


def test_run_takes_a_namespace_without_eval_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """client/demo.py's own `gdfed demo` parser hands its namespace over without --eval-examples."""
    args = argparse.Namespace(action="init", dir=tmp_path, seed=0, examples_per_site=20, pretrain_steps=0)
    assert run(args) == 0
    assert len(read_jsonl(demo_paths(tmp_path).eval)) == 300
    assert "300 examples" in capsys.readouterr().out


def test_asking_for_more_than_exists_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct"):
        init_demo(tmp_path, examples_per_site=100_000)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Two intra-op threads on a shared two-core box ran these 30 steps in 40 s instead of 1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_thirty_adamw_steps_on_site_a_lower_site_a_eval_loss(demo: DemoPaths) -> None:
    tokenizer, model = load(demo)

    def batch(texts: list[str]) -> dict[str, torch.Tensor]:
        ids = [[tokenizer.bos_token_id, *tokenizer(t)["input_ids"], tokenizer.eos_token_id] for t in texts]
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": input_ids.masked_fill(mask == 0, -100),
        }

    train = [r["text"] for r in read_jsonl(demo.sites["site-a"])]
    held_out = batch([r["text"] for r in read_jsonl(demo.eval) if r["site"] == "site-a"])

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**held_out).loss)

    before = eval_loss()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        picks = torch.randint(len(train), (16,)).tolist()
        loss = model(**batch([train[i] for i in picks])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    print(f"site-a eval loss {before:.3f} -> {after:.3f}")
    assert after < before - 2.0
