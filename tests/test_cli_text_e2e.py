"""File names with brackets and colons print as they are, through the real program (issue 15, item 1).

Was: `merge ... "char [v2].safetensors:0.5" -o "out [x].safetensors"` printed `wrote out .safetensors`
and `char .safetensors (ratio 0.5)`; `resize "char [v2].safetensors"` printed `char _svfro0.9...`;
`metadata show "style:smile:.safetensors"` printed an emoji; `lora.safetensors:abc` printed `🔤`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from loratools.tiny import make_lora

pytestmark = pytest.mark.slow


def _importable() -> dict[str, str]:
    """The one variable a bare environment must keep: a checkout used through PYTHONPATH (not
    pip-installed, as on a machine that only has the repository) finds loratools through it."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def run(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       timeout=300, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "COLUMNS": "80",
                                         "LORATOOLS_CACHE_DIR": str(cwd), **_importable()})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def named(tiny_sd1, tiny_sd1_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("names")
    lora = make_lora(tiny_sd1, "sd1", "lora", rank=4, alpha=2, path=d / "char [v2].safetensors").path
    shutil.copy(lora, d / "style:smile:.safetensors")
    shutil.copy(tiny_sd1_ckpt, d / "base [fp32].safetensors")
    return d


def test_merge_prints_paths_as_they_are(named):
    rc, out, err = run("merge", "base [fp32].safetensors", "char [v2].safetensors:0.5", "style:smile:.safetensors",
                       "-o", "out [x].safetensors", cwd=named)
    assert rc == 0, err
    assert "wrote out [x].safetensors (sd1, single_file" in out
    assert "char [v2].safetensors (ratio 0.5): applied" in out and "style:smile:.safetensors (ratio 1): applied" in out
    rc, _, err = run("merge", "base [fp32].safetensors", "char [v2].safetensors:abc", "-o", "o.safetensors", cwd=named)
    assert rc == 2 and err.startswith("error: ") and "char [v2].safetensors:abc" in err and "🔤" not in err


def test_resize_and_metadata_print_paths_as_they_are(named):
    rc, out, err = run("resize", "char [v2].safetensors", "-r", "sv_fro=0.9", "--no-cache", cwd=named)
    assert rc == 0, err
    assert out.startswith("char [v2]_svfro0.9.safetensors: rank ") and (named / "char [v2]_svfro0.9.safetensors").is_file()
    rc, out, err = run("metadata", "show", "style:smile:.safetensors", cwd=named)
    assert rc == 0, err
    assert "style:smile:.safetensors" in out and "😄" not in out
    rc, out, err = run("check", "weights", "style:smile:.safetensors", "char [v2].safetensors", cwd=named)
    assert rc == 0, err
    assert "style:smile:.safetensors" in out and "char [v2].safetensors" in out and "😄" not in out


def test_json_is_unchanged_by_names(named):
    rc, out, err = run("metadata", "show", "char [v2].safetensors", "--json", cwd=named)
    assert rc == 0, err
    assert json.loads(out)["path"] == "char [v2].safetensors"
