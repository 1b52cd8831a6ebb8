"""loratools: train, resize, merge, check and inspect Stable Diffusion LoRA/LyCORIS adapters.

The package is layered (see docs/ARCHITECTURE.md): ``io`` alone touches files, ``adapters``
and ``keys`` turn tensors into typed modules mapped onto base weights, ``linalg`` holds pure
tensor maths, ``ops`` are the operations, ``cli`` renders them. Importing this package does
not import torch, so ``loratools --help`` stays instant.
"""

__version__ = "0.1.0"
