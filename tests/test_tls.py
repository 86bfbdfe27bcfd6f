"""TLS and mutual TLS: the daemon's certificate flags, with a CA and certificates made by openssl here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from common.channel import ChannelConfig, auth_metadata, open_channel
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc
from server.config import TlsConfig
from tests.scripted import ADMIN_TOKEN, Aggregator, make_config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "operator"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip
    return d


def _status(target: str, pki: Path, *, cert: bool) -> admin_pb2.RunStatus:
    channel = open_channel(
        ChannelConfig(
            target=target,
            ca=pki / "ca.crt",
            cert=pki / "operator.crt" if cert else None,
            key=pki / "operator.key" if cert else None,
        )
    )
    try:
        stub = admin_pb2_grpc.AdminStub(channel)
        reply: admin_pb2.RunStatus = stub.GetStatus(
            admin_pb2.StatusRequest(), metadata=auth_metadata(ADMIN_TOKEN), timeout=10
        )
        return reply
    finally:
        channel.close()


def test_server_tls(tmp_path: Path, pki: Path) -> None:
    config = make_config(tmp_path, ["a"], tls=TlsConfig(cert=pki / "server.crt", key=pki / "server.key"))
    with Aggregator(config) as agg:
        assert _status(agg.target, pki, cert=False).run_id == "test-run"
        plain = grpc.insecure_channel(agg.target)
        with pytest.raises(grpc.RpcError) as refused:
            admin_pb2_grpc.AdminStub(plain).GetStatus(
                admin_pb2.StatusRequest(), metadata=auth_metadata(ADMIN_TOKEN), timeout=5
            )
        plain.close()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path, pki: Path) -> None:
    tls = TlsConfig(cert=pki / "server.crt", key=pki / "server.key", client_ca=pki / "ca.crt")
    with Aggregator(make_config(tmp_path, ["a"], tls=tls)) as agg:
        assert _status(agg.target, pki, cert=True).run_id == "test-run"
        with pytest.raises(grpc.RpcError) as refused:
            _status(agg.target, pki, cert=False)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
