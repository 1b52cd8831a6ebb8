"""The only layer that opens model and adapter files (safetensors, pickle checkpoints, diffusers folders)."""

from loratools.io.checkpoint import ModelSource, open_model, open_state_dict, release_pages
from loratools.io.hashes import autov2, file_sha256
from loratools.io.header import SafetensorsHeader, TensorInfo, read_header
from loratools.io.reader import SafetensorsReader, open_safetensors, read_scalars
from loratools.io.writer import TensorSpec, WrittenFile, save_tensors, write_safetensors

__all__ = [
    "ModelSource", "SafetensorsHeader", "SafetensorsReader", "TensorInfo", "TensorSpec", "WrittenFile",
    "autov2", "file_sha256", "open_model", "open_safetensors", "open_state_dict", "read_header", "read_scalars",
    "release_pages", "save_tensors", "write_safetensors",
]
