"""Shared by every test: the test kits' own assertions report values, as the tests' do."""

import pytest

pytest.register_assert_rewrite("vdpasim.testing")
