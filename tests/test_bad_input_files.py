"""Odd files given to every command: symbolic link loops, header-only files, folders and .ckpt LoRAs,
pickles that would run code, and a CUDA device that is not there.

Each is one ``LoratoolsError`` naming the file (the CLI prints it as one line, exit 2: checked
once in a subprocess), nothing is written, and valid files keep working.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loratools.errors import InvalidFileError, LoratoolsError, UsageError
from loratools.io import save_tensors


@pytest.fixture(scope="module")
def files(tiny_sd1, tmp_path_factory):
    from loratools.tiny import make_lora

    d = tmp_path_factory.mktemp("odd")
    lora = make_lora(tiny_sd1, "sd1", "lora", path=d / "good.safetensors")
    os.symlink("loop_b.safetensors", d / "loop_a.safetensors")
    os.symlink("loop_a.safetensors", d / "loop_b.safetensors")
    save_tensors(d / "header_only.safetensors", {}, {"ss_network_dim": "4"})
    torch.save(dict(lora.tensors), d / "lora.ckpt")
    (d / "empty_dir").mkdir()
    return d


def _operations(adapter: Path, base: Path, out: Path):
    """Every command's operation on ``adapter`` (as the CLI calls them), writing into ``out``."""
    from loratools.ops.check_keys import CheckKeysOptions, check_keys
    from loratools.ops.check_weights import check_file
    from loratools.ops.convert import ConvertOptions, convert
    from loratools.ops.merge.checkpoint import MergeOptions, merge_checkpoint
    from loratools.ops.merge.ratios import WeightedPath
    from loratools.ops.merge.to_lora import LoraMergeOptions, merge_loras
    from loratools.ops.metadata import edit_metadata, summarize
    from loratools.ops.resize import Resizer, resolve_inputs

    def resize():
        _, loras, _ = resolve_inputs([str(adapter)])
        return Resizer(None, cache_dir=None).resize(loras[0], "rank=2", output=out)

    return {
        "check weights": lambda: check_file(adapter),
        "check keys": lambda: check_keys(CheckKeysOptions(adapter, base)),
        "merge": lambda: merge_checkpoint(MergeOptions(base=base, adapters=[WeightedPath(adapter, 1.0)],
                                                       output=out / "merged.safetensors")),
        "merge --to-lora": lambda: merge_loras(LoraMergeOptions(adapters=[WeightedPath(adapter, 1.0)],
                                                                output=out / "l.safetensors")),
        "resize": resize,
        "convert": lambda: convert(ConvertOptions(adapter, out / "c.safetensors", "kohya", arch="sd1")),
        "metadata show": lambda: summarize(adapter),
        "metadata set": lambda: edit_metadata(adapter, output=out / "m.safetensors", set_values={"a": "b"}),
    }


def test_a_symlink_loop_is_named_by_every_command(files, tiny_sd1_ckpt, tmp_path):
    loop = files / "loop_a.safetensors"
    for name, call in _operations(loop, tiny_sd1_ckpt, tmp_path).items():
        with pytest.raises(LoratoolsError) as exc:
            call()
        assert str(exc.value) == f"{loop}: symbolic link loop (the link points back to itself through other " \
                                  "links); fix or remove the link", name
    assert list(tmp_path.iterdir()) == []
    proc = subprocess.run([sys.executable, "-m", "loratools", "metadata", "show", str(loop)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: {loop}: symbolic link loop (the link points " \
                                                           "back to itself through other links); fix or remove the link"


def test_a_header_only_file_is_not_a_lora_in_every_command(files, tiny_sd1_ckpt, tmp_path):
    """It used to pass `check keys` ("0/0 modules apply"), resize to an empty file and merge to a
    copy of the base. `metadata` still reads and edits it (it is a valid safetensors file)."""
    empty = files / "header_only.safetensors"
    ops = _operations(empty, tiny_sd1_ckpt, tmp_path)
    for name in ("metadata show", "metadata set"):
        ops.pop(name)()
    (tmp_path / "m.safetensors").unlink()
    for name, call in ops.items():
        with pytest.raises(InvalidFileError) as exc:
            call()
        assert str(exc.value) == f"{empty}: holds no tensors (a header only): not a LoRA", name
    assert list(tmp_path.iterdir()) == []


def test_ckpt_loras_and_folders_in_resize(files, tmp_path):
    from loratools.adapters import load_adapter
    from loratools.ops.resize import Resizer, resolve_inputs

    base, loras, _ = resolve_inputs([str(files / "lora.ckpt")])  # was taken for a base checkpoint
    assert base is None and loras == [files / "lora.ckpt"]
    outcome = Resizer(None, cache_dir=None).resize(loras[0], "rank=2", output=tmp_path)
    written = load_adapter(outcome.outcomes[0].path)
    assert {m.rank for m in written.modules.values()} == {2}
    assert set(written.modules) == set(load_adapter(files / "good.safetensors").modules)
    with pytest.raises(UsageError) as exc:
        resolve_inputs([str(files / "empty_dir")])
    assert f"folder {files / 'empty_dir'} holds no .safetensors file" in str(exc.value)
    resized = tmp_path / "resized"
    resized.mkdir()
    outcome.outcomes[0].path.rename(resized / "x.safetensors")
    with pytest.raises(UsageError, match=f"folder {resized} holds only earlier resize outputs \\(1\\)"):
        resolve_inputs([str(resized)])


class _System:
    """A pickle payload that would call os.system (posix.system) when unpickled; it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_naming_the_call(tmp_path):
    from loratools.adapters import load_adapter

    marker = tmp_path / "ran"
    for name, save in (("zip.ckpt", lambda p, o: torch.save(o, p)),
                       ("plain.pt", lambda p, o: p.write_bytes(__import__("pickle").dumps(o)))):
        path = tmp_path / name
        save(path, {"lora_unet_a.lora_down.weight": torch.ones(2, 2), "x": _System(marker)})
        with pytest.raises(InvalidFileError) as exc:
            load_adapter(path)
        message = str(exc.value)
        assert message.startswith(f"{path}: refused: loading this checkpoint would run code from it "
                                  f"({os.system.__module__}.system); nothing was run.")
        assert "weights_only" not in message and "get a .safetensors version" in message
    assert not marker.exists()


def test_device_cuda_without_cuda_is_one_error():
    from loratools.ops.resize import Resizer

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match=r"^--device cuda: .*; use --device cpu$"):
        Resizer(None, cache_dir=None, device="cuda")
    with pytest.raises(UsageError, match="is not a device name"):
        Resizer(None, cache_dir=None, device="gpu")
    assert Resizer(None, cache_dir=None, device="cpu").device == "cpu"
