"""What a site reports of its training: tokens/s, step time, peak memory, ranks, in heartbeats and uploads.

A real worker on the demo model against an in-process aggregator on 127.0.0.1, ``gdfed status`` as a
real process; scripted sites (tests/scripted.py) for the figures the aggregator must refuse.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from client import stats
from client.data import IGNORE, read_jsonl, split, tokenize, training_batches
from client.heartbeat import Heartbeat, Status
from common.delta import TrainingStats, UploadMetrics
from common.pb.gradualdiff.v1 import delta_pb2, federation_pb2, federation_pb2_grpc
from common.serde import STATS_LIMITS, training_stats_to_proto
from common.spec import TrainingSpec
from server.status_json import site_json
from tests.federation import demo_config, demo_worker, run_workers, tiny_demo
from tests.scripted import ADMIN_TOKEN, ROOT, AdminClient, Aggregator, MakeHarness, harnesses, random_delta

SPEC = TrainingSpec(local_steps=4, batch_size=8, learning_rate=1e-3, max_seq_len=96)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[MakeHarness]:
    with harnesses(tmp_path) as make:
        yield make


def gdfed_status(target: str, tmp: Path, *args: str) -> str:
    """``gdfed status ARGS`` as a real process; its stdout (the command must succeed)."""
    token = tmp / "admin.token"
    token.write_text(ADMIN_TOKEN + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONIOENCODING="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "common.cli",
            "status",
            "--aggregator",
            target,
            "--admin-token-file",
            str(token),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---------------------------------------------------------------- the worker's measurements


def test_peak_host_memory_is_the_processs_high_water_mark() -> None:
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    peak = stats.peak_host_rss()
    assert peak >= rss > 0
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched: the peak must cover it
    assert stats.peak_host_rss() >= peak and stats.peak_host_rss() >= rss + block.numel() * 3
    assert stats.peak_memory(torch.device("cpu"))[1] is False
    assert stats.world_size() == 1  # no process group here


def test_the_round_meter_reports_the_figures_the_aggregator_takes() -> None:
    meter = stats.RoundMeter(torch.device("cpu"))
    figures = meter.at(4, 1000, seconds=2.0)
    assert (figures.tokens_per_second, figures.step_seconds, figures.tokens, figures.ranks) == (
        500.0,
        0.5,
        1000,
        1,
    )
    assert figures.peak_memory_bytes > 0 and not figures.peak_is_accelerator
    # Nothing trained yet, or a clock that did not move: nothing measured, never inf or NaN.
    assert meter.at(0, 0, seconds=0.0).tokens_per_second == 0.0 == meter.at(0, 0, seconds=0.0).step_seconds
    assert meter.at(1, 10**6, seconds=1e-9).tokens_per_second == 0.0  # 1e15 tokens/s: past the bound
    assert meter.at(1, 2**60, seconds=1.0).tokens == 0


def test_a_beat_carries_the_status_training_figures() -> None:
    status = Status()
    status.training = TrainingStats(tokens_per_second=1234.5, step_seconds=0.25, peak_memory_bytes=3 << 30,
                                    peak_is_accelerator=True, ranks=2, tokens=4096)  # fmt: skip
    channel = grpc.insecure_channel("127.0.0.1:9")  # never called: request() only builds the message
    beats = Heartbeat(federation_pb2_grpc.FederationStub(channel), (), "a", status, interval_s=1.0)
    assert beats.request().training == training_stats_to_proto(status.training)
    channel.close()


# ---------------------------------------------------------------- a real worker's round, as status shows it


def chat_demo(root: Path) -> Path:
    """The demo model with a chat template, and site-a's data as conversations of one to three
    exchanges (skewed lengths) in ``data/chat.jsonl``."""
    demo = tiny_demo(root, examples_per_site=48, eval_examples=8)
    (demo / "model" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    qa = read_jsonl(demo / "data" / "site-b.jsonl")
    lines = []
    for i in range(len(qa)):
        turns = [{"role": "system", "content": "Answer briefly."}]
        for e in (qa[(i + k) % len(qa)] for k in range(3 if i % 4 == 0 else 1)):
            turns += [
                {"role": "user", "content": e["prompt"]},
                {"role": "assistant", "content": e["response"]},
            ]
        lines.append(json.dumps({"messages": turns}))
    (demo / "data" / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return demo


@pytest.mark.slow
def test_a_worker_round_on_chat_data_reports_its_figures_in_heartbeats_and_status(tmp_path: Path) -> None:
    demo = chat_demo(tmp_path / "demo")
    config = demo_config(tmp_path, demo, ["site-a"], SPEC, rounds=1)
    with Aggregator(config) as agg:
        worker = demo_worker(agg.target, "site-a", demo, tmp_path, data="chat")
        assert run_workers([worker]) == [0]
        with AdminClient(agg.target) as admin:
            beat = admin.sites()["site-a"].training  # the worker's last beat: the round it trained
            [part] = admin.round(1).participants
        json_doc = json.loads(gdfed_status(agg.target, tmp_path, "--round", "1", "--json"))
        table = gdfed_status(agg.target, tmp_path, "--round", "1")

    # The tokens are those of the round's batches exactly: the worker's seeded, length-grouped order.
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(demo / "model")
    train, _ = split(read_jsonl(demo / "data" / "chat.jsonl"), 0.1, 0)
    examples = tokenize(train, tokenizer, SPEC.max_seq_len)
    assert all(IGNORE in e.labels and set(e.labels) != {IGNORE} for e in examples)  # answers only carry loss
    stream = training_batches(examples, 8, tokenizer.pad_token_id, seed=1)
    tokens = sum(int(next(stream).attention_mask.sum()) for _ in range(SPEC.local_steps))
    assert worker.reports[0].train_loss > 0

    for figures in (beat, part.training):
        assert figures.tokens == tokens and figures.ranks == 1
        assert figures.tokens_per_second > 0 and figures.step_seconds > 0
        assert figures.tokens_per_second * figures.step_seconds * SPEC.local_steps == pytest.approx(tokens)
        assert figures.peak_memory_bytes > 100 * 2**20 and not figures.peak_is_accelerator  # torch alone

    [row] = json_doc["rounds"][0]["participants"]
    assert row["training"] == {
        "tokens_per_second": part.training.tokens_per_second,
        "step_seconds": part.training.step_seconds,
        "peak_memory_bytes": part.training.peak_memory_bytes,
        "peak_memory_kind": "host",
        "ranks": 1,
        "tokens": tokens,
    }
    [site] = json_doc["sites"]
    assert site["training"]["tokens"] == tokens and site["training"]["peak_memory_kind"] == "host"

    lines = table.splitlines()
    [detail] = [line for line in lines if line.strip().startswith("site-a") and "tok/s=" in line]
    peak_gb = f"{part.training.peak_memory_bytes / 1e9:.2f} GB host"
    assert f"tok/s={part.training.tokens_per_second:,.0f} " in detail
    assert f"step={part.training.step_seconds:.3f}s peak={peak_gb}" in detail
    [site_row] = [line for line in lines if line.split()[:2] == ["site-a", "alive"]]
    assert f"{beat.tokens_per_second:,.0f}" in site_row.split() and peak_gb in site_row


# ---------------------------------------------------------------- what the aggregator refuses


BAD = [
    ("tokens_per_second", math.nan),
    ("tokens_per_second", math.inf),
    ("tokens_per_second", -1.0),
    ("step_seconds", 1e12),
    ("peak_memory_bytes", 2**60),
    ("ranks", 100_000),
    ("tokens", 2**60),
]


def test_bad_figures_are_refused_naming_the_field_and_good_ones_are_kept(harness: MakeHarness) -> None:
    h = harness({"a": 10}, missed_beats=600)  # no beats but this test's own: never dropped
    h.join_all(beat=False)
    site = h["a"]

    def beat(**figures: Any) -> federation_pb2.HeartbeatReply:
        reply: federation_pb2.HeartbeatReply = site.stub.Heartbeat(
            federation_pb2.HeartbeatRequest(site_id="a", training=delta_pb2.TrainingStats(**figures)),
            metadata=site.metadata,
            timeout=10,
        )
        return reply

    for name, value in BAD:
        with pytest.raises(grpc.RpcError) as caught:
            beat(**{name: value})
        details = str(caught.value.details())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"training.{name} is ") and f"<= {STATS_LIMITS[name]:g}" in details, details

    good = TrainingStats(tokens_per_second=2500.0, step_seconds=0.125, peak_memory_bytes=7 * 10**9,
                         peak_is_accelerator=True, ranks=4, tokens=80_000)  # fmt: skip
    beat(**dataclasses.asdict(good))
    seen = h.admin.sites()["a"]
    assert seen.training == training_stats_to_proto(good)
    assert site_json(seen)["training"] == {
        "tokens_per_second": 2500.0,
        "step_seconds": 0.125,
        "peak_memory_bytes": 7 * 10**9,
        "peak_memory_kind": "accelerator",
        "ranks": 4,
        "tokens": 80_000,
    }

    # An upload's figures: refused with the upload when bad, kept per round when good.
    assert site.await_round(after=0).round == 1
    for name, value in BAD[:4]:
        head, payload = site.header(
            random_delta(1, h.init),
            round=1,
            base=0,
            metrics=UploadMetrics(training=TrainingStats(**dict[str, Any]({name: value}))),
        )
        with pytest.raises(grpc.RpcError) as caught:
            site.push(head, payload)
        details = str(caught.value.details())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"metrics.training.{name} is "), details
    head, payload = site.header(
        random_delta(1, h.init), round=1, base=0, metrics=UploadMetrics(training=good)
    )
    assert site.push(head, payload).accepted
    [part] = h.admin.wait_round(1).participants
    assert part.training == training_stats_to_proto(good)
