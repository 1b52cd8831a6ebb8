"""The one error handler: file names with brackets are printed literally, never read as markup."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratools", *args], capture_output=True, text=True, cwd=cwd)


def test_bracketed_names_are_printed_literally(tmp_path):
    for name in ("x[/b].safetensors", "my[lora].safetensors"):
        proc = _run("metadata", "show", name, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert name in proc.stderr and "file not found" in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = _run("--debug", "metadata", "show", "missing.safetensors", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "missing.safetensors" in proc.stderr
