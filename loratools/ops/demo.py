"""``loratools demo``: the seed guides' whole workflow, end to end, on built-in tiny models.

A newcomer's first command. Nothing is downloaded and no GPU is needed: a tiny SDXL-like (or
SD1-like) model is built from configs (``loratools.tiny``) and saved both as a single-file
checkpoint and as a diffusers folder; a synthetic captioned dataset is written in sd-scripts'
``N_concept`` layout; then the steps the guides run on a real model run here, through the same
code the commands use:

1. train a LoCon with sample images (``trainer.run.train``, configured by sd-scripts flags);
2. resize it against the base with ``fro_ckpt=1,thr=-3.55`` and with ``sv_fro=0.9``
   (``loratools.ops.resize``, one decomposition shared by both recipes);
3. check the trained and resized files for dead / NaN / fp16-underflowed modules
   (``loratools.ops.check_weights``);
4. merge the LoCon into the single-file base with ``--verify`` (``loratools.ops.merge``) and
   render the same prompt with the base and the merged checkpoint;
5. merge it again with block weights (``LORA:RATIO:OUTALL``: the output blocks only);
6. extract a LoCon back from the merged checkpoint and its base (``loratools.ops.extract``) and
   compare it with the trained LoCon at the merge ratio;
7. post-hoc EMA of the LoCons the run saved (``loratools.ops.ema``, ``--sigma_rel``);
8. read the LoCon's metadata: base model, rank/alpha, training record, trigger words
   (``loratools.ops.metadata``).

Each step's report carries the equivalent ``loratools`` command line, so the demo doubles as a
worked example of the CLI. ``run_demo`` never prints; ``progress`` receives one line per step.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratools.errors import OutputExistsError, UsageError

MARKER = ".loratools-demo"
#: What the demo writes inside its output folder; only these are ever replaced.
ENTRIES = ("base", "dataset", "train", "resized", "merged", "extracted", "ema", "report.json", MARKER)
ARCHES = ("sdxl", "sd1")
CONCEPT = "tinychar"
RECIPES = ("fro_ckpt=1,thr=-3.55", "sv_fro=0.9")
MERGE_RATIO = 0.8  # the LoCon's strength in the merged checkpoint (LORA:RATIO on the command line)
BLOCKS = "OUTALL"  # the block-weight preset of the second merge (recipes/lbw/OUTALL.toml)
EMA_SIGMA_REL = 0.2  # the post-hoc EMA's profile (--sigma_rel)
PROMPT = f"{CONCEPT}, red circle, white background, stripes"
#: The seeds' LoCon per architecture: the Pony/SDXL guide (Hungarian) trains lycoris.kohya with
#: algo=locon preset=full; the SD1.5 guide (Russian) kohya's own networks.lora with conv_dim.
NETWORKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sdxl": ("lycoris.kohya", ("algo=locon", "preset=full")),
    "sd1": ("networks.lora", ()),
}

Progress = Callable[[str], None]
STEPS = 10  # base, dataset, train, resize, check, merge, blocks, extract, ema, metadata


@dataclass(frozen=True)
class DemoOptions:
    """What to run and where.

    Attributes:
        output_dir: folder for everything the demo writes (created if missing). A non-empty
            folder that no earlier demo wrote is refused unless ``overwrite``.
        arch: ``"sdxl"`` (the seeds' Pony/SDXL case) or ``"sd1"``.
        steps: optimizer steps; default 120 (``quick``: 8); the LoCon is also saved every third of them.
        quick: fewer images, steps and sample steps (for tests and a smoke check).
        overwrite: allow a non-empty folder that is not a demo folder (only the demo's own
            entries, ``ENTRIES``, are replaced; other files are left alone).
        seed: seeds the models, the dataset and training.
    """

    output_dir: Path = Path("demo-output")
    arch: str = "sdxl"
    steps: int | None = None
    quick: bool = False
    overwrite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise UsageError(f"--arch {self.arch!r}: choose one of {', '.join(ARCHES)}")
        if self.steps is not None and self.steps < 2:
            raise UsageError(f"--steps must be at least 2 (the EMA step averages the run's saves), got {self.steps}")

    @property
    def settings(self) -> Settings:
        steps = self.steps if self.steps is not None else (8 if self.quick else 120)
        return Settings(
            steps=steps,
            images=4 if self.quick else 6,
            sample_every=max(1, steps // 2),
            sample_steps=4 if self.quick else 8,
            save_every=max(1, steps // 3),
        )


@dataclass(frozen=True)
class Settings:
    """Training sizes derived from the options (a LoCon with linear dim 8, conv dim 4)."""

    steps: int
    images: int
    sample_every: int
    sample_steps: int
    save_every: int = 0
    repeats: int = 5
    batch_size: int = 2
    network_dim: int = 8
    network_alpha: int = 4
    conv_dim: int = 4
    conv_alpha: int = 2
    learning_rate: float = 2e-3


@dataclass
class BaseReport:
    """The tiny base model, as the two files a user would have."""

    arch: str
    single_file: Path
    diffusers_dir: Path
    single_file_bytes: int
    parameters: int


@dataclass
class DatasetReport:
    """The training folder (``--train_data_dir``) and its one ``N_concept`` subfolder."""

    root: Path
    concept_dir: Path
    images: int
    repeats: int
    trigger: str
    example_caption: str


@dataclass
class TrainReport:
    """The trained LoCon, its loss per optimizer step, sample images and the recipe that ran."""

    lora: Path
    bytes: int
    network: str
    modules: int
    steps: int
    losses: list[float]
    samples: list[Path]
    prompts: Path
    recipe: Path
    warnings: list[str]
    command: str
    saved: list[Path] = field(default_factory=list)  # every LoCon the run wrote, oldest first

    @property
    def loss_first(self) -> float:
        return self.losses[0]

    @property
    def loss_last(self) -> float:
        return self.losses[-1]

    def loss_window(self) -> tuple[float, float]:
        """Mean loss of the first and of the last quarter of the steps (single steps are noisy:
        each draws its own timesteps)."""
        n = max(1, len(self.losses) // 4)
        return sum(self.losses[:n]) / n, sum(self.losses[-n:]) / n


@dataclass
class ResizeReport:
    """One recipe's output; ``summary`` is the line ``loratools resize`` prints for it."""

    recipe: str
    path: Path
    status: str
    rank_before: int
    rank_after: int
    bytes_before: int
    bytes_after: int
    fro_retained: float
    threshold: float | None
    layers_kept: int
    layers_dropped: int
    summary: str


@dataclass
class CheckReport:
    """``check weights`` on one file: module counts per status and what they mean."""

    path: Path
    modules: int
    counts: dict[str, int]
    explanations: list[str]
    failed: bool


@dataclass
class MergeReport:
    """The merged checkpoint, how much of the LoCon it applied, and base/merged previews."""

    path: Path
    bytes: int
    ratio: float
    modules: int
    applied: int
    patched_keys: int
    copied_keys: int
    verified: bool | None
    preview_base: Path
    preview_merged: Path
    preview_change: float  # mean |merged - base| pixel difference, 0..1
    command: str


@dataclass
class BlocksReport:
    """The LoCon merged with block weights: which modules the preset left at 0."""

    path: Path
    preset: str
    applied: int
    zeroed: int
    unnamed: int
    preview: Path
    preview_change: float  # mean |blocks - base| pixel difference, 0..1
    command: str


@dataclass
class ExtractReport:
    """A LoCon extracted from the merged checkpoint, against the trained LoCon at the merge ratio."""

    path: Path
    bytes: int
    recipe: str
    layers: int
    ranks: tuple[int, int]
    kept: float  # share of the merged-minus-base difference the file holds (Frobenius)
    deviation: float  # ||extracted - ratio * trained|| / ||ratio * trained|| over the modules both have
    compared: int
    command: str


@dataclass
class EmaReport:
    """The post-hoc EMA of the run's saved LoCons."""

    path: Path
    bytes: int
    sigma_rel: float
    steps: list[int]
    weights: list[float]
    max_rank: int
    command: str


@dataclass
class MetadataReport:
    """What ``metadata show`` reads from the LoCon's header."""

    path: Path
    architecture: str | None
    base_model: dict[str, Any]
    network: dict[str, Any]
    ranks: dict[str, int]
    trigger_words: list[tuple[str, int]]
    datasets: list[dict[str, Any]]
    command: str


@dataclass
class DemoResult:
    """Everything the demo produced, step by step."""

    output_dir: Path
    arch: str
    base: BaseReport
    dataset: DatasetReport
    train: TrainReport
    resized: list[ResizeReport]
    resize_command: str
    checks: list[CheckReport]
    check_command: str
    merge: MergeReport
    blocks: BlocksReport
    extract: ExtractReport
    ema: EmaReport
    metadata: MetadataReport
    seconds: float
    steps_seconds: dict[str, float] = field(default_factory=dict)  # step name -> wall seconds

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings); also written to ``report.json``."""
        data = _jsonable(asdict(self))
        lo, hi = self.train.loss_window()
        data["train"].update(loss_first=self.train.loss_first, loss_last=self.train.loss_last,
                             loss_first_quarter=lo, loss_last_quarter=hi)
        return data


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _shown(path: Path) -> Path:
    """``path`` relative to the working folder when it is inside it (shorter to read and to copy)."""
    cwd = Path.cwd()
    return path.relative_to(cwd) if path.is_absolute() and path.is_relative_to(cwd) else path


def _command(*parts: Any) -> str:
    """A shell command line, paths shown by ``_shown``."""
    return " ".join(shlex.quote(str(_shown(p) if isinstance(p, Path) else p)) for p in parts)


# ------------------------------------------------------------------------------- output folder

def prepare_output(folder: Path, overwrite: bool) -> None:
    """Make ``folder`` ready: refuse a foreign non-empty folder, remove the demo's old entries.

    Raises:
        UsageError: ``folder`` is a file.
        OutputExistsError: ``folder`` is non-empty, was not written by the demo, and no ``overwrite``.
    """
    if folder.exists() and not folder.is_dir():
        raise UsageError("the demo's output must be a folder, and this is a file; choose another --output-dir",
                         path=folder)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).exists() and not overwrite:
        raise OutputExistsError("folder is not empty and was not written by loratools demo; choose another "
                                "--output-dir or pass --overwrite (only the demo's own entries are replaced)",
                                path=folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ENTRIES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    (folder / MARKER).write_text("written by `loratools demo`; safe to delete\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------- steps

def _build_base(out: Path, arch: str, seed: int) -> BaseReport:
    from loratools.tiny import build_pipeline, save_diffusers, save_single_file

    pipe = build_pipeline(arch, seed=seed)
    folder = out / "base"
    folder.mkdir()
    name = f"tiny-{arch}"
    diffusers_dir = save_diffusers(pipe, folder / f"{name}-diffusers")
    single = save_single_file(pipe, folder / f"{name}.safetensors")
    params = sum(p.numel() for m in pipe.components.values() if hasattr(m, "parameters") for p in m.parameters())
    return BaseReport(arch, single, diffusers_dir, single.stat().st_size, params)


def _make_dataset(out: Path, arch: str, settings: Settings, seed: int) -> DatasetReport:
    from loratools.tiny import make_dataset

    ds = make_dataset(out / "dataset", arch, settings.images, repeats=settings.repeats, concept=CONCEPT, seed=seed)
    example = next(iter(ds.captions.values()), "")
    return DatasetReport(ds.root, ds.concept_dir, len(ds.images), ds.repeats, ds.trigger, example)


def train_argv(base: Path, data: Path, out: Path, prompts: Path, arch: str, settings: Settings,
               seed: int) -> list[str]:
    """sd-scripts flags of the demo's LoCon run (the seeds' recipe, shrunk to the tiny model)."""
    resolution = "64" if arch == "sd1" else "64,64"
    module, algo = NETWORKS[arch]
    return [
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
        "--output_name", f"{CONCEPT}-locon", "--resolution", resolution, "--enable_bucket",
        "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "32",
        "--caption_extension", ".txt", "--shuffle_caption", "--keep_tokens", "1",
        "--network_module", module, "--network_dim", str(settings.network_dim),
        "--network_alpha", str(settings.network_alpha), "--network_args", *algo,
        f"conv_dim={settings.conv_dim}", f"conv_alpha={settings.conv_alpha}",
        "--optimizer_type", "AdamW", "--learning_rate", str(settings.learning_rate),
        "--lr_scheduler", "cosine", "--max_train_steps", str(settings.steps),
        "--train_batch_size", str(settings.batch_size), "--cache_latents", "--max_data_loader_n_workers", "0",
        "--save_precision", "fp16", "--seed", str(seed), "--save_every_n_steps", str(settings.save_every),
        "--sample_prompts", str(prompts), "--sample_sampler", "euler_a",
        "--sample_every_n_steps", str(settings.sample_every), "--sample_at_first",
    ]


def network_label(arch: str) -> str:
    """How the LoCon was made, for the report: module and the arguments that make it a LoCon."""
    module, algo = NETWORKS[arch]
    return f"LoCon ({module} {' '.join(algo)})" if algo else f"LoCon ({module} with conv_dim)"


def _train(out: Path, base: BaseReport, dataset: DatasetReport, settings: Settings, seed: int) -> TrainReport:
    from trainer.config import config_to_toml, resolve_config
    from trainer.run import train

    folder = out / "train"
    folder.mkdir()
    prompts = folder / "prompts.txt"
    options = f"--w 64 --h 64 --s {settings.sample_steps} --l 5"
    prompts.write_text(f"{PROMPT} {options} --d {seed + 1}\n"
                       f"blue square, black background {options} --d {seed + 2}\n", encoding="utf-8")
    # The run is configured the way a user would: a TOML recipe of sd-scripts flags, so the command
    # shown for this step is exactly what ran. The base is the diffusers folder, as the Pony guide
    # trains from one; resize and merge use the single file, as resize_lora and A1111 users do.
    recipe = folder / "recipe.toml"
    recipe.write_text(config_to_toml(resolve_config(
        train_argv(base.diffusers_dir, dataset.root, folder, prompts, base.arch, settings, seed))), encoding="utf-8")
    result = train(resolve_config(["--config", str(recipe)]))
    assert result.final_file is not None  # a single process is always the main one
    from loratools.ops.metadata import summarize

    modules = sum(summarize(result.final_file).module_counts.values())
    return TrainReport(result.final_file, result.final_file.stat().st_size, network_label(base.arch),
                       modules, result.global_step, list(result.losses), list(result.sample_files), prompts, recipe,
                       list(result.warnings), _command("loratools", "train", "--config", recipe),
                       list(result.saved_files))


def _resize(out: Path, base: BaseReport, lora: Path) -> tuple[list[ResizeReport], str]:
    from loratools.ops.resize import Resizer

    folder = out / "resized"
    folder.mkdir()
    recipes = ":".join(RECIPES)
    # The norm cache lives in the user's cache folder; the demo's base is throwaway, so skip it.
    outcome = Resizer(base.single_file, cache_dir=None).resize(lora, recipes, output=folder)
    reports = [ResizeReport(o.recipe, o.path, o.status, o.rank_before, o.rank_after, o.size_before, o.size_after,
                            o.fro_retained, o.threshold, o.layers_kept, len(o.layers_dropped), o.summary_line())
               for o in outcome.outcomes]
    return reports, _command("loratools", "resize", "-o", folder, "-r", recipes, base.single_file, lora)


def _check(paths: Sequence[Path]) -> tuple[list[CheckReport], str]:
    from loratools.ops.check_weights import check_file

    reports = []
    for path in paths:
        r = check_file(path)
        reports.append(CheckReport(path, len(r.modules), dict(r.counts), list(r.explanations), r.failed))
    return reports, _command("loratools", "check", "weights", *paths)


def _merge(out: Path, base: BaseReport, lora: Path, seed: int) -> MergeReport:
    import numpy as np

    from loratools.ops.merge import MergeOptions, WeightedPath, merge_checkpoint
    from loratools.tiny import load_single_file, render

    folder = out / "merged"
    folder.mkdir()
    target = folder / f"tiny-{base.arch}-{CONCEPT}.safetensors"
    ratio = MERGE_RATIO
    res = merge_checkpoint(MergeOptions(base.single_file, [WeightedPath(lora, ratio)], target, verify=True))
    rep = res.adapters[0]
    images = {}
    for label, path in (("base", base.single_file), ("merged", target)):
        pipe = load_single_file(path, base.arch, seed=seed)
        images[label] = render(pipe, PROMPT, seed=seed, steps=4, size=64)
    previews = {label: _save_png(img, folder / f"preview-{label}.png") for label, img in images.items()}
    change = float(np.abs(images["merged"] - images["base"]).mean())
    return MergeReport(target, target.stat().st_size, ratio, rep.modules, rep.applied, res.patched_keys,
                       res.copied_keys, res.verified, previews["base"], previews["merged"], change,
                       _command("loratools", "merge", base.single_file, f"{_shown(lora)}:{ratio:g}", "-o", target,
                                "--verify"))


def _blocks(out: Path, base: BaseReport, lora: Path, seed: int) -> BlocksReport:
    import numpy as np

    from loratools.ops.merge import MergeOptions, WeightedPath, merge_checkpoint
    from loratools.tiny import load_single_file, render

    target = out / "merged" / f"tiny-{base.arch}-{CONCEPT}-{BLOCKS.lower()}.safetensors"
    res = merge_checkpoint(MergeOptions(base.single_file, [WeightedPath(lora, MERGE_RATIO, BLOCKS)], target))
    rep = res.adapters[0]
    images = [render(load_single_file(p, base.arch, seed=seed), PROMPT, seed=seed, steps=4, size=64)
              for p in (base.single_file, target)]
    preview = _save_png(images[1], out / "merged" / f"preview-{BLOCKS.lower()}.png")
    return BlocksReport(target, BLOCKS, rep.applied, rep.zeroed, rep.unnamed, preview,
                        float(np.abs(images[1] - images[0]).mean()),
                        _command("loratools", "merge", base.single_file, f"{_shown(lora)}:{MERGE_RATIO:g}:{BLOCKS}",
                                 "-o", target))


def _extract(out: Path, base: BaseReport, merged: Path, lora: Path, settings: Settings) -> ExtractReport:
    from loratools.adapters import load_adapter
    from loratools.ops.extract import ExtractOptions, extract

    folder = out / "extracted"
    folder.mkdir()
    target = folder / f"{CONCEPT}-extracted.safetensors"
    recipe = f"rank={settings.network_dim},conv_rank={settings.conv_dim}"
    res = extract(ExtractOptions(merged, base.single_file, target, recipe=recipe))
    got, trained = load_adapter(target).modules, load_adapter(lora).modules
    common = sorted(set(got) & set(trained))
    err = want = 0.0
    for name in common:
        expected = MERGE_RATIO * trained[name].delta()
        err += float((got[name].delta().reshape(expected.shape) - expected).norm()) ** 2
        want += float(expected.norm()) ** 2
    ranks = [r.rank for r in res.written]
    return ExtractReport(target, target.stat().st_size, recipe, len(res.written), (min(ranks), max(ranks)), res.kept,
                         (err / want) ** 0.5 if want else 0.0, len(common),
                         _command("loratools", "extract", merged, base.single_file, "-r", recipe, "-o", target))


def _ema(out: Path, base: BaseReport, saved: Sequence[Path]) -> EmaReport:
    from loratools.ops.ema import EmaOptions, post_hoc_ema

    folder = out / "ema"
    folder.mkdir()
    target = folder / f"{CONCEPT}-ema.safetensors"
    # --base: the tiny UNet is not the released SDXL layout, so its SGM names are resolved against it
    folder_in = saved[-1].parent  # the run's output folder: its LoCons, found by ema as a user would
    res = post_hoc_ema(EmaOptions([folder_in], target, sigma_rel=EMA_SIGMA_REL, base=base.single_file))
    return EmaReport(target, target.stat().st_size, EMA_SIGMA_REL, [i.step or 0 for i in res.inputs],
                     [i.weight for i in res.inputs], max(res.merge.ranks, default=0),
                     _command("loratools", "ema", folder_in, "--sigma_rel", EMA_SIGMA_REL, "--base", base.single_file,
                              "-o", target))


def _save_png(image: Any, path: Path) -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype("uint8")).save(path)
    return path


def _metadata(lora: Path) -> MetadataReport:
    from loratools.ops.metadata import summarize

    s = summarize(lora, top_tags=5)
    network = {k: s.training[k] for k in ("network module", "network dim", "network alpha", "network args", "steps",
                                         "resolution", "optimizer", "learning rate") if k in s.training}
    return MetadataReport(lora, s.arch_label, dict(s.base_model), network, dict(s.ranks), list(s.trigger_words),
                          [asdict(d) for d in s.datasets], _command("loratools", "metadata", "show", lora))


# ------------------------------------------------------------------------------------------ run

def run_demo(options: DemoOptions, progress: Progress | None = None) -> DemoResult:
    """Run the whole workflow into ``options.output_dir``; also writes ``report.json`` there.

    Args:
        options: see ``DemoOptions``.
        progress: called with one line as each step starts (the CLI prints it on stderr).
    Returns:
        A ``DemoResult`` with every path and number the steps produced.
    Raises:
        OutputExistsError: the output folder is someone else's (see ``DemoOptions.overwrite``).
    Example:
        >>> result = run_demo(DemoOptions(Path("demo-output"), quick=True))
        >>> result.train.loss_window(), [r.rank_after for r in result.resized]
    """
    prepare_output(Path(options.output_dir), options.overwrite)  # refuse before the slow imports
    import torch

    # Every tensor here is tiny: torch's thread pool only adds fan-out cost, and on a busy machine
    # its threads wait on each other (a tiny SDXL training step: 0.06 s on one thread, 0.85 s on
    # two with the machine's other processes running). The caller's setting is restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet_libraries():
            return _run(options, progress)
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Hide diffusers' and transformers' notes and progress bars for the demo's duration.

    They are about the libraries' own internals (torchvision is not installed, float32 modules,
    "Writing model shards" bars for a 6 MB model, lycoris-lora's module-creation notes) and would
    bury the seven step lines; the trainer's own summary and progress bar still show. Levels are
    restored after. lycoris-lora resets its logger's level when imported, so its notes are
    filtered instead (a filter survives that).
    """
    import logging

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    lycoris = logging.getLogger("LyCORIS")

    def below_warning(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING

    lycoris.addFilter(below_warning)

    levels = (tlog.get_verbosity(), dlog.get_verbosity())
    bars = (tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled())
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        lycoris.removeFilter(below_warning)
        tlog.set_verbosity(levels[0])
        dlog.set_verbosity(levels[1])
        for lib, enabled in ((tlog, bars[0]), (dlog, bars[1])):
            (lib.enable_progress_bar if enabled else lib.disable_progress_bar)()


def _run(options: DemoOptions, progress: Progress | None) -> DemoResult:
    say = progress or (lambda _msg: None)
    settings = options.settings
    t_start = time.perf_counter()
    out = Path(options.output_dir).resolve()
    timings: dict[str, float] = {}

    def step(name: str, message: str, fn: Callable[[], Any]) -> Any:
        say(f"[{len(timings) + 1}/{STEPS}] {message}")
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 3)
        return value

    base = step("base", f"building a tiny {options.arch.upper()} base model (single file + diffusers folder)",
                lambda: _build_base(out, options.arch, options.seed))
    dataset = step("dataset", f"writing {settings.images} captioned images in {settings.repeats}_{CONCEPT}/",
                   lambda: _make_dataset(out, options.arch, settings, options.seed))
    train = step("train", f"training a LoCon for {settings.steps} steps with sample images",
                 lambda: _train(out, base, dataset, settings, options.seed))
    resized, resize_cmd = step("resize", f"resizing with {' and '.join(RECIPES)}",
                               lambda: _resize(out, base, train.lora))
    written = [r.path for r in resized if r.status == "written"]
    checks, check_cmd = step("check", "checking weights", lambda: _check([train.lora, *written]))
    merge = step("merge", "merging the LoCon into the base checkpoint (with --verify)",
                 lambda: _merge(out, base, train.lora, options.seed))
    blocks = step("blocks", f"merging it with block weights ({BLOCKS}: the output blocks only)",
                  lambda: _blocks(out, base, train.lora, options.seed))
    extracted = step("extract", "extracting a LoCon from the merged checkpoint and the base",
                     lambda: _extract(out, base, merge.path, train.lora, settings))
    ema = step("ema", f"post-hoc EMA of the {len(train.saved)} LoCons the run saved",
               lambda: _ema(out, base, train.saved))
    meta = step("metadata", "reading the LoCon's metadata", lambda: _metadata(train.lora))
    result = DemoResult(out, options.arch, base, dataset, train, resized, resize_cmd, checks,
                        check_cmd, merge, blocks, extracted, ema, meta, time.perf_counter() - t_start, timings)
    (out / "report.json").write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    return result
