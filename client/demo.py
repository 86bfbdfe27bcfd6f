"""``gdfed demo``: a real federation on this machine, start to finish.

``gdfed demo init DIR`` builds a small Llama-style model, a tokenizer and three
sites' differing datasets (client/demo_init.py). ``gdfed demo run DIR`` then:

1. writes the round-0 trainable state and the aggregator's config and tokens;
2. starts ``gdfed serve`` and three ``gdfed work`` processes on 127.0.0.1;
3. follows the rounds, evaluating each published global model on the shared
   held-out set, with the bytes sent up and down against the full model;
4. trains a centralized baseline on the union of the data with the same total
   number of optimizer steps, and prints both side by side;
5. writes a JSON report and stops every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.pb.gradualdiff.v1.admin_pb2_grpc import AdminStub

Metadata = tuple[tuple[str, str], ...]
SITES = ("site-a", "site-b", "site-c")


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSettings:
    rounds: int = 10
    local_steps: int = 25
    batch_size: int = 16
    learning_rate: float = 1e-3
    max_seq_len: int = 64
    seed: int = 0
    # What ``make compare`` varies (bench/compare.py); the defaults are the demo's GradualDiff-Fed run.
    training: dict[str, Any] = field(
        default_factory=dict
    )  # extra [training] settings (method, mode, lora...)
    sections: str = ""  # extra TOML sections for the aggregator ([cybgd], [optimizer], ...)
    site_ranks: tuple[int, ...] = ()  # FlexLoRA: each site's --lora-rank
    baseline: bool = True  # train and print the centralized baseline


@dataclass
class Processes:
    """Every process the demo started, so none outlives it."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    def start(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        handle = log.open("wb")
        proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(handle)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for handle in self.logs:
            handle.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", choices=("init", "run"), help="init: build model and data; run: run the federation"
    )
    parser.add_argument("dir", type=Path, help="the demo's directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples-per-site", type=int, default=1000)
    parser.add_argument("--pretrain-steps", type=int, default=400, help="base-model pretraining (init)")
    parser.add_argument("--rounds", type=int, default=DemoSettings().rounds)
    parser.add_argument("--local-steps", type=int, default=DemoSettings().local_steps)


def run(args: argparse.Namespace) -> int:
    from client import demo_init

    if args.action == "init":
        return demo_init.run(args)
    if not (args.dir / "model" / "config.json").exists():
        print(f"no demo in {args.dir}: building one first (gdfed demo init)", flush=True)
        demo_init.init_demo(
            args.dir,
            seed=args.seed,
            examples_per_site=args.examples_per_site,
            pretrain_steps=args.pretrain_steps,
        )
    settings = DemoSettings(rounds=args.rounds, local_steps=args.local_steps, seed=args.seed)
    return run_demo(args.dir, settings)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_config(
    root: Path, run_dir: Path, settings: DemoSettings, port: int
) -> tuple[Path, dict[str, Path]]:
    from client.model import fingerprint

    tokens = {site: secrets.token_hex(16) for site in SITES}
    token_files = {}
    for site, token in tokens.items():
        path = run_dir / f"{site}.token"
        path.write_text(token + "\n")
        token_files[site] = path
    (run_dir / "sites.tokens").write_text("".join(f"{s} = {t}\n" for s, t in tokens.items()))
    (run_dir / "admin.token").write_text(secrets.token_hex(16) + "\n")
    config = run_dir / "aggregator.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\n'
        f'state_dir = "{run_dir / "aggregator"}"\n'
        f'init_state = "{run_dir / "init.safetensors"}"\n'
        f'run_id = "demo"\nrounds = {settings.rounds}\n'
        f'site_tokens_file = "{run_dir / "sites.tokens"}"\n'
        f'admin_token_file = "{run_dir / "admin.token"}"\n'
        f"heartbeat_interval_s = 2.0\nmissed_beats = 10\nkeep_states = {settings.rounds + 1}\n"
        f'base_model_fingerprint = "{fingerprint(root / "model")}"\n'
        f"[round]\nmin_sites_to_open = {len(SITES)}\nmin_sites = 0\ndeadline_s = 600\n"
        "[training]\n"
        + _toml_section(
            {
                "method": "gradualdiff",
                "mode": "full",
                "local_steps": settings.local_steps,
                "batch_size": settings.batch_size,
                "learning_rate": settings.learning_rate,
                "max_seq_len": settings.max_seq_len,
                "seed": settings.seed,
            }
            | settings.training
        )
        + settings.sections
    )
    return config, token_files


