"""scripts/bootstrap.sh picks the newest Python >= 3.12 among PATH and pyenv (fake interpreters, no install)."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_python(path, version):
    major, minor, micro = version
    path.write_text("#!/bin/sh\n"
                    f'case "$2" in *print*) echo "{major} {minor} {micro}" ;; '
                    f'*) exit {0 if (major, minor) >= (3, 12) else 1} ;; esac\n')
    path.chmod(0o755)


@pytest.mark.parametrize("on_path,in_pyenv,want", [
    ({"python3.12": (3, 12, 3), "python3.13": (3, 13, 1), "python3": (3, 11, 9)}, {}, "python3.13"),
    ({"python3": (3, 12, 0)}, {"3.12.1": (3, 12, 1), "3.14.2": (3, 14, 2), "3.9.18": (3, 9, 18),
                               "3.13.0": (3, 13, 0)}, "3.14.2"),  # the old sort took the oldest here
    ({"python3.12": (3, 12, 9)}, {"3.12.10": (3, 12, 10)}, "3.12.10"),  # micro versions compare as numbers
    ({"python3": (3, 11, 2)}, {"3.8.0": (3, 8, 0)}, None),
])
def test_bootstrap_picks_the_newest_python(tmp_path, on_path, in_pyenv, want):
    bin_, tools, root = tmp_path / "bin", tmp_path / "tools", tmp_path / "pyenv"
    for d in (bin_, tools):
        d.mkdir()
    for name in ("sh", "sort", "head", "dirname", "cat"):
        os.symlink(shutil.which(name), tools / name)
    for name, v in on_path.items():
        _fake_python(bin_ / name, v)
    if in_pyenv:
        for name, v in in_pyenv.items():
            (root / "versions" / name / "bin").mkdir(parents=True)
            _fake_python(root / "versions" / name / "bin" / "python3", v)
        (bin_ / "pyenv").write_text(f'#!/bin/sh\ncase "$1" in root) echo "{root}" ;; '
                                    f'versions) printf "%s\\n" {" ".join(in_pyenv)} ;; esac\n')
        (bin_ / "pyenv").chmod(0o755)
    r = subprocess.run([shutil.which("sh"), os.path.join(ROOT, "scripts", "bootstrap.sh"), "--which-python"],
                       capture_output=True, text=True, env={"PATH": f"{bin_}:{tools}"}, timeout=60)
    if want is None:
        assert r.returncode == 1 and "no Python >= 3.12" in r.stderr
    else:
        assert r.returncode == 0, r.stderr
        assert want in r.stdout.strip(), r.stdout
