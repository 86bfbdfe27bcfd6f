"""A breaking-change check of protos/ against the last released v1 (``released.json``).

buf is not installed by ``make setup``, so this is the part of ``buf breaking`` that
matters to a third-party worker: a field or enum value that a released client may
send or read keeps its number, name and type; RPCs keep their names, message types
and streaming. Adding fields, values, messages or RPCs is allowed.

``python -m common.protocompat`` checks; ``--release`` rewrites the snapshot, which is
done once per protocol release, never to silence a failing check.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from common.protogen import PROTO_DIR, proto_files

RELEASED = PROTO_DIR / "gradualdiff" / "v1" / "released.json"

Snapshot = dict[str, dict[str, Any]]


def _fields(message: descriptor_pb2.DescriptorProto, prefix: str, out: Snapshot) -> None:
    name = f"{prefix}.{message.name}"
    out["messages"][name] = {
        str(f.number): {
            "name": f.name,
            "type": descriptor_pb2.FieldDescriptorProto.Type.Name(f.type),
            "type_name": f.type_name,
            "repeated": f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
        }
        for f in message.field
    }
    for nested in message.nested_type:
        _fields(nested, name, out)
    for enum in message.enum_type:
        out["enums"][f"{name}.{enum.name}"] = {str(v.number): v.name for v in enum.value}


def snapshot(proto_dir: Path = PROTO_DIR) -> Snapshot:
    """Compile the .proto files under ``proto_dir`` (``protoc -I proto_dir``) and list their shape."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "set.pb"
        args = ["grpc_tools.protoc", f"-I{proto_dir}", f"--descriptor_set_out={out_file}"]
        args += [(proto_dir / p).as_posix() for p in proto_files(proto_dir)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc -I {proto_dir} failed")
        files = descriptor_pb2.FileDescriptorSet.FromString(out_file.read_bytes())
    result: Snapshot = {"messages": {}, "enums": {}, "services": {}}
    for file in files.file:
        prefix = f".{file.package}"
        for message in file.message_type:
            _fields(message, prefix, result)
        for enum in file.enum_type:
            result["enums"][f"{prefix}.{enum.name}"] = {str(v.number): v.name for v in enum.value}
        for service in file.service:
            result["services"][f"{prefix}.{service.name}"] = {
                m.name: {
                    "input": m.input_type,
                    "output": m.output_type,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in service.method
            }
    return result


def breaking_changes(released: Snapshot, current: Snapshot) -> list[str]:
    """Every way ``current`` breaks a peer built against ``released``; empty when compatible."""
    problems = []
    for kind, what in (("messages", "field"), ("enums", "value"), ("services", "rpc")):
        for owner, members in released[kind].items():
            now = current[kind].get(owner)
            if now is None:
                problems.append(f"{owner}: removed")
                continue
            for key, old in members.items():
                new = now.get(key)
                if new is None:
                    problems.append(f"{owner}: {what} {key} ({_describe(old)}) removed")
                elif new != old:
                    problems.append(f"{owner}: {what} {key} was {_describe(old)}, now {_describe(new)}")
    return problems


def _describe(entry: Any) -> str:
    return json.dumps(entry, sort_keys=True)


def load_released(path: Path = RELEASED) -> Snapshot:
    loaded: Snapshot = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def write_released(path: Path = RELEASED) -> None:
    path.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--release", action="store_true", help=f"rewrite {RELEASED.name} from protos/")
    args = parser.parse_args()
    if args.release:
        write_released()
        print(f"wrote {RELEASED}")
        return 0
    problems = breaking_changes(load_released(), snapshot())
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"protos/ breaks the released v1 ({RELEASED.name}); add, do not change", file=sys.stderr)
        return 1
    print("protos/ is compatible with the released v1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
