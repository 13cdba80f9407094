"""What a wheel carries: the package data that `geovq tune DATASET` reads by default (issue 29, item 4)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_elsewhere_carries_the_search_spaces(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("geovq-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:  # installing a pure-Python wheel is unpacking it (PEP 427)
        archive.extractall(site)
    probe = ("import geovq, geovq.cli as cli\n"
             "from geovq.search.space import load_space\n"
             "print(geovq.__file__)\n"
             "for name in ('digits', 'mnist', 'fashion', 'cifar10'):\n"
             "    print(name, sorted(load_space(cli.SPACES_DIR / f'{name}.yaml', (4, 4, 8) if name == 'digits' else "
             "(8, 8, 32) if name == 'cifar10' else (7, 7, 16)).method_names))\n")
    # the installed wheel first on the path, ahead of this checkout's editable install; run from elsewhere
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert Path(lines[0]).is_relative_to(site)  # the wheel's geovq, not the checkout's
    assert [line.split()[0] for line in lines[1:]] == ["digits", "mnist", "fashion", "cifar10"]
    assert all("'kmeans'" in line for line in lines[1:])
