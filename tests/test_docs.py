"""docs/plugins.md documents every hook and every argument (like datasette's test_docs)."""

import inspect
import re
from pathlib import Path

import pytest

from yugongd import hookspecs

DOC = (Path(__file__).parent.parent / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_every_hook_has_a_section_with_its_signature(name):
    assert f"### {name}" in DOC, f"docs/plugins.md has no section for {name}"
    args = list(inspect.signature(getattr(hookspecs, name)).parameters)
    assert f"`{name}({', '.join(args)})`" in DOC, f"the section of {name} lacks its signature"


def test_no_documented_hook_is_missing_from_the_specs():
    documented = set(re.findall(r"^### (yugongd_\w+)", DOC, re.M))
    assert documented == set(hookspecs.HOOK_NAMES)


def test_the_eight_hooks_of_the_contract():
    assert set(hookspecs.HOOK_NAMES) == {
        "yugongd_configure",
        "yugongd_authenticate",
        "yugongd_authorize",
        "yugongd_select_key",
        "yugongd_upstream_response",
        "yugongd_upstream_failure",
        "yugongd_usage",
        "yugongd_request_finished",
    }