def _toml_section(values: dict[str, Any]) -> str:
    """``key = value`` lines for the [training] table, with sub-tables (lora, upload_codec) after."""
    plain = [f"{k} = {json.dumps(v)}\n" for k, v in values.items() if not isinstance(v, dict)]
    tables = [
        f"[training.{k}]\n" + "".join(f"{kk} = {json.dumps(vv)}\n" for kk, vv in v.items())
        for k, v in values.items()
        if isinstance(v, dict)
    ]
    return "".join(plain) + "".join(tables)


def training_spec_of(settings: DemoSettings) -> Any:
    """The TrainingSpec the demo's aggregator will run (for the round-0 state and the evaluator)."""
    from common.spec import LoraSpec, Method, TrainingSpec, TrainMode

    extra = settings.training
    lora = extra.get("lora", {})
    return TrainingSpec(
        method=Method[str(extra.get("method", "gradualdiff")).upper()],
        mode=TrainMode[str(extra.get("mode", "full")).upper()],
        trainable_patterns=tuple(extra.get("trainable_patterns", ())),
        lora=LoraSpec(
            rank=int(lora.get("rank", 8)),
            alpha=float(lora.get("alpha", 16.0)),
            target_modules=tuple(lora.get("target_modules", ("q_proj", "v_proj"))),
        ),
        local_steps=settings.local_steps,
        batch_size=settings.batch_size,
        learning_rate=float(extra.get("learning_rate", settings.learning_rate)),
        max_seq_len=settings.max_seq_len,
        seed=settings.seed,
    )


def run_demo(root: Path, settings: DemoSettings) -> int:
    """The whole demo; returns an exit code."""
    run_federation(root, settings)
    return 0


