"""examples/train.py under torchrun: 2 CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import segmentation_models_pytorch as smp

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_keeps_ranks_in_sync(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(ROOT / "examples" / "train.py"),
        "--epochs", "1", "--max-steps", "2", "--train-size", "16", "--val-size", "4", "--batch-size", "4",
        "--image-size", "32", "--device", "cpu", "--no-progress", "--figure-samples", "2",
        "--dump-rank-weights", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Rank 0 alone logs and saves.
    assert proc.stdout.count("train loss") == 1, proc.stdout  # one epoch line, not one per rank
    assert proc.stdout.count("2 process(es)") == 1, proc.stdout
    assert (out / "model" / "model.safetensors").is_file() and (out / "predictions.png").is_file()

    rank0 = torch.load(out / "rank0_state.pt")
    rank1 = torch.load(out / "rank1_state.pt")
    assert rank0.keys() == rank1.keys()
    differing = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differing, f"ranks disagree on {differing[:5]}"

    # Training did change the weights (same seed -> same initial model as the script builds).
    torch.manual_seed(0)
    initial = smp.Unet(
        "resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(64, 32, 16), classes=4
    ).state_dict()
    assert initial.keys() == rank0.keys()
    changed = [k for k in initial if k.endswith("weight") and not torch.equal(initial[k], rank0[k])]
    assert len(changed) > 10

    # The saved checkpoint is rank 0's model.
    saved = smp.from_pretrained(str(out / "model")).state_dict()
    assert all(torch.equal(saved[k], rank0[k]) for k in rank0)
