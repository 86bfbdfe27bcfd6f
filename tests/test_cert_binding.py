"""Sites bound to their mTLS client certificates (``[tls] bind_site_to_cert``): a site's token is
taken only with a certificate whose CN or subjectAltName is the site id, so a stolen token alone
is not enough. A CA and certificates made by openssl here, a real aggregator on 127.0.0.1."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from common.channel import ChannelConfig, auth_metadata, open_channel
from common.errors import metadata_of, reason_of
from common.pb.gradualdiff.v1 import admin_pb2, admin_pb2_grpc, federation_pb2, federation_pb2_grpc
from server.config import ConfigError, TlsConfig
from server.config_file import load_config
from tests.scripted import ADMIN_TOKEN, Aggregator, make_config, refusal, token_of

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

# Client certificates: file name -> (subject CN, subjectAltName or "").
CLIENTS = {
    "a": ("a", ""),
    "b": ("b", ""),
    "a-by-san": ("a.site.example", "DNS:a.site.example,DNS:a"),  # the site id as a SAN, not the CN
    "operator": ("operator", ""),
}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(d: Path, name: str, cn: str, san: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=d)  # fmt: skip
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    _signed(d, "server", "server", "DNS:localhost,IP:127.0.0.1")
    for name, (cn, san) in CLIENTS.items():
        _signed(d, name, cn, san)
    return d


def _tls(pki: Path, *, bind: bool) -> TlsConfig:
    return TlsConfig(
        cert=pki / "server.crt", key=pki / "server.key", client_ca=pki / "ca.crt", bind_site_to_cert=bind
    )


def _join(target: str, pki: Path, cert: str, site: str) -> federation_pb2.JoinReply:
    """Join as ``site`` (its token) over a channel that presents client certificate ``cert``."""
    channel = open_channel(
        ChannelConfig(target=target, ca=pki / "ca.crt", cert=pki / f"{cert}.crt", key=pki / f"{cert}.key")
    )
    try:
        reply: federation_pb2.JoinReply = federation_pb2_grpc.FederationStub(channel).Join(
            federation_pb2.JoinRequest(site_id=site), metadata=auth_metadata(token_of(site)), timeout=10
        )
        return reply
    finally:
        channel.close()


def test_a_bound_site_is_taken_only_with_its_own_certificate(tmp_path: Path, pki: Path) -> None:
    with Aggregator(make_config(tmp_path, ["a", "b"], tls=_tls(pki, bind=True))) as agg:
        assert _join(agg.target, pki, "a", "a").run_id == "test-run"
        assert _join(agg.target, pki, "a-by-san", "a").run_id == "test-run"  # a SAN naming the site
        # a's token (stolen) from b's machine, with b's certificate: refused, both names given.
        exc = refusal(lambda: _join(agg.target, pki, "b", "a"))
        assert exc.code() is grpc.StatusCode.PERMISSION_DENIED, exc.details()
        assert reason_of(exc) == "CERT_MISMATCH"
        meta = metadata_of(exc)
        assert meta["expected"] == "a" and meta["presented"] == "b", meta
        assert "'a'" in (exc.details() or "") and "'b'" in (exc.details() or "")
        # The operator's certificate names no site; the Admin service is not bound to a site.
        channel = open_channel(
            ChannelConfig(
                target=agg.target, ca=pki / "ca.crt", cert=pki / "operator.crt", key=pki / "operator.key"
            )
        )
        try:
            status = admin_pb2_grpc.AdminStub(channel).GetStatus(
                admin_pb2.StatusRequest(), metadata=auth_metadata(ADMIN_TOKEN), timeout=10
            )
            assert status.sites_known == 1  # a joined; the refused call did nothing
        finally:
            channel.close()


def test_without_the_binding_any_certificate_of_the_ca_goes(tmp_path: Path, pki: Path) -> None:
    with Aggregator(make_config(tmp_path, ["a", "b"], tls=_tls(pki, bind=False))) as agg:
        assert _join(agg.target, pki, "b", "a").run_id == "test-run"


def test_the_binding_needs_mutual_tls_and_reads_from_the_config_file(tmp_path: Path, pki: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        TlsConfig(cert=pki / "server.crt", key=pki / "server.key", bind_site_to_cert=True)
    assert caught.value.field == "tls.bind_site_to_cert" and "client_ca" in caught.value.message
    config = tmp_path / "gdfed.toml"
    config.write_text(
        f'admin_token = "{ADMIN_TOKEN}"\n[sites]\na = "{token_of("a")}"\n'
        f'[tls]\ncert = "{pki / "server.crt"}"\nkey = "{pki / "server.key"}"\n'
        f'client_ca = "{pki / "ca.crt"}"\nbind_site_to_cert = true\n'
    )
    assert load_config(config, {}).tls.bind_site_to_cert
    config.write_text(config.read_text().replace('client_ca = "', 'ca_was = "'))
    with pytest.raises(ConfigError, match="unknown settings"):
        load_config(config, {})
    config.write_text(config.read_text().replace(f'ca_was = "{pki / "ca.crt"}"\n', ""))
    with pytest.raises(ConfigError, match="bind_site_to_cert needs mutual TLS"):
        load_config(config, {})
