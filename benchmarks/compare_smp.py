"""Side-by-side benchmark of this library against SMP 0.6.0, in one run (``make bench``).

Each measurement runs in a fresh process (benchmarks/_worker.py); the two libraries alternate
(A B A B ...) for ``--rounds`` rounds and the medians are compared, so drifting machine load hits
both sides alike. SMP 0.6.0 lives in its own virtualenv (same import name): pass ``--smp-python`` or
let the script create ``.bench/smp06`` with the same torch version as ours.

Prints ratios (SMP time / our time: > 1 means we are faster; our memory / SMP memory: < 1 means we use
less) and achieved GFLOP/s against the machine's measured fp32 matmul peak, then writes
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_worker.py")

FULL_ARCHS = ["Unet", "FPN", "Linknet", "PSPNet", "DeepLabV3Plus"]
FULL_ENCODERS = ["resnet34", "efficientnet-b0", "mobilenet_v2"]


def ensure_smp_venv(path: Path) -> Path:
    """Create (once) a virtualenv with SMP 0.6.0 and our exact torch/torchvision versions."""
    python = path / "bin" / "python"
    if python.exists():
        return python
    import torch
    import torchvision

    print(f"Creating {path} with segmentation-models-pytorch==0.6.0 ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    pins = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "segmentation-models-pytorch==0.6.0", *pins, "six"],
        check=True,
    )
    return python


def run_worker(python: str, env: dict, args: list) -> dict:
    proc = subprocess.run([python, str(WORKER), *args], capture_output=True, text=True, env=env, cwd="/tmp")
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_delta(results: list):
    """What training adds on top of the built model (libraries and weights excluded)."""
    deltas = [r["peak_rss_mb"] - r["rss_before_train_mb"] for r in results if "peak_rss_mb" in r]
    return statistics.median(deltas) if deltas else None


def median(results: list, key: str):
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


MEMORY_METRICS = {
    "train peak RSS (process)": lambda rs: median(rs, "peak_rss_mb"),
    "train memory (peak - after build)": _train_delta,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smp-python", default=os.environ.get("SMP_REF_PYTHON"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions inside each process")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--archs", nargs="+", default=FULL_ARCHS)
    p.add_argument("--encoders", nargs="+", default=FULL_ENCODERS)
    p.add_argument("--quick", action="store_true", help="Unet/FPN x resnet34 only")
    p.add_argument("--metrics", nargs="+", default=["build", "eval", "train", "fast", "fast_bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()
    if args.quick:
        args.archs, args.encoders = ["Unet", "FPN"], ["resnet34"]

    smp_python = args.smp_python or str(ensure_smp_venv(ROOT / ".bench" / "smp06"))
    ours_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    smp_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    sides = {"ours": (sys.executable, ours_env), "smp": (smp_python, smp_env)}
    common = [
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--reps",
        str(args.reps),
        "--device",
        args.device,
    ]

    peak = run_worker(sys.executable, ours_env, ["peak", "--reps", "5"]).get("gflops")
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"fp32 matmul peak {peak:.0f} GFLOP/s; device {args.device}; "
        f"input {args.batch}x3x{args.size}x{args.size}; "
        f"{args.rounds} rounds, medians."
    ]
    print(lines[0], flush=True)

    imports = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side, (py, env) in sides.items():
            imports[side].append(run_worker(py, env, ["import"]))
    imp = {side: median(r, "import_s") for side, r in imports.items()}
    lines.append(
        f"\n`import segmentation_models_pytorch` on top of torch: ours {imp['ours']:.3f} s, "
        f"SMP 0.6.0 {imp['smp']:.3f} s."
    )
    print(lines[-1], flush=True)

    header = "| model | metric | ours | SMP 0.6.0 | ratio | ours GFLOP/s (% peak) | SMP GFLOP/s (% peak) |"
    lines += ["", header, "|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    started = time.time()
    for arch in args.archs:
        for encoder in args.encoders:
            for metric in args.metrics:
                res = {side: [] for side in sides}
                only_ours = metric.startswith("fast")
                for _ in range(args.rounds):
                    for side, (py, env) in sides.items():
                        # The fast path is ours only; it is compared with SMP's plain eager eval.
                        what = metric if side == "ours" or not only_ours else "eval"
                        res[side].append(
                            run_worker(py, env, [what, "--arch", arch, "--encoder", encoder, *common])
                        )
                key = "build_s" if metric == "build" else "latency_s"
                o, s = median(res["ours"], key), median(res["smp"], key)
                err = next((r["error"] for r in res["ours"] + res["smp"] if "error" in r), None)
                if o is None or s is None:
                    row = f"| {arch}-{encoder} | {metric} | error: {err} | | | | |"
                else:

                    def gf(rs, t):
                        f = median(rs, "flops")
                        return f"{f / t / 1e9:.0f} ({100 * f / t / 1e9 / peak:.0f}%)" if f else ""

                    row = (
                        f"| {arch}-{encoder} | {metric} | {o * 1000:.0f} ms | {s * 1000:.0f} ms | "
                        f"{s / o:.2f}x faster | {gf(res['ours'], o)} | {gf(res['smp'], s)} |"
                    )
                    if metric == "train":
                        for label, fn in MEMORY_METRICS.items():
                            mo, ms = fn(res["ours"]), fn(res["smp"])
                            if mo and ms:
                                row += f"\n| {arch}-{encoder} | {label} | {mo:.0f} MB | {ms:.0f} MB | "
                                row += f"{mo / ms:.2f}x memory | | |"
                lines.append(row)
                print(row, flush=True)
    lines.append(
        f"\nRatios: SMP time / our time (> 1: we are faster); our memory / SMP memory (< 1: we use less). "
        f"`fast` = `smp.optimize_for_inference(model)` (fp32), `fast_bf16` = the same with "
        f"`dtype=torch.bfloat16`, both against SMP's eager fp32 eval. Took {time.time() - started:.0f} s."
    )
    Path(args.out).write_text(
        "# Benchmarks: ours vs SMP 0.6.0\n\nGenerated by `make bench` "
        "(benchmarks/compare_smp.py).\n\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
