"""Benchmark: `loratools train` against a plain diffusers + peft training loop, in one run.

Both train on the same base model (built here from configs with random weights, saved as an
fp16 diffusers folder: nothing is downloaded), the same images, resolution, batch size and
precision; each run is a separate process, so memory peaks and setup times are its own.

Runs (``--runs``):
- ``ref``: the simplest loop a user could write: diffusers UNet + peft LoRA r8 on every
  attention ``to_q/to_k/to_v/to_out.0`` (560 modules on SDXL), latents and text embeddings
  computed once, bf16 autocast, AdamW, gradient checkpointing, ``loss.item()`` each step.
- ``ours``: `loratools train` (``trainer.run.train``, what the CLI calls) on the same 560 modules
  (a LyCORIS preset file naming them), the same settings as sd-scripts flags.
- ``recipe``: `loratools train --config recipes/pony-locon.toml` as written (LoCon preset full,
  conv_dim 256, text encoders trained: 1052 modules; scale_weight_norms, max_grad_norm, multires
  noise, tensorboard logging), in bf16 without gradient accumulation so steps compare.
- ``lowvram``: `recipes/sdxl-lowvram.toml` (fp8 base, both caches; AdamW where bitsandbytes is missing).
Each kind can run with ``--torch_compile`` (``+c`` in ``--plan``). Reported: seconds per step (steady state, after ``--warmup``
steps), images/s, peak allocated/reserved GiB over the whole process (loading included) and in
the steady state, MFU (model FLOPs of one UNet forward+backward, counted with torch's flop
counter, against a bf16 matmul rate measured in the same run), setup seconds (process start to
the first training step), and each run's images/s against ``ref`` at the same batch.

Usage:
    python bench/bench_train.py --tiny                       # CPU, toy-width SDXL, b1 runs
    python bench/bench_train.py --arch sdxl --device cuda    # full-size SDXL, 1024 px
    python bench/bench_train.py --arch sd1 --plan "ref:1,4 ours:1,4 ours+c:1,4"   # SD1.5, 512 px
The toy model keeps SDXL's structure (every block, transformer depth 1/2/10, so the same module
counts) at 1/10 of its widths: on a CPU it shows the per-step and per-module overhead that bounds
a step on a fast GPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "trainer" / "configs"
RESULT = "BENCH_RESULT "

#: LyCORIS preset naming exactly the modules the reference loop's peft config targets.
ATTENTION_PRESET = """\
use_fnmatch = true
unet_target_module = []
unet_target_name = ["*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v", "*.attn1.to_out.0",
                    "*.attn2.to_q", "*.attn2.to_k", "*.attn2.to_v", "*.attn2.to_out.0"]
