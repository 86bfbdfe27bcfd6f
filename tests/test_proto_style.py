"""The buf STANDARD lint rules the protos follow, checked without buf (docs/protocol.md, "Proto style").

The protos are compiled from ``protos/`` alone (as a third party would) into a
descriptor set, and each rule below is a function over it that returns its
violations as ``RULE_ID: where: why``. Where the protos deliberately depart
from a buf rule (released v1 names), the exceptions are listed here by name,
so anything added later follows the rule.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from common.protogen import PROTO_DIR

# ENUM_ZERO_VALUE_SUFFIX: released v1 enums whose zero value is a meaningful default, not "unset":
# an unset codec field means exact, an unset directive means carry on.
ZERO_VALUE_EXCEPTIONS = {"gradualdiff.v1.Cast", "gradualdiff.v1.Lossy", "gradualdiff.v1.Directive"}
# ENUM_VALUE_PREFIX: buf derives D_TYPE_ from DType; the released values are DTYPE_*.
PREFIX_EXCEPTIONS = {"gradualdiff.v1.DType": "DTYPE_"}

_PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
_VERSION = re.compile(r"^v\d+((alpha|beta)\d*)?$")


def upper_snake(name: str) -> str:
    """buf's UPPER_SNAKE_CASE of a PascalCase name: ``DType`` -> ``D_TYPE``, ``HTTPServer`` -> ``HTTP_SERVER``."""
    out = []
    for i, ch in enumerate(name):
        prev = name[i - 1] if i else ""
        nxt = name[i + 1] if i + 1 < len(name) else ""
        if i and ch.isupper() and (prev.islower() or prev.isdigit() or (prev.isupper() and nxt.islower())):
            out.append("_")
        out.append(ch.upper())
    return "".join(out)


