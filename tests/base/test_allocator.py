"""glibc allocator tuning: when it applies, and that freed tensor memory is then reused, not re-faulted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from segmentation_models_pytorch.base import allocator


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, True),
        ({"SMP_TUNE_MALLOC": "1"}, True),
        ({"SMP_TUNE_MALLOC": "0"}, False),
        ({"SMP_TUNE_MALLOC": " Off "}, False),
        ({"SMP_TUNE_MALLOC": "false"}, False),
        ({"MALLOC_TRIM_THRESHOLD_": "1000"}, False),
        ({"MALLOC_MMAP_THRESHOLD_": "131072"}, False),
        ({"MALLOC_TOP_PAD_": "0"}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, False),
        ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, True),
    ],
)
def test_user_settings_win(environ, expected):
    assert allocator.wanted(environ) is expected


# In a fresh process: allocate 160 MB in 8 MB tensors, free them, allocate and fill them again, and
# count the page faults of the second round. Tuned, the second round reuses the first round's pages.
# glibc's adaptive defaults re-fault them only sometimes (whether the freed blocks reach the heap's
# top depends on what else was allocated), so the control that shows the probe sees re-faulted pages
# is a fixed zero trim threshold, under which glibc maps every 8 MB block fresh.
_PROBE = r"""
import json, resource
import torch
import segmentation_models_pytorch as smp
from segmentation_models_pytorch.base import allocator

smp.Linknet("resnet18", encoder_weights=None, encoder_depth=3)  # models tune on construction
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
blocks = [torch.ones(2 << 20) for _ in range(20)]
del blocks
before = faults()
blocks = [torch.ones(2 << 20) for _ in range(20)]
pages = 20 * (8 << 20) // resource.getpagesize()
print(json.dumps({"applied": allocator._applied, "fault_share": (faults() - before) / pages}))
"""


def _probe(**env: str) -> dict:
    skip = (allocator.ENV_SWITCH, "MALLOC_", "GLIBC_TUNABLES")  # the user's settings would win
    environ = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    environ.update(env)
    command = [sys.executable, "-c", _PROBE]
    out = subprocess.run(command, capture_output=True, text=True, env=environ, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc_mallopt() is None, reason="glibc only")
def test_models_tune_glibc_so_freed_memory_is_reused():
    tuned = _probe()
    assert tuned["applied"] is True
    assert tuned["fault_share"] < 0.1, tuned
    assert _probe(SMP_TUNE_MALLOC="0")["applied"] is False
    trimming = _probe(MALLOC_TRIM_THRESHOLD_="0")  # the user's setting wins, and it returns memory
    assert trimming["applied"] is False
    assert trimming["fault_share"] > 0.5, trimming  # what the tuning avoids: every page faulted again
