"""Packaging: the README's build and install lines make a wheel and an sdist, the wheel installs into a fresh
virtual environment (offline: --no-index --no-deps, the dependencies come from this interpreter's
site-packages through a .pth file), imports, and runs an example from outside the source tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "__pycache__", "*.egg-info", ".pytest_cache")


def readme_install_lines() -> list[str]:
    """The commands of the README's wheel block: ``python -m build`` and ``pip install "dist/...whl[extra]"``."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Install"):]
    section = section[:section.index("\n## ", 4)]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            cmd = line.split("#", 1)[0].strip()
            if cmd.startswith("python -m build") or (cmd.startswith("pip install") and ".whl" in cmd):
                lines.append(cmd)
    return lines


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 240) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_wheel_builds_installs_offline_and_runs_an_example(tmp_path):
    pytest.importorskip("build")
    lines = readme_install_lines()
    assert len(lines) == 2 and lines[0] == "python -m build", lines
    wheel_arg = re.fullmatch(r'pip install "(dist/safedpo_kernels-[^"]+\.whl)\[(\w+)\]"', lines[1])
    assert wheel_arg, lines[1]
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)  # build from a copy: the checkout gets no build/ or egg-info
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The README's `python -m build`, offline: the build backend of this environment instead of a download.
    _run([sys.executable, "-m", "build", "--no-isolation"], cwd=src, env=env)
    wheel = src / wheel_arg.group(1)
    sdists = list((src / "dist").glob("safedpo_kernels-*.tar.gz"))
    assert wheel.exists() and len(sdists) == 1, sorted(p.name for p in (src / "dist").iterdir())
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("safedpo_kernels/__init__.py", "safedpo_kernels/kernels/__init__.py",
                   "safedpo_kernels/integrations/heads.py", "safedpo_kernels/integrations/trl.py"):
        assert needed in names, needed
    assert any(n.startswith("safedpo_kernels/data/fixtures/") for n in names)  # package data
    assert not any(n.startswith(("tests/", "recipes/", "benchmarks/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert re.search(r"Requires-Dist: peft.*extra == \"trl\"", metadata)
    assert re.search(r"Requires-Dist: build.*extra == \"test\"", metadata)
    sdist_names = tarfile.open(sdists[0]).getnames()
    assert any(n.endswith("examples/safedpo_trl.py") for n in sdist_names)
    # A fresh venv; this environment's packages (torch, transformers, trl...) reachable through a .pth,
    # whose directory's own .pth files (e.g. an editable install of this package) are not processed.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=env).strip())
    (site / "shared_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The README's `pip install "dist/...whl[trl]"`, offline (extras' dependencies are already there).
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--no-deps",
          f"{wheel}[{wheel_arg.group(2)}]"], cwd=src, env=env)
    run = tmp_path / "run"  # outside the source tree: only the installed wheel can be imported
    run.mkdir()
    shutil.copy(src / "examples" / "safedpo_own_loop.py", run)
    check = ("import safedpo_kernels, safedpo_kernels.integrations as i, runpy; "
             "print('FROM', safedpo_kernels.__file__); i.SafeDPOTrainer; i.SafeDPOHFTrainer; "
             "runpy.run_path('safedpo_own_loop.py', run_name='__main__')")
    out = _run([str(py), "-c", check], cwd=run, env=env)
    assert f"FROM {site}" in out, out[-2000:]
    assert "rewards/margins" in out
