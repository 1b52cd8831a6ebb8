"""Faults while writing: SIGTERM/SIGHUP/SIGKILL mid-write, two writers of one output, a full disk.

The CLI runs as a real subprocess (``loratools metadata set`` copies every tensor through the
writer). To stop it *during* the write deterministically, the child wraps the reader so that each
tensor takes 30 ms and announces itself on stdout; the parent waits for the first announcement
and for the writer's temporary file, then signals. Everything else is the real program.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from loratools.errors import DiskFullError, OutputBusyError, OutputExistsError
from loratools.io import TensorSpec, open_safetensors, save_tensors, write_safetensors
from loratools.io.claim import TEMP_SUFFIX, claim, temp_path
from loratools.ops.metadata import edit_metadata

N_TENSORS = 24

_SLOW_CLI = textwrap.dedent("""
    import sys, time
    from loratools.io import reader
    _get = reader.SafetensorsReader.__getitem__
    def slow(self, key):
        print("TENSOR", key, flush=True)
        time.sleep(0.03)
        return _get(self, key)
    reader.SafetensorsReader.__getitem__ = slow
    sys.argv = ["loratools", *sys.argv[1:]]
    from loratools.cli.app import main
    main()
""")


@pytest.fixture()
def big(tmp_path) -> Path:
    """A LoRA-shaped input of 24 x 256 KiB tensors (6 MiB): a write of ~0.7 s in the slow child."""
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "in.safetensors"
    save_tensors(p, {f"lora_unet_m{i}.lora_down.weight": torch.randn(64, 1024, generator=g)
                     for i in range(N_TENSORS)}, {"ss_network_dim": "64"})
    return p


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def _slow(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def _wait_writing(proc: subprocess.Popen, out: Path) -> None:
    """Block until the child is inside the write: a tensor was produced and the temp file has bytes."""
    line = proc.stdout.readline()
    assert line.startswith("TENSOR"), (line, proc.stderr.read() if proc.poll() is not None else "")
    deadline = time.monotonic() + 30
    while not (temp_path(out).exists() and temp_path(out).stat().st_size > 0):
        assert time.monotonic() < deadline and proc.poll() is None, "the write never started"
        time.sleep(0.005)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX) or p.name.endswith(".tmp"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_mid_write_leaves_nothing_and_the_next_run_succeeds(big, tmp_path, sig):
    out = tmp_path / "out.safetensors"
    proc = _slow("metadata", "set", big, "a=b", "-o", out, cwd=tmp_path)
    _wait_writing(proc, out)
    before = big.read_bytes()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (128 + sig, -sig), err
    assert not out.exists()
    if sig == signal.SIGKILL:  # nothing can run on SIGKILL: the stale temporary file stays ...
        assert _leftovers(tmp_path) == [temp_path(out).name]
    else:  # ... SIGTERM cleans up like Ctrl-C, with one line and exit code 128 + 15
        assert _leftovers(tmp_path) == [] and err.strip() == "interrupted (SIGTERM)"
    again = edit_metadata(big, output=out, set_values={"a": "c"})  # ... and the next run removes it
    assert again.written.size == out.stat().st_size and _leftovers(tmp_path) == []
    assert open_safetensors(out).metadata["a"] == "c" and len(open_safetensors(out)) == N_TENSORS
    assert big.read_bytes() == before  # the input is never touched


def test_sighup_cleans_up_like_sigint(tmp_path):
    """The CLI's handler makes SIGHUP (a closed terminal) an exception, so every ``finally`` runs.
    Here a script installs the CLI's handlers and claims an output (no torch, no command); the
    signal comes while the fresh claim still holds interrupts back (the file exists, the ``try``
    that removes it has not begun) and is raised at ``arm()``, inside that ``try``."""
    out = tmp_path / "x.safetensors"
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        from loratools import interrupts
        from loratools.errors import Interrupted
        from loratools.io.claim import claim
        interrupts.install()
        held = claim(Path({str(out)!r}))
        os.write(held.fd, b"partial")
        print("HELD", flush=True)
        sys.stdin.readline()  # the signal arrives here: recorded, not raised
        try:
            held.arm()
            print("NOT INTERRUPTED", flush=True)
        except Interrupted as exc:
            print("INTERRUPTED", exc.signum, flush=True)
        finally:
            held.abandon()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HELD"
    assert _leftovers(tmp_path) == [temp_path(out).name]
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.2)
    assert proc.poll() is None  # held: the process lives on
    stdout, err = proc.communicate("go\n", timeout=30)
    assert stdout.strip() == f"INTERRUPTED {int(signal.SIGHUP)}", err
    assert _leftovers(tmp_path) == []


def test_a_stale_temp_is_removed_even_by_a_run_that_then_refuses(big, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"someone's file")
    temp_path(out).write_bytes(b"\0" * 4096)  # what a SIGKILLed run leaves (nobody holds it)
    proc = _cli("metadata", "set", big, "a=b", "-o", out, cwd=tmp_path)
    assert proc.returncode == 2 and "output exists" in proc.stderr
    assert _leftovers(tmp_path) == [] and out.read_bytes() == b"someone's file"


def test_two_writers_of_one_output(big, tmp_path):
    """`metadata set a=b` and `a=c` to one output: the second is refused while the first writes, and
    after it (exists); the first one's file is complete and is the one that stays."""
    out = tmp_path / "out.safetensors"
    first = _slow("metadata", "set", big, "a=b", "-o", out, cwd=tmp_path)
    _wait_writing(first, out)
    second = _cli("metadata", "set", big, "a=c", "-o", out, cwd=tmp_path)
    assert second.returncode == 2, second.stderr
    assert "being written by another process" in second.stderr and str(out) in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    third = _cli("metadata", "set", big, "a=c", "-o", out, cwd=tmp_path)
    assert third.returncode == 2 and "output exists" in third.stderr
    assert open_safetensors(out).metadata["a"] == "b" and _leftovers(tmp_path) == []


