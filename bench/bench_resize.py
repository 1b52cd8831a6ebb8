"""Benchmark `loratools resize` against elias-gaeros/resize_lora, side by side, cold and warm.

Needs a clone of elias-gaeros/resize_lora (``--elias DIR``) and ~8 GB of disk in the work folder
(default /tmp/loratools-bench-resize) for the inputs ``bench/sdxl_inputs.py`` builds once: a random
fp16 SDXL base (6.9 GB) and three SDXL adapters (LoCon conv dim 64 and 256, LoRA rank 32).

Cases: {locon64, locon256, lora32} x {fro: fro_ckpt=1,thr=-3.55; spn: spn_lora=1,thr=-0.7} x
{cold, warm}. Each tool runs as its own process with this interpreter (elias: ``resize_lora.py``;
ours: ``python -m loratools resize``), same base, LoRA and recipe, one output folder each.

- cold: before each cold run, that tool's norm cache is emptied (ours: the ``--cache-dir`` folder the
  bench gives it; elias: this base's entry in ``DIR/norms_cache.json``) and the base's and LoRA's
  pages are dropped from the page cache (fsync + ``posix_fadvise(DONTNEED)``; the bytes still
  resident after the drop are checked with ``fincore`` when present and reported). The other
  tool's cache is left alone (it does not matter to this run), so the warm pair finds both full.
- warm: right after the cold pair: norm caches filled by it, files' pages in memory.

Per run: wall seconds, peak RSS (``wait4`` rusage of that child) minus the peak RSS of a child that
only imports torch, and MB read from disk (rusage ``ru_inblock``). Both outputs' kept ranks are
compared per layer (layers matched through ``loratools.keys``' base targets). Reference: the cold
time to just read, sequentially, the base weights that the LoRA's modules map to (``loratools.keys``).
Exit 1 when a tool fails (its stderr tail is printed); ratios below target are only reported.

Run: ``python bench/bench_resize.py --elias ../resize_lora [--only locon64/fro] [--repeat 2] [--threads 1]
[--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sdxl_inputs import LORAS, needed_base_ranges  # noqa: E402

RECIPES = {"fro": "fro_ckpt=1,thr=-3.55", "spn": "spn_lora=1,thr=-0.7"}
TOOLS = ("elias", "ours")


@dataclass
class Run:
    """One child process: what it cost."""

    seconds: float
    rss_mb: float  # peak RSS, whole process
    read_mb: float  # read from disk (not from the page cache)
    resident_base_mb: float | None = None  # base bytes in the page cache when it started (cold: ~0)
    output: str | None = None


@dataclass
class Case:
    lora: str
    recipe: str
    temp: str
    runs: dict[str, list[Run]] = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.lora}/{self.recipe}/{self.temp}"


class ToolFailed(RuntimeError):
    pass


def run_child(cmd: list[str], log: Path, env: dict | None = None) -> Run:
    """Run ``cmd`` to completion; wall time and this child's own rusage (``wait4``)."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise ToolFailed(f"{' '.join(cmd[:3])} ... exited {p.returncode}:\n{tail}")
    return Run(seconds, ru.ru_maxrss / 1024, ru.ru_inblock * 512 / 1e6)


