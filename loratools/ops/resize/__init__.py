"""``loratools resize``: shrink LoRAs by a checkpoint-aware (elias) or kohya-style recipe.

The maths is exact and fast: each layer's delta is decomposed from its factors (QR + r x r SVD,
never the out x in matrix), once per LoRA and shared by every recipe; base-weight norms are exact
and cached on disk. See ``recipe`` for the recipe language, ``selection`` for what each method
keeps, ``engine`` for formats and outputs.

Python API, for scripted batch shrinking (the base checkpoint is opened once, norms are cached):

    from loratools.ops.resize import Resizer, resolve_inputs

    # as the CLI: base recognised by content, folders/globs expanded, earlier resize outputs skipped
    base, loras, skipped = resolve_inputs(["sd_xl_base_1.0.safetensors", "loras/"])
    rz = Resizer(base)                                  # or None for checkpoint-free recipes
    for lora in loras:
        result = rz.resize(lora, "fro_ckpt=1,thr=-3.55:sv_fro=0.9", output="resized/")
        for out in result.outcomes:                     # one per recipe
            print(out.summary_line())                   # rank, sizes, Frobenius retained, threshold
            # out.path, out.status ("written", "exists", "dry-run"), out.rows (per layer), ...

``Resizer.resize`` takes ``output`` (folder or ``.safetensors`` file), ``dtype`` ("fp16", "bf16",
"fp32"; default the input's), ``overwrite``, ``kohya_compat``, ``dry_run`` and a ``progress``
callback; existing outputs are skipped unless ``overwrite``. ``resize(paths, recipes, base=...)``
is the one-call form (it resolves ``paths`` as above).
"""

from loratools.ops.resize.engine import LayerRow, LoraOutcome, RecipeOutcome, Resizer, resize
from loratools.ops.resize.inputs import resolve_inputs
from loratools.ops.resize.recipe import DEFAULT_RECIPE, Recipe, kohya_recipe, parse_recipe, parse_recipes

__all__ = [
    "DEFAULT_RECIPE", "LayerRow", "LoraOutcome", "Recipe", "RecipeOutcome", "Resizer", "kohya_recipe",
    "parse_recipe", "parse_recipes", "resize", "resolve_inputs",
]
