"""`loratools resize` end to end: the real program in a subprocess on tiny SD1/SDXL files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loratools.adapters import load_adapter
from loratools.io import open_safetensors
from loratools.tiny import make_lora


def _importable() -> dict[str, str]:
    """The one variable a bare environment must keep: a checkout used through PYTHONPATH (not
    pip-installed, as on a machine that only has the repository) finds loratools through it."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def run(*args, cwd=None):
    p = subprocess.run([sys.executable, "-m", "loratools", "resize", *map(str, args)], capture_output=True,
                       text=True, cwd=cwd, env={"LORATOOLS_CACHE_DIR": str(cwd or "."), "PATH": "/usr/bin:/bin",
                                                "OMP_NUM_THREADS": "1", **_importable()})
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, tiny_sdxl_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli sdxl, with spaces")
    lora = make_lora(tiny_sdxl, "sdxl", "locon", rank=6, alpha=3, path=d / "my lora, v2.safetensors").path
    return tiny_sdxl_ckpt, lora


def test_seed_command_verbatim_then_skip_then_overwrite(sdxl, tmp_path):
    ckpt, lora = sdxl
    out = tmp_path / "out dir"
    out.mkdir()
    rc, stdout, err = run("-o", out, "-r", "fro_ckpt=1,thr=-3.55", ckpt, lora, cwd=tmp_path)
    assert rc == 0, err
    target = out / "my lora, v2_frockpt1_th-3.55.safetensors"
    assert target.is_file() and [p.name for p in out.iterdir()] == [target.name]
    assert "rank 930 -> " in stdout and "Frobenius" in stdout and "threshold -3.55" in stdout
    # sizes in the unit that shows the change (was "0.4 MiB -> 0.4 MiB"), matching the files on disk
    before, after = lora.stat().st_size, target.stat().st_size
    assert f"{before / 1024:.1f} KiB -> {after / 1024:.1f} KiB" in stdout
    assert open_safetensors(target).metadata["ss_training_comment"].startswith("Resized by loratools")
    mtime = target.stat().st_mtime_ns
    rc, stdout, _ = run("-o", out, "-r", "fro_ckpt=1,thr=-3.55", ckpt, lora, cwd=tmp_path)
    assert rc == 0 and "exists, skipped" in stdout and target.stat().st_mtime_ns == mtime
    rc, _, _ = run("-o", out, "-b", ckpt, "--overwrite", lora, cwd=tmp_path)  # default recipe = same name
    assert rc == 0 and target.stat().st_mtime_ns != mtime


def test_sd_scripts_flags_and_json(sdxl, tmp_path):
    ckpt, lora = sdxl
    rc, stdout, err = run("--dynamic_method", "sv_fro", "--dynamic-param", "0.9", "--save_precision", "fp32",
                          "--new_rank", "4", "--json", "-o", tmp_path, lora, cwd=tmp_path)
    assert rc == 0, err
    (res,) = json.loads(stdout)
    (o,) = res["outputs"]
    assert o["recipe"] == "sv_fro=0.9,max_rank=4" and o["status"] == "written"
    assert max(r["new_rank"] for r in o["layers"]) <= 4
    sd = open_safetensors(tmp_path / "my lora, v2_svfro0.9_max4.safetensors")
    assert {sd.info(k).dtype for k in sd if k.endswith("weight")} == {"F32"}
    assert {sd.info(k).dtype for k in sd if k.endswith("alpha")} == {"F32"}


def test_dry_run_folder_input_and_several_recipes(sdxl, tmp_path):
    ckpt, lora = sdxl
    rc, stdout, err = run("--dry-run", "-r", "sv_ratio=8,max_rank=32:fro_ckpt=1,size=0.2", ckpt, lora.parent,
                          cwd=tmp_path)
    assert rc == 0, err
    assert "rle_lora" in stdout and "score quantiles" in stdout and "predicted size" in stdout
    assert stdout.count("(dry run)") == 2
    assert sorted(p.name for p in lora.parent.iterdir()) == [lora.name]  # nothing written


