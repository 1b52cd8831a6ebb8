"""The resize bench's rank comparison (bench/bench_resize.py), on two tiny hand-made files.

The bench's verdict "ranks identical n/N" is only as good as this function: a module one tool
dropped (rank 0, absent from its file) and a module written under another name must both count.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from loratools.io import save_tensors

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_resize.py"


def _bench(monkeypatch):
    """Import the bench script (not a package); its sys.path and sys.modules entries are undone after."""
    spec = importlib.util.spec_from_file_location("bench_resize", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "bench_resize", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _lora(path: Path, ranks: dict[str, int]) -> Path:
    tensors = {}
    for name, r in ranks.items():
        tensors[f"{name}.lora_down.weight"] = torch.zeros(r, 6, dtype=torch.float16)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(5, r, dtype=torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_tensors(path, tensors)
    return path


def test_ranks_compared_per_module_through_targets(tmp_path, monkeypatch):
    bench = _bench(monkeypatch)
    elias = bench.kept_ranks(_lora(tmp_path / "elias.safetensors", {"m1": 3, "m2": 2}))
    ours = bench.kept_ranks(_lora(tmp_path / "ours.safetensors", {"m1": 3, "m2_alias": 1, "m3": 1}))
    assert elias == {"m1": 3, "m2": 2}
    same_layer = {"m2_alias": "m2"}
    got = bench.compare_ranks(elias, ours, ["m1", "m2", "m3"], lambda n: same_layer.get(n, n))
    assert got["identical"] == 1 and got["modules"] == 3
    assert got["differ"] == [("m2", 2, 1), ("m3", 0, 1)]  # m3 dropped by elias: rank 0
    assert got["kept_total"] == [5, 5]
