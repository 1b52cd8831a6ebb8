"""The GPU check: one command a maintainer runs on a CUDA machine (under 8 minutes on one H200).

    python bench/gpu_check.py [--out gpu-check] [--stages tiny,bench,suite]

1. tiny: real `loratools train` runs on tiny SD1/SDXL models built here, in every precision the
   trainer offers on a GPU (bf16, fp16 with the grad scaler, full_fp16, full_bf16), SDXL with
   both caches, a LyCORIS LoCon with sample images, the pony and low-VRAM recipes scaled down,
   `--torch_compile` and `--fp8_base`; each must finish with finite losses and a file that
   `loratools check weights` passes (exit code 0).
2. bench: `bench/bench_train.py` at full size (SDXL, 1024 px): the trainer against a plain
   diffusers + peft loop, with and without `--torch_compile`.
3. suite: the whole test suite, on this machine (CUDA visible).
Prints one short table per stage and writes `summary.txt`, `summary.json` and the logs to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = "GPU_CHECK_RESULT "

#: name -> (tiny arch, extra sd-scripts flags); every run also gets `_common`'s flags.
TINY_RUNS: dict[str, tuple[str, list[str]]] = {
    "sd1 bf16": ("sd1", ["--mixed_precision", "bf16"]),
    "sd1 fp16": ("sd1", ["--mixed_precision", "fp16"]),
    "sd1 full_fp16": ("sd1", ["--mixed_precision", "fp16", "--full_fp16"]),
    "sd1 full_bf16": ("sd1", ["--mixed_precision", "bf16", "--full_bf16"]),
    "sdxl bf16 caches": ("sdxl", ["--mixed_precision", "bf16", "--cache_latents", "--cache_text_encoder_outputs",
                                  "--network_train_unet_only"]),
    "sdxl locon fp16 samples": ("sdxl", ["--mixed_precision", "fp16", "--no_half_vae", "--network_module",
                                         "lycoris.kohya", "--network_args", "algo=locon", "preset=full",
                                         "conv_dim=4", "conv_alpha=1", "--sample_prompts", "{prompts}",
                                         "--sample_every_n_steps", "2"]),
    "sdxl pony recipe": ("sdxl", ["--config", str(ROOT / "recipes" / "pony-locon.toml"), "--train_batch_size", "2",
                                  "--gradient_accumulation_steps", "2", "--logging_dir", "{work}/logs",
                                  "--max_data_loader_n_workers", "2", "--min_bucket_reso", "64"]),
    "sdxl lowvram recipe": ("sdxl", ["--config", str(ROOT / "recipes" / "sdxl-lowvram.toml"), "--optimizer_type",
                                     "{lowvram_optimizer}", "--min_bucket_reso", "64"]),
    "sdxl torch_compile": ("sdxl", ["--mixed_precision", "bf16", "--torch_compile", "--cache_latents"]),
    "sdxl fp8_base": ("sdxl", ["--mixed_precision", "bf16", "--fp8_base", "--network_train_unet_only"]),
}


def _common(model: Path, data: Path, out: Path) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "check", "--resolution", "64", "--caption_extension", ".txt", "--max_train_steps", "4",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "5e-3", "--unet_lr", "5e-3",
            "--text_encoder_lr", "5e-3", "--seed", "1",
            # bf16 files: 4 steps leave some factors below fp16's normal range, which check weights
            # rightly reports as underflow
            "--save_precision", "bf16"]


def tiny_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One tiny run in this process (the CLI's configuration path and `trainer.run.train`)."""
    import torch

    from trainer.config import resolve_config
    from trainer.run import train

    result = train(resolve_config(spec["argv"]))
    losses = result.losses
    return {"steps": result.global_step, "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "finite": bool(losses) and all(torch.isfinite(torch.tensor(losses)).tolist()),
            "file": str(result.final_file), "samples": len(result.sample_files),
            "skipped_steps": result.skipped_steps, "device": str(torch.cuda.get_device_name(0))
            if torch.cuda.is_available() else "cpu"}


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        return None


def stage_tiny(work: Path, only: list[str] | None, timeout: float, jobs: int, log: list[str]) -> list[dict]:
    """Every tiny run (`jobs` at a time; the GPU has room), then `check weights` on its file."""
    from loratools.tiny import build_pipeline, make_dataset, save_diffusers

    models = {arch: save_diffusers(build_pipeline(arch, seed=0), work / f"tiny-{arch}") for arch in ("sd1", "sdxl")}
    data = {arch: make_dataset(work / f"data-{arch}", arch, 4, repeats=2).root for arch in ("sd1", "sdxl")}
    prompts = work / "prompts.txt"
    prompts.write_text("tinychar, red circle --w 64 --h 64 --s 2 --d 1\n")
    try:
        import bitsandbytes  # noqa: F401
        lowvram_optimizer = "AdamW8bit"
    except ImportError:
        lowvram_optimizer = "AdamW"
    names = [n for n in TINY_RUNS if not only or n in only]

    def one(name: str) -> dict:
        arch, extra = TINY_RUNS[name]
        out = work / ("out-" + name.replace(" ", "-"))
        fill = {"prompts": str(prompts), "work": str(work), "lowvram_optimizer": lowvram_optimizer}
        argv = [a.format(**fill) for a in extra]
        # a recipe comes first so that the common flags override its paths and sizes
        argv = argv[:2] + _common(models[arch], data[arch], out) + argv[2:] if argv[:1] == ["--config"] else \
            _common(models[arch], data[arch], out) + argv
        start = time.time()
        proc = _run([sys.executable, __file__, "--tiny-worker", json.dumps({"argv": argv})], timeout)
        row: dict[str, Any] = {"run": name, "seconds": round(time.time() - start, 1)}
        if proc is None:
            return {**row, "ok": False, "error": f"timed out after {timeout:.0f} s"}
        log.append(f"===== {name}\n{' '.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode != 0 or not found:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {**row, "ok": False, "error": f"exit {proc.returncode}: {tail[:240]}"}
        row.update(json.loads(found[-1][len(RESULT):]))
        check = _run([sys.executable, "-m", "loratools", "check", "weights", row["file"], "--json"], timeout)
        row["check_exit"] = None if check is None else check.returncode
        if check is not None:
            log.append(f"----- check weights {name}\n{check.stdout[-2000:]}\n{check.stderr[-1000:]}")
        row["ok"] = bool(row["finite"]) and row["check_exit"] == 0 and row["steps"] == 4
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, names))


