"""Recomputed norm/activation chains on vs off (``model.recompute_activations``), our library only.

Memory: train peak RSS of a fresh process per measurement (flags alternate, medians over rounds).
Speed: one process holding both models, train steps alternating between them (medians), so that
the machine's drift affects both alike. Prints a markdown table.

    python benchmarks/recompute_ab.py --archs Unet FPN --encoders resnet34 efficientnet-b0 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train_step(model, opt, x, target):
    import torch

    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), target).backward()
    opt.step()


def _setup(arch: str, encoder: str, recompute: bool, size: int, batch: int):
    import torch

    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2).train()
    model.recompute_activations = recompute
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, target = torch.randn(batch, 3, size, size), torch.randn(batch, 2, size, size)
    return model, opt, x, target


def worker_memory(args) -> None:
    model, opt, x, target = _setup(args.arch, args.encoder, args.recompute == "1", args.size, args.batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    for _ in range(3):
        _train_step(model, opt, x, target)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"before_mb": before, "peak_mb": peak}))


def worker_speed(args) -> None:
    runs = {flag: _setup(args.arch, args.encoder, flag, args.size, args.batch) for flag in (True, False)}
    for run in runs.values():
        _train_step(*run)
        _train_step(*run)  # warm-up: allocator, oneDNN primitive cache
    times = {True: [], False: []}
    for r in range(args.steps):
        for flag in (True, False) if r % 2 == 0 else (False, True):
            start = time.perf_counter()
            _train_step(*runs[flag])
            times[flag].append(time.perf_counter() - start)
    print(json.dumps({"on_s": statistics.median(times[True]), "off_s": statistics.median(times[False])}))


def _run(args: list) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["memory", "speed"], help=argparse.SUPPRESS)
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--recompute", default="1")
    p.add_argument("--archs", nargs="+", default=["Unet"])
    p.add_argument("--encoders", nargs="+", default=["resnet34", "efficientnet-b0", "mobilenet_v2"])
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per flag (memory)")
    p.add_argument("--steps", type=int, default=14, help="alternating train steps per flag (speed)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    if args.worker == "memory":
        return worker_memory(args)
    if args.worker == "speed":
        return worker_speed(args)

    common = ["--size", str(args.size), "--batch", str(args.batch)]
    print(
        f"input {args.batch}x3x{args.size}x{args.size}; {args.rounds} rounds (memory), "
        f"{args.steps} steps (speed)"
    )
    print("| model | peak RSS on | peak RSS off | on/off | train step on | off | off/on time |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for encoder in args.encoders:
            model = ["--arch", arch, "--encoder", encoder, *common]
            peaks = {"1": [], "0": []}
            for r in range(args.rounds):
                for flag in ("1", "0") if r % 2 == 0 else ("0", "1"):
                    res = _run(["--worker", "memory", "--recompute", flag, *model])
                    peaks[flag].append(res["peak_mb"])
            on, off = statistics.median(peaks["1"]), statistics.median(peaks["0"])
            speed = _run(["--worker", "speed", "--steps", str(args.steps), *model])
            print(
                f"| {arch}-{encoder} | {on:.0f} MB | {off:.0f} MB | {on / off:.2f}x | "
                f"{speed['on_s'] * 1e3:.0f} ms | {speed['off_s'] * 1e3:.0f} ms | "
                f"{speed['off_s'] / speed['on_s']:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
