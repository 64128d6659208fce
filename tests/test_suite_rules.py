"""Rules of the suite itself: with DSMD_NO_SKIPS=1 (as .ci/run sets it) a skip fails the run."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.mark.parametrize("body", [
    "import pytest\n\ndef test_browser():\n    pytest.skip('chromium not found')\n",
    "import pytest\n\npytest.importorskip('a_package_that_is_not_installed')\n\ndef test_x():\n    pass\n",
], ids=["in-a-test", "at-collection"])
def test_a_skip_fails_the_run_only_when_skips_are_refused(pytester, monkeypatch, body):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_one=body)
    monkeypatch.delenv("DSMD_NO_SKIPS", raising=False)
    assert pytester.runpytest("-p", "no:cacheprovider").ret in (0, 5)  # a skip alone is a pass
    monkeypatch.setenv("DSMD_NO_SKIPS", "1")
    refused = pytester.runpytest("-p", "no:cacheprovider")
    assert refused.ret == 1
    refused.stdout.fnmatch_lines(["*skips refused (DSMD_NO_SKIPS=1)*", "*test_one.py*"])


def test_ci_refuses_skips():
    assert "DSMD_NO_SKIPS=1 make test" in (Path(__file__).parents[1] / ".ci" / "run").read_text()
