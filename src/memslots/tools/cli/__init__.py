"""The ``memslots`` command line tool.

Each subcommand lives in its own module of this package, ``memslots.tools.cli.NAME``, and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` (a callable
taking the parsed namespace and returning an exit status). :data:`COMMANDS` lists them
with their one-line help; a module is imported only when its subcommand runs (or its
``--help`` is asked for), so ``memslots --version`` and ``memslots --help`` load none of
them. A new subcommand is one entry there and its module.

Errors reach the user as one line on stderr and a non-zero exit status, never as a
traceback (the statuses of docs/cli.md's table): a :class:`CliError`, a
:class:`memslots.errors.KvmUnavailable`, a memslot error, an OS error (status 2), Ctrl-C
(status 130), standard output that is closed, full or fails (status 2; a reader that went
away, ``| head``, ends the output silently), even a bug (``internal error``, status 1;
the environment variable ``MEMSLOTS_TRACEBACK=1`` lets its traceback through). Standard
error that is closed or fails is written to no more.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from memslots.errors import KvmUnavailable, MemslotError

TYPE_CHECKING = False  # typing is not imported: ``memslots --version`` stays fast
if TYPE_CHECKING:
    from typing import IO, Any, NoReturn

    import rich.console

#: every subcommand, in the order ``memslots --help`` lists them: its name (its module is
#: ``memslots.tools.cli.NAME``) and its one-line help (the module's parser says the same,
#: tests/test_cli_parser.py checks it)
COMMANDS: tuple[tuple[str, str], ...] = (
    ("replay", "replay a memslot trace on the engine, the array and /dev/kvm, and compare"),
    (
        "check",
        "explain every failed call of a trace and find what loses data or faults the guest",
    ),
    ("record", "run a VMM (or attach to one) and record its memslot calls, one trace per run"),
    (
        "bench",
        "memslot_perf_test scenarios and a slot-count sweep: the engine (compiled and pure),"
        " the array design, the kernel and peer libraries",
    ),
    ("conform", "random operation sequences against /dev/kvm: agreement rate, minimal reproducers"),
    ("stress", "concurrent readers check every lookup while a writer changes slots"),
    ("demo", "a short tour of the engine, printing the memory map"),
    ("profiles", "list the named kernel profiles (what each kernel answers differently)"),
)

#: the subcommands' names, in the order ``memslots --help`` lists them
SUBCOMMANDS = tuple(name for name, _ in COMMANDS)

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
    import memslots
    from memslots._build import installed_compiled

    build = "compiled build (mypyc)" if installed_compiled() else "pure-Python build"
    python = ".".join(map(str, sys.version_info[:3]))
    return f"memslots {memslots.__version__}, {build}, Python {python}"


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
    # highlight=False: rich would colour numbers, paths and brackets of plain text at random
    return Console(file=file, stderr=stderr, width=None if tty else PIPE_WIDTH, highlight=False)


class _Version(argparse.Action):
    """``--version``, computed only when asked for (it imports the engine)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and the build")

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        print(version_text())
        parser.exit()


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, with the width found as ``shutil.get_terminal_size``
    finds it (``$COLUMNS``, the terminal, else 80) without importing shutil, which every
    ``add_argument`` would (``memslots --version`` stays fast)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        if width is None:
            width = _columns() - 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors, like every other error of the tool:
    ``memslots replay: error: argument --impl: invalid choice: ... (memslots replay
    --help lists the options)``, exit status 2. Subcommands' parsers are of this class
    too."""

    #: the subcommands' parsers, by name (on the top-level parser)
    subcommands: dict[str, argparse.ArgumentParser]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

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


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The top-level parser. The subcommands named in ``commands`` (default: every one)
    get their real parser, which imports their module; the others only a name and a help
    line in ``memslots --help``, which imports nothing."""
    wanted = set(SUBCOMMANDS if commands is None else commands)
    parser = _Parser(
        prog="memslots",
        description="KVM's tree-based memslots: replay traces, benchmark, check conformance.",
    )
    parser.add_argument("--version", action=_Version)
    # (prog given: argparse would otherwise format a usage line, importing shutil)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", prog="memslots")
    for name, help_text in COMMANDS:
        if name in wanted:
            module = importlib.import_module(f"memslots.tools.cli.{name}")
            module.register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    parser.subcommands = dict(sub.choices)
    return parser


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the
    top-level options take no value), or None."""
    for i, word in enumerate(argv):
        if word == "--":
            return argv[i + 1] if i + 1 < len(argv) else None
        if not word.startswith("-") or word == "-":
            return word
    return None


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
            words = sys.argv[1:] if argv is None else list(argv)
            parser = build_parser([c] if (c := command_of(words)) in SUBCOMMANDS else [])
            try:
                args = parser.parse_args(argv)
                if not getattr(args, "func", None):
                    parser.error(f"no command given: one of {', '.join(SUBCOMMANDS)}")
            except SystemExit as exc:  # --help, --version, a usage error (already said)
                status = exc.code if isinstance(exc.code, int) else 2
            else:
                if args.command:
                    command = f"memslots {args.command}"
                if out is None and args.command not in _NO_STDOUT:
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
            if reported:  # a file that cannot be read or written: status 2, as the table says
                _say(f"{command}: error: {os_error_text(exc)}")
                status = 2
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
