"""SDXL-sized inputs for the resize bench, built once into a work folder (nothing is downloaded).

- ``base.safetensors``: an fp16 SDXL single-file checkpoint with exactly the keys and shapes of
  ``tests/fixtures/ckpt_sdxl_single_file.json`` (6.9 GB), random normal weights * 0.02, seeded per
  key, streamed to disk one tensor at a time by ``loratools.io.write_safetensors`` (RAM stays at the
  largest tensor).
- ``locon64``/``locon256``: LyCORIS LoCons with the names and shapes of
  ``lora_lycoris_sdxl_locon.json`` (1052 modules; linear dim 8, 3x3 conv dim 64 or 256, alpha 4 as
  the real file), and ``lora32``: a kohya LoRA with the names of ``lora_kohya_sdxl_lora.json``
  (986 modules) at rank 32, alpha 16. Factors hold a decaying spectrum whose top direction is
  1e-3..1e-1.5 of the base layer's norm, so both recipes keep varied ranks.

Each file gets a ``<file>.json`` sidecar with its size and generator version; a file is reused
when both match, and rebuilt (atomically, by the io writer) otherwise.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
CKPT_FIXTURE = "ckpt_sdxl_single_file.json"
_VERSION = 2  # bump when the generated contents change
_SPECTRUM = "top-3..-1.5,decay.5..0.9"  # the LoRAs' singular values (see _factors)
BASE_STD = 0.02


@dataclass(frozen=True)
class LoraSpec:
    """One bench LoRA: the fixture it copies names from, its ranks and alphas, its metadata changes."""

    name: str
    fixture: str
    linear_rank: int
    conv_rank: int  # 3x3 convs (1x1 convs take the linear rank, as LyCORIS does)
    linear_alpha: float
    conv_alpha: float
    metadata: dict[str, str]


LORAS = {
    "locon64": LoraSpec("locon64", "lora_lycoris_sdxl_locon.json", 8, 64, 4.0, 4.0, {"conv_dim": "64"}),
    "locon256": LoraSpec("locon256", "lora_lycoris_sdxl_locon.json", 8, 256, 4.0, 4.0, {"conv_dim": "256"}),
    "lora32": LoraSpec("lora32", "lora_kohya_sdxl_lora.json", 32, 32, 16.0, 16.0,
                       {"ss_network_dim": "32", "ss_network_alpha": "16.0"}),
}


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def _reusable(path: Path, what: str) -> bool:
    side = path.with_name(path.name + ".json")
    if not (path.is_file() and side.is_file()):
        return False
    try:
        info = json.loads(side.read_text())
    except ValueError:
        return False
    return info == {"version": _VERSION, "what": what, "size": path.stat().st_size}


def _record(path: Path, what: str) -> None:
    path.with_name(path.name + ".json").write_text(
        json.dumps({"version": _VERSION, "what": what, "size": path.stat().st_size}))


def _generator(key: str):
    import torch

    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def build_base(path: Path, log: Callable[[str], None] = print) -> Path:
    """The random fp16 SDXL single-file checkpoint (reused when already built)."""
    if _reusable(path, "base"):
        return path
    import torch

    from loratools.io import TensorSpec, write_safetensors

    tensors = fixture(CKPT_FIXTURE)["tensors"]
    dtypes = {"F16": torch.float16, "I64": torch.int64}
    specs = [TensorSpec(k, dtypes[v["dtype"]], tuple(v["shape"])) for k, v in tensors.items()]
    shapes = {s.name: s for s in specs}

    def produce(key: str) -> torch.Tensor:
        s = shapes[key]
        if s.dtype == torch.int64:  # position_ids: 0..76
            return torch.arange(math.prod(s.shape), dtype=torch.int64).reshape(s.shape)
        return (torch.randn(s.shape, generator=_generator(key)) * BASE_STD).half()

    log(f"building {path} (~6.9 GB, random fp16 SDXL base; once)")
    write_safetensors(path, specs, produce, {"format": "pt"}, overwrite=True)
    _record(path, "base")
    return path


def _modules(tensors: dict) -> dict[str, dict[str, list[int]]]:
    mods: dict[str, dict[str, list[int]]] = {}
    for key, info in tensors.items():
        name, _, suffix = key.partition(".")
        mods.setdefault(name, {})[suffix] = info["shape"]
    return {n: m for n, m in mods.items() if "lora_down.weight" in m}


def _metadata(fx: dict, spec: LoraSpec) -> dict[str, str]:
    meta = dict(fx.get("metadata") or {})
    args = json.loads(meta.get("ss_network_args", "null") or "null")
    for k, v in spec.metadata.items():
        if isinstance(args, dict) and k in args:
            args[k] = v
        else:
            meta[k] = v
    if isinstance(args, dict):
        meta["ss_network_args"] = json.dumps(args)
    return meta


def build_lora(path: Path, spec: LoraSpec, log: Callable[[str], None] = print) -> Path:
    """One bench LoRA (reused when already built). Module ``(out, n)`` shapes are the fixture's;
    ranks and alphas are ``spec``'s."""
    what = f"{spec.name}/{_SPECTRUM}"
    if _reusable(path, what):
        return path
    import torch

    from loratools.io import TensorSpec, write_safetensors

    fx = fixture(spec.fixture)
    layers = {}
    for name, m in sorted(_modules(fx["tensors"]).items()):
        down, up = m["lora_down.weight"], m["lora_up.weight"]
        conv3 = len(down) == 4 and down[2:] != [1, 1]
        rank, alpha = (spec.conv_rank, spec.conv_alpha) if conv3 else (spec.linear_rank, spec.linear_alpha)
        layers[name] = (up[0], rank, down[1:], alpha)
    specs = []
    for name, (out, r, rest, _) in layers.items():
        specs += [TensorSpec(f"{name}.lora_down.weight", torch.float16, (r, *rest)),
                  TensorSpec(f"{name}.lora_up.weight", torch.float16, (out, r, *([1] * (len(rest) - 1)))),
                  TensorSpec(f"{name}.alpha", torch.float16, ())]
    made: dict[str, dict[str, torch.Tensor]] = {}

    def produce(key: str) -> torch.Tensor:
        name, _, suffix = key.partition(".")
        if name not in made:
            made.clear()
            made[name] = _factors(name, *layers[name])
        return made[name].pop(suffix)

    log(f"building {path} ({spec.name}: {len(layers)} modules)")
    write_safetensors(path, specs, produce, _metadata(fx, spec), overwrite=True)
    _record(path, what)
    return path