def test_sd1_with_base_flag(tiny_sd1, tiny_sd1_ckpt, tmp_path):
    lora = make_lora(tiny_sd1, "sd1", "loha", rank=4, alpha=2, path=tmp_path / "loha.safetensors").path
    rc, stdout, err = run("-b", tiny_sd1_ckpt, "-r", "fro_ckpt=1,thr=-2.5", str(tmp_path / "*.safetensors"),
                          "-o", tmp_path, cwd=tmp_path)
    assert rc == 0, err
    assert "loha_frockpt1_th-2.5.safetensors" in stdout
    out = load_adapter(tmp_path / "loha_frockpt1_th-2.5.safetensors")  # issue 12: the LoHa stays a LoHa
    assert {m.kind for m in out.modules.values()} == {"loha"} and max(m.rank for m in out.modules.values()) <= 4


def test_lokr_without_base_stays_lokr_and_smaller(tiny_sd1, tmp_path):
    # issue 12 part 2 through the CLI: a checkpoint-free recipe on a LoKr writes a smaller LoKr whose
    # every module leaves out exactly the strengths it dropped (dense check)
    lora = make_lora(tiny_sd1, "sd1", "lokr", rank=4, alpha=2, dtype=torch.float32,
                     path=tmp_path / "lokr.safetensors").path
    (tmp_path / "out").mkdir()
    rc, stdout, err = run("-r", "rank=1", lora, "-o", tmp_path / "out", cwd=tmp_path)
    assert rc == 0, err
    (written,) = (tmp_path / "out").iterdir()
    assert written.name in stdout and written.stat().st_size < lora.stat().st_size
    src, out = load_adapter(lora), load_adapter(written)
    assert {m.kind for m in out.modules.values()} == {"lokr"} and set(out.modules) == set(src.modules)
    for name, m in src.modules.items():
        full = m.delta()
        left_out = float((full - out.modules[name].delta().reshape(full.shape)).norm())
        assert left_out == pytest.approx(float(torch.from_numpy(m.directions().S)[1:].double().norm()), rel=1e-4,
                                         abs=1e-6 * float(full.norm()))


@pytest.mark.parametrize("case", ["arch", "typo", "thr_and_size", "output_is_file"])
def test_bad_inputs_clear_errors_and_no_files(case, sdxl, tiny_sd1_ckpt, tmp_path):
    ckpt, lora = sdxl
    (tmp_path / "o").mkdir()
    blocker = tmp_path / "o" / "afile"
    blocker.write_text("x")
    args = {"arch": ["-o", tmp_path / "o", tiny_sd1_ckpt, lora],
            "typo": ["-o", tmp_path / "o", "-r", "fro_ckpt=1,tresh=-3", ckpt, lora],
            "thr_and_size": ["-o", tmp_path / "o", "-r", "thr=-3,size=1", ckpt, lora],
            "output_is_file": ["-o", blocker, ckpt, lora]}[case]
    rc, stdout, err = run(*args, cwd=tmp_path)
    assert rc == 2 and "Traceback" not in err
    line = " ".join(err.split())
    assert {"arch": "SDXL", "typo": "'tresh'", "thr_and_size": "both thr= and size=",
            "output_is_file": "is a file"}[case] in line
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["afile"]
    assert sorted(p.name for p in lora.parent.iterdir()) == [lora.name]


def test_larger_output_is_skipped_and_said_unless_allowed(sdxl, tmp_path):
    """fp16 factors written as fp32 at full rank take twice the bytes: skipped (batch runs too), one
    line naming the file and both sizes; --allow-larger writes it."""
    ckpt, lora = sdxl
    rc, stdout, err = run(ckpt, lora, "-r", "fro_ckpt=1,thr=-20", "--save_precision", "fp32", "-o", tmp_path,
                          cwd=tmp_path)
    assert rc == 0, err
    (line,) = [ln for ln in stdout.splitlines() if "frockpt1" in ln]
    assert "larger than the input's: not written; --allow-larger writes it" in line and " -> " in line
    assert not list(tmp_path.glob("*.safetensors"))
    rc, stdout, err = run(ckpt, lora, "-r", "fro_ckpt=1,thr=-20", "--save_precision", "fp32", "-o", tmp_path,
                          "--allow-larger", "--json", cwd=tmp_path)
    assert rc == 0, err
    (out,) = json.loads(stdout)[0]["outputs"]
    assert out["status"] == "written" and out["size_after"] > out["size_before"]


