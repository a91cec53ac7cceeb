"""One measurement in a fresh process; run by compare_smp.py with either library's interpreter.

Imports only torch and whichever ``segmentation_models_pytorch`` the interpreter sees, and prints one
JSON line. Never import this project's helpers here: the same file runs inside SMP 0.6.0's venv.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["import", "build", "eval", "train", "fast", "fast_bf16", "peak"])
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import segmentation_models_pytorch as smp

    t2 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"what": args.what, "torch_import_s": t1 - t0, "import_s": t2 - t1}
    if args.what == "import":
        print(json.dumps(out))
        return
    if args.what == "peak":  # the machine's fp32 matmul peak, for GFLOP/s context
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(args.reps):
            s = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - s)
        out["gflops"] = 2 * n**3 / statistics.median(times) / 1e9
        print(json.dumps(out))
        return

    torch.manual_seed(0)
    cls = getattr(smp, args.arch)
    s = time.perf_counter()
    model = cls(encoder_name=args.encoder, encoder_weights=None, classes=2)
    # The first build also pays for importing the encoder's backend (torchvision, timm...), which SMP
    # pays at `import` time instead; the second build measures construction alone.
    out["first_build_s"] = time.perf_counter() - s
    s = time.perf_counter()
    model = cls(encoder_name=args.encoder, encoder_weights=None, classes=2)
    out["build_s"] = time.perf_counter() - s
    if args.what == "build":
        print(json.dumps(out))
        return

    device = torch.device(args.device)
    model = model.to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, reps):
        fn()
        fn()  # warm-up (allocator, oneDNN primitive cache)
        sync()
        times = []
        for _ in range(reps):
            s = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - s)
        return statistics.median(times)

    if args.what in ("eval", "fast", "fast_bf16"):
        model.eval()
        if args.what != "eval":
            model = smp.optimize_for_inference(
                model, dtype=torch.bfloat16 if args.what == "fast_bf16" else None
            )
        with torch.no_grad():
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                model(x)
            out["flops"] = counter.get_total_flops()
            out["latency_s"] = timed(lambda: model(x), args.reps)
    else:
        out["rss_before_train_mb"] = _peak_rss_mb()
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        target = torch.randn(args.batch, 2, args.size, args.size, device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()

        out["latency_s"] = timed(step, args.reps)
    out["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
