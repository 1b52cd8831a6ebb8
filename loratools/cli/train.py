"""`loratools train`: sd-scripts-compatible LoRA/LyCORIS training (SD1.x, SD2, SDXL/Pony).

The command only wires: the raw sd-scripts flags go to ``trainer.config.resolve_config``,
``--dry-run`` prints the resolved configuration and sd-scripts' step arithmetic from the images
on disk (no model, no torch), and otherwise ``trainer.run.train`` runs (imported lazily).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from loratools.cli.options import JsonOpt

HELP = (
    "Train a LoRA/LoCon (or any LyCORIS algorithm) with sd-scripts' flags.\n\n"
    "Every train_network.py / sdxl_train_network.py flag is accepted as sd-scripts spells it (--flag=value, "
    "--flag value, bare --flag for booleans, --network_args k=v k=v; dashes or underscores); a TOML recipe "
    "(--config) sets values that flags override. Flags accepted without effect, and the seed guides' typos "
    "(--spda, save_precision=fp32), are reported as warnings. --list-flags shows them all.\n\n"
    "Step arithmetic (as sd-scripts): batches per epoch = sum over buckets of ceil(images x repeats / batch size); "
    "optimizer steps per epoch = ceil(batches / processes / gradient_accumulation_steps); --max_train_epochs sets "
    "total steps = epochs x steps per epoch, otherwise epochs = ceil(max_train_steps / steps per epoch). "
    "Effective batch = batch size x processes x accumulation.\n\n"
    "Examples:\n\n"
    "  loratools train --config recipes/pony-locon.toml --dry-run \\\n"
    "      --pretrained_model_name_or_path pony/ --train_data_dir data/\n\n"
    "  accelerate launch --num_processes 2 -m loratools train --config my.toml"
)


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command(
        "train",
        help=HELP,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )(train)


def train(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "--config_file", help="TOML recipe (sd-scripts flag names as keys); flags override it.",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", "--dry_run", help="Print the resolved configuration, buckets and step arithmetic; load no model.")] = False,
    list_flags: Annotated[bool, typer.Option(
        "--list-flags", help="List every accepted sd-scripts flag with its default and exit.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train (see the help above)."""
    from loratools.cli.output import out
    from trainer.config import resolve_config

    if list_flags:
        _list_flags(json_out)
        return

    argv = (["--config", str(config)] if config is not None else []) + list(ctx.args)
    cfg = resolve_config(argv)
    if cfg.output_config:
        from trainer.config import config_to_toml

        for message in cfg.warnings:
            out.warn(message)
        typer.echo(config_to_toml(cfg), nl=False)
        return
    if dry_run:
        _dry_run(cfg, json_out)
        return
    if not cfg.pretrained_model_name_or_path:
        from loratools.errors import UsageError

        raise UsageError("--pretrained_model_name_or_path is required (a diffusers folder or a .safetensors/.ckpt file)")
    from trainer.run import train as run_train  # prints cfg.warnings once, on the main process

    run_train(cfg)


def _dry_run(cfg: Any, json_out: bool) -> None:
    from loratools.cli.output import out
    from trainer.data.layout import build_layouts
    from trainer.data.steps import plan_for_layouts

    _check_base_path(cfg.pretrained_model_name_or_path)
    layouts = build_layouts(cfg, seed=cfg.seed or 0)
    validation = build_layouts(cfg, validation=True) if any(l.spec.validation_split > 0 for l in layouts) else []
    plan = plan_for_layouts(cfg, layouts, num_validation_images=sum(v.num_train_images for v in validation))
    if not cfg.pretrained_model_name_or_path:
        cfg.warnings.append("--pretrained_model_name_or_path is not set; a real run needs it")
    outputs = _planned_outputs(cfg, plan)
    buckets = [{"dataset": n, "bucket": i, "resolution": list(reso), "count": count}
               for n, layout in enumerate(layouts) for i, reso, count in layout.bucket_table()]
    if json_out:
        for message in cfg.warnings:
            out.warn(message)
        out.json({
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.settings().items()},
            "provided": sorted(cfg.provided),
            "warnings": cfg.warnings,
            "steps": dict(plan.__dict__, effective_batch_size=plan.effective_batch_size),
            "buckets": buckets,
            "mean_ar_error": [layout.bucket_info()["mean_img_ar_error"] for layout in layouts],
            "outputs": outputs,
        })
        return
    rows = [(name, _show(value)) for name, value in cfg.settings().items() if name in cfg.provided]
    out.show(out.table("Configuration (recipe and flags)", ["option", "value"], rows, wrap=("value",)))
    out.show(out.table("Buckets", ["dataset", "bucket", "resolution", "count"],
                       [(b["dataset"], b["bucket"], "x".join(map(str, b["resolution"])), b["count"]) for b in buckets],
                       justify_right=["count"]))
    out.show(out.key_values("Step arithmetic (sd-scripts)", plan.summary_rows()))
    out.show(out.table("Files a run writes", ["file"], [(o,) for o in outputs]))
    for message in cfg.warnings:
        out.warn(message)


def _check_base_path(base: str | None) -> None:
    """A dry run loads no model, but a base path that a real run could not open is an error now too."""
    if not base:
        return
    path = Path(base).expanduser()
    if not path.exists():
        from loratools.errors import UsageError
        from loratools.io.paths import missing_reason

        raise UsageError(f"--pretrained_model_name_or_path {base}: {missing_reason(path)}; pass a local diffusers "
                         "folder or a single-file checkpoint (nothing is downloaded from a hub)", path=None)


def _list_flags(json_out: bool) -> None:
    from loratools.cli.output import out
    from trainer.config import TrainConfig, config_fields

    defaults = TrainConfig()
    rows = [(f.metadata["group"], f"--{name}", _show(getattr(defaults, name)), f.metadata["help"])
            for name, f in config_fields().items()]
    if json_out:
        out.json([dict(zip(("group", "flag", "default", "help"), r)) for r in rows])
        return
    out.show(out.table("sd-scripts flags accepted by loratools train", ["flag", "group", "default", "help"],
                       [(flag, group, default, text) for group, flag, default, text in rows],
                       wrap=("default", "help")))


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value and isinstance(value[0], str) else ",".join(map(str, value))
    return str(value)


def _planned_outputs(cfg: Any, plan: Any) -> list[str]:
    """The model files the run's save schedule writes (`trainer.schedule`, the loop's own rules)."""
    from trainer.schedule import SaveSchedule

    folder = Path(cfg.output_dir) if cfg.output_dir else Path(".")
    files = SaveSchedule(cfg, plan.num_epochs).planned_files(plan.steps_per_epoch, plan.max_train_steps)
    return [str(folder / f) for f in files]
