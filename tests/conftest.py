"""Shared pytest fixtures: tiny real models, files and a dataset, built once per session.

Every fixture here is session-scoped (under pytest-xdist: once per worker) and cheap. The
pipeline fixtures are SHARED objects: a test that changes a pipeline (``load_lora_weights``,
``fuse_lora``, weight edits) must build its own with ``loratools.tiny.build_pipeline(arch)``
(about 0.05 s) instead of mutating ``tiny_sd1``/``tiny_sdxl``. The files are read-only inputs:
write outputs into the test's own ``tmp_path``.
"""

from __future__ import annotations

import os
import sys

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread for the whole session, serial or under pytest-xdist.

    The box has 2 cores shared by several runs; ``-n 2`` with torch's default of one thread per
    core oversubscribes it, and the tiny tensors and models of this suite gain nothing from
    threads (one thread measured ~40x faster than two on tiny LyCORIS cases). The variables are
    set before torch is imported (torch reads them once) and are inherited by the CLI
    subprocesses; a value the user exported is kept for those.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Pin torch to one thread in-process, whatever ``OMP_NUM_THREADS`` says or whoever imported
    torch first. Never imports torch itself: tests that do not use it stay torch-free."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one device/precision per process and refuses a test's `Accelerator(cpu=True)`
    after an earlier test trained on CUDA in the same worker: forget its state after every test
    (never under a distributed launch, whose process group belongs to the whole process)."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        state.AcceleratorState._reset_state(reset_partial_state=True)
        state.GradientState._reset_state()


@pytest.fixture(scope="session")
def same_seed_tolerance() -> dict:
    """How closely two trainings with one seed agree: bit for bit on a CPU; on CUDA, kernels that
    add with atomics (convolution and embedding backward) reorder float sums, and a few steps at a
    high learning rate grow those last-bit differences; a real divergence (another RNG state, other
    batches) moves losses by 1e-2 or more. Pass as `pytest.approx(x, **tolerance)`."""
    import torch

    return {"rel": 1e-3, "abs": 1e-5} if torch.cuda.is_available() else {"rel": 0, "abs": 0}


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
