"""common.malloc: with its settings, streaming 1 MiB messages stops faulting fresh pages per message.

Each case runs in its own interpreter, since malloc settings are per process
and cannot be undone. Page faults are counted (getrusage), not timed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = 200

PROBE = f"""
import os, resource, sys
from common.malloc import tune_malloc
from common.pb.gradualdiff.v1 import delta_pb2
if sys.argv[1] != "default":
    assert tune_malloc(arenas=2 if sys.argv[1] == "daemon" else None)
data = os.urandom(1 << 20)
for _ in range(10):  # warm: the heaps reach their working size
    delta_pb2.DeltaChunk(offset=1, data=data, crc32=2).SerializeToString()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({MESSAGES}):
    delta_pb2.DeltaChunk(offset=1, data=data, crc32=2).SerializeToString()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_defaults_fault_every_message_in_again() -> None:
    # The trap the settings avoid: about 3 MiB of fresh pages per message (measured: ~737 faults).
    assert _faults("default") > MESSAGES * 100


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode", ["worker", "daemon"])
def test_tuned_processes_reuse_their_message_buffers(mode: str) -> None:
    assert _faults(mode) < MESSAGES