def test_checkpoint_free_recipe_reads_no_base_weight(sdxl, tmp_path):
    """spn_lora scores need no base norms: the norm cache stays empty (a cold run reads only headers)."""
    ckpt, lora = sdxl
    rc, stdout, err = run(ckpt, lora, "-r", "spn_lora=1,thr=-0.7", "-o", tmp_path, cwd=tmp_path)
    assert rc == 0, err
    assert list(tmp_path.glob("*spnlora1*.safetensors")) and not (tmp_path / "norms").exists()
    rc, _, err = run(ckpt, lora, "-r", "fro_ckpt=1,thr=-3.55", "-o", tmp_path, cwd=tmp_path)
    assert rc == 0, err
    assert len(list((tmp_path / "norms").iterdir())) == 1


_TORCH_PROBE = ("import sys\nfrom loratools.cli.app import main\ntry:\n    main()\nexcept SystemExit as exc:\n"
                "    print('exit', exc.code)\nprint('torch imported' if 'torch' in sys.modules else 'torch not imported')")


@pytest.mark.parametrize("kind,dtype,imported", [("locon", torch.float16, False), ("locon", torch.float32, False),
                                                  ("locon", torch.bfloat16, False), ("lokr", torch.float16, True)])
def test_lora_resize_never_imports_torch(tiny_sdxl, tiny_sdxl_ckpt, tmp_path, kind, dtype, imported):
    """torch's import is more than half of a warm resize: a LoRA/LoCon (fp16, fp32 or bf16) is read,
    decomposed and written with numpy alone, cold (norms streamed) and warm; a LoKr still uses torch."""
    lora = make_lora(tiny_sdxl, "sdxl", kind, rank=6, alpha=3, dtype=dtype, path=tmp_path / "l.safetensors").path
    for run_no in range(2):  # cold, then warm (norm cache filled)
        out = tmp_path / f"out{run_no}"
        out.mkdir()
        p = subprocess.run([sys.executable, "-c", _TORCH_PROBE, "resize", "-r", "fro_ckpt=1,thr=-2", "--cache-dir",
                            str(tmp_path / "cache"), str(tiny_sdxl_ckpt), str(lora), "-o", str(out)],
                           capture_output=True, text=True, cwd=tmp_path,
                           env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", **_importable()})
        assert "exit 0" in p.stdout, p.stderr
        assert p.stdout.strip().endswith("torch imported" if imported else "torch not imported")
        (written,) = out.iterdir()
        assert {m.kind for m in load_adapter(written).modules.values()} == {"lora" if kind == "locon" else kind}
        factors = {t.dtype for k, t in open_safetensors(written).items() if not k.endswith(".alpha")}
        assert factors == {dtype}  # the input's precision, bf16 included


def test_shell_glob_rerun_skips_own_outputs(sdxl, tmp_path):
    """`resize base *.safetensors` run twice: the shell names the first run's output too; it is
    skipped (its source is in the batch), and the skipped line says what is on disk, not rank 0 / nan."""
    ckpt, lora = sdxl
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(lora.read_bytes())
    rc, _, err = run("-r", "fro_ckpt=1,thr=-2", ckpt, folder / "a.safetensors", cwd=tmp_path)
    assert rc == 0, err
    (out,) = [p for p in folder.iterdir() if p.name != "a.safetensors"]
    rc, stdout, err = run("-r", "fro_ckpt=1,thr=-2", ckpt, *sorted(folder.iterdir()), cwd=tmp_path)  # as a shell expands it
    assert rc == 0, err
    assert sorted(p.name for p in folder.iterdir()) == ["a.safetensors", out.name]  # nothing resized twice
    assert "nan" not in stdout and "rank 0 " not in stdout and "exists, skipped" in stdout
    rc, stdout, err = run("-r", "rank=1", out, "-o", tmp_path, cwd=tmp_path)  # named on its own: resized
    assert rc == 0, err
    assert len([p for p in tmp_path.glob("*.safetensors") if p.name.startswith(out.stem)]) == 1
