"""The test suite. The shared helpers' assertions (testbed, tests.support) are rewritten like
the tests' own, so that a failing one shows its values."""

import pytest

pytest.register_assert_rewrite("testbed", "tests.support")
