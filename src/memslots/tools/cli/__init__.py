"""The ``memslots`` command line tool.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (a callable taking the
parsed namespace and returning an exit status). Errors reach the user as one line on
stderr and a non-zero exit status, never as a traceback: a :class:`CliError`, a
:class:`memslots.errors.KvmUnavailable`, a memslot error, an OS error, Ctrl-C (status
130), standard output that is closed, full or fails (status 2; a reader that went away,
``| head``, ends the output silently), even a bug (``internal error``, status 1; the
environment variable ``MEMSLOTS_TRACEBACK=1`` lets its traceback through). Standard
error that is closed or fails is written to no more.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any, NoReturn

from memslots.errors import KvmUnavailable, MemslotError

if TYPE_CHECKING:
    import rich.console

#: subcommand modules, in the order ``memslots --help`` lists them
SUBCOMMANDS = ("replay", "check", "record", "bench", "conform", "stress", "demo", "profiles")

#: subcommands that write nothing to standard output unless asked to (``record -o -``
#: checks for itself)
_NO_STDOUT = frozenset({"record"})


class CliError(Exception):
    """A user-facing error: printed as one line, exit status ``status``."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def version_text() -> str:
    """What ``memslots --version`` prints: the version, the build and the Python."""
    import platform

    import memslots

    build = "compiled build (mypyc)" if memslots.COMPILED else "pure-Python build"
    return f"memslots {memslots.__version__}, {build}, Python {platform.python_version()}"


#: the width of rich's output when it goes to a file or a pipe: wide enough for every
#: table of the tool (a terminal's own width is used)
PIPE_WIDTH = 160


def console(*, stderr: bool = False, file: IO[str] | None = None) -> rich.console.Console:
    """A ``rich.console.Console`` for a subcommand's output (standard output, standard
    error with ``stderr=True``, or ``file``): the terminal's width on a terminal,
    :data:`PIPE_WIDTH` columns otherwise, so that ``memslots bench > results.txt`` keeps
    every column instead of rich's 80 columns and cells cut short."""
    from rich.console import Console

    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    try:
        tty = stream.isatty()
    except (ValueError, OSError):  # a closed stream: its writes are reported elsewhere
        tty = False
    return Console(file=file, stderr=stderr, width=None if tty else PIPE_WIDTH)


class _Version(argparse.Action):
    """``--version``, computed only when asked for (it imports the engine)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and the build")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other error of the tool:
    ``memslots replay: error: argument --impl: invalid choice: ... (memslots replay
    --help lists the options)``, exit status 2. Subcommands' parsers are of this class
    too."""

    #: the subcommands' parsers, by name (on the top-level parser)
    subcommands: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        _say(f"{self.prog}: error: {message} ({self.prog} --help lists the options)")
        raise SystemExit(2)

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: None = None
    ) -> argparse.Namespace:
        """As argparse's, with arguments left over reported by the subcommand they were
        given to (``memslots replay: error: unrecognized arguments: ...``)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            sub = getattr(self, "subcommands", {}).get(getattr(parsed, "command", None))
            (sub or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = _Parser(
        prog="memslots",
        description="KVM's tree-based memslots: replay traces, benchmark, check conformance.",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"memslots.tools.cli.{name}")
        module.register(sub)
    parser.subcommands = dict(sub.choices)
    return parser


class _Stdout:
    """Standard output as the commands write to it: a write or flush that fails is
    remembered (``failed``), so that :func:`main` reports it as standard output's even
    where a library swallowed the error."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.failed: OSError | None = None

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            self.failed = self.failed or exc
            raise

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            self.failed = self.failed or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _Stderr:
    """Standard error that never raises: after its first failed write it drops
    everything (there is nowhere left to report anything)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def _guarded_streams() -> Iterator[_Stdout | None]:
    """``sys.stdout`` and ``sys.stderr`` wrapped for the duration of a command (see
    :class:`_Stdout`, :class:`_Stderr`; a closed standard error becomes ``/dev/null``);
    yields the stdout wrapper, None when standard output is closed."""
    real_out, real_err = sys.stdout, sys.stderr
    devnull = None
    out = _Stdout(real_out) if real_out is not None else None
    if real_err is None:
        devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
        err: Any = devnull
    else:
        err = _Stderr(real_err)
    sys.stdout, sys.stderr = out, err
    try:
        yield out
    finally:
        if sys.stdout is out:
            sys.stdout = real_out
        if sys.stderr is err:
            sys.stderr = real_err
        if devnull is not None:
            devnull.close()


def os_error_text(exc: OSError) -> str:
    """``FILE: reason`` (or just the reason) of an OS error, on one line."""
    why = exc.strerror or str(exc)
    return f"{exc.filename}: {why}" if exc.filename else why


def _say(line: str) -> None:
    """One line on standard error (never raises)."""
    try:
        if sys.stderr is not None:
            print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _silence_stdout(out: _Stdout) -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's last flush of what is
    still buffered succeeds instead of complaining at exit."""
    try:
        fd = out.stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def _stdout_failed(command: str, out: _Stdout, status: int, reported: bool) -> int:
    """Standard output failed (``out.failed``): a reader that went away (EPIPE) ends the
    output silently with the command's status; anything else is an error, status 2
    (said once: not again when the command has ``reported`` it)."""
    exc = out.failed
    _silence_stdout(out)
    if exc is not None and exc.errno == errno.EPIPE:
        return status
    if reported:
        return status or 2
    why = (exc.strerror if exc is not None else None) or str(exc)
    _say(f"{command}: error: standard output: {why}")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memslots`` command line; returns the exit status."""
    command = "memslots"
    with _guarded_streams() as out:
        status, reported = 0, True
        try:
            parser = build_parser()
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # --help, --version, a usage error (already said)
                status = exc.code if isinstance(exc.code, int) else 2
            else:
                if args.command:
                    command = f"memslots {args.command}"
                if not getattr(args, "func", None):
                    parser.print_help()
                    status = 2
                elif out is None and args.command not in _NO_STDOUT:
                    raise CliError("standard output is closed")
                else:
                    try:
                        status = args.func(args)
                    except SystemExit as exc:  # rich ends a run whose stdout reader left
                        failed = out.failed if out is not None else None
                        if failed is not None and failed.errno == errno.EPIPE:
                            status = 0
                        else:
                            status = exc.code if isinstance(exc.code, int) else 1
            if out is not None:
                out.flush()
            reported = False
        except CliError as exc:
            _say(f"{command}: error: {exc}")
            status = exc.status
        except KvmUnavailable as exc:
            _say(f"{command}: error: {exc}")
            status = 2
        except MemslotError as exc:
            _say(f"{command}: error: {exc.errno_name}: {exc.strerror}")
            status = 1
        except OSError as exc:
            reported = out is None or out.failed is None
            if reported:
                _say(f"{command}: error: {os_error_text(exc)}")
                status = 1
        except KeyboardInterrupt:
            _say(f"{command}: interrupted")
            status = 130
        except Exception as exc:  # a bug: still one line, unless asked for the traceback
            if os.environ.get("MEMSLOTS_TRACEBACK"):
                raise
            _say(
                f"{command}: internal error: {type(exc).__name__}: {exc} (a bug: please report"
                " it; MEMSLOTS_TRACEBACK=1 shows where)"
            )
            status = 1
        if out is not None and out.failed is not None:
            return _stdout_failed(command, out, status, reported)
        return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