text_encoder_target_module = []
text_encoder_target_name = []
"""
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
#: What a GPU run measures (the issue's goals: 560 modules at batch 1 and 4, the seed recipe, the
#: low-VRAM recipe, with and without --torch_compile), and the CPU smoke run (overhead only).
FULL_PLAN = "ref:1 ours:1 ours+c:1 recipe:1 lowvram:1 ref:4 ours:4 ours+c:4 recipe+c:4"
TINY_PLAN = "ref:1 ours:1 recipe:1"


# --- the model ---------------------------------------------------------------------------------

def _json(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def model_configs(arch: str, toy: bool) -> dict[str, dict[str, Any]]:
    """Configs of the released model (``trainer/configs``), or the toy-width variant: every
    channel count / 10, heads kept at 32 wide, the same blocks and depths."""
    from loratools.tiny.tokenizer import EOS, tokenizer_vocab

    vocab, _ = tokenizer_vocab()
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    cfgs = {name: _json(CONFIGS / arch / f"{name}.json") for name in names}
    for name in names[2:]:  # the project's tiny tokenizer: its special ids, its vocabulary size
        cfgs[name].update(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab[EOS],
                          pad_token_id=vocab[EOS] if name == "text_encoder" else 0, vocab_size=len(vocab))
    if not toy:
        return cfgs
    unet = cfgs["unet"]
    unet["block_out_channels"] = [c // 10 for c in unet["block_out_channels"]]
    unet["attention_head_dim"] = [max(1, c // 32) for c in unet["block_out_channels"]] \
        if isinstance(unet["attention_head_dim"], list) else 1
    te_widths = []
    for name in names[2:]:
        te = cfgs[name]
        te["hidden_size"] = te["projection_dim"] = te["hidden_size"] // 16
        te["intermediate_size"] = te["hidden_size"] * 4
        te["num_attention_heads"] = max(1, te["hidden_size"] // 16)
        te_widths.append(te["hidden_size"])
    unet["cross_attention_dim"] = sum(te_widths)
    if arch == "sdxl":
        unet["addition_time_embed_dim"] = 8
        unet["projection_class_embeddings_input_dim"] = te_widths[-1] + 6 * 8
    vae = cfgs["vae"]
    vae["block_out_channels"] = [max(32, c // 8) for c in vae["block_out_channels"]]
    vae["layers_per_block"] = 1
    return cfgs


def build_model(arch: str, toy: bool, folder: Path, device: str) -> Path:
    """A random-weight model of `arch` saved as an fp16 diffusers folder (weights initialised on
    `device`, which is fast on a GPU even at 2.6 B parameters)."""
    import torch
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loratools.tiny.files import save_diffusers
    from loratools.tiny.models import SCHEDULER_CONFIG
    from loratools.tiny.tokenizer import make_tokenizer

    cfgs = model_configs(arch, toy)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfgs["unet"]).half()
        vae = AutoencoderKL(**cfgs["vae"]).half()
        te1 = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])).half()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfgs["text_encoder_2"])).half() \
            if arch == "sdxl" else None
    sched = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=make_tokenizer(),
                                         tokenizer_2=make_tokenizer(pad_token="!"), unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te1, tokenizer=make_tokenizer(), unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to("cpu")
    save_diffusers(pipe, folder)
    del pipe, unet, vae, te1, te2
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def make_images(root: Path, count: int, size: int) -> Path:
    """`count` RGB images of `size` px with captions in sd-scripts' `1_bench/` layout."""
    import numpy as np
    from PIL import Image

    concept = root / "1_bench"
    concept.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(concept / f"{i:02d}.png")
        (concept / f"{i:02d}.txt").write_text(f"tinychar, red circle, white background, picture {i}\n")
    return root


# --- measurements shared by the workers --------------------------------------------------------

class StepClock:
    """Host timestamps of the training steps, synchronised with the device at the two points
    that bound the steady state (the end of warm-up and the last step), so queued GPU work is
    counted without adding a synchronisation to every step."""

    def __init__(self, device: str, warmup: int, total: int) -> None:
        self.device, self.warmup, self.total = device, warmup, total
        self.ops = op_counter() if warmup >= 2 else None
        self.first_step_at: float | None = None
        self.t_warm: float | None = None
        self.t_end: float | None = None
        self.cpu_warm = self.cpu_end = 0.0
        self.peak_loading: tuple[float, float] = (0.0, 0.0)

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def loop_start(self) -> None:
        self.first_step_at = time.time()

    def step_end(self, step: int) -> None:
        import torch

        if self.ops is not None and step == self.warmup - 1:  # the last warm-up step is counted, not timed
            self.ops.__enter__()
        if self.ops is not None and step == self.warmup:
            self.ops.__exit__(None, None, None)
        if step == self.warmup:
            self._sync()
            self.t_warm = time.perf_counter()
            self.cpu_warm = time.process_time()
            if self.device == "cuda":
                self.peak_loading = (torch.cuda.max_memory_allocated() / 2**30,
                                     torch.cuda.max_memory_reserved() / 2**30)
                torch.cuda.reset_peak_memory_stats()
        if step == self.total:
            self._sync()
            self.t_end = time.perf_counter()
            self.cpu_end = time.process_time()

    def result(self, batch: int) -> dict[str, Any]:
        import torch

        steps = self.total - self.warmup
        s_per_step = (self.t_end - self.t_warm) / steps
        out: dict[str, Any] = {"s_per_step": s_per_step, "images_per_s": batch / s_per_step,
                               "first_step_at": self.first_step_at,
                               "cpu_s_per_step": (self.cpu_end - self.cpu_warm) / steps}
        if self.ops is not None:
            out["ops_per_step"] = self.ops.count
            out["top_ops"] = dict(self.ops.by_op.most_common(25))  # in --json: where the count comes from
        if self.device == "cuda":
            steady = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
            out.update(peak_alloc=max(self.peak_loading[0], steady[0]), peak_reserved=max(self.peak_loading[1], steady[1]),
                       steady_alloc=steady[0], steady_reserved=steady[1])
        else:
            import resource

            out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return out


