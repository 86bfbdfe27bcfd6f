"""Conformance vectors of the delta wire format: deltas to decode, and malformed ones to refuse.

``protos/gradualdiff/v1/vectors/`` holds, for every codec (exact, bf16 and f16
casts, top-k, int8; byte shuffle on and off), a delta as a receiver meets it:
its ``DeltaHeader`` (protobuf JSON), its payload bytes, and the tensors it
decodes to (safetensors); and malformed deltas, each with the gRPC status and
the ``google.rpc.ErrorInfo`` reason a receiver must refuse it with.
``index.json`` describes them all; docs/protocol.md says how to use them.

The modules: :mod:`.vectors` (the index: what a vector is, reading and
writing it), :mod:`.tamper` (taking a payload apart into frames and putting it
back with every size and digest consistent), :mod:`.valid` and
:mod:`.malformed` (the generator, deterministic: fixed data, fixed zstd level),
:mod:`.check` (decode, refuse, re-encode). ``python -m common.conformance
--write`` regenerates the files, ``--check`` verifies them against this
implementation.
"""

from __future__ import annotations

from common.conformance.vectors import VECTORS_DIR, Refusal, Vector, load

__all__ = ["VECTORS_DIR", "Refusal", "Vector", "load"]
