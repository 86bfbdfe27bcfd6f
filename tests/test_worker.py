"""The worker end to end: real aggregator, real workers, a tiny real causal LM, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client.data import IGNORE, read_jsonl, tokenize
from client.export import state_file_of_round
from client.model import fingerprint
from common.cli import main as cli_main
from common.spec import Phase, TrainingSpec
from server.records import RoundRecord
from tests.federation import demo_config, demo_worker, run_workers, tiny_demo
from tests.scripted import AdminClient, Aggregator, assert_same_bits, token_of, wait_for

SPEC = TrainingSpec(local_steps=3, batch_size=8, learning_rate=1e-3, max_seq_len=32)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("demo"))


def test_prompt_tokens_carry_no_loss(demo: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    records = [
        {"prompt": "Q: What is the capital of X?\nA:", "response": " Y."},
        {"text": "one plus one is two."},
    ]
    qa, text = tokenize(records, tokenizer, 64)
    prompt_len = 1 + len(tokenizer.encode(records[0]["prompt"], add_special_tokens=False))
    assert all(label == IGNORE for label in qa.labels[:prompt_len])
    assert list(qa.labels[prompt_len:]) == list(qa.input_ids[prompt_len:])
    assert list(text.labels) == list(text.input_ids)
    assert len(read_jsonl(demo / "data" / "site-b.jsonl")) == 80


@pytest.mark.slow
def test_two_sites_two_rounds_then_export(tmp_path: Path, demo: Path) -> None:
    # With the base model's fingerprint configured, the sites start from their own copy of the base:
    # no snapshot travels, only differences.
    sites = ["site-a", "site-b"]
    config = demo_config(
        tmp_path, demo, sites, SPEC, rounds=2, base_model_fingerprint=fingerprint(demo / "model")
    )
    with Aggregator(config) as agg:
        workers = [demo_worker(agg.target, s, demo, tmp_path) for s in sites]
        codes = run_workers(workers)
        assert codes == [0, 0], "both workers end cleanly when the run finishes"
        with AdminClient(agg.target) as admin:
            status = admin.status()
            assert status.finished
            for number in (1, 2):
                r = admin.round(number)
                assert r.state == 5  # PUBLISHED
                assert sum(p.accepted for p in r.participants) == 2
                assert r.samples == sum(len(w.reports) and 72 for w in workers)  # 80 examples, 10% held out
                assert 0 < r.mean_eval_loss < 10
            assert admin.round(1).bytes_out > 0  # round 1's difference was fetched by both
        genesis = agg.coordinator.store.get(RoundRecord, 0)
        assert genesis is not None and genesis.bytes_out == 0  # no round-0 snapshot was sent
        for w in workers:
            assert [rep.round for rep in w.reports] == [1, 2]
            assert all(rep.bytes_up > 0 for rep in w.reports)
        # When the run finished each worker fetched the last round: the site keeps the final model,
        # the aggregator's round-2 state bit for bit.
        state_dir = config.state_dir
        path, number = state_file_of_round(state_dir, None)
        assert number == 2
        with AdminClient(agg.target) as admin:
            assert admin.round(2).bytes_out > 0
        for site in ("site-a", "site-b"):
            held = load_file(str(tmp_path / site / "held.safetensors"))
            assert_same_bits(held, load_file(str(path)))
        # Exported while the aggregator runs, with no flag: the run's mode is read from its state directory.
        out = tmp_path / "exported"
        command = [
            "export",
            "--model",
            str(demo / "model"),
            "--aggregator-state",
            str(state_dir),
            "--out",
            str(out),
        ]
        assert cli_main(command) == 0
    assert not (tmp_path / "exported-adapter").exists()  # a full fine-tuning run has no adapter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(out)
    tokenizer: Any = AutoTokenizer.from_pretrained(out)
    # Full fine-tuning: the published state holds every parameter, and the exported model is exactly it.
    state = load_file(str(path))
    params = dict(model.named_parameters())
    assert params.keys() == state.keys()
    assert all(torch.equal(p.detach(), state[name]) for name, p in params.items())
    base: Any = AutoModelForCausalLM.from_pretrained(demo / "model")
    assert not torch.equal(base.lm_head.weight, params["lm_head.weight"]), "two rounds changed the model"
    ids = tokenizer("12 + 9 =", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids.shape[1]


@pytest.mark.slow
def test_killed_worker_rejoins_and_nothing_is_counted_twice(tmp_path: Path, demo: Path) -> None:
    spec = replace(SPEC, local_steps=60)
    # A restart imports torch and transformers again: under a loaded CI machine that can take longer
    # than 20 beats of 0.3 s, and the round would close without the site. Allow a minute of silence.
    config = demo_config(tmp_path, demo, ["site-a", "site-b"], spec, rounds=2, missed_beats=200)
    with Aggregator(config) as agg, AdminClient(agg.target) as admin:
        a = demo_worker(agg.target, "site-a", demo, tmp_path)
        a_thread = threading.Thread(target=a.run)
        a_thread.start()
        token_file = tmp_path / "site-b.token"
        token_file.write_text(token_of("site-b"))
        command = [
            sys.executable, "-m", "common.cli", "work", "--aggregator", agg.target, "--site", "site-b",
            "--token-file", str(token_file), "--model", str(demo / "model"),
            "--data", str(demo / "data" / "site-b.jsonl"), "--state-dir", str(tmp_path / "site-b"),
            "--quiet", "--threads", "1",
        ]  # fmt: skip
        log = (tmp_path / "site-b.log").open("wb")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

        def training() -> bool:
            site = admin.sites().get("site-b")
            return bool(site and site.phase == int(Phase.TRAINING) and site.step >= 1)

        wait_for(training, timeout=120)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.5)
        restarted = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert restarted.wait(timeout=240) == 0
        finally:
            if restarted.poll() is None:
                restarted.kill()
            log.close()
        a_thread.join(timeout=240)
        status = admin.status()
        assert status.finished
        for number in (1, 2):
            r = admin.round(number)
            assert r.state == 5
            accepted = [p.site_id for p in r.participants if p.accepted]
            assert sorted(accepted) == ["site-a", "site-b"]
            assert r.samples == 72 * 2  # each site once, however often it started
