"""A bare import loads torch and our code only; heavy backends load when an encoder needs them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["timm", "torchvision", "huggingface_hub", "pretrainedmodels", "efficientnet_pytorch", "safetensors"]


def _loaded_after(code: str) -> dict:
    probe = f"import sys, json\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bare_import_is_light():
    loaded = _loaded_after("import segmentation_models_pytorch as smp; smp.encoders; smp.losses; smp.Unet")
    assert not any(loaded.values()), loaded


def test_smp_alias_is_the_same_package():
    code = (
        "import smp, segmentation_models_pytorch as s, smp.encoders\n"
        "assert smp is s and smp.encoders is s.encoders\n"
        "from smp.decoders.unet.model import Unet\n"
        "assert Unet is s.Unet\n"
    )
    loaded = _loaded_after(code)
    assert not any(loaded.values()), loaded


def test_building_a_resnet_model_loads_only_torchvision():
    loaded = _loaded_after(
        "import segmentation_models_pytorch as smp; smp.Unet('resnet18', encoder_weights=None)"
    )
    assert loaded["torchvision"] and not loaded["timm"] and not loaded["huggingface_hub"]
