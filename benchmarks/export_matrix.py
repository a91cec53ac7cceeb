"""Check every architecture against every deployment path and write docs/capability_matrix.md.

For each architecture in ``smp.MODEL_ARCHITECTURES_MAPPING`` a small representative model
(``segmentation_models_pytorch.utils.capabilities.representative_model``) goes through
``torch.jit.script``, ``torch.jit.trace``, ``torch.export.export`` (dynamic batch/H/W),
``torch.compile(fullgraph=True)`` (inductor), ONNX export run in onnxruntime, channels_last and
autocast; each converted model is compared with the eager one. Every architecture runs in its own
subprocess, so one crash (or TorchScript's process-wide caches) cannot affect the others.

Usage (from the repository root)::

    PYTHONPATH=. .venv/bin/python benchmarks/export_matrix.py                  # everything
    PYTHONPATH=. .venv/bin/python benchmarks/export_matrix.py --archs unet,fpn --checks script,onnx
    PYTHONPATH=. .venv/bin/python benchmarks/export_matrix.py --jobs 2 --out /tmp/matrix.md

The markdown file is generated; do not edit it by hand.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "capability_matrix.md"
INPUT_SHAPE = (2, 3, 64, 64)
RESULT_MARK = "@@RESULT@@ "

COLUMNS = {
    "script": "TorchScript script",
    "trace": "TorchScript trace",
    "export": "torch.export (dynamic)",
    "compile": "torch.compile inductor",
    "onnx": "ONNX + onnxruntime",
    "channels_last": "channels_last",
    "autocast_cpu_bf16": "autocast bf16 (CPU)",
    "autocast_cuda_fp16": "autocast fp16 (CUDA)",
}
SYMBOLS = {"ok": "✅", "partial": "⚠️", "unsupported": "⛔", "fail": "❌", "n/a": "—"}


# ---------------------------------------------------------------------------------------- worker
def run_worker(arch: str, checks: List[str], threads: int) -> None:
    """Run the checks for one architecture and print the results as one JSON line."""
    import warnings

    import torch

    from segmentation_models_pytorch.utils import capabilities as cap

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    model = cap.representative_model(arch)
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0))
    results = {}
    for name in checks:
        r = cap.run_check(name, model, x)
        results[name] = {
            "status": r.status,
            "detail": r.detail,
            "max_error": r.max_error,
            "seconds": r.seconds,
        }
        print(f"  {arch:14s} {name:19s} {r.status:11s} {r.seconds:6.1f}s {r.detail[:120]}", file=sys.stderr)
    config = cap.representative_config(arch)
    print(RESULT_MARK + json.dumps({"arch": arch, "config": _jsonable(config), "results": results}))


def _jsonable(config: Dict) -> Dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def run_arch(arch: str, checks: List[str], threads: int, timeout: float) -> Dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        arch,
        "--checks",
        ",".join(checks),
        "--threads",
        str(threads),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    try:
        # A fresh inductor cache per architecture: compile times are cold, as on a new machine.
        with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        reason = f"worker timed out after {timeout:.0f}s"
        return {"arch": arch, "config": {}, "results": {c: _crash(reason) for c in checks}}
    sys.stderr.write(
        proc.stderr[-20000:]
        if proc.returncode
        else "".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith("  "))
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            data["wall"] = time.perf_counter() - start
            return data
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    reason = f"worker crashed: {tail[:200]}"
    return {"arch": arch, "config": {}, "results": {c: _crash(reason) for c in checks}}


def _crash(reason: str) -> Dict:
    return {"status": "fail", "detail": reason, "max_error": None, "seconds": 0.0}


# ---------------------------------------------------------------------------------------- report
def _environment() -> List[str]:
    import torch

    versions = [f"torch {torch.__version__}"]
    for module in ("onnx", "onnxruntime", "timm"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} (not installed)")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return [
        f"- Generated {datetime.date.today().isoformat()} on {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}, {', '.join(versions)}; {cuda}.",
    ]


def render(records: List[Dict], checks: List[str], jobs: int = 1, threads: int = 1) -> str:
    from segmentation_models_pytorch.utils.capabilities import MIXED_PRECISION_RTOL, RTOL

    notes: List[str] = []
    header = ["Architecture", "Encoder"] + [COLUMNS[c] for c in checks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rec in records:
        cells = [f"`{rec['arch']}`", f"`{rec['config'].get('encoder_name', '?')}`"]
        for check in checks:
            r = rec["results"][check]
            cell = SYMBOLS[r["status"]]
            if r["detail"] and r["status"] != "n/a":
                notes.append(f"{rec['arch']} / {COLUMNS[check]}: {r['detail']}")
                cell += f" [{len(notes)}]"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")

    table_head = [
        "| Architecture | " + " | ".join(COLUMNS[c] for c in checks) + " |",
        "|" + "---|" * (len(checks) + 1),
    ]
    errors = list(table_head)
    for rec in records:
        row = []
        for check in checks:
            e = rec["results"][check]["max_error"]
            row.append(f"{e:.1e}" if e is not None else "")
        errors.append(f"| `{rec['arch']}` | " + " | ".join(row) + " |")

    times = list(table_head)
    for rec in records:
        row = [f"{rec['results'][c]['seconds']:.1f}" for c in checks]
        times.append(f"| `{rec['arch']}` | " + " | ".join(row) + " |")

    configs = [f"- `{rec['arch']}`: `{json.dumps(rec['config'])}`" for rec in records]
    out = [
        "# Capability matrix",
        "",
        "<!-- Generated by benchmarks/export_matrix.py; do not edit by hand. -->",
        "",
        "Which deployment paths each architecture supports, checked numerically against the eager model.",
        "Regenerate with `PYTHONPATH=. python benchmarks/export_matrix.py`; the test suite runs the same",
        "checks (`tests/utils/test_export.py`).",
        "",
        *_environment(),
        f"- Input `{INPUT_SHAPE}`; models in eval mode with random weights, `classes=2`.",
        "- Legend: ✅ works and matches eager; ⚠️ works with the limitation in the note; ⛔ not supported,"
        " and the helper raises a clear `CapabilityError` (declared by the model's `_is_torch_*` flags);"
        " ❌ fails; — not run here.",
        "",
        "What each column checks:",
        "",
        f"- **TorchScript script**: `smp.utils.script_model(model)`; output on the example and on a second"
        f" shape (batch + 1, non-divisible height/width) within {RTOL:g} relative error.",
        "- **TorchScript trace**: `torch.jit.trace` on the example; ⚠️ when the traced graph only reproduces"
        " the example's input size.",
        "- **torch.export (dynamic)**: `smp.utils.export_program(model)` with dynamic batch, height and"
        " width, run on the second shape too; ⚠️ when the network fixes some axes.",
        "- **torch.compile inductor**: `torch.compile(model, fullgraph=True)` (default inductor backend on"
        " CPU) on the example.",
        "- **ONNX + onnxruntime**: `smp.utils.export_onnx(model, path)` (torch.export-based exporter,"
        " opset 18, dynamic batch/height/width), run in onnxruntime on both shapes,"
        f" within {RTOL:g}.",
        f"- **channels_last**: model and input in `torch.channels_last`, both shapes, within {RTOL:g}.",
        f"- **autocast**: `torch.autocast` output finite and within {MIXED_PRECISION_RTOL:g} of float32.",
        "",
        *lines,
        "",
    ]
    if notes:
        out += ["Notes:", ""] + [f"{i}. {n}" for i, n in enumerate(notes, 1)] + [""]
    out += [
        "## Largest relative error vs eager",
        "",
        *errors,
        "",
        "## Seconds per check",
        "",
        f"Wall-clock seconds on the machine above ({threads} torch thread(s) per architecture, {jobs}"
        " architecture(s) at a time, cold inductor cache); useful to budget the test suite.",
        "",
        *times,
        "",
        "## Models",
        "",
        *configs,
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- main
def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", help="comma-separated architectures (default: all)")
    parser.add_argument("--checks", help=f"comma-separated checks (default: all of {', '.join(COLUMNS)})")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to write")
    parser.add_argument("--jobs", type=int, default=1, help="architectures checked in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per architecture")
    parser.add_argument("--json", help="also write the raw results to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    checks = args.checks.split(",") if args.checks else list(COLUMNS)
    unknown = [c for c in checks if c not in COLUMNS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {list(COLUMNS)}")
    if args.worker:
        run_worker(args.worker, checks, args.threads)
        return 0

    sys.path.insert(0, str(ROOT))
    import segmentation_models_pytorch as smp

    archs = args.archs.split(",") if args.archs else list(smp.MODEL_ARCHITECTURES_MAPPING)
    bad = [a for a in archs if a not in smp.MODEL_ARCHITECTURES_MAPPING]
    if bad:
        parser.error(f"unknown architectures {bad}; choose from {list(smp.MODEL_ARCHITECTURES_MAPPING)}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records = list(pool.map(lambda a: run_arch(a, checks, args.threads, args.timeout), archs))
    Path(args.out).write_text(render(records, checks, args.jobs, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    print(f"wrote {args.out}")
    failed = [(r["arch"], c) for r in records for c, v in r["results"].items() if v["status"] == "fail"]
    if failed:
        print("failed:", ", ".join(f"{a}/{c}" for a, c in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
