"""Debian kernels: resolve ``debian:SERIES`` to the newest package of that series, fetch
it with apt under a private configuration, unpack it into the cache.

apt runs as an ordinary user with its own configuration (``APT_CONFIG`` pointing at a file
in the cache): its own ``sources.list`` (the suites of the series, component ``main`` of
``http://deb.debian.org/debian``, ``signed-by`` the Debian archive keyring), its own
package lists, an empty ``dpkg`` status file and its own archive cache. The system's apt
configuration and state are not read or touched, and no root is needed. apt checks the
``InRelease`` signatures against ``/usr/share/keyrings/debian-archive-keyring.gpg`` and
every package against the hashes of the signed lists: that verification is the trust
anchor, and nothing here turns it off. The lists are refreshed when they are over a day
old (or missing); when that fails (offline) the older lists are used, so a kernel in
the cache boots without the network.

Resolving a series: ``apt-cache pkgnames`` lists the names that start like the series'
packages; the names that match the series' pattern exactly and have a candidate version
are ranked by their numbers (the ABI number ``-NN`` of 5.10 and 6.1, the point release
and Debian revision of 6.12 and 7.x), so a point release that appears or goes away is
picked up without any hard-coded version. From 7.x the ``linux-image-VER`` package is a
metapackage: the image is in ``linux-binary-VER`` and the modules in
``linux-modules-VER``, both fetched.

Unpacking uses ``dpkg-deb -x`` into a temporary folder renamed into place, so a cache
entry is either complete or absent; of the modules only KVM's and their dependencies are
kept (about 5 MiB of a tree of hundreds). Images are ``boot/vmlinuz-VER`` (up to 6.x) or
``usr/lib/modules/VER/vmlinuz`` (7.x); modules are under ``lib/modules/VER`` or
``usr/lib/modules/VER``.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memslots.tools.kernels.initramfs import prune_modules
from memslots.tools.kernels.spec import ARCHES, DEBIAN_SERIES, KernelBootError, cache_dir

__all__ = [
    "DEBIAN_KEYRING",
    "DEBIAN_MIRROR",
    "DebianKernel",
    "apt_config_text",
    "fetch_debian_kernel",
    "package_pattern",
    "rank_packages",
]

DEBIAN_MIRROR: Final = "http://deb.debian.org/debian"
DEBIAN_KEYRING: Final = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: refresh the package lists when they are older than this
LISTS_MAX_AGE: Final = 24 * 3600.0
_TIMEOUT: Final = 600.0
_PROGRESS_EVERY: Final = 5.0


@dataclass(frozen=True, slots=True)
class DebianKernel:
    """An unpacked Debian kernel: the package, its version, the image and the modules
    tree (None when the package has no modules)."""

    package: str
    version: str
    image: Path
    modules: Path | None


def apt_config_text(root: Path) -> str:
    """The private apt configuration for the apt folder ``root``: every path apt writes
    or reads state from is inside ``root``; both architectures' lists are fetched."""
    return (
        f'Dir::Etc::SourceList "{root}/sources.list";\n'
        f'Dir::Etc::SourceParts "{root}/sources.list.d";\n'
        f'Dir::Etc::Preferences "{root}/preferences";\n'
        f'Dir::Etc::PreferencesParts "{root}/preferences.d";\n'
        f'Dir::State::Lists "{root}/lists";\n'
        f'Dir::State::status "{root}/status";\n'
        f'Dir::Cache "{root}/cache";\n'
        f'Dir::Log "{root}/log";\n'
        'APT::Architectures { "amd64"; "arm64"; };\n'
        'Acquire::Languages "none";\n'
        'Acquire::Retries "1";\n'
        'Acquire::http::Timeout "30";\n'
    )


def sources_list_text(suites: tuple[str, ...]) -> str:
    """``sources.list`` lines for ``suites`` of the Debian mirror, component main,
    signed by the Debian archive keyring."""
    return "".join(
        f"deb [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {suite} main\n" for suite in suites
    )


