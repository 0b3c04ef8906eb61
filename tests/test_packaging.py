"""The Dockerfile lints clean; the entry points run from a clone without PYTHONPATH tricks."""

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    cmd = [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_uses_cuda_base_and_entry():
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in text and "runtime" in text
    assert 'ENTRYPOINT ["python", "src/train.py"]' in text


def test_entry_point_help_runs_without_pythonpath(tmp_path):
    """`python src/train.py --help` composes the config from a plain checkout."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_MODE": "offline"}
    for entry in ("train.py", "cache_activations.py", "eval.py"):
        r = subprocess.run([sys.executable, str(ROOT / "src" / entry), "--cfg", "job", "--resolve"]
                           if entry == "train.py" else [sys.executable, str(ROOT / "src" / entry), "--help"],
                           capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
