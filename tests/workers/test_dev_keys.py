"""Development keys (`bulwark up`, `bulwark keys init`) follow the catalogue: a keys folder
made before a new task family was added grants the demo producer the new family too."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from workers.security.keys import DEMO_TASKS, dev_keys, read_trust, write_trust


def test_an_old_demo_grant_is_brought_up_to_date(tmp_path: Path) -> None:
    made = dev_keys(tmp_path)
    store = read_trust(made.trust_file)
    demo = store.identity("demo")
    assert demo is not None and demo.grant.tasks == DEMO_TASKS
    old = replace(demo, grant=replace(demo.grant, tasks=("payments.*",)))  # an older folder
    write_trust(made.trust_file, store.with_identity(old))
    again = dev_keys(tmp_path)
    demo_now = read_trust(again.trust_file).identity("demo")
    assert demo_now is not None and demo_now.grant.tasks == DEMO_TASKS
    assert demo_now.keys == demo.keys, "the same key: only the grant changed"
    assert again.key_files["demo"].read_bytes() == made.key_files["demo"].read_bytes()