def package_pattern(series: str, debarch: str, flavour: str = "") -> str:
    """The regex of the image packages of ``series`` for the Debian architecture
    ``debarch`` and ``flavour`` (``"-16k"``: ``linux-image-6.12.117+deb13-arm64-16k``).

    >>> names = ["linux-image-6.12.9+deb13-arm64", "linux-image-6.12.9+deb13-arm64-16k"]
    >>> rank_packages(names, package_pattern("6.12", "arm64", "-16k"))
    ['linux-image-6.12.9+deb13-arm64-16k']
    """
    return DEBIAN_SERIES[series][1].format(arch=re.escape(debarch + flavour))


def rank_packages(names: list[str], pattern: str) -> list[str]:
    """The ``names`` that match ``pattern`` (a regex with numeric groups) exactly, the
    highest numbers first."""
    rx = re.compile(pattern)
    ranked: list[tuple[tuple[int, ...], str]] = []
    for name in names:
        m = rx.fullmatch(name)
        if m:
            ranked.append((tuple(int(g) for g in m.groups()), name))
    ranked.sort(reverse=True)
    return [name for _, name in ranked]


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Apt:
    """apt-get and apt-cache under the private configuration of one series."""

    def __init__(self, root: Path, suites: tuple[str, ...]) -> None:
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if shutil.which(tool) is None:
                raise KernelBootError(
                    f"{tool} not found: fetching Debian kernels needs apt and dpkg"
                    " (or give a kernel image path instead of debian:SERIES)"
                )
        if not Path(DEBIAN_KEYRING).is_file():
            raise KernelBootError(
                f"{DEBIAN_KEYRING} not found: apt-get install debian-archive-keyring"
            )
        self.root = root
        for sub in ("lists/partial", "cache/archives/partial", "sources.list.d", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "preferences.d").mkdir(exist_ok=True)
        _write_if_changed(root / "apt.conf", apt_config_text(root))
        _write_if_changed(root / "sources.list", sources_list_text(suites))
        status = root / "status"
        if not status.exists():
            status.write_bytes(b"")
        self.env = {**os.environ, "APT_CONFIG": str(root / "apt.conf"), "LC_ALL": "C"}

    def run(self, *args: str, cwd: Path | None = None, note: str = "") -> str:
        """Run an apt command under the private configuration; its stdout. With
        ``note``, a progress line every few seconds while it runs (downloads)."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(list(args), env=self.env, cwd=cwd, stdout=out, stderr=err)
            except OSError as exc:
                raise KernelBootError(f"{args[0]}: {exc.strerror or exc}") from None
            start = time.monotonic()
            try:
                while True:
                    try:
                        code = proc.wait(timeout=_PROGRESS_EVERY)
                        break
                    except subprocess.TimeoutExpired:
                        waited = time.monotonic() - start
                        if waited > _TIMEOUT:
                            raise KernelBootError(
                                f"{args[0]} {args[1]}: no answer in {_TIMEOUT:.0f} s"
                            ) from None
                        if note:
                            _progress(f"{note} ({waited:.0f} s)")
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            out.seek(0)
            err.seek(0)
            stdout = out.read().decode("utf-8", "replace")
            stderr = err.read().decode("utf-8", "replace")
        if code != 0:
            errors = [ln for ln in stderr.splitlines() if ln.startswith(("E:", "Err:"))]
            why = (errors or stderr.strip().splitlines() or ["failed"])[-1]
            raise KernelBootError(f"{args[0]} {' '.join(args[1:3])}: {why}")
        return stdout

    def update(self, force: bool = False) -> None:
        stamp = self.root / "lists" / ".updated"
        fresh = stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE
        if fresh and not force:
            return
        _progress(f"updating the Debian package lists ({self.root})...")
        try:
            self.run("apt-get", "update", "-q", note="updating the Debian package lists")
        except KernelBootError as exc:
            if not stamp.exists():
                raise
            # offline, say: the lists fetched before still resolve the series (and a
            # kernel unpacked before is used without any download)
            _progress(f"keeping the package lists of before: {exc}")
            return
        stamp.write_bytes(b"")

    def show(self, name: str) -> dict[str, str]:
        """The candidate's fields (empty if none)."""
        try:
            text = self.run("apt-cache", "show", "--no-all-versions", name)
        except KernelBootError:
            return {}
        fields: dict[str, str] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(": ")
            if sep and not key.startswith(" "):
                fields.setdefault(key, value)
        return fields


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def fetch_debian_kernel(series: str, arch: str = "x86_64", flavour: str = "") -> DebianKernel:
    """The newest Debian kernel of ``series`` for ``arch``, fetched and unpacked into the
    cache (only the lists are refreshed when it is there already); ``flavour`` is the
    suffix of another flavour of that architecture (``"-16k"``: arm64 with 16 KiB pages).
    Progress on stderr. Raises :class:`KernelBootError`."""
    if series not in DEBIAN_SERIES:
        raise KernelBootError(
            f"unknown Debian kernel series {series!r}: known are {', '.join(DEBIAN_SERIES)}"
        )
    root = cache_dir() / "apt" / series
    root.mkdir(parents=True, exist_ok=True)
    # one process at a time per series: apt's own locks would fail a second one
    with (root / ".memslots.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_locked(series, arch, root, flavour)


def _fetch_locked(series: str, arch: str, root: Path, flavour: str = "") -> DebianKernel:
    debarch = ARCHES[arch]
    suites = DEBIAN_SERIES[series][0]
    apt = _Apt(root, suites)
    apt.update()
    pattern = package_pattern(series, debarch, flavour)
    prefix = pattern.split("\\")[0]  # "linux-image-5"
    names = rank_packages(apt.run("apt-cache", "pkgnames", prefix).split(), pattern)
    for name in names:
        fields = apt.show(f"{name}:{debarch}")
        if fields.get("Version"):
            break
    else:
        raise KernelBootError(f"debian:{series}: no {pattern} package in {', '.join(suites)}")
    version = fields["Version"]
    dest = cache_dir() / "debian" / f"{name}_{version}"
    if not dest.is_dir():
        packages = [name]
        for dep in re.split(r",\s*", fields.get("Depends", "")):
            dep_name = dep.split()[0] if dep else ""
            if dep_name.startswith(("linux-binary-", "linux-modules-")):
                packages.append(dep_name)
        _download_and_unpack(apt, packages, debarch, dest)
    return _locate(name, version, dest)


def _download_and_unpack(apt: _Apt, packages: list[str], debarch: str, dest: Path) -> None:
    archives = apt.root / "cache" / "archives"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        for pkg in packages:
            size = int(apt.show(f"{pkg}:{debarch}").get("Size", "0") or 0)
            amount = f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"
            _progress(f"fetching {pkg} ({amount})...")
            apt.run(
                "apt-get",
                "download",
                "-q",
                f"{pkg}:{debarch}",
                cwd=archives,
                note=f"fetching {pkg}",
            )
            debs = list(archives.glob(f"{pkg}_*_{debarch}.deb"))
            if not debs:
                raise KernelBootError(f"apt-get download {pkg}: no .deb appeared in {archives}")
            deb = max(debs, key=lambda p: p.stat().st_mtime)
            done = subprocess.run(
                ["dpkg-deb", "-x", str(deb), str(tmp)],
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                check=False,
            )
            if done.returncode != 0:
                raise KernelBootError(f"dpkg-deb -x {deb.name}: {done.stderr.strip()}")
            deb.unlink()  # the unpacked tree is what the cache keeps
        for tree in [*tmp.glob("lib/modules/*"), *tmp.glob("usr/lib/modules/*")]:
            prune_modules(tree)  # the KVM modules and their dependencies stay
        for bulky in [*tmp.glob("usr/share"), *tmp.glob("usr/lib/debug")]:
            shutil.rmtree(bulky, ignore_errors=True)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _locate(name: str, version: str, root: Path) -> DebianKernel:
    """The image and modules tree inside an unpacked package."""
    images = sorted(root.glob("boot/vmlinuz-*")) + sorted(root.glob("usr/lib/modules/*/vmlinuz"))
    if not images:
        raise KernelBootError(f"{root}: no boot/vmlinuz-* or usr/lib/modules/*/vmlinuz inside")
    trees = sorted(root.glob("lib/modules/*")) + sorted(root.glob("usr/lib/modules/*"))
    modules = next((t for t in trees if t.is_dir()), None)
    return DebianKernel(name, version, images[0], modules)