def _factors(name: str, out: int, r: int, rest: list[int], alpha: float) -> dict:
    """Up/down with singular values ``||W|| * 10^a * decay^i`` (``||W||`` the base layer's expected
    Frobenius norm), a and decay drawn per module; stored so that ``up @ down * alpha / r`` has them."""
    import torch

    n = math.prod(rest)
    g = _generator(name)
    qu, _ = torch.linalg.qr(torch.randn(out, r, generator=g))
    qd, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    top = -3.0 + 1.5 * float(torch.rand((), generator=g))
    decay = 0.5 + 0.4 * float(torch.rand((), generator=g))
    s = BASE_STD * math.sqrt(out * n) * 10 ** top * (decay ** torch.arange(r, dtype=torch.float64) + 1e-4)
    raw = (s / (alpha / r)).sqrt().float()
    return {"lora_up.weight": (qu * raw).reshape(out, r, *([1] * (len(rest) - 1))).half(),
            "lora_down.weight": (raw[:, None] * qd.T).reshape(r, *rest).half(),
            "alpha": torch.tensor(alpha, dtype=torch.float16)}


def needed_base_ranges(base: Path, lora: Path) -> list[tuple[str, int, int]]:
    """``(key, file offset, bytes)`` of the base weights a checkpoint-aware recipe reads for ``lora``,
    mapped by ``loratools.keys`` (TE2's fused q/k/v counted once), in file order."""
    from loratools.io import read_header
    from loratools.keys.index import BaseIndex

    bh = read_header(base)
    index = BaseIndex.from_key_shapes({k: tuple(t.shape) for k, t in bh.tensors.items()})
    names = {k.partition(".")[0] for k in read_header(lora).tensors}
    keys = {index[n].key for n in names if n in index}
    infos = sorted((bh.tensors[k] for k in keys), key=lambda t: t.begin)
    return [(t.name, bh.data_offset + t.begin, t.nbytes) for t in infos]


def build_all(work: Path) -> dict[str, Path]:
    """The base and every bench LoRA in ``work``: ``{"base": path, lora name: path}``."""
    paths = {"base": build_base(work / "base.safetensors")}
    for name, spec in LORAS.items():
        paths[name] = build_lora(work / f"{name}.safetensors", spec)
    return paths


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    build_all(folder)
