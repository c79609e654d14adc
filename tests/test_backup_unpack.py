"""The client side of `replicator backup` unpacks only what a snapshot can hold: regular files under their known
names, each once; links, special files, absolute or `..` paths and cut streams are refused by name."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from replicator.backup import _ChunkReader, backup, receive_tar
from replicator.errors import SnapshotFailed
from tests.support.nats_server import free_port


def _tar(*members: tuple[str, bytes | None, bytes]) -> bytes:
    """(name, link target or None, content) -> an uncompressed tar."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, link, content in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = link.decode()
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def _receive(raw: bytes, dest: Path, chunk: int = 7) -> int:
    chunks = iter([raw[i : i + chunk] for i in range(0, len(raw), chunk)])
    return receive_tar(_ChunkReader(chunks), dest)  # type: ignore[arg-type]


def test_a_snapshot_tar_unpacks(tmp_path: Path) -> None:
    raw = _tar(("agents/a.db", None, b"A" * 1000), ("dead_letters.db", None, b"D"), ("manifest.json", None, b"{}"))
    assert _receive(raw, tmp_path) == 1003
    assert (tmp_path / "agents" / "a.db").read_bytes() == b"A" * 1000
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "agents/a.db",
        "dead_letters.db",
        "manifest.json",
    ]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ((("../evil.db", None, b"x"),), "unexpected file '../evil.db'"),
        ((("agents/../../evil.db", None, b"x"),), "unexpected file"),
        ((("/etc/evil", None, b"x"),), "unexpected file '/etc/evil'"),
        ((("agents/a.db", b"/etc/passwd", b""),), "unexpected link or special file 'agents/a.db'"),
        ((("agents/Not-An-Id.db", None, b"x"),), "unexpected file"),
        ((("notes.txt", None, b"x"),), "unexpected file 'notes.txt'"),
        ((("agents/a.db", None, b"1"), ("agents/a.db", None, b"2")), "unexpected file 'agents/a.db'"),
    ],
)
def test_anything_else_is_refused(
    tmp_path: Path, members: tuple[tuple[str, bytes | None, bytes], ...], message: str
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SnapshotFailed, match=message):
        _receive(_tar(*members), dest)
    assert not (tmp_path / "evil.db").exists() and not Path("/etc/evil").exists()


def test_a_cut_stream_is_refused(tmp_path: Path) -> None:
    raw = _tar(("agents/a.db", None, b"A" * 5000), ("manifest.json", None, b"{}"))
    with pytest.raises(SnapshotFailed, match="not a complete tar archive"):
        _receive(raw[:2000], tmp_path)
    with pytest.raises(SnapshotFailed, match="not a complete tar archive"):
        _receive(b"<html>not a tar</html>" * 40, tmp_path / "other")


def test_backup_from_an_unreachable_htpc_says_so_and_keeps_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert backup(url, None, tmp_path / "dest") == 2
    err = capsys.readouterr().err
    assert f"cannot fetch a backup from {url}" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no partial directory, no destination


def test_backup_refuses_a_destination_that_holds_something(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "old.txt").write_text("mine")
    assert backup("http://127.0.0.1:1", None, tmp_path / "dest") == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert (tmp_path / "dest" / "old.txt").read_text() == "mine"