def descriptor_set(root: Path, tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    """Every .proto under ``root``, compiled with ``root`` as the only include path."""
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    out = tmp / "set.pb"
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(root), f"--descriptor_set_out={out}", *files],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _messages(
    prefix: str, messages: list[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for m in messages:
        name = f"{prefix}.{m.name}"
        yield name, m
        yield from _messages(name, list(m.nested_type))


def _enums(
    fd: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, descriptor_pb2.EnumDescriptorProto]]:
    for e in fd.enum_type:
        yield f"{fd.package}.{e.name}", e
    for name, m in _messages(fd.package, list(fd.message_type)):
        for e in m.enum_type:
            yield f"{name}.{e.name}", e


def violations(fds: descriptor_pb2.FileDescriptorSet) -> list[str]:
    """Every breach of the rules we follow, as ``RULE: where: what``."""
    found: list[str] = []
    packages_by_dir: dict[str, set[str]] = {}
    defined = {fd.name: _defined(fd) for fd in fds.file}
    for fd in fds.file:
        where = fd.name
        directory, _, filename = fd.name.rpartition("/")
        packages_by_dir.setdefault(directory, set()).add(fd.package)
        if fd.syntax != "proto3":
            found.append(f"SYNTAX_SPECIFIED: {where}: syntax is {fd.syntax or 'unset'}, not proto3")
        if not _LOWER_SNAKE.match(filename.removesuffix(".proto")):
            found.append(f"FILE_LOWER_SNAKE_CASE: {where}")
        if not fd.package:
            found.append(f"PACKAGE_DEFINED: {where}: no package")
        else:
            parts = fd.package.split(".")
            if not all(_LOWER_SNAKE.match(p) for p in parts):
                found.append(f"PACKAGE_LOWER_SNAKE_CASE: {where}: {fd.package}")
            if directory != "/".join(parts):
                found.append(
                    f"PACKAGE_DIRECTORY_MATCH: {where}: package {fd.package} is not directory {directory}"
                )
            if not _VERSION.match(parts[-1]):
                found.append(f"PACKAGE_VERSION_SUFFIX: {where}: {fd.package} does not end in a version")
        if fd.public_dependency or fd.weak_dependency:
            found.append(f"IMPORT_NO_PUBLIC / IMPORT_NO_WEAK: {where}")
        for name, m in _messages(fd.package, list(fd.message_type)):
            if not _PASCAL.match(m.name):
                found.append(f"MESSAGE_PASCAL_CASE: {name}")
            for f in m.field:
                if not _LOWER_SNAKE.match(f.name):
                    found.append(f"FIELD_LOWER_SNAKE_CASE: {name}.{f.name}")
            # proto3 `optional` makes a synthetic oneof named _field: not the proto's to name.
            synthetic = {f.oneof_index for f in m.field if f.proto3_optional}
            for i, o in enumerate(m.oneof_decl):
                if i not in synthetic and not _LOWER_SNAKE.match(o.name):
                    found.append(f"ONEOF_LOWER_SNAKE_CASE: {name}.{o.name}")
        for name, e in _enums(fd):
            found += _enum_violations(name, e)
        for s in fd.service:
            if not _PASCAL.match(s.name):
                found.append(f"SERVICE_PASCAL_CASE: {fd.package}.{s.name}")
            for rpc in s.method:
                if not _PASCAL.match(rpc.name):
                    found.append(f"RPC_PASCAL_CASE: {fd.package}.{s.name}.{rpc.name}")
        found += _unused_imports(fd, defined)
    for directory, packages in packages_by_dir.items():
        if len(packages) > 1:
            found.append(f"DIRECTORY_SAME_PACKAGE: {directory}: {sorted(packages)}")
    return found


def _enum_violations(name: str, e: descriptor_pb2.EnumDescriptorProto) -> list[str]:
    found = []
    if not _PASCAL.match(e.name):
        found.append(f"ENUM_PASCAL_CASE: {name}")
    if e.options.allow_alias:
        found.append(f"ENUM_NO_ALLOW_ALIAS: {name}")
    prefix = PREFIX_EXCEPTIONS.get(name, upper_snake(e.name) + "_")
    for v in e.value:
        if not _UPPER_SNAKE.match(v.name):
            found.append(f"ENUM_VALUE_UPPER_SNAKE_CASE: {name}.{v.name}")
        if not v.name.startswith(prefix):
            found.append(f"ENUM_VALUE_PREFIX: {name}.{v.name} does not start with {prefix}")
    zero = next((v for v in e.value if v.number == 0), None)
    if zero is None or e.value[0].number != 0:
        found.append(f"ENUM_FIRST_VALUE_ZERO: {name}")
    elif name not in ZERO_VALUE_EXCEPTIONS and not zero.name.endswith("_UNSPECIFIED"):
        found.append(f"ENUM_ZERO_VALUE_SUFFIX: {name}.{zero.name} does not end in _UNSPECIFIED")
    return found


def _defined(fd: descriptor_pb2.FileDescriptorProto) -> set[str]:
    return {name for name, _ in _messages(fd.package, list(fd.message_type))} | {
        name for name, _ in _enums(fd)
    }


def _unused_imports(fd: descriptor_pb2.FileDescriptorProto, defined: dict[str, set[str]]) -> list[str]:
    """IMPORT_USED: some field or rpc of the file names a type the imported file defines."""
    used = {f.type_name.lstrip(".") for _, m in _messages(fd.package, list(fd.message_type)) for f in m.field}
    used |= {t.lstrip(".") for s in fd.service for rpc in s.method for t in (rpc.input_type, rpc.output_type)}
    return [
        f"IMPORT_USED: {fd.name} imports {dep} unused" for dep in fd.dependency if not used & defined[dep]
    ]


# ---------------------------------------------------------------- the protos


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorSet:
    return descriptor_set(PROTO_DIR, tmp_path_factory.mktemp("protos"))


def test_the_protos_follow_the_buf_rules_we_keep(ours: descriptor_pb2.FileDescriptorSet) -> None:
    assert sorted(fd.name for fd in ours.file)[0].startswith("gradualdiff/v1/")
    assert violations(ours) == []


def test_the_exceptions_are_still_needed(ours: descriptor_pb2.FileDescriptorSet) -> None:
    """An exception whose enum is gone or now follows the rule is dropped from the list, not kept as a hole."""
    enums = {name: e for fd in ours.file for name, e in _enums(fd)}
    for name in ZERO_VALUE_EXCEPTIONS:
        zero = next(v for v in enums[name].value if v.number == 0)
        assert not zero.name.endswith("_UNSPECIFIED"), name
    for name, prefix in PREFIX_EXCEPTIONS.items():
        assert upper_snake(enums[name].name) + "_" != prefix


def test_upper_snake_is_bufs() -> None:
    assert upper_snake("DType") == "D_TYPE"
    assert upper_snake("HTTPServer") == "HTTP_SERVER"
    assert upper_snake("LrSchedule") == "LR_SCHEDULE"
    assert upper_snake("Phase2Timing") == "PHASE2_TIMING"


_BAD = """\
syntax = "proto3";
package Wrong.v1;
enum colour { RED = 0; COLOUR_blue = 1; }
message bad_message {
  string FieldName = 1;
  optional int32 fine = 2;
  oneof Choice { int32 one = 3; }
  enum Inner { INNER_NONE = 0; }
}
service lower { rpc do_it(bad_message) returns (bad_message); }
"""


def test_the_check_finds_each_kind_of_breach(tmp_path: Path) -> None:
    root = tmp_path / "protos"
    (root / "other" / "v1").mkdir(parents=True)
    (root / "other" / "v1" / "BadFile.proto").write_text(_BAD)
    (root / "other" / "v1" / "second.proto").write_text(
        'syntax = "proto3";\npackage other.v1;\nimport "other/v1/BadFile.proto";\nmessage Ok {}\n'
    )
    rules = {v.split(":")[0] for v in violations(descriptor_set(root, tmp_path))}
    assert rules == {
        "FILE_LOWER_SNAKE_CASE",
        "PACKAGE_LOWER_SNAKE_CASE",
        "PACKAGE_DIRECTORY_MATCH",
        "MESSAGE_PASCAL_CASE",
        "FIELD_LOWER_SNAKE_CASE",
        "ONEOF_LOWER_SNAKE_CASE",
        "ENUM_PASCAL_CASE",
        "ENUM_VALUE_UPPER_SNAKE_CASE",
        "ENUM_VALUE_PREFIX",
        "ENUM_ZERO_VALUE_SUFFIX",
        "SERVICE_PASCAL_CASE",
        "RPC_PASCAL_CASE",
        "DIRECTORY_SAME_PACKAGE",
        "IMPORT_USED",
    }