def stage_bench(out: Path, work: Path, args: list[str], timeout: float, log: list[str]) -> dict:
    """bench_train.py in its own process; what it measured survives a timeout (it writes its JSON
    after every run), and the tails of its per-run logs go to the log."""
    bench_json = out / "bench.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--json", str(bench_json),
           "--workdir", str(work / "bench"), *args]
    start = time.time()
    proc = _run(cmd, timeout)
    seconds = time.time() - start
    doc = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    for path in sorted((work / "bench").glob("log-*.txt")):
        log.append(f"----- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
    if proc is None:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": seconds, **doc}
    log.append(f"===== bench_train {' '.join(args)}\n{proc.stdout}\n{proc.stderr[-8000:]}")
    return {"ok": proc.returncode == 0, "table": proc.stdout, "seconds": seconds, **doc}


def stage_suite(timeout: float, workers: int, log: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", str(workers), "-p", "no:cacheprovider"]
    start = time.time()
    proc = _run(cmd, timeout, env={"OMP_NUM_THREADS": "1"})
    seconds = time.time() - start
    if proc is None:
        return {"ok": False, "summary": f"timed out after {timeout:.0f} s", "seconds": seconds}
    lines = proc.stdout.strip().splitlines()
    log.append(f"===== test suite\n" + "\n".join(lines[-200:]) + "\n" + proc.stderr[-3000:])
    summary = next((line for line in reversed(lines) if " passed" in line or " failed" in line or "error" in line),
                   lines[-1] if lines else "no output")
    return {"ok": proc.returncode == 0, "summary": summary.strip("= "), "seconds": seconds,
            "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))][:60]}


def _tiny_table(rows: list[dict]) -> str:
    out = ["tiny runs | ok | steps | loss first -> last | check weights | samples | s"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['run']} | FAIL | - | {r['error']} | - | - | {r['seconds']}")
            continue
        loss = f"{r['loss_first']:.4f} -> {r['loss_last']:.4f}" if r["loss_first"] is not None else "-"
        check = {0: "clean", 1: "problems", None: "timed out"}.get(r["check_exit"], f"exit {r['check_exit']}")
        out.append(f"{r['run']} | {'ok' if r['ok'] else 'FAIL'} | {r['steps']} | {loss} | {check} | "
                   f"{r['samples']} | {r['seconds']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-check"))
    p.add_argument("--stages", default="tiny,bench,suite")
    p.add_argument("--only", default="", help="comma-separated tiny run names (default: all)")
    p.add_argument("--jobs", type=int, default=4, help="tiny runs at a time")
    p.add_argument("--bench-args", default="--arch sdxl --steps 6 --warmup 4 --images 4",
                   help="arguments of bench/bench_train.py (its default --plan: every kind, with and without compile)")
    p.add_argument("--suite-workers", type=int, default=8)
    p.add_argument("--bench-timeout", type=float, default=560)
    p.add_argument("--timeout", type=float, default=240, help="seconds per stage step")
    p.add_argument("--tiny-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny_worker:
        print(RESULT + json.dumps(tiny_worker(json.loads(args.tiny_worker))), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    summary: dict[str, Any] = {}
    text: list[str] = []
    log: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))

    def emit(block: str) -> None:
        print(block, flush=True)
        text.append(block)
        (args.out / "summary.txt").write_text("\n\n".join(text) + "\n")
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (args.out / "log.txt").write_text("\n".join(log))

    t0 = time.time()
    if "tiny" in stages:
        only = [s.strip() for s in args.only.split(",") if s.strip()] or None
        summary["tiny"] = stage_tiny(work, only, args.timeout, args.jobs, log)
        emit(_tiny_table(summary["tiny"]) + f"\n(tiny stage {time.time() - t0:.0f} s)")
    if "bench" in stages:
        summary["bench"] = stage_bench(args.out, work, args.bench_args.split(), args.bench_timeout, log)
        bench = summary["bench"]
        rows = "\n".join(f"{r['run']}: " + (r["error"] if "error" in r else
                          f"{r['s_per_step']:.3f} s/step, {r.get('vs_ref', 0):.2f}x ref") for r in bench.get("rows", []))
        emit(bench.get("table") or f"bench: {bench.get('error')}\n{rows}")
    if "suite" in stages:
        summary["suite"] = stage_suite(max(args.timeout, 300), args.suite_workers, log)
        suite = summary["suite"]
        emit(f"test suite: {suite['summary']} ({suite['seconds']:.0f} s)\n" + "\n".join(suite.get("failures", [])))
    ok = all(r.get("ok") for r in summary.get("tiny", [])) and all(
        summary[s].get("ok") for s in ("bench", "suite") if s in summary)
    emit(f"gpu check: {'PASSED' if ok else 'FAILED'} in {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
