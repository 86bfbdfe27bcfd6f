"""Error feedback on the worker (client.feedback): across rounds, restarts, refusals; and a real run.

The unit tests drive UploadFeedback with the worker's own LocalState and
codec, the way ``Worker._round`` does (prepare, encode through client.outgoing,
which records the upload as pending, then acknowledged or not_taken), and rebuild both from disk wherever a worker
could be killed. The last test runs two real workers on the demo model with
top-1% uploads.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from client.feedback import UploadFeedback
from client.local_state import LocalState, Pending
from client.outgoing import start_encoding
from common.codec.compact import decode_dense
from common.codec.encoder import manifest_of
from common.delta import Cast, Codec, DeltaHeader, Lossy, PayloadSpec, TensorSpec
from common.dtypes import DType

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HALF = Codec(cast=Cast.BF16, lossy=Lossy.TOPK, topk_fraction=0.5)
RUN = "run-1"


class Site:
    """A worker's state directory: LocalState and UploadFeedback, re-openable as after a restart."""

    def __init__(self, root: Path, accepted: dict[str, bool] | None = None) -> None:
        self.root = root
        self.accepted = accepted if accepted is not None else {}
        self.restart()

    def restart(self) -> None:
        self.local = LocalState(self.root)
        self.feedback = UploadFeedback(self.root, accepted=lambda uid: self.accepted[uid])

    def encode(
        self, upload_id: str, delta: dict[str, torch.Tensor], codec: Codec, round_number: int = 1
    ) -> Pending:
        """prepare, then encode (recorded as pending once whole): what the worker does after training."""
        tensors = self.feedback.prepare(RUN, upload_id, delta, codec)
        spec = PayloadSpec(codec, manifest_of(tensors))
        header = DeltaHeader(
            spec=spec, run_id=RUN, round=round_number, site_id="s", upload_id=upload_id, sample_count=1
        )
        layout = start_encoding(header, tensors, self.local).result()
        return Pending(header, layout, self.local.payload_path(upload_id))

    def received(self, upload: Pending, delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the aggregator densifies from the payload on disk."""
        manifest = [TensorSpec(n, DType.F32, tuple(t.shape)) for n, t in delta.items()]
        with upload.payload.open("rb") as f:
            return decode_dense(upload.layout, f, manifest)


def test_topk_feedback_by_hand_across_rounds_and_restarts(tmp_path: Path) -> None:
    # The sequence of tests/test_lossy.py: k = ceil(0.5 · 4) = 2, every value exact in bf16.
    deltas = [[1.0, -2.0, 0.5, 0.25], [0.5, 0.5, 0.0, 0.25], [0.25, -0.5, -0.25, 0.5]]
    sent = [[1.0, -2.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, -0.5, 0.0, 1.0]]
    residual = [[0.0, 0.0, 0.5, 0.25], [0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.25, 0.0]]
    site = Site(tmp_path)
    for r in range(3):
        delta = {"w": torch.tensor(deltas[r])}
        upload = site.encode(f"u{r}", delta, HALF, r + 1)
        assert site.received(upload, delta)["w"].tolist() == sent[r], f"round {r + 1}"
        site.restart()  # killed after encoding: the residual is not yet applied...
        assert site.local.pending(RUN, r + 1) is not None
        before = site.feedback.residual(RUN)
        assert (before["w"].tolist() if before else [0.0] * 4) == (residual[r - 1] if r else [0.0] * 4)
        site.feedback.acknowledged(RUN, upload.header.upload_id)  # ...the resumed push is acknowledged
        site.feedback.acknowledged(RUN, upload.header.upload_id)  # a second ack changes nothing
        site.local.clear_pending()
        site.restart()
        assert site.feedback.residual(RUN)["w"].tolist() == residual[r], f"round {r + 1}"
    assert site.feedback.residual("another-run") == {}  # a new run starts from zero


def test_round_over_restores_e_plus_delta_exactly(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    site = Site(tmp_path)
    for codec in (
        replace(HALF, topk_fraction=0.01),
        Codec(lossy=Lossy.INT8),
        Codec(cast=Cast.BF16, lossy=Lossy.INT8),
    ):
        site.local.clear_pending()
        d1 = {"w": torch.randn(64, 48, generator=gen), "b": torch.randn(48, generator=gen) * 1e-3}
        h1 = site.encode("first", d1, codec)
        site.feedback.acknowledged(RUN, h1.header.upload_id)
        site.local.clear_pending()
        e1 = site.feedback.residual(RUN)
        d2 = {"w": torch.randn(64, 48, generator=gen), "b": torch.randn(48, generator=gen) * 1e-3}
        h2 = site.encode("second", d2, codec)
        site.restart()
        site.feedback.not_taken(RUN, h2)
        site.feedback.not_taken(RUN, h2)  # retried after a crash
        e2 = site.feedback.residual(RUN)
        for name in d2:
            want = e1[name] + d2[name]
            assert torch.equal(e2[name].view(torch.int32), want.view(torch.int32)), (codec.name, name)


def test_a_stale_upload_is_settled_by_asking_the_aggregator(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    codec = replace(HALF, topk_fraction=0.1)
    for accepted in (True, False):
        site = Site(tmp_path / str(accepted), {"old": accepted})
        d1 = {"w": torch.randn(100, generator=gen)}
        h1 = site.encode("old", d1, codec, round_number=1)
        received = site.received(h1, d1)["w"]
        # Killed before the aggregator answered; restarted after round 1 closed: round 2 is trained.
        site.restart()
        d2 = {"w": torch.randn(100, generator=gen)}
        site.encode("new", d2, codec, round_number=2)
        settled = site.feedback.residual(RUN)["w"]
        if accepted:
            assert torch.equal(settled, d1["w"] - received)
        else:
            assert torch.equal(settled, d1["w"])  # delayed, not lost
        site.feedback.acknowledged(RUN, "new")
        site.local.clear_pending()
        assert site.feedback.residual(RUN)["w"].shape == (100,)


def test_two_stale_uploads_are_each_settled_once(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    codec = replace(HALF, topk_fraction=0.1)
    site = Site(tmp_path, {"r1": False, "r2": False})
    d1, d2, d3 = ({"w": torch.randn(100, generator=gen)} for _ in range(3))
    site.encode("r1", d1, codec, round_number=1)
    site.restart()  # killed before the answer; rounds 1 and then 2 close without this site's uploads
    site.encode("r2", d2, codec, round_number=2)  # settles r1: e = d1
    assert torch.equal(site.feedback.residual(RUN)["w"], d1["w"])
    site.restart()
    site.encode("r3", d3, codec, round_number=3)  # settles r2 (e = d1 + d2), and r1 not again
    assert torch.equal(site.feedback.residual(RUN)["w"], d1["w"] + d2["w"])


def test_exact_codecs_leave_the_residual_alone(tmp_path: Path) -> None:
    site = Site(tmp_path)
    d = {"w": torch.tensor([1.0, -2.0, 0.5, 0.25])}
    upload = site.encode("lossy", d, HALF)
    site.feedback.acknowledged(RUN, upload.header.upload_id)
    site.local.clear_pending()
    before = site.feedback.residual(RUN)
    tensors = site.feedback.prepare(RUN, "exact", d, Codec())
    assert tensors.keys() == d.keys() and torch.equal(tensors["w"], d["w"])
    assert not site.feedback.residual_path("exact").exists()
    assert torch.equal(site.feedback.residual(RUN)["w"], before["w"])


def test_a_tensor_that_changed_shape_starts_from_zero(tmp_path: Path) -> None:
    site = Site(tmp_path)
    upload = site.encode("a", {"w": torch.tensor([1.0, -2.0, 0.5, 0.25])}, HALF)
    site.feedback.acknowledged(RUN, upload.header.upload_id)
    site.local.clear_pending()
    upload = site.encode("b", {"w": torch.tensor([3.0, 1.0])}, HALF)
    site.feedback.acknowledged(RUN, upload.header.upload_id)
    assert site.feedback.residual(RUN)["w"].tolist() == [0.0, 1.0]


# ---------------------------------------------------------------- a real run


@pytest.mark.slow
def test_two_workers_with_top1_percent_uploads(tmp_path: Path) -> None:
    from common.spec import TrainingSpec
    from tests.federation import demo_config, demo_worker, run_workers, tiny_demo
    from tests.scripted import AdminClient, Aggregator

    demo = tiny_demo(tmp_path / "demo")
    codec = Codec(cast=Cast.BF16, lossy=Lossy.TOPK, topk_fraction=0.01)
    spec = TrainingSpec(local_steps=3, batch_size=8, learning_rate=1e-3, max_seq_len=32, upload_codec=codec)
    config = demo_config(tmp_path, demo, ["site-a", "site-b"], spec, rounds=2)
    fp32_bytes = sum(t.nbytes for t in manifest_of(_load(tmp_path / "model-init.safetensors")))
    with Aggregator(config) as agg:
        workers = [demo_worker(agg.target, s, demo, tmp_path) for s in ("site-a", "site-b")]
        assert run_workers(workers) == [0, 0]
        with AdminClient(agg.target) as admin:
            assert admin.status().finished
            for number in (1, 2):
                r = admin.round(number)
                assert r.state == 5 and sum(p.accepted for p in r.participants) == 2
    for w in workers:
        assert [rep.round for rep in w.reports] == [1, 2]
        for rep in w.reports:
            print(
                f"{w.config.site_id} round {rep.round}: {rep.bytes_up} bytes up, fp32 {fp32_bytes} (1/{fp32_bytes / rep.bytes_up:.0f})"
            )
            assert rep.bytes_up * 150 <= fp32_bytes
        # The residual is on disk, for this run, and as large as what trains.
        feedback = UploadFeedback(tmp_path / w.config.site_id, accepted=lambda uid: True)
        residual = feedback.residual(agg.coordinator.run.run_id)
        assert sum(t.numel() * 4 for t in residual.values()) == fp32_bytes
        assert any(bool(t.any()) for t in residual.values())


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