def test_the_claim_in_process(tmp_path):
    """The lock, not the file's existence, decides: a held claim refuses a second writer at once, and
    a name that appears while writing is not replaced without overwrite (the final link is exclusive)."""
    out = tmp_path / "o.safetensors"
    held = claim(out)
    with pytest.raises(OutputBusyError, match="being written by another process"):
        save_tensors(out, {"w": torch.ones(1)})
    held.abandon()
    assert _leftovers(tmp_path) == []

    def produce(name):
        out.write_bytes(b"appeared meanwhile")  # another program takes the name mid-write
        return torch.ones(2)

    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        write_safetensors(out, [TensorSpec("w", torch.float32, (2,))], produce)
    assert out.read_bytes() == b"appeared meanwhile" and _leftovers(tmp_path) == []
    save_tensors(out, {"w": torch.ones(3)}, overwrite=True)
    assert open_safetensors(out)["w"].shape == (3,) and _leftovers(tmp_path) == []


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot run mount")
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_size(big, tiny_disk, tmp_path):
    out = tiny_disk / "out.safetensors"
    proc = _cli("metadata", "set", big, "a=b", "-o", out, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    size = big.stat().st_size + 8  # the header grows by the new key (padded to 8 bytes)
    assert line.startswith(f"error: {tiny_disk}: not enough space to write out.safetensors: it needs ")
    needed = int(line.split("(")[1].split(" bytes")[0].replace(",", ""))
    assert abs(needed - size) <= 16
    assert os.listdir(tiny_disk) == []


def test_running_out_of_space_mid_write(tiny_disk):
    """Space that vanishes after the check (another program fills the disk): ENOSPC mid-write is the
    same one error, and the partial file is removed."""
    out = tiny_disk / "o.safetensors"
    specs = [TensorSpec(f"t{i}", torch.float32, (64 * 1024,)) for i in range(3)]  # 768 KiB of 1 MiB

    def produce(name):
        if name == "t0":
            (tiny_disk / "filler").write_bytes(b"\0" * (900 * 1024))  # leaves too little for the rest
        return torch.zeros(64 * 1024)

    with pytest.raises(DiskFullError, match=r"needs 768\.\d KiB") as exc:
        write_safetensors(out, specs, produce)
    assert exc.value.path == str(tiny_disk)
    assert sorted(os.listdir(tiny_disk)) == ["filler"]



def test_an_output_folder_is_claimed_like_a_file(tmp_path):
    """A merged diffusers folder is built in ``.<name>.loratools-partial/`` under the same lock: a
    second claim is refused, a killed run's half-built folder is cleared, ``finish`` renames."""
    from loratools.io.claim import claim_folder, clear_stale

    out = tmp_path / "merged"
    stale = temp_path(out)
    (stale / "unet").mkdir(parents=True)  # what a SIGKILLed folder merge leaves
    (stale / "unet" / "half.safetensors").write_bytes(b"\0" * 100)
    held = claim_folder(out)
    assert held.path == stale and list(stale.iterdir()) == []
    with pytest.raises(OutputBusyError):
        claim_folder(out)
    with pytest.raises(OutputBusyError):
        clear_stale(out)
    (held.path / "model_index.json").write_text("{}")
    held.finish(overwrite=False)
    assert (out / "model_index.json").read_text() == "{}" and _leftovers(tmp_path) == []
    again = claim_folder(out)
    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        again.finish(overwrite=False)
    assert _leftovers(tmp_path) == [] and (out / "model_index.json").exists()
    (stale / "x").mkdir(parents=True)  # stale again: the next check of that output removes it
    clear_stale(out)
    assert _leftovers(tmp_path) == []