def run_federation(root: Path, settings: DemoSettings) -> dict[str, Any]:
    """Run the federation (and the baseline, if asked); print as it goes; return the report."""
    import grpc
    import torch

    from client.init_state import write_init_state
    from common.channel import auth_metadata
    from common.pb.gradualdiff.v1 import admin_pb2_grpc

    start = time.monotonic()
    # Absolute: the config written below is read relative to its own folder.
    root = root.resolve()
    run_dir = root / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    spec = training_spec_of(settings)
    write_init_state(root / "model", run_dir / "init.safetensors", spec)
    from common.statefile import StateReader

    trainable_bytes = sum(t.numel * 4 for t in StateReader(run_dir / "init.safetensors").manifest)
    port = _free_port()
    config, token_files = _write_config(root, run_dir, settings, port)
    evaluator = GlobalEvaluator(root, settings)
    full_model = evaluator.full_model_bytes
    print(
        f"gradualdiff-fed demo: an aggregator and {len(SITES)} workers on 127.0.0.1:{port}, {settings.rounds} rounds of "
        f"{settings.local_steps} local steps; model {evaluator.params:,} parameters ({full_model / 1e6:.1f} MB as fp32)",
        flush=True,
    )
    print(f"logs and state in {run_dir}\n", flush=True)
    procs = Processes()
    exe = [sys.executable, "-m", "common.cli"]
    try:
        procs.start([*exe, "serve", "--config", str(config)], run_dir / "aggregator.log")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        admin = admin_pb2_grpc.AdminStub(channel)
        meta = auth_metadata((run_dir / "admin.token").read_text().strip())
        _wait_ready(admin, meta, procs)
        for i, site in enumerate(SITES):
            procs.start(
                [
                    *exe,
                    "work",
                    "--aggregator",
                    f"127.0.0.1:{port}",
                    "--site",
                    site,
                    "--token-file",
                    str(token_files[site]),
                    "--model",
                    str(root / "model"),
                    "--data",
                    str(root / "data" / f"{site}.jsonl"),
                    "--state-dir",
                    str(run_dir / site),
                    "--quiet",
                    "--threads",
                    "1",
                    "--seed",
                    str(settings.seed),
                    *(["--lora-rank", str(settings.site_ranks[i])] if settings.site_ranks else []),
                ],
                run_dir / f"{site}.log",
            )
        print(
            f"{'round':>5} {'eval loss':>10} {'site train':>11} {'MB up':>8} {'up / full':>10} {'s':>6}",
            flush=True,
        )
        peaks: dict[int, int] = {}
        rounds = _follow(admin, meta, evaluator, settings, procs, full_model, peaks)
        channel.close()
    finally:
        procs.stop()
    federation_seconds = time.monotonic() - start
    bytes_up = sum(r["bytes_up"] for r in rounds)
    bytes_down = sum(r.get("bytes_down", 0) for r in rounds)
    report: dict[str, Any] = {
        "rounds": len(rounds),
        "eval_loss": [r["eval_loss"] for r in rounds],
        "initial_eval_loss": evaluator.initial_loss,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "bytes_up_per_round": [r["bytes_up"] for r in rounds],
        "bytes_down_per_round": [r.get("bytes_down", 0) for r in rounds],
        "full_model_bytes": full_model,
        "trainable_fp32_bytes": trainable_bytes,
        "sites": list(SITES),
        "local_steps": settings.local_steps,
        "worker_peak_rss_bytes": max((v for pid, v in peaks.items() if pid != procs.procs[0].pid), default=0),
        "aggregator_peak_rss_bytes": peaks.get(procs.procs[0].pid, 0),
        "federation_seconds": round(federation_seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if not settings.baseline:
        return report
    total_steps = settings.rounds * settings.local_steps
    print(
        f"\ncentralized baseline: the same model trained on the union of the sites' data for the same "
        f"{total_steps} optimizer steps, each on a batch of {len(SITES)} x {settings.batch_size} examples "
        "(what the three sites see in one step) ...",
        flush=True,
    )
    central = evaluator.centralized(
        total_steps, checkpoints=settings.local_steps, batch_size=len(SITES) * settings.batch_size
    )
    print(f"\n{'round':>5} {'federated eval':>15} {'centralized eval':>17} {'MB up':>8} {'MB down':>8}")
    for r, c in zip(rounds, central, strict=False):
        print(
            f"{r['round']:>5} {r['eval_loss']:>15.4f} {c:>17.4f} {r['bytes_up'] / 1e6:>8.2f} "
            f"{r.get('bytes_down', 0) / 1e6:>8.2f}"
        )
    fed_final, central_final = rounds[-1]["eval_loss"], central[-1]
    fedavg_each_way = full_model * len(SITES) * len(rounds)
    print(
        f"\nfinal eval loss: federated {fed_final:.4f}, centralized {central_final:.4f} "
        f"({(fed_final / central_final - 1) * 100:+.1f}%); initial {evaluator.initial_loss:.4f}"
    )
    print(
        f"sent {bytes_up / 1e6:.1f} MB up and {bytes_down / 1e6:.1f} MB down; sending the full fp32 model "
        f"each way would be {fedavg_each_way / 1e6:.1f} MB each way "
        f"(up {bytes_up / fedavg_each_way:.3f}x, down {bytes_down / fedavg_each_way:.3f}x)"
    )
    report |= {
        "centralized_eval_loss": central_final,
        "centralized_eval_loss_per_round": central,
        "seconds": round(time.monotonic() - start, 1),
    }
    path = run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path} ({report['seconds']:.0f} s)")
    return report


def _wait_ready(admin: AdminStub, meta: Metadata, procs: Processes) -> None:
    import grpc

    from common.pb.gradualdiff.v1 import admin_pb2

    deadline = time.monotonic() + 120
    while True:
        try:
            admin.GetStatus(admin_pb2.StatusRequest(), metadata=meta, timeout=2)
            return
        except grpc.RpcError:
            if procs.procs[0].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the aggregator did not start; see run/aggregator.log") from None
            time.sleep(0.3)


def _follow(
    admin: AdminStub,
    meta: Metadata,
    evaluator: GlobalEvaluator,
    settings: DemoSettings,
    procs: Processes,
    full_model: int,
    peaks: dict[int, int],
) -> list[dict[str, Any]]:
    from common.pb.gradualdiff.v1 import admin_pb2
    from common.spec import RoundState

    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 1800
    while len(seen) < settings.rounds:
        if time.monotonic() > deadline:
            raise RuntimeError("the demo took more than 30 minutes")
        for i, proc in enumerate(procs.procs):
            if proc.poll() not in (None, 0):
                who = "aggregator" if i == 0 else SITES[i - 1]
                raise RuntimeError(f"{who} exited with {proc.returncode}; see its log in run/")
        for proc in procs.procs:
            peaks[proc.pid] = max(peaks.get(proc.pid, 0), _peak_rss(proc.pid))
        rounds = admin.ListRounds(admin_pb2.ListRoundsRequest(limit=100), metadata=meta, timeout=10).rounds
        for r in sorted(rounds, key=lambda r: r.round):
            state = int(r.state)
            if r.round in seen or state not in (RoundState.PUBLISHED, RoundState.FAILED):
                continue
            if state == RoundState.FAILED:
                raise RuntimeError(f"round {r.round} failed: {r.failure_reason}")
            loss = evaluator.evaluate_round(r.round)
            took = (r.published_unix_ms - r.opened_unix_ms) / 1000
            # Bytes down are counted when fetched, i.e. at the start of the next round; read them again then.
            seen[r.round] = {
                "round": r.round,
                "eval_loss": loss,
                "bytes_up": r.bytes_in,
                "train_loss": r.mean_train_loss,
            }
            print(
                f"{r.round:>5} {loss:>10.4f} {r.mean_train_loss:>11.4f} {r.bytes_in / 1e6:>8.2f} "
                f"{r.bytes_in / (full_model * max(1, len(r.participants))):>10.3f} {took:>6.1f}",
                flush=True,
            )
        time.sleep(0.5)
    # Let the workers fetch the last round and exit, then count the bytes sent down.
    for proc in procs.procs:
        peaks[proc.pid] = max(peaks.get(proc.pid, 0), _peak_rss(proc.pid))
    for proc in procs.procs[1:]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    rounds = admin.ListRounds(admin_pb2.ListRoundsRequest(limit=100), metadata=meta, timeout=10).rounds
    for r in rounds:
        if r.round in seen:
            seen[r.round]["bytes_down"] = r.bytes_out
    return [seen[k] for k in sorted(seen)]


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class GlobalEvaluator:
    """Evaluates global states on the shared held-out set, and trains the centralized baseline."""

    def __init__(self, root: Path, settings: DemoSettings) -> None:
        import torch

        from client.data import read_jsonl, tokenize
        from client.model import load_model, trainable_state

        torch.manual_seed(settings.seed)
        # While the workers train, this process only evaluates: one thread, so it does not slow them.
        torch.set_num_threads(1)
        self.root = root
        self.settings = settings
        self.spec = training_spec_of(settings)
        self.loaded = load_model(root / "model", self.spec, torch.device("cpu"))
        self.initial = trainable_state(self.loaded)
        self.eval = tokenize(
            read_jsonl(root / "data" / "eval.jsonl"), self.loaded.tokenizer, settings.max_seq_len
        )
        # The whole model's size, whatever trains (LoRA adapters are not the model).
        self.params = sum(p.numel() for n, p in self.loaded.model.named_parameters() if "lora_" not in n)
        self.full_model_bytes = self.params * 4
        self.initial_loss = self._loss()

    def _loss(self) -> float:
        from client.train import evaluate

        return evaluate(self.loaded, self.eval, 64)

    def evaluate_round(self, round_number: int) -> float:
        from safetensors.torch import load_file

        from client.model import load_trainable
        from common.state_dir import published_state

        found = published_state(self.root / "run" / "aggregator", round_number)
        load_trainable(self.loaded, load_file(str(found.path)))
        return self._loss()

    def centralized(self, steps: int, checkpoints: int, batch_size: int) -> list[float]:
        """Eval loss after every ``checkpoints`` steps of training on the union of the sites' data.

        The same sequence of optimizer steps as a site makes over the run, each on a batch as large
        as all sites' batches together: the same examples and the same steps as the federation, with
        nothing kept apart, which is what federated training is measured against.
        """
        import os

        import torch

        from client.data import batches, read_jsonl, tokenize
        from client.model import load_trainable
        from client.train import train_steps

        torch.set_num_threads(os.cpu_count() or 1)
        load_trainable(self.loaded, self.initial)
        union = tokenize(
            read_jsonl(self.root / "data" / "all.jsonl"), self.loaded.tokenizer, self.settings.max_seq_len
        )
        data = batches(
            union, self.settings.batch_size, self.loaded.tokenizer.pad_token_id, seed=self.settings.seed
        )
        losses = []
        done = 0
        # One AdamW for the whole run: the baseline is the best a single site holding all the data could do.
        params = dict(self.loaded.model.named_parameters())
        optimizer = torch.optim.AdamW(
            [params[n] for n in self.loaded.trainable], lr=self.settings.learning_rate, weight_decay=0.0
        )
        while done < steps:
            n = min(checkpoints, steps - done)
            train_steps(self.loaded, data, steps=n, lr=self.settings.learning_rate, optimizer=optimizer)
            done += n
            losses.append(self._loss())
        return losses
