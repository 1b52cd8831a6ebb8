"""``loratools extract``: a LoRA/LoCon from the difference of a fine-tuned model and its base.

Modules: ``pairs`` (which weights are compared, read one pair at a time), ``decompose`` (the exact
Gram route and the randomized one), ``select`` (the resize recipes' rules on a difference's
spectrum), ``engine`` (streaming, text-encoder check, ``size=``'s two passes, writing), ``metadata``.
"""

from loratools.ops.extract.engine import (DEFAULT_RECIPE, MIN_DIFF, SCOPES, EncoderCheck, ExtractOptions,
                                          ExtractResult, LayerReport, extract)

__all__ = ["DEFAULT_RECIPE", "MIN_DIFF", "SCOPES", "EncoderCheck", "ExtractOptions", "ExtractResult", "LayerReport",
           "extract"]