def op_counter():
    """A dispatch mode that counts the ATen operators one step runs (forward, recomputation,
    backward, optimizer): each is at least one kernel launch and one trip through the dispatcher
    on a GPU, so the count measures the host-side work that bounds a fast GPU's step, on any
    device. Views and metadata queries count too; they cost host time as well."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.by_op: collections.Counter[str] = collections.Counter()

        @property
        def count(self) -> int:
            return self.by_op.total()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.by_op[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    return Counter()


def matmul_rate(device: str) -> float:
    """Measured dense matmul FLOP/s: bf16 8192^3 on a GPU, fp32 1024^3 on a CPU."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


# --- the reference loop ------------------------------------------------------------------------

def run_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """The plain loop: what a user writes with diffusers' and peft's documented APIs."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device, batch, model = spec["device"], spec["batch"], Path(spec["model"])
    dtype = torch.bfloat16
    sdxl = (model / "text_encoder_2").is_dir()
    clock = StepClock(device, spec["warmup"], spec["warmup"] + spec["steps"])
    unet = UNet2DConditionModel.from_pretrained(model / "unet", torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(model / "vae", torch_dtype=torch.float32).to(device)
    encoders = [CLIPTextModel.from_pretrained(model / "text_encoder", torch_dtype=dtype).to(device)]
    tokenizers = [CLIPTokenizer.from_pretrained(model / "tokenizer")]
    if sdxl:
        encoders.append(CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2", torch_dtype=dtype).to(device))
        tokenizers.append(CLIPTokenizer.from_pretrained(model / "tokenizer_2"))
    images = sorted((Path(spec["data"]) / "1_bench").glob("*.png"))
    with torch.no_grad():  # latents and text embeddings once, as --cache_latents/--cache_text_encoder_outputs
        latents, hidden, pooled = [], [], []
        for path in images:
            pixels = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
            pixels = (pixels.float() / 127.5 - 1).unsqueeze(0).to(device)
            latents.append(vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor)
            caption = path.with_suffix(".txt").read_text().strip()
            states = []
            for tok, enc in zip(tokenizers, encoders):
                ids = tok(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                out = enc(ids.to(device), output_hidden_states=True)
                states.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)
                if sdxl and isinstance(enc, CLIPTextModelWithProjection):
                    pooled.append(out.text_embeds)
            hidden.append(torch.cat(states, dim=-1))
    del vae, encoders
    latents, hidden = torch.cat(latents).to(dtype), torch.cat(hidden)
    pooled = torch.cat(pooled) if sdxl else None
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=PEFT_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    unet.enable_gradient_checkpointing()
    unet.train()
    # torch picks foreach AdamW for CUDA parameters; on a CPU it must be asked for, so the CPU run
    # counts the optimizer work a GPU run does
    optimizer = torch.optim.AdamW(params, lr=1e-4, **({"foreach": True} if device == "cpu" else {}))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000)
    size = latents.shape[-1] * 8
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)
    n = latents.shape[0]
    clock.loop_start()
    for step in range(1, clock.total + 1):
        idx = torch.randint(0, n, (batch,))
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        noisy = scheduler.add_noise(x0, noise, t)
        extra = {"added_cond_kwargs": {"text_embeds": pooled[idx], "time_ids": time_ids}} if sdxl else {}
        with torch.autocast(device_type=device, dtype=dtype):
            pred = unet(noisy, t, hidden[idx], **extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        clock.step_end(step)
    result = clock.result(batch)
    result["modules"] = sum(1 for name, _ in unet.named_modules() if name.endswith(".lora_A"))
    if spec.get("count_flops"):
        result["flops_per_image"] = count_unet_flops(unet, latents[:1], hidden[:1], pooled[:1] if sdxl else None,
                                                     time_ids[:1], dtype, device)
    return result


def count_unet_flops(unet, x0, hidden, pooled, time_ids, dtype, device) -> float:
    """Model FLOPs of one UNet forward+backward at batch 1 (recomputation excluded)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet.disable_gradient_checkpointing()
    extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} if pooled is not None else {}
    t = torch.tensor([500], device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device_type=device, dtype=dtype):
            pred = unet(x0, t, hidden, **extra).sample
        pred.float().square().mean().backward()
    return float(counter.get_total_flops())


# --- loratools train ---------------------------------------------------------------------------

def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """`loratools train` in this process: the CLI's own configuration path and `trainer.run.train`."""
    from trainer.config import resolve_config
    from trainer.run import TrainHooks, train

    batch = spec["batch"]
    clock = StepClock(spec["device"], spec["warmup"], spec["warmup"] + spec["steps"])
    argv = spec["argv"] + ["--train_batch_size", str(batch), "--max_train_steps", str(clock.total)]
    result = train(resolve_config(argv), hooks=TrainHooks(loop_start=clock.loop_start, step_end=clock.step_end))
    out = clock.result(batch)
    out["modules"] = result.modules
    out["finite"] = all(map(lambda v: v == v and abs(v) != float("inf"), result.losses))
    return out


