"""Generate the Python stubs in common/pb from protos/ (``make proto``), or check them.

The generated modules are committed so that installing the package needs no
protoc; ``--check`` regenerates into a temporary tree and fails on any
difference, which is how a test notices stubs that drifted from the contract.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE_DIR = Path("common") / "pb"


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The .proto sources, relative to ``proto_dir``, in a stable order."""
    return sorted(p.relative_to(proto_dir) for p in proto_dir.rglob("*.proto"))


_FROM_IMPORT = re.compile(r"^(\s*)from gradualdiff\.v1 import", re.MULTILINE)
_MODULE_REF = re.compile(r"(?<![\w./])gradualdiff([./])v1\1(\w+_pb2(?:_grpc)?)\b")


def _rewrite_imports(text: str) -> str:
    """Point generated imports at ``common.pb``, where the stubs are installed.

    The protos import each other as ``gradualdiff/v1/...`` (so that ``protoc -I protos``
    works for anyone, in any language); protoc's Python plugins turn that into
    ``gradualdiff.v1`` modules, which exist in this package only under ``common.pb``.
    Only module references are rewritten (``from gradualdiff.v1 import``, ``..._pb2``
    names): the proto package ``gradualdiff.v1`` inside descriptors and method paths
    is the wire contract and stays as it is.
    """
    text = _FROM_IMPORT.sub(r"\1from common.pb.gradualdiff.v1 import", text)
    return _MODULE_REF.sub(lambda m: f"common{m[1]}pb{m[1]}gradualdiff{m[1]}v1{m[1]}{m[2]}", text)


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root``; return the generated files relative to it."""
    plugin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        args = [
            "grpc_tools.protoc",
            # The same include root a third party uses: protos/ alone.
            f"-I{PROTO_DIR}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_out={scratch}",
            f"--mypy_grpc_out={scratch}",
        ]
        args += [(PROTO_DIR / p).as_posix() for p in proto_files()]
        code = protoc.main(args)
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        for path in sorted(scratch.rglob("*")):
            if path.is_file():
                target = out_root / PACKAGE_DIR / path.relative_to(scratch)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(_rewrite_imports(path.read_text(encoding="utf-8")), encoding="utf-8")
    generated = []
    for path in sorted((out_root / PACKAGE_DIR).rglob("*")):
        if path.is_file():
            generated.append(path.relative_to(out_root))
    # Every generated directory must be a package for mypy and for imports.
    directories = {p.parent for p in generated}
    directories |= {
        parent for d in directories for parent in d.parents if PACKAGE_DIR in (parent, *parent.parents)
    }
    for directory in sorted(directories):
        init = out_root / directory / "__init__.py"
        if not init.exists():
            init.write_text("")
            generated.append(init.relative_to(out_root))
    return sorted(generated)


def check() -> list[str]:
    """Regenerate into a temporary tree; return the paths that differ from the committed ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = []
        for rel in fresh:
            committed = ROOT / rel
            if not committed.exists():
                problems.append(f"missing: {rel}")
            elif not filecmp.cmp(Path(tmp) / rel, committed, shallow=False):
                problems.append(f"differs: {rel}")
        fresh_set = {str(p) for p in fresh}
        for path in (ROOT / PACKAGE_DIR).rglob("*"):
            rel_path = path.relative_to(ROOT)
            generated_here = path.is_file() and "__pycache__" not in path.parts
            if (
                generated_here
                and str(rel_path) not in fresh_set
                and rel_path.name not in ("__init__.py", "py.typed")
            ):
                problems.append(f"stale: {rel_path}")
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if common/pb is out of date")
    args = parser.parse_args()
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("common/pb is out of date: run `make proto`", file=sys.stderr)
            return 1
        print("common/pb matches protos/")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            target = ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, target)
            print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