def drop_pages(path: Path) -> None:
    """Evict ``path`` from the page cache (written back first, so no dirty page stays)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_mb(path: Path) -> float | None:
    """Bytes of ``path`` in the page cache, by util-linux ``fincore`` (None without it)."""
    if not shutil.which("fincore"):
        return None
    p = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                       capture_output=True, text=True)
    return int(p.stdout.split()[0]) / 1e6 if p.returncode == 0 and p.stdout.strip() else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.work: Path = args.workdir
        self.elias: Path = args.elias.resolve()
        self.base = (self.work / "base.safetensors").resolve()
        self.ours_cache = self.work / "ours-norm-cache"
        self.elias_cache = self.elias / "norms_cache.json"
        self.env = None if not args.threads else {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                                                  "MKL_NUM_THREADS": str(args.threads)}

    # -- caches ----------------------------------------------------------------------------

    def empty_cache(self, tool: str) -> None:
        if tool == "ours":
            shutil.rmtree(self.ours_cache, ignore_errors=True)
        elif self.elias_cache.is_file():  # keyed by the resolved base path; other bases' entries stay
            data = json.loads(self.elias_cache.read_text())
            if data.pop(str(self.base), None) is not None:
                self.elias_cache.write_text(json.dumps(data))

    def go_cold(self, tool: str, lora: Path) -> float | None:
        """Empty ``tool``'s norm cache (the other tool's does not matter to this run, and emptying it
        would make the warm run after the pair cold again) and drop the files' pages."""
        self.empty_cache(tool)
        for f in (self.base, lora):
            drop_pages(f)
        return resident_mb(self.base)

    # -- tools -----------------------------------------------------------------------------

    def command(self, tool: str, lora: Path, recipe: str, out: Path) -> list[str]:
        if tool == "elias":
            return [sys.executable, str(self.elias / "resize_lora.py"), str(self.base), str(lora), "-o", str(out),
                    "-r", recipe, "-d", "cpu"]
        return [sys.executable, "-m", "loratools", "resize", "-o", str(out), "-r", recipe, "--cache-dir",
                str(self.ours_cache), "--overwrite", str(self.base), str(lora)]

    def run_tool(self, tool: str, case: Case, lora: Path, cold: bool) -> Run:
        out = self.work / "out" / case.id.replace("/", "-") / tool
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        resident = self.go_cold(tool, lora) if cold else resident_mb(self.base)
        run = run_child(self.command(tool, lora, RECIPES[case.recipe], out), out.with_suffix(".log"), self.env)
        run.resident_base_mb = resident
        found = sorted(out.glob("*.safetensors"))
        if len(found) != 1:
            raise ToolFailed(f"{tool} wrote {len(found)} .safetensors files in {out}, expected 1")
        run.output = str(found[0])
        return run

    def reference_read(self, lora: Path) -> dict:
        """Cold sequential read of the base weights ``lora``'s modules map to."""
        ranges = needed_base_ranges(self.base, lora)
        drop_pages(self.base)
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        t0 = time.perf_counter()
        with open(self.base, "rb", buffering=0) as f:
            for _, offset, size in ranges:
                f.seek(offset)
                while size:
                    size -= f.readinto(view[:min(size, len(buf))])
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "tensors": len(ranges), "mb": sum(r[2] for r in ranges) / 1e6}


def kept_ranks(path: str | Path) -> dict[str, int]:
    """Module name -> kept rank (``lora_down``'s first dim) from a safetensors header."""
    from loratools.io import read_header

    return {k.removesuffix(".lora_down.weight"): t.shape[0] for k, t in read_header(path).tensors.items()
            if k.endswith(".lora_down.weight")}


def compare_ranks(a: dict[str, int], b: dict[str, int], modules: list[str], target=lambda n: n) -> dict:
    """Per input module, the rank each output kept (a module absent from an output kept 0; modules
    are matched by ``target``, the base weight they change, so renamed outputs still compare)."""
    by_a = {target(n): r for n, r in a.items()}
    by_b = {target(n): r for n, r in b.items()}
    differ = [(n, by_a.get(target(n), 0), by_b.get(target(n), 0)) for n in modules
              if by_a.get(target(n), 0) != by_b.get(target(n), 0)]
    return {"identical": len(modules) - len(differ), "modules": len(modules), "differ": differ,
            "kept_total": [sum(by_a.get(target(n), 0) for n in modules), sum(by_b.get(target(n), 0) for n in modules)]}


def _target_of(base: Path):
    from loratools.io import read_header
    from loratools.keys.index import BaseIndex

    index = BaseIndex.from_key_shapes({k: tuple(t.shape) for k, t in read_header(base).tensors.items()})
    return lambda n: (index[n].key, index[n].rows) if n in index else n


