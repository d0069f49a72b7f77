"""The README's settings table is the one `bulwark settings --markdown` prints."""

from __future__ import annotations

import contextlib
import io

from tests.kit import ROOT
from workers.ops.cli import main


def test_readme_settings_table_is_current() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["settings", "--markdown"]) == 0
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- settings table")
    table = readme[readme.index("\n", start) + 1 : readme.index("<!-- end settings table -->")]
    assert table == out.getvalue()


def test_readme_leads_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```sh", 1)[1].split("```", 1)[0]
    assert first_block.strip().splitlines()[0].startswith("make run")
    assert first_block.strip().splitlines()[1].startswith("make test")