def ours_argv(kind: str, spec: dict[str, Any], work: Path) -> list[str]:
    """sd-scripts flags for `kind`: "ours" (the reference's 560 attention modules, UNet only, both
    caches), "recipe" (recipes/pony-locon.toml as written: LoCon preset full conv_dim 256, text
    encoders trained, scale_weight_norms, max_grad_norm, multires noise, tensorboard logging) or
    "lowvram" (recipes/sdxl-lowvram.toml). Batch, steps, precision and paths are the bench's."""
    paths = ["--pretrained_model_name_or_path", spec["model"], "--train_data_dir", spec["data"],
             "--output_dir", str(work / f"out-{kind}-{spec['batch']}"), "--resolution", str(spec["resolution"]),
             "--seed", "1", "--mixed_precision", spec["precision"], "--save_precision", "bf16",
             "--caption_extension", ".txt", "--output_name", "bench", "--save_every_n_epochs", "0",
             "--gradient_accumulation_steps", "1"]
    if spec.get("compile"):
        paths.append("--torch_compile")
    if kind == "ours":
        preset = work / "attention-preset.toml"
        preset.write_text(ATTENTION_PRESET)
        return paths + ["--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--sdpa",
                        "--gradient_checkpointing", "--max_data_loader_n_workers", "0",
                        "--network_module", "lycoris.kohya", "--network_dim", "8", "--network_alpha", "8",
                        "--network_args", "algo=lora", f"preset={preset}", "--optimizer_type", "AdamW",
                        "--learning_rate", "1e-4", "--max_grad_norm", "1.0"]
    recipe = ROOT / "recipes" / ("pony-locon.toml" if kind == "recipe" else "sdxl-lowvram.toml")
    extra = ["--logging_dir", str(work / "logs"), "--min_bucket_reso", str(min(256, spec["resolution"]))]
    if kind == "lowvram" and not _has_bitsandbytes():
        extra += ["--optimizer_type", "AdamW"]
    return ["--config", str(recipe)] + paths + extra


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def parse_plan(text: str) -> list[tuple[str, bool, int]]:
    """`"ref:1,4 ours+c:1 recipe:1"` -> [(kind, compiled, batch), ...] in that order."""
    runs = []
    for token in text.split():
        name, _, batches = token.partition(":")
        kind, compiled = name.removesuffix("+c"), name.endswith("+c")
        if kind not in ("ref", "ours", "recipe", "lowvram") or (compiled and kind == "ref"):
            raise SystemExit(f"--plan: unknown run {name!r} (ref, ours, recipe, lowvram; +c = --torch_compile)")
        runs += [(kind, compiled, int(b)) for b in (batches or "1").split(",")]
    return runs


# --- the driver --------------------------------------------------------------------------------

def worker(args) -> None:
    spec = json.loads(args.spec)
    if spec["device"] == "cpu":
        import torch

        torch.set_num_threads(max(1, int(spec.get("threads") or torch.get_num_threads())))
    result = run_reference(spec) if spec["kind"] == "ref" else run_ours(spec)
    print(RESULT + json.dumps(result), flush=True)