def _selected(case_id: str, only: list[str]) -> bool:
    parts = case_id.split("/")
    return not only or any(all(p in parts for p in o.split("/")) for o in only)


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Needs ~8 GB of disk in --workdir (inputs are built once and reused).")
    ap.add_argument("--elias", type=Path, required=True, help="clone of elias-gaeros/resize_lora")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratools-bench-resize"),
                    help="inputs and outputs (~8 GB; default %(default)s)")
    ap.add_argument("--only", default="", help="comma-separated case filters, e.g. locon64, lora32/spn, "
                                               "locon256/fro/cold (a warm case also runs its cold pair)")
    ap.add_argument("--repeat", type=int, default=1, help="pairs per case; tool order alternates (default 1)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP/MKL threads of both tools (default: theirs). On a shared box, torch threads "
                         "that outnumber the free cores spin: both tools ran 4-6x slower with 2 threads on 1 core")
    args = ap.parse_args()
    if not (args.elias / "resize_lora.py").is_file():
        ap.error(f"--elias {args.elias}: no resize_lora.py there")
    only = [o for o in args.only.split(",") if o]
    args.workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    load_before = os.getloadavg()

    # Built by a child: this process must stay small, because a child's peak RSS starts at its
    # parent's (subprocess spawns with vfork; exec keeps the old mm's high-water mark).
    subprocess.run([sys.executable, str(Path(__file__).with_name("sdxl_inputs.py")), str(args.workdir)], check=True)
    loras = {name: args.workdir / f"{name}.safetensors" for name in LORAS}
    torch_run = run_child([sys.executable, "-c", "import torch"], args.workdir / "torch-only.log")
    print(f"load {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; {os.cpu_count()} CPUs; "
          f"python -c 'import torch': {torch_run.seconds:.2f} s, peak RSS {torch_run.rss_mb:.0f} MB", flush=True)

    target = _target_of(bench.base)
    cases: list[Case] = []
    references: dict[str, dict] = {}
    failed = None
    try:
        for lname, lora in loras.items():
            plan = [rid for rid in RECIPES if any(_selected(f"{lname}/{rid}/{t}", only) for t in ("cold", "warm"))]
            if not plan:
                continue
            if "fro" in plan:
                references[lname] = ref = bench.reference_read(lora)
                print(f"{lname}: cold read of the {ref['tensors']} base weights it maps to ({ref['mb']:.0f} MB): "
                      f"{ref['seconds']:.1f} s", flush=True)
            modules = sorted(kept_ranks(lora))
            for rid in plan:
                cold, warm = Case(lname, rid, "cold"), Case(lname, rid, "warm")
                for rep in range(args.repeat):
                    order = TOOLS if rep % 2 == 0 else TOOLS[::-1]
                    for case in (cold, warm):
                        for tool in order:
                            run = bench.run_tool(tool, case, lora, cold=case is cold)
                            case.runs.setdefault(tool, []).append(run)
                            print(f"  {case.id} {tool}: {run.seconds:.1f} s, RSS {run.rss_mb:.0f} MB, "
                                  f"read {run.read_mb:.0f} MB", flush=True)
                        outs = [kept_ranks(case.runs[t][-1].output) for t in TOOLS]
                        case.ranks = compare_ranks(*outs, modules, target)
                cases += [c for c in (cold, warm) if _selected(c.id, only)]
    except ToolFailed as e:
        failed = str(e)
    load_after = os.getloadavg()
    own_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if own_mb >= torch_run.rss_mb:
        print(f"warning: this process peaked at {own_mb:.0f} MB, so children's peak RSS may be its own")

    print("\n| case | elias s | ours s | elias/ours | ranks identical | RSS above torch elias / ours MB "
          "| disk read elias / ours MB | LoRA MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for c in cases:
        e, o = (_median([r.seconds for r in c.runs[t]]) for t in TOOLS)
        rss = [max(r.rss_mb for r in c.runs[t]) - torch_run.rss_mb for t in TOOLS]
        rd = [_median([r.read_mb for r in c.runs[t]]) for t in TOOLS]
        size = Path(loras[c.lora]).stat().st_size / 1e6
        rk = c.ranks
        rows.append({"case": c.id, "elias_s": e, "ours_s": o, "ratio": e / o, "rss_above_torch_mb": rss,
                     "read_mb": rd, "lora_mb": size, "ranks": rk,
                     "runs": {t: [asdict(r) for r in c.runs[t]] for t in TOOLS}})
        print(f"| {c.id} | {e:.1f} | {o:.1f} | {e / o:.2f}x | {rk['identical']}/{rk['modules']} | "
              f"{rss[0]:.0f} / {rss[1]:.0f} | {rd[0]:.0f} / {rd[1]:.0f} | {size:.0f} |")
    for c in cases:
        if c.ranks["differ"]:
            shown = ", ".join(f"{n} {a} vs {b}" for n, a, b in c.ranks["differ"][:5])
            print(f"{c.id}: ranks differ (elias vs ours) on {len(c.ranks['differ'])} layers: {shown}")
    for c in cases:  # a cold fro run must read its base weights from disk, unless another process cached them
        need = references.get(c.lora, {}).get("mb") if c.recipe == "fro" and c.temp == "cold" else None
        short = [f"{t} {r.read_mb:.0f} MB" for t in TOOLS for r in c.runs[t] if need and r.read_mb < 0.8 * need]
        if short:
            print(f"warning: {c.id} read less from disk than the {need:.0f} MB of base weights it needs "
                  f"({', '.join(short)}): another process brought pages in; not a cold run")
    for lname, ref in references.items():
        print(f"reference {lname}: cold sequential read of {ref['mb']:.0f} MB of base weights {ref['seconds']:.1f} s")
    resid = [r.resident_base_mb for c in cases if c.temp == "cold" for t in TOOLS for r in c.runs[t]]
    if resid and resid[0] is not None:
        print(f"base pages resident at the start of cold runs (fincore): at most {max(resid):.0f} MB")
    print(f"load before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count(), "threads": args.threads,
            "torch_import": asdict(torch_run), "bench_process_rss_mb": own_mb, "references": references, "cases": rows, "failed": failed}, indent=1))
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
