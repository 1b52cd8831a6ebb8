"""Shared pytest fixtures: tiny real models, files and a dataset, built once per session.

Every fixture here is session-scoped (under pytest-xdist: once per worker) and cheap. The
pipeline fixtures are SHARED objects: a test that changes a pipeline (``load_lora_weights``,
``fuse_lora``, weight edits) must build its own with ``loratools.tiny.build_pipeline(arch)``
(about 0.05 s) instead of mutating ``tiny_sd1``/``tiny_sdxl``. The files are read-only inputs:
write outputs into the test's own ``tmp_path``.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, one intra-op thread per worker: ``-n 2`` on 2 cores with torch's default
    of one thread per core oversubscribes the CPU, and the tiny models gain nothing from threads.
    Set before torch is imported (it reads the variable once); subprocesses inherit it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_sd1():
    """A tiny SD1-like ``StableDiffusionPipeline`` (seed 0). Do not mutate."""
    from loratools.tiny import build_pipeline

    return build_pipeline("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    """A tiny SDXL-like ``StableDiffusionXLPipeline`` (seed 0). Do not mutate."""
    from loratools.tiny import build_pipeline

    return build_pipeline("sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tiny_sd1, tmp_path_factory):
    """``tiny_sd1`` saved as a diffusers folder."""
    from loratools.tiny import save_diffusers

    return save_diffusers(tiny_sd1, tmp_path_factory.mktemp("tiny_sd1") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_sdxl, tmp_path_factory):
    """``tiny_sdxl`` saved as a diffusers folder."""
    from loratools.tiny import save_diffusers

    return save_diffusers(tiny_sdxl, tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_sd1_ckpt(tiny_sd1, tmp_path_factory):
    """``tiny_sd1`` as one LDM-layout float32 ``.safetensors`` (``model.diffusion_model.*``, ...)."""
    from loratools.tiny import save_single_file

    return save_single_file(tiny_sd1, tmp_path_factory.mktemp("tiny_sd1_ckpt") / "tiny-sd1.safetensors")


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(tiny_sdxl, tmp_path_factory):
    """``tiny_sdxl`` as one SGM-layout float32 ``.safetensors`` (``conditioner.embedders.*``, ...)."""
    from loratools.tiny import save_single_file

    return save_single_file(tiny_sdxl, tmp_path_factory.mktemp("tiny_sdxl_ckpt") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Six captioned PNGs in ``<root>/5_tinychar/`` (varied aspect ratios): a ``TinyDataset``."""
    from loratools.tiny import make_dataset

    return make_dataset(tmp_path_factory.mktemp("tiny_dataset") / "train", "sd1", 6)
