"""Two CPU processes under `accelerate launch` (DDP over gloo): sharded data, averaged gradients,
one file written by the main process."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from loratools.io.reader import open_safetensors

pytestmark = pytest.mark.slow

SCRIPT = """
import os, sys
from trainer.config import resolve_config
from trainer.run import train
r = train(resolve_config(sys.argv[1:]))
print("RESULT", os.environ["RANK"], repr(r.losses), r.final_file is not None, flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run(tiny_sd1_dir, tiny_dataset, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(script),
           "--pretrained_model_name_or_path", str(tiny_sd1_dir), "--train_data_dir", str(tiny_dataset.root),
           "--output_dir", str(out), "--output_name", "mp", "--resolution", "64", "--caption_extension", ".txt",
           "--train_batch_size", "2", "--network_dim", "2", "--learning_rate", "1e-2", "--seed", "1",
           "--max_data_loader_n_workers", "0", "--max_train_steps", "2", "--gradient_accumulation_steps", "2"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both processes share one stdout pipe: a line of one can start mid-line of the other, so search, don't split
    results = sorted(list(m) for m in re.findall(r"RESULT (\d) (\[[^\]]*\]) (True|False)", proc.stdout))
    assert [r[0] for r in results] == ["0", "1"], proc.stdout[-3000:]
    assert results[0][1] == results[1][1]  # the logged loss is the mean over processes
    assert results[0][2] == "True" and results[1][2] == "False"  # only the main process saves
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["mp.safetensors"]
    meta = open_safetensors(out / "mp.safetensors").metadata
    assert meta["ss_total_batch_size"] == "8" and meta["ss_steps"] == "2"
    assert re.search(r"processes\s+2\n", proc.stderr)  # the startup summary counts both processes
