"""Hardening, second round (issue 25): the descriptor store loses no data and tells no lies.

Each test reproduces a finding of the audit and fails without its fix. The command-line
tests call :func:`quests_torch.cli.main` in-process (no subprocess: torch is imported once).
"""

from __future__ import annotations

import pytest

from quests_torch.resume import TableInUseError, table_lock

# --------------------------------------------------------------------------------------------
# 12. a lock is an flock on a file that stays; a holder sees its file removed or replaced
# --------------------------------------------------------------------------------------------


def test_a_deleted_lock_file_is_seen_by_its_holder(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("frame\n")
    with table_lock(table) as held:
        held.check()  # still the file at the path
        held.path.unlink()  # a user "cleaning up" a lock that looks stale
        with table_lock(table) as second:  # a second run gets in on a new file ...
            with pytest.raises(TableInUseError, match="removed or replaced while this process"):
                held.check()  # ... and the first one stops instead of writing beside it
            second.check()
    assert held.path.exists()  # beside an output, the lock file stays: nothing to clean up


def test_a_lock_without_output_leaves_nothing(tmp_path):
    table = tmp_path / "new" / "t.csv"
    with table_lock(table):
        with pytest.raises(TableInUseError, match="in use by another screening"):
            with table_lock(table):
                pass
    assert not (tmp_path / "new").exists()
