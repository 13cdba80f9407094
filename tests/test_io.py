"""Atomic writes: the old file or the new one, never half of one, with the permissions open() would give; and the
folder lock that keeps a second command out."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from geovq.errors import GeovqError
from geovq.io import LOCK_NAME, atomic_path, directory_lock, save_npz, write_json, write_text


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


def test_a_locked_folder_names_its_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    script = ("import sys, time; from pathlib import Path; from geovq.io import directory_lock\n"
              "with directory_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GeovqError, match=rf"is in use by another geovq command \(PID {holder.pid}\)"):
            with directory_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    with directory_lock(tmp_path):  # the kernel released the lock with the process
        assert (tmp_path / LOCK_NAME).read_text() == f"{os.getpid()}\n"
        with pytest.raises(GeovqError, match=rf"PID {os.getpid()}\)"):  # a second holder, even in this process
            with directory_lock(tmp_path):
                pass
