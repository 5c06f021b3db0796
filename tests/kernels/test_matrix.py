"""The kernel matrix: the engine checked against Debian's kernels, each booted under QEMU
(``make test-kernels``; not part of ``make test``, which stays under five minutes).

Every kernel runs ``memslots conform --kernel debian:SERIES --ops 2000`` through the
command line, as a user runs it, and must agree on every call; the real QEMU traces of
``tests/data/traces`` are replayed against 6.1 and 7.2 and must agree with the kernel on
every record. A summary table (agreement, calls, boot and run time per kernel) ends the
run. Needs QEMU (``qemu-system-x86``, ``qemu-system-arm``), gcc (and
``gcc-aarch64-linux-gnu`` with ``libc6-dev-arm64-cross`` for arm64) and, the first time,
Debian's archive; what is missing is named in the skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memslots.profiles import KernelProfile

TRACES = sorted((Path(__file__).parent.parent / "data" / "traces").glob("*.log"))
OPS = int(os.environ.get("MEMSLOTS_MATRIX_OPS", "2000"))
SEED = int(os.environ.get("MEMSLOTS_MATRIX_SEED", "1"))

#: (series, arch, extra options): Debian's x86-64 kernels with 4-level paging, 7.2 with
#: 5-level paging too, and the arm64 kernels, with 4 KiB pages and with 16 KiB pages
#: (Debian's arm64-16k flavour: ``debian:SERIES/16k``)
KERNELS = [
    ("5.10", "x86_64", ()),
    ("6.1", "x86_64", ()),
    ("6.12", "x86_64", ()),
    ("7.2", "x86_64", ()),
    ("7.2", "x86_64", ("--paging", "5")),
    ("6.12", "arm64", ()),
    ("7.2", "arm64", ()),
    ("6.12/16k", "arm64", ()),
    ("7.2/16k", "arm64", ()),
]

#: rows of the summary table, filled by the tests
RESULTS: list[dict[str, object]] = []


def _missing(arch: str) -> str | None:
    qemu = "qemu-system-x86_64" if arch == "x86_64" else "qemu-system-aarch64"
    if shutil.which(qemu) is None:
        return f"{qemu} is not installed"
    cc = "gcc" if arch == "x86_64" else "aarch64-linux-gnu-gcc"
    if shutil.which(cc) is None:
        return f"{cc} is not installed"
    return None


def _memslots(*args: str, timeout: float = 900) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "memslots", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done, time.monotonic() - t0


def _name(series: str, arch: str, extra: tuple[str, ...]) -> str:
    """``7.2/x86_64 la57``, ``6.12/arm64-16k``: the named profile's name, and the paging."""
    series, _, pages = series.partition("/")
    return f"{series}/{arch}" + (f"-{pages}" if pages else "") + (" la57" if extra else "")


@pytest.mark.parametrize(
    ("series", "arch", "extra"),
    KERNELS,
    ids=[_name(*k).replace(" ", "-") for k in KERNELS],
)
def test_conform_agrees_on_every_call(series: str, arch: str, extra: tuple[str, ...]) -> None:
    missing = _missing(arch)
    if missing:
        pytest.skip(missing)
    done, seconds = _memslots(
        "conform", "--kernel", f"debian:{series}", "--arch", arch, *extra,
        "--ops", str(OPS), "--seed", str(SEED), "--json",
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    kernel = report["kernel"]
    RESULTS.append(
        {
            "kernel": _name(series, arch, extra),
            "release": kernel["release"],
            "what": f"conform --ops {OPS} --seed {SEED}",
            "agreed": report["agreed"],
            "calls": report["calls"],
            "seconds": round(seconds, 1),
        }
    )
    assert report["disagreements"] == [], json.dumps(report["disagreements"], indent=1)
    assert report["agreement"] == 1.0
    assert report["calls"] >= OPS * 0.9  # nearly every operation is a compared call
    assert done.returncode == 0
    if arch == "arm64":  # the named profile is what the probe measured
        probed = KernelProfile.from_dict(kernel)
        named = KernelProfile.named(_name(series, arch, extra))
        assert named.differences(probed) == []


@pytest.mark.parametrize("series", ["6.1", "7.2"])
@pytest.mark.parametrize("trace", TRACES, ids=[t.name for t in TRACES])
def test_real_traces_agree_with_the_kernel(series: str, trace: Path) -> None:
    missing = _missing("x86_64")
    if missing:
        pytest.skip(missing)
    done, seconds = _memslots("replay", str(trace), "--kernel", f"debian:{series}", "--json")
    assert done.returncode in (0, 1), done.stderr
    doc = json.loads(done.stdout)
    disagreements = [d for vm in doc["vms"] for d in vm["disagreements"]]
    calls = sum(vm["calls"] for vm in doc["vms"])
    RESULTS.append(
        {
            "kernel": f"{series}/x86_64",
            "release": "",
            "what": f"replay {trace.name}",
            "agreed": calls - len(disagreements),
            "calls": calls,
            "seconds": round(seconds, 1),
        }
    )
    # the engine, the array and the kernel agree with each other and with the recording
    assert disagreements == [], json.dumps(disagreements, indent=1)
    assert done.returncode == 0
