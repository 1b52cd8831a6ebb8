"""Importing the CLI, building the app and `loratools --help` never import torch (instant start)."""

from __future__ import annotations

import subprocess
import sys


def test_building_the_app_does_not_import_torch():
    code = ("import sys, typer\n"
            "from loratools.cli.app import app\n"
            "cmd = typer.main.get_command(app)\n"
            "names = sorted(cmd.commands)\n"
            "try:\n"
            "    sys.argv = ['loratools', '--help']\n"
            "    app(prog_name='loratools')\n"
            "except SystemExit:\n"
            "    pass\n"
            "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'safetensors', 'numpy')\n"
            "               if m in sys.modules)\n"
            "print('MODULES', names, 'HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("MODULES"))
    assert "'metadata'" in line and "'check'" in line
    assert line.endswith("HEAVY []"), line
