"""examples/train.py: a tiny run writes a finite loss, an IoU, a reloadable checkpoint and a figure."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import segmentation_models_pytorch as smp

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
TINY = ["--epochs", "1", "--max-steps", "2", "--train-size", "8", "--val-size", "4", "--batch-size", "4"]
TINY += ["--image-size", "32", "--no-progress", "--figure-samples", "3"]


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("smp_example_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_training_run(train_script, tmp_path, capsys):
    out = tmp_path / "run"
    result = train_script.main([*TINY, "--out", str(out)])
    printed = capsys.readouterr().out

    assert len(result["history"]) == 1
    record = result["history"][0]
    assert math.isfinite(record["train_loss"]) and record["train_loss"] > 0
    assert 0.0 <= record["val_miou"] <= 1.0
    assert set(record["val_iou"]) == {"background", "circle", "rectangle", "triangle"}
    assert "val mIoU" in printed and "train loss" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_miou"] == pytest.approx(record["val_miou"])
    png = out / "predictions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = Image.open(png).size
    assert width > 200 and height > 300  # 3 rows (image / ground truth / prediction)

    # The checkpoint is a save_pretrained folder that smp.from_pretrained rebuilds.
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    model = smp.from_pretrained(str(out / "model")).eval()
    assert type(model).__name__ == "Unet"
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4, 32, 32)


def test_training_on_a_mask_folder(train_script, tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(data / "images" / f"{i}.png")
        mask = np.zeros((40, 40), np.uint8)
        mask[10:30, 5 + i : 25 + i] = 1 + i % 2
        Image.fromarray(mask).save(data / "masks" / f"{i}.png")
    result = train_script.main(
        [*TINY, "--data-dir", str(data), "--loss", "dice", "--out", str(tmp_path / "o")]
    )
    assert result["classes"] == ["class 0", "class 1", "class 2"]
    assert math.isfinite(result["history"][0]["train_loss"])
    assert (tmp_path / "o" / "predictions.png").is_file()


def test_other_architecture_and_loss(train_script, tmp_path):
    result = train_script.main([*TINY, "--arch", "FPN", "--loss", "focal", "--out", str(tmp_path)])
    assert result["args"]["arch"] == "fpn" and result["args"]["encoder_depth"] == 3
    assert math.isfinite(result["history"][0]["train_loss"])
    assert json.loads((tmp_path / "model" / "config.json").read_text())["_model_class"] == "FPN"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--arch", "unetx"], "invalid choice: 'unetx'"),
        (["--loss", "hinge"], "invalid choice: 'hinge'"),
        (["--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    ],
)
def test_bad_arguments(train_script, argv, message, capsys):
    with pytest.raises(SystemExit):
        train_script.parse_args(argv)
    assert message in capsys.readouterr().err


def test_sync_bn_on_cpu_is_a_clear_error(train_script, tmp_path):
    with pytest.raises(SystemExit, match="--sync-bn needs CUDA"):
        train_script.main([*TINY, "--sync-bn", "--device", "cpu", "--out", str(tmp_path)])
    assert not os.listdir(tmp_path)
