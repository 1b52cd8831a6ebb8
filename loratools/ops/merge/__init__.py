"""``loratools merge``: adapters into a checkpoint (streaming), or adapters into one adapter.

Modules: ``ratios`` (``PATH[:RATIO]`` and ``--ratio``), ``plan`` (module -> base key, all refusals
before any write), ``fuse`` (float32 sum of one tensor's deltas), ``checkpoint`` (the streaming
engine, single files and diffusers folders), ``verify`` (re-read and check), ``concat`` (exact rank
concatenation maths), ``to_lora`` (LoRA + LoRA files), ``provenance`` (output metadata).
"""

from loratools.ops.merge.checkpoint import AdapterReport, MergeOptions, MergeResult, merge_checkpoint
from loratools.ops.merge.concat import ConcatResult, LoraFactors, concat_factors
from loratools.ops.merge.ratios import WeightedPath, resolve_inputs, split_weighted
from loratools.ops.merge.to_lora import LoraMergeOptions, LoraMergeResult, combine_layer, merge_loras
from loratools.ops.merge.verify import VerifyRow

__all__ = [
    "AdapterReport", "ConcatResult", "LoraFactors", "LoraMergeOptions", "LoraMergeResult", "MergeOptions",
    "MergeResult", "VerifyRow", "WeightedPath", "combine_layer", "concat_factors", "merge_checkpoint",
    "merge_loras", "resolve_inputs", "split_weighted",
]
