"""The ``gdfed`` command: one entry point, a subcommand per job.

Each subcommand lives in the package that owns it and is imported only when
chosen, so ``gdfed status`` does not pay for importing torch.

Errors are mapped here, once, so no subcommand has to: whatever escapes a
subcommand becomes one line on stderr, ``gdfed COMMAND: what is wrong; what to
do``, and an exit code (docs/operator.md, "Exit codes and errors"):

    0    done
    1    a failure at run time: the aggregator refused or could not be reached,
         an I/O error, a bug (with a hint to rerun with --debug)
    2    usage or configuration: a flag, a setting or a named file that cannot work
    130  interrupted (Ctrl-C)
    141  stdout was closed by its reader (``gdfed status | head``): stop quietly

``--debug`` prints the traceback above that line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # what a shell reports for a command killed by SIGPIPE

# name -> (module, help). The module defines ``add_arguments(parser)`` and ``run(args) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.cli", "run the aggregator daemon"),
    "status": ("server.admin_cli", "show the run, its rounds and sites (--watch to follow)"),
    "admin": (
        "server.admin_control",
        "steer a run: pause, resume, close-round, evict, reload-tokens, policy",
    ),
    "work": ("client.cli", "run a site's worker: train locally, send only what changed"),
    "init-state": (
        "client.init_state",
        "write the trainable state at round 0 from a model, for serve --init-state",
    ),
    "export": ("client.export", "write a published round as a Hugging Face model directory"),
    "demo": (
        "client.demo",
        "a whole federation on this machine: `gdfed demo init DIR`, `gdfed demo run DIR`",
    ),
    "codec-demo": ("common.codec_demo", "encode and decode a generated delta, and show what travels"),
    "token": ("server.token_cli", "a new site token, and the hashed line for the aggregator's tokens file"),
}


class UsageError(Exception):
    """A flag, file or setting the command cannot work with (exit code 2).

    The message names it and says what to do; the top level prints it as the one line.
    """


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the usage above them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` given, only that subcommand's module is imported (its flags added).

    ``None`` imports every one; a name of none (``""``) imports none, for ``gdfed --help`` and
    errors before the subcommand.
    """
    parser = Parser(prog="gdfed", description="Federated fine-tuning by weight differences.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module)
        if command is None or command == name:
            _load(module, "add_arguments")(sub_parser)
    # The global flags work before the subcommand and after it (``gdfed admin pause --debug``).
    for each in _parsers(parser):
        _add_global_flags(each, top=each is parser)
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Below the top, SUPPRESS: a subparser's default would overwrite what was given before it.
    default: object = False if top else argparse.SUPPRESS
    taken = parser._option_string_actions  # a subcommand's own -v (none has one yet) wins
    if "-v" not in taken and "--verbose" not in taken:
        parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    if "--debug" not in taken:
        parser.add_argument(
            "--debug", action="store_true", default=default, help="print the traceback of an error"
        )


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every subparser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _load(module: str, attr: str) -> Callable[..., object]:
    fn: Callable[..., object] = getattr(importlib.import_module(module), attr)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gdfed``; returns the exit code (see the module docstring)."""
    # Models are local paths, never hub names: keep transformers from reaching for the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    words = list(sys.argv[1:] if argv is None else argv)
    # The subcommand is the first word that is not an option (the top level has only flags).
    command = next((w for w in words if not w.startswith("-")), None)
    known = command if command in SUBCOMMANDS else None
    # Read before parsing: an error while the parser is built (an import) is reported by it too.
    debug = "--debug" in words
    parser: argparse.ArgumentParser | None = None
    args: argparse.Namespace | None = None
    try:
        # No subcommand (or an unknown one): import none of their modules ("" matches no name).
        parser = build_parser(known or "")
        args = parser.parse_args(words)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        code = _load(args._module, "run")(args)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return int(code) if isinstance(code, int) else 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            raise
        # ``raise SystemExit("message")``: a command giving up on what it was asked for.
        return _report(EXIT_USAGE, str(exc.code), known, debug=debug)
    except BaseException as exc:  # the one place every error is mapped
        if isinstance(exc, BrokenPipeError) and _stdout_closed():
            _silence_stdout()
            return EXIT_PIPE_CLOSED
        code, message = classify(exc, args, parser)
        action = getattr(args, "action", None)  # gdfed admin's
        return _report(code, message, f"{known} {action}" if known and action else known, debug=debug)


def _report(code: int, message: str, command: str | None, *, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    elif code == EXIT_RUNTIME and message.startswith("internal error"):
        message += " (rerun with --debug for the traceback)"
    message = " ".join(part.strip() for part in message.splitlines() if part.strip())  # one line, always
    print(f"gdfed {command}: {message}" if command else f"gdfed: {message}", file=sys.stderr, flush=True)
    return code


def classify(
    exc: BaseException,
    args: argparse.Namespace | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> tuple[int, str]:
    """The exit code and the one line for ``exc``, raised by a subcommand run with ``args``."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    # Checked by name in sys.modules: an error of a module is only raised once it is imported, and
    # importing grpc or common.errors here would slow down every command, `gdfed --help` too.
    grpc = sys.modules.get("grpc")
    if grpc is not None and isinstance(exc, grpc.RpcError):
        return EXIT_RUNTIME, _rpc_message(exc, getattr(args, "aggregator", None))
    errors = sys.modules.get("common.errors")
    if errors is not None and isinstance(exc, errors.GdfedError):
        runtime = (errors.DataLoss, errors.TruncatedStream, errors.RoundClosed, errors.LimitExceeded)
        return (EXIT_RUNTIME if isinstance(exc, runtime) else EXIT_USAGE), exc.message
    if isinstance(exc, FileNotFoundError | NotADirectoryError | IsADirectoryError | PermissionError):
        if exc.filename is None:  # raised with a message of its own, which names the file
            return EXIT_USAGE, str(exc)
        flag = _flag_of(str(exc.filename), args, parser)
        problem = (exc.strerror or str(exc)).lower()
        return EXIT_USAGE, f"{flag + ' ' if flag else ''}{exc.filename}: {problem}"
    if isinstance(exc, OSError):
        return EXIT_RUNTIME, str(exc)
    return EXIT_RUNTIME, f"internal error: {type(exc).__name__}: {exc}"


# What to do about a failed call, by status code.
_RPC_HINTS = {
    "UNAVAILABLE": "is the aggregator running, and is --aggregator its address?",
    "UNAUTHENTICATED": "check the token file (or the token's environment variable)",
    "PERMISSION_DENIED": "this token may not make this call",
    "DEADLINE_EXCEEDED": "the aggregator did not answer in time",
}


def _rpc_message(exc: BaseException, target: str | None) -> str:
    code_of = getattr(exc, "code", None)
    details_of = getattr(exc, "details", None)
    code = code_of() if callable(code_of) else None
    name = getattr(code, "name", "ERROR")
    details = (details_of() if callable(details_of) else None) or str(exc)
    hint = _RPC_HINTS.get(name)
    return f"aggregator {target or '?'}: {name}: {details}" + (f"; {hint}" if hint else "")


def _flag_of(
    path: str, args: argparse.Namespace | None, parser: argparse.ArgumentParser | None
) -> str | None:
    """The flag whose value is ``path`` ("--token-file"), if one is."""
    if args is None or parser is None:
        return None
    given = {dest for dest, value in vars(args).items() if value is not None and str(value) == path}
    for each in _parsers(parser):
        for action in each._actions:
            if action.dest in given and action.option_strings:
                return action.option_strings[-1]
            if action.dest in given:
                return action.dest.upper()  # a positional argument: its metavar
    return None


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader went away (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout() -> None:
    # Python flushes stdout once more at exit; with the pipe gone that prints a second error.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    # `python -m common.cli` runs this file as __main__; the subcommands import `common.cli` (for
    # UsageError), a second copy. Run that copy's main, so `except UsageError` sees their class.
    from common.cli import main as _main

    sys.exit(_main())
