"""Bytes that are not a request message get INVALID_ARGUMENT MALFORMED_REQUEST, on every kind of call."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from common.errors import reason_of
from tests.scripted import ADMIN_TOKEN, AdminClient, Aggregator, ScriptedSite, make_config, token_of

GARBAGE = b"\xff\xff\x01garbage"  # field 0x3fff... with a truncated varint: no message parses it


def _raw(channel: grpc.Channel, method: str, streaming_in: bool, streaming_out: bool) -> grpc.RpcError:
    # Bytes as they are: no serializer, so nothing on this side can refuse them first.
    ident: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    ch: Any = channel
    token = ADMIN_TOKEN if "/Admin/" in method else token_of("site-a")
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        if streaming_in:

            def chunks() -> Iterator[bytes]:
                yield GARBAGE

            ch.stream_unary(method, **ident)(chunks(), metadata=metadata, timeout=10)
        elif streaming_out:
            list(ch.unary_stream(method, **ident)(GARBAGE, metadata=metadata, timeout=10))
        else:
            ch.unary_unary(method, **ident)(GARBAGE, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{method} accepted bytes that are no message")


@pytest.mark.parametrize(
    ("method", "streaming_in", "streaming_out"),
    [
        ("/gradualdiff.v1.Federation/Join", False, False),
        ("/gradualdiff.v1.Federation/PushDelta", True, False),
        ("/gradualdiff.v1.Federation/FetchDiff", False, True),
        ("/gradualdiff.v1.Admin/ListRounds", False, False),
        ("/gradualdiff.v1.Admin/Watch", False, True),
    ],
)
def test_bytes_that_are_no_message_are_refused_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, method: str, streaming_in: bool, streaming_out: bool
) -> None:
    with Aggregator(make_config(tmp_path, ["site-a"])) as agg, caplog.at_level(logging.INFO):
        with grpc.insecure_channel(agg.target) as channel:
            error = _raw(channel, method, streaming_in, streaming_out)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
        assert reason_of(error) == "MALFORMED_REQUEST"
        assert "is not a valid gradualdiff.v1." in (error.details() or "")
        # The daemon goes on answering, and logged no traceback for the client's bytes.
        with ScriptedSite(agg.target, "site-a") as site:
            assert site.join().run_id == "test-run"
        with AdminClient(agg.target) as admin:
            assert admin.status().run_id == "test-run"
    assert "Exception deserializing" not in caplog.text
    assert "Traceback" not in caplog.text