def launch(spec: dict[str, Any], timeout: float, log: Path) -> dict[str, Any]:
    start = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--spec", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"{exc.stdout or ''}\n{exc.stderr or ''}")
        return {"error": f"timed out after {timeout:.0f} s"}
    log.write_text(proc.stdout + "\n" + proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
            result["setup_s"] = result.pop("first_step_at") - start
            result["wall_s"] = time.time() - start
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="toy-width model on the CPU (a minute; overhead, not FLOPs)")
    p.add_argument("--arch", choices=("sdxl", "sd1"), default="sdxl")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None)
    p.add_argument("--resolution", type=int, default=None, help="square training size (default 1024 SDXL, 512 SD1)")
    p.add_argument("--plan", default=None,
                   help="runs as kind[+c]:batches (kinds ref, ours, recipe, lowvram; +c adds --torch_compile); "
                        f"default {FULL_PLAN!r}, with --tiny {TINY_PLAN!r}")
    p.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--model", type=Path, default=None, help="reuse a model folder built by an earlier run")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    resolution = args.resolution or (256 if args.tiny else 1024 if args.arch == "sdxl" else 512)
    if args.tiny:
        args.steps, args.warmup, args.images = min(args.steps, 4), min(args.warmup, 2), min(args.images, 4)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.time()
    model = args.model or work / "model"
    if not (model / "model_index.json").exists():  # a --workdir of an earlier run keeps its model
        build_model(args.arch, args.tiny, model, device)
    data = make_images(work / "data", args.images, resolution)
    print(f"model {model} ({'toy-width' if args.tiny else 'full-size'} {args.arch}) and {args.images} images of "
          f"{resolution} px ready in {time.time() - t:.1f} s", file=sys.stderr)
    rate = matmul_rate(device)
    rows: list[dict[str, Any]] = []
    plan = parse_plan(args.plan or (TINY_PLAN if args.tiny else FULL_PLAN))
    flops = None
    for kind, compiled, batch in plan:
        spec = {"kind": kind, "device": device, "batch": batch, "model": str(model), "data": str(data),
                "resolution": resolution, "steps": args.steps, "warmup": args.warmup, "precision": "bf16",
                "compile": compiled, "count_flops": kind == "ref" and flops is None,
                "threads": 1 if args.tiny else 0}
        if kind != "ref":
            spec["argv"] = ours_argv(kind, spec, work)
        label = f"{kind}{' +compile' if compiled else ''} b{batch}"
        print(f"running {label} ...", file=sys.stderr, flush=True)
        res = launch(spec, args.timeout, work / f"log-{kind}{'-c' if compiled else ''}-b{batch}.txt")
        if "error" in res:
            print(f"  {label}: {res['error']}", file=sys.stderr, flush=True)
        else:
            print(f"  {label}: {res['s_per_step']:.3f} s/step, setup {res['setup_s']:.1f} s, "
                  f"peak {res.get('peak_alloc', res.get('peak_rss', 0)):.2f} GiB", file=sys.stderr, flush=True)
        flops = flops or res.get("flops_per_image")
        rows.append({"run": label, "kind": kind, "batch": batch, **res})
        _finish_rows(rows, flops, rate, device)
        if args.json:  # after every run, so a run cut short by a time limit keeps what it measured
            args.json.write_text(json.dumps({"rows": rows, "matmul_flops": rate, "flops_per_image": flops,
                                             "device": device, "arch": args.arch, "toy": args.tiny,
                                             "resolution": resolution}, indent=1))
    _print_table(rows, rate, flops, device)
    return 0 if all("error" not in r for r in rows) else 1


def _finish_rows(rows: list[dict[str, Any]], flops: float | None, rate: float, device: str) -> None:
    """Ratios against `ref` at the same batch and MFU, for every row measured so far."""
    for row in rows:
        if "error" in row:
            continue
        ref = next((r for r in rows if r["kind"] == "ref" and r["batch"] == row["batch"] and "error" not in r), None)
        if ref is not None:  # on a CPU: process CPU time, which other jobs on a shared box do not inflate
            key = "cpu_s_per_step" if device == "cpu" else "s_per_step"
            row["vs_ref"] = ref[key] / row[key]
        if flops:
            row["mfu"] = row["images_per_s"] * flops / rate


def _print_table(rows: list[dict[str, Any]], rate: float, flops: float | None, device: str) -> None:
    cols = [("run", "run", "{}"), ("modules", "modules", "{}"), ("s/step", "s_per_step", "{:.3f}"),
            ("CPU s/step", "cpu_s_per_step", "{:.3f}"), ("ops/step", "ops_per_step", "{}"),
            ("img/s", "images_per_s", "{:.2f}"), ("vs ref", "vs_ref", "{:.2f}x"), ("MFU", "mfu", "{:.1%}"),
            ("setup s", "setup_s", "{:.1f}")]
    if device == "cuda":
        cols += [("peak alloc GiB", "peak_alloc", "{:.2f}"), ("peak resv GiB", "peak_reserved", "{:.2f}"),
                 ("steady alloc GiB", "steady_alloc", "{:.2f}")]
    else:
        cols += [("peak RSS GiB", "peak_rss", "{:.2f}")]
    print(f"matmul rate {rate / 1e12:.1f} TFLOP/s; UNet forward+backward "
          f"{(flops or 0) / 1e12:.2f} TFLOP per image")
    print(" | ".join(c[0] for c in cols))
    for row in rows:
        if "error" in row:
            print(f"{row['run']} | error: {row['error']}")
            continue
        cells = []
        for _, key, fmt in cols:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        print(" | ".join(cells))


if __name__ == "__main__":
    sys.exit(main())
