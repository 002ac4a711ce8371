"""Files and folders written atomically get the modes a plain open/mkdir would give (the umask), not 0600/0700."""

import os
import stat

import pytest

from speechtrim.assets.cache import atomic_dir, atomic_file, write_json_atomic


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_atomic_file_respects_the_umask(tmp_path, umask_022):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    os.umask(0o077)
    with atomic_file(tmp_path / "b.txt") as handle:
        handle.write("private")
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_atomic_dir_respects_the_umask(tmp_path, umask_022):
    with atomic_dir(tmp_path / "folder") as staging:
        (staging / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_file(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.json") as handle:
            handle.write("half")
            raise RuntimeError("disk full")
    assert (tmp_path / "a.json").read_text().startswith("{") and sorted(os.listdir(tmp_path)) == ["a.json"]
