"""Build (and cache) the test guest: a Debian 6.12 kernel and a busybox initramfs that runs workloads.

The end-to-end tests boot a real Linux guest under QEMU. Everything it needs comes from Debian
packages fetched with ``apt-get download`` (no root, nothing installed on the host): the newest
``linux-image-6.12.*-amd64`` apt knows (6.12 is the Debian kernel with VDUSE, vhost-vdpa and
virtio-vdpa; bookworm's default 6.1 has no vDPA at all) and ``busybox-static``. Debian ships the
modules as ``.ko.xz`` without ``modules.dep`` and busybox's ``insmod`` cannot read xz, so the chosen
modules are decompressed, their dependencies resolved from each module's ``.modinfo`` section, and
``depmod`` is run on the result. The few tools busybox lacks are small C programs compiled
statically here (``vdpasim/guest/c``). The initramfs is written directly as a newc cpio (so
``/dev/console`` can be created without root) and gzip-compressed, with fixed timestamps.

Cache: ``$VDPASIM_CACHE_DIR`` or ``~/.cache/vdpasim``. ``debs/`` keeps downloaded packages,
``guest/<key>/`` a finished image, where the key hashes every input (package names and versions,
module list, /init, C sources, this file, the compiler version). A finished image appears by an atomic
rename of a private build directory, under a per-key lock, so concurrent builds neither corrupt
nor duplicate work, and a repeated build costs a few ``apt-cache`` queries.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import VdpasimError

__all__ = [
    "DEFAULT_MODULES",
    "GuestBuildError",
    "GuestImage",
    "build_guest",
    "cache_dir",
    "newc_archive",
    "pick_packages",
]

# virtio_pci, virtio and virtio_ring are built into the 6.12 kernel; failover and net_failover come in as
# virtio_net's dependencies, netfs and 9pnet as 9p's.
DEFAULT_MODULES: tuple[str, ...] = (
    "virtio_net",
    "virtio_blk",
    "9pnet_virtio",
    "9p",
    "vdpa",
    "vhost_iotlb",
    "vhost",
    "vhost_vdpa",
    "vduse",
    "virtio_vdpa",
)

BUSYBOX_PACKAGE = "busybox-static"
_HERE = Path(__file__).resolve().parent
_C_DIR = _HERE / "c"
# name of the tool in the image -> its C source
_C_TOOLS = {
    "vdpasim-pktloop": "pktloop.c",
    "vdpasim-channels": "channels.c",
    "vdpasim-blkop": "blkop.c",
    "vdpasim-blkverify": "blkverify.c",
}
# Also handed to apt-cache as a regular expression.
_KERNEL_NAME = re.compile(r"^linux-image-6\.12\.([0-9]+)\+deb[0-9]+-amd64(-unsigned)?$")

Progress = Callable[[str], None]


class GuestBuildError(VdpasimError):
    """The guest image cannot be built (missing package or tool, failed download or compile)."""


@dataclass(frozen=True)
class GuestImage:
    """A finished image in the cache: boot it with ``-kernel`` and ``-initrd``."""

    directory: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    manifest: dict

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(
            directory=directory,
            kernel=directory / "vmlinuz",
            initrd=directory / "initrd.img",
            kernel_version=manifest["kernel_version"],
            manifest=manifest,
        )


def cache_dir() -> Path:
    return Path(os.environ.get("VDPASIM_CACHE_DIR") or Path.home() / ".cache" / "vdpasim")


def _run(cmd: Sequence[str | os.PathLike[str]], **kwargs) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{cmd[0]} not found: run scripts/setup.sh (it installs the Debian packages)") from e
    if proc.returncode != 0:
        raise GuestBuildError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def _candidates(names: Iterable[str]) -> dict[str, str]:
    """apt's candidate version of each package (names or regular expressions; no candidate: left out)."""
    out = _run(["apt-cache", "policy", *names]).stdout
    versions: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version != "(none)":
                versions[current] = version
    return versions


