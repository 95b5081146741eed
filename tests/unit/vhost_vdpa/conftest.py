from __future__ import annotations

from collections.abc import Iterator

import pytest

from vdpasim.testing.vhost_vdpa import VdpaEnv


@pytest.fixture
def env() -> Iterator[VdpaEnv]:
    environment = VdpaEnv()
    try:
        yield environment
    finally:
        environment.close()
