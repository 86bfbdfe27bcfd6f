"""Generate the Python stubs in common/pb from protos/ (``make proto``), or check them.

The generated modules are committed so that installing the package needs no
protoc; ``--check`` regenerates into a temporary tree and fails on any
difference, which is how a test notices stubs that drifted from the contract.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE_DIR = Path("common") / "pb"


def proto_files() -> list[Path]:
    """The .proto sources, relative to protos/, in a stable order."""
    return sorted(p.relative_to(PROTO_DIR) for p in PROTO_DIR.rglob("*.proto"))


def generate(out_root: Path) -> list[Path]:
    """Run protoc into ``out_root``; return the generated files relative to it."""
    plugin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        # The virtual include path makes protoc emit `from common.pb... import`,
        # so the stubs import as a normal package without sys.path tricks.
        f"-I{PACKAGE_DIR.as_posix()}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
    ]
    args += [(PACKAGE_DIR / p).as_posix() for p in proto_files()]
    # protoc resolves the virtual path against the mapping, not the cwd.
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
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