def pick_packages(progress: Progress | None = None) -> dict[str, tuple[str, str]]:
    """The (name, version) of the kernel and busybox packages to build from, in one apt query.

    The kernel is the newest linux-image-6.12.N amd64 package apt can download (unsigned preferred
    on a tie); ``$VDPASIM_GUEST_KERNEL`` pins a package name instead. Stale package lists (a
    container image's, say, without bookworm-security where Debian carries 6.12) are refreshed once
    when we are root; otherwise the error says what to run.
    """
    pinned = os.environ.get("VDPASIM_GUEST_KERNEL")
    wanted = [BUSYBOX_PACKAGE, pinned or _KERNEL_NAME.pattern]
    versions = _candidates(wanted)
    kernels = [n for n in versions if n == pinned or (not pinned and _KERNEL_NAME.match(n))]
    if (not kernels or BUSYBOX_PACKAGE not in versions) and os.geteuid() == 0:
        if progress:
            progress("apt knows no candidate for a needed package: running apt-get update")
        _run(["apt-get", "update", "-qq"])
        versions = _candidates(wanted)
        kernels = [n for n in versions if n == pinned or (not pinned and _KERNEL_NAME.match(n))]
    if BUSYBOX_PACKAGE not in versions:
        raise GuestBuildError(f"apt has no candidate for {BUSYBOX_PACKAGE}: run `apt-get update`")
    if not kernels:
        raise GuestBuildError(
            f"apt has no candidate for {pinned}"
            if pinned
            else "apt knows no linux-image-6.12.*-amd64 package: run `apt-get update` with bookworm-security "
            "(or another suite carrying Linux 6.12) in the sources"
        )

    def rank(name: str) -> tuple[int, bool]:
        m = _KERNEL_NAME.match(name)
        return (int(m.group(1)), bool(m.group(2))) if m else (0, False)

    kernel = max(kernels, key=rank)
    return {"kernel": (kernel, versions[kernel]), "busybox": (BUSYBOX_PACKAGE, versions[BUSYBOX_PACKAGE])}


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compiler_version() -> str:
    return _run(["gcc", "-dumpfullversion"]).stdout.strip()


def _cache_key(packages: dict[str, tuple[str, str]], modules: Sequence[str]) -> tuple[str, dict]:
    inputs = {
        "packages": packages,
        "modules": sorted(modules),
        "init": _file_digest(_HERE / "init.sh"),
        "c": {tool: _file_digest(_C_DIR / src) for tool, src in sorted(_C_TOOLS.items())},
        "builder": _file_digest(Path(__file__)),
        "gcc": _compiler_version(),
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20], inputs


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download(name: str, version: str, debs: Path, progress: Progress) -> Path:
    """The .deb of name=version, from the cache or downloaded into it (atomically)."""
    debs.mkdir(parents=True, exist_ok=True)
    pattern = f"{name}_{version.replace(':', '%3a')}_*.deb"  # apt's file name for an epoch
    found = sorted(debs.glob(pattern))
    if found:
        return found[0]
    progress(f"downloading {name} {version}")
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        _run(["apt-get", "download", "-q", f"{name}={version}"], cwd=tmp)
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise GuestBuildError(f"apt-get download {name}={version} produced {got}")
        target = debs / got[0].name
        os.replace(got[0], target)
    return target


def _modinfo_depends(ko: bytes) -> list[str]:
    """The ``depends=`` entry of a module's .modinfo ELF section (ELF64 little-endian, as on amd64)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2 or ko[5] != 1:
        raise GuestBuildError("not an ELF64 little-endian kernel module")
    (shoff,) = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, offset, size

    _, strtab, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if ko[strtab + name : ko.index(b"\0", strtab + name)] == b".modinfo":
            for entry in ko[offset : offset + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends=") :].decode()
                    return [d.replace("-", "_") for d in value.split(",") if d]
            return []
    raise GuestBuildError("kernel module without a .modinfo section")


def _resolve_modules(moddir: Path, wanted: Sequence[str], out_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Decompress ``wanted`` and their dependencies into out_dir (same relative paths, .ko).

    Returns (name, relative path) in load order (dependencies first), and the wanted names that are
    built into the kernel.
    """
    index: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        index[path.name.split(".ko")[0].replace("-", "_")] = path
    builtin = {
        Path(line).name.split(".ko")[0].replace("-", "_") for line in (moddir / "modules.builtin").read_text().split()
    }
    order: list[tuple[str, str]] = []
    done: set[str] = set()
    builtin_wanted: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise GuestBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in index:
            if name in builtin:
                if not chain:
                    builtin_wanted.append(name)
                done.add(name)
                return
            raise GuestBuildError(f"module {name} is not in the kernel package")
        src = index[name]
        data = lzma.decompress(src.read_bytes()) if src.suffix == ".xz" else src.read_bytes()
        for dep in _modinfo_depends(data):
            visit(dep, (*chain, name))
        rel = src.relative_to(moddir).as_posix()
        rel = rel[: rel.index(".ko")] + ".ko"
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        done.add(name)
        order.append((name, rel))

    for name in wanted:
        visit(name.replace("-", "_"), ())
    return order, builtin_wanted


