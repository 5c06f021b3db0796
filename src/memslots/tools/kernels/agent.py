"""Building the guest agent (``agent.c``, shipped with memslots) for an architecture.

The agent is a small static C program (``gcc -static``; ``aarch64-linux-gnu-gcc -static``
for arm64) and the guest's ``/init``: see ``agent.c`` for what it does and
:mod:`memslots.tools.kernels.protocol` for how the host talks to it. It is built at first
use into the cache, under a name keyed by a hash of its source, the compiler's path and
the compiler's ``--version``, so an edited source or another compiler gives a new build
and a cached build is never stale.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Final

from memslots.tools.kernels.spec import KernelBootError, cache_dir

__all__ = ["COMPILERS", "agent_source", "build_agent"]

#: architecture -> (compiler, the packages that provide it and its static C library)
COMPILERS: Final = {
    "x86_64": ("gcc", "gcc libc6-dev"),
    "arm64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu libc6-dev-arm64-cross"),
}
_CFLAGS: Final = ("-static", "-O2", "-Wall", "-Wextra", "-std=gnu11")


def agent_source() -> bytes:
    """The agent's C source, as shipped in the package."""
    return resources.files("memslots.tools.kernels").joinpath("agent.c").read_bytes()


def build_agent(arch: str = "x86_64") -> Path:
    """The agent binary for ``arch``: from the cache, or compiled into it now. Raises
    :class:`KernelBootError` naming the packages to install when the compiler is missing
    or cannot link statically."""
    compiler, packages = COMPILERS[arch]
    path = shutil.which(compiler)
    if path is None:
        raise KernelBootError(f"{compiler} not found: apt-get install {packages}")
    source = agent_source()
    try:
        version = subprocess.run(
            [path, "--version"], capture_output=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KernelBootError(f"{compiler} --version: {exc}") from None
    key = hashlib.sha256(source + b"\0" + path.encode() + b"\0" + version).hexdigest()[:16]
    out = cache_dir() / "agents" / f"{arch}-{key}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="memslots-agent-") as tmp:
        src = Path(tmp) / "agent.c"
        src.write_bytes(source)
        exe = Path(tmp) / "agent"
        try:
            done = subprocess.run(
                [path, *_CFLAGS, "-o", str(exe), str(src)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KernelBootError(f"{compiler}: {exc}") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            raise KernelBootError(
                f"{compiler} -static could not build the agent ({last}): apt-get install {packages}"
            )
        staged = out.with_name(f".{out.name}.{os.getpid()}")
        shutil.copyfile(exe, staged)
        staged.chmod(0o755)
        staged.replace(out)
    return out
