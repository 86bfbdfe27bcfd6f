"""The ``gdfed`` entry point runs the codec demo end to end in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from common import cli

ROOT = Path(__file__).resolve().parent.parent


def test_codec_demo_runs_bit_exact():
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "codec-demo", "--layers", "1", "--width", "64"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-exact" in result.stdout
    assert "MISMATCH" not in result.stdout
    # One line per codec, each with its check.
    assert result.stdout.count("bit-exact") == 2
    assert "bf16 rounding" in result.stdout


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2


def test_parser_lists_codec_demo():
    parser = cli.build_parser()
    args = parser.parse_args(["codec-demo", "--layers", "2", "--width", "8"])
    assert (args.command, args.layers, args.width) == ("codec-demo", 2, 8)


def test_stream_window_comes_from_toml_and_flags_and_is_bounded(tmp_path):
    from server.app import server_options
    from server.config_file import load_config

    path = tmp_path / "aggregator.toml"
    path.write_text("stream_window_bytes = 8388608\n")
    assert ("grpc.http2.lookahead_bytes", 8388608) in server_options(load_config(path, {}))
    flagged = load_config(path, {"stream_window_bytes": 1 << 20})
    assert ("grpc.http2.lookahead_bytes", 1 << 20) in server_options(flagged)
    with pytest.raises(ValueError, match=r"stream_window_bytes = 1000: must be between 65536"):
        server_options(load_config(path, {"stream_window_bytes": 1000}))
