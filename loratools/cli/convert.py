"""`loratools convert`: kohya <-> diffusers/PEFT naming (work in ``loratools.ops.convert``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from loratools.cli.options import JsonOpt, OverwriteOpt

def convert(
    lora: Annotated[Path, typer.Argument(help="The adapter file (.safetensors, or a .pt/.ckpt pickle).",
                                         show_default=False)],
    to: Annotated[str, typer.Option("--to", help="Target naming: kohya (loads in ComfyUI, A1111 and diffusers) "
                                    "or peft (diffusers/PEFT only: ComfyUI skips its UNet attention keys, A1111 "
                                    "every key; LoRA only, alpha folded into the factors).",
                                    show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .safetensors file.", show_default=False)],
    arch: Annotated[Optional[str], typer.Option("--arch", help="sd1, sd2 or sdxl; overrides detection.")] = None,
    base: Annotated[Optional[Path], typer.Option(
        "--base", help="Base model (file or diffusers folder) to resolve module names against; only needed "
        "for models that are not the released SD1/SD2/SDXL layout (a name that cannot be resolved is an "
        "error).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="fp16, bf16 or fp32 for every float tensor "
                                                 "(default: keep each tensor's dtype).")] = None,
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Rename an adapter between kohya and diffusers/PEFT naming; every weight delta stays the same.

    kohya output uses the names every UI loads (SD1/SD2: lora_unet_down_blocks_... and lora_te_; SDXL: lora_unet_input_blocks_... and lora_te1_/lora_te2_) and keeps every adapter type. PEFT output is for diffusers/PEFT: ComfyUI and A1111 do not load its UNet keys (ComfyUI skips the attention layers, A1111 every dotted key); it holds LoRA/LoCon only, with alpha/rank folded into the factors (PEFT has no per-module alpha). Metadata is carried over. `loratools check keys FILE --loader all` shows what each program loads.

    Examples:

      loratools convert diffusers_lora.safetensors --to kohya -o my.safetensors

      loratools convert my_lora.safetensors --to peft -o peft_lora.safetensors
    """
    from loratools.ops.convert import ConvertOptions
    from loratools.ops.convert import convert as run

    result = run(ConvertOptions(input=lora, output=output, to=to, arch=arch, base=base, dtype=dtype,
                                overwrite=overwrite))
    from loratools.cli.output import out
    from loratools.units import human_bytes

    for message in result.warnings:
        out.warn(message)
    if json_out:
        from dataclasses import asdict

        out.json(asdict(result))
        return
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(result.kinds.items()))
    out.show(out.key_values(None, [
        ("input", f"{result.input} ({result.source_naming} names)"),
        ("output", f"{result.output} ({result.to} names, {human_bytes(result.bytes)})"),
        ("architecture", result.arch),
        ("modules", f"{result.modules} ({kinds})" if kinds else "0"),
        ("tensors", result.tensors),
    ]))


def register(app: typer.Typer) -> None:
    """Add the command to the main app."""
    app.command(name="convert")(convert)
