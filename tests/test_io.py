"""Atomic writes: the old file or the new one, never half of one, with the permissions open() would give."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from geovq.io import atomic_path, save_npz, write_json, write_text


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text(tmp_path / "report.md", "# report\n")
        save_npz(tmp_path / "q.npz", a=np.arange(3))
        reference = tmp_path / "plain.txt"
        reference.write_text("x")  # what a plain open() gives under this umask
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert stat.S_IMODE(reference.stat().st_mode) == expected
    for name in ("report.md", "q.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert np.load(tmp_path / "q.npz")["a"].tolist() == [0, 1, 2]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"psnr": 27.5})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"psnr": 2')  # half written
            raise RuntimeError("interrupted")
    assert path.read_text() == '{\n  "psnr": 27.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with pytest.raises(ValueError):
        write_json(path, {"psnr": float("nan")})  # not JSON: refused before anything is renamed
    assert path.read_text() == '{\n  "psnr": 27.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