def newc_archive(entries: Iterable[tuple[str, int, bytes | str | tuple[int, int]]]) -> bytes:
    """A newc ("070701") cpio archive of (path, mode, content) with uid/gid 0 and mtime 0.

    content is bytes for a file, a str (link target) for a symlink, (major, minor) for a device node,
    ``b""`` for a directory; mode carries the file type bits.
    """
    out = io.BytesIO()

    def put(ino: int, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (ino, mode, 0, 0, 2 if mode & 0o170000 == 0o040000 else 1, 0, len(data), 0, 0, *rdev)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        encoded = name.encode() + b"\0"
        header += b"%08x%08x" % (len(encoded), 0)
        out.write(header + encoded)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (path, mode, content) in enumerate(entries, start=1):
        if isinstance(content, tuple):
            put(ino, path, mode, b"", content)
        elif isinstance(content, str):
            put(ino, path, mode, content.encode())
        else:
            put(ino, path, mode, content)
    put(0, "TRAILER!!!", 0, b"")
    return out.getvalue()


def _tree_entries(root: Path) -> list[tuple[str, int, bytes | str | tuple[int, int]]]:
    entries: list[tuple[str, int, bytes | str | tuple[int, int]]] = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if path.is_symlink():
            entries.append((rel, 0o120777, os.readlink(path)))
        elif path.is_dir():
            entries.append((rel, 0o040755, b""))
        else:
            entries.append((rel, 0o100000 | (st.st_mode & 0o777), path.read_bytes()))
    return entries


def _build(
    work: Path, out: Path, kernel_deb: Path, busybox_deb: Path, modules: Sequence[str], progress: Progress
) -> dict:
    progress(f"extracting {kernel_deb.name}")
    kroot = work / "kernel"
    _run(["dpkg-deb", "-x", kernel_deb, kroot])
    _run(["dpkg-deb", "-x", busybox_deb, work / "busybox"])
    (moddir,) = (kroot / "lib" / "modules").iterdir()
    kver = moddir.name
    (vmlinuz,) = (kroot / "boot").glob("vmlinuz-*")

    root = work / "root"
    for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "run", "mnt", "host", "root", "etc/vdpasim"):
        (root / d).mkdir(parents=True, exist_ok=True)

    progress(f"resolving and decompressing modules for {kver}")
    target_moddir = root / "lib" / "modules" / kver
    order, builtin = _resolve_modules(moddir, modules, target_moddir)
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (moddir / name).exists():
            shutil.copy(moddir / name, target_moddir / name)
    _run(["depmod", "-b", root, kver])
    (root / "etc/vdpasim/modules").write_text("".join(f"{name} {rel}\n" for name, rel in order))

    progress("installing busybox and its applets")
    busybox = work / "busybox" / "bin" / "busybox"
    shutil.copy(busybox, root / "bin" / "busybox")
    applets = _run([busybox, "--list"]).stdout.split()
    for applet in applets:
        if applet not in ("busybox", "linuxrc", "init"):
            (root / "bin" / applet).symlink_to("busybox")

    progress(f"compiling static helpers: {', '.join(_C_TOOLS)}")
    for tool, src in _C_TOOLS.items():
        _run(["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", "-Werror", "-o", root / "bin" / tool, _C_DIR / src])

    init = root / "init"
    shutil.copy(_HERE / "init.sh", init)
    init.chmod(0o755)
    image_info = {
        "kernel_version": kver,
        "modules": [name for name, _ in order],
        "builtin": builtin,
        "tools": sorted(_C_TOOLS),
    }
    (root / "etc/vdpasim/image.json").write_text(json.dumps(image_info, sort_keys=True, separators=(",", ":")))

    progress("writing the initramfs")
    # The kernel opens /dev/console for init before /init can mount devtmpfs.
    devices = [("dev/console", 0o020600, (5, 1)), ("dev/null", 0o020666, (1, 3))]
    archive = newc_archive([*_tree_entries(root), *devices])
    with gzip.GzipFile(out / "initrd.img", "wb", compresslevel=6, mtime=0) as gz:
        gz.write(archive)
    shutil.copy(vmlinuz, out / "vmlinuz")
    return image_info


def build_guest(
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    cache: Path | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> GuestImage:
    """Build the guest image, or return the cached one whose inputs are the same."""
    say = progress or (lambda _msg: None)
    root = cache or cache_dir()
    packages = pick_packages(say)
    key, inputs = _cache_key(packages, modules)
    final = root / "guest" / key
    if (final / "manifest.json").exists() and not force:
        say(f"guest image {key} is cached in {final}")
        return GuestImage.load(final)

    with _locked(root / "guest" / f".{key}.lock"):
        if (final / "manifest.json").exists() and not force:
            return GuestImage.load(final)
        started = time.monotonic()
        say(f"building guest image {key} ({' '.join(packages['kernel'])})")
        kernel_deb = _download(*packages["kernel"], root / "debs", say)
        busybox_deb = _download(*packages["busybox"], root / "debs", say)
        with tempfile.TemporaryDirectory(dir=root / "guest", prefix=f".build-{key}-") as tmp:
            out = Path(tmp) / "out"
            out.mkdir()
            info = _build(Path(tmp), out, kernel_deb, busybox_deb, modules, say)
            manifest = {"key": key, "inputs": inputs, **info}
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            if final.exists():  # forced rebuild (or a damaged entry): replaced only once the new one is complete
                shutil.rmtree(final)
            os.rename(out, final)
        say(f"guest image {key} built in {time.monotonic() - started:.1f} s: {final}")
    return GuestImage.load(final)
