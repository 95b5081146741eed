"""``require_program``: a bench finds its peer's program, or installs its packages, or says what to install."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vdpasim.bench.common import require_program
from vdpasim.errors import UsageError


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir()
    monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin")  # ours first: the stand-in apt-get wins
    return directory


def test_a_missing_program_is_installed_with_apt_get(bin_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the install path runs as root only: run the suite as root, as CI does")
    calls = bin_dir / "calls"
    # A stand-in apt-get: records its arguments and "installs" the program, as the real one would.
    _executable(
        bin_dir / "apt-get",
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        f'if [ "$1" = install ]; then printf "#!/bin/sh\\n" > {bin_dir}/peer-tool; chmod +x {bin_dir}/peer-tool; fi\n',
    )
    said: list[str] = []
    assert require_program("peer-tool", ["pkg-a", "pkg-b"], said.append) == str(bin_dir / "peer-tool")
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq pkg-a pkg-b"]
    assert said == ["peer-tool not found: installing pkg-a pkg-b with apt-get"]
    assert require_program("peer-tool", ["pkg-a"], said.append) == str(bin_dir / "peer-tool")  # found: no apt
    assert len(calls.read_text().splitlines()) == 2


def test_a_failed_install_says_what_to_install_and_why(bin_dir: Path) -> None:
    _executable(bin_dir / "apt-get", '#!/bin/sh\necho "E: Unable to locate package $4" >&2\nexit 100\n')
    with pytest.raises(UsageError, match=r"apt-get install nothing-here; .*Unable to locate package"):
        require_program("peer-tool", ["nothing-here"], lambda text: None)


def test_without_apt_get_the_error_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get at all
    with pytest.raises(UsageError, match=r"peer-tool not found: install it \(Debian: apt-get install pkg-a pkg-b"):
        require_program("peer-tool", ["pkg-a", "pkg-b"], lambda text: None)
