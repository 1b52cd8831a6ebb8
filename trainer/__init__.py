"""The loratools LoRA/LyCORIS trainer for SD1.x, SD2 and SDXL (diffusers + transformers + accelerate)."""
