"""atomic_write: the one way every side replaces a file it will trust later."""

from __future__ import annotations

import stat

import pytest

from jobs.atomic_files import atomic_write


@pytest.mark.parametrize("durable", [True, False])
def test_a_write_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path, durable):
    path = tmp_path / "ledger.jsonl"
    atomic_write(path, b"old\n", durable=durable)

    def half_then_crash(handle):
        handle.write(b"new but not fin")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_crash, durable=durable)
    assert path.read_bytes() == b"old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.jsonl"]


def test_bytes_or_a_writer_give_the_same_file_with_the_mode_asked_for(tmp_path):
    by_bytes, by_writer = tmp_path / "a" / "x.json", tmp_path / "b" / "x.json"
    atomic_write(by_bytes, b'{"k": 1}\n', durable=True)  # the folder is made
    atomic_write(by_writer, lambda handle: handle.write(b'{"k": 1}\n'), durable=False, mode=0o644)
    assert by_bytes.read_bytes() == by_writer.read_bytes() == b'{"k": 1}\n'
    assert stat.S_IMODE(by_bytes.stat().st_mode) == 0o600
    assert stat.S_IMODE(by_writer.stat().st_mode) == 0o644


def test_an_interrupt_leaves_nothing_under_the_final_name_nor_a_temporary(tmp_path):
    def crash(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "i.dcm", crash, durable=True, prefix=".partial-")
    # the temporary is removed on the way out; nothing is left under the final name either
    assert not (tmp_path / "i.dcm").exists()
    assert list(tmp_path.glob(".partial-*")) == []
