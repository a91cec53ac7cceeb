"""Measurements in one fresh process; run by compare_smp.py with either library on the path.

Imports only torch and whichever ``segmentation_models_pytorch`` the interpreter sees, and prints one
JSON line. Never import this project's helpers here: the same file runs against SMP 0.6.0.

Modes:
    import   time of ``import segmentation_models_pytorch`` on top of ``import torch``.
    peak     the machine's fp32 matmul throughput (GFLOP/s), for "% of peak" context.
    infer    build time, then eval latency, then (ours only, when asked) the fast path in fp32 and
             bf16. One process serves them all: each is timed after its own warm-up. With
             ``--pretrained`` also the build with ``encoder_weights="imagenet"`` read from the
             (offline) Hugging Face cache that ``hf-weights`` wrote.
    hf-weights
             write random weights for ``--encoder`` into the Hugging Face cache (``$HF_HUB_CACHE``)
             under its registry repo and revision, as if downloaded; both libraries then find them.
    train    train-step latency (forward + backward + SGD step) and peak RSS. Alone in its process,
             so the peak is the training peak and nothing else. With ``--tensor-memory`` also the
             peak of live tensor bytes during one more step (see :func:`_peak_tensor_mb`).
    throughput
             images per second of eval and of training (forward + backward + SGD step) in each of
             ``--modes``: ``eager`` (the model as built: what a user gets without changing code),
             ``amp`` (model and input in ``channels_last``, autocast to ``--amp-dtype``; float16
             training uses a GradScaler) and ``compile`` (``amp`` plus ``torch.compile``). Each
             mode builds its own model from the same seed; the first iterations (for ``compile``,
             the compilation) are timed apart as ``*_warmup_s``. The issue's GPU comparison.
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


def _timed(fn, reps: int, sync) -> float:
    fn()
    fn()  # warm-up: allocator, oneDNN primitive cache
    sync()
    times = []
    for _ in range(reps):
        s = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - s)
    return statistics.median(times)


def _peak_tensor_mb(step, known, device) -> float:
    """The most tensor memory alive at once during ``step()``, in MB, independent of the allocator.

    Peak RSS also counts what the C allocator keeps after ``free`` (glibc's heap grows to its
    high-water mark and its mmap threshold adapts to the tensor sizes it sees), which can hide or
    exaggerate differences in what a library really allocates. Here: on CUDA the caching
    allocator's own peak; on CPU, the profiler's allocation events (every c10 allocation and free,
    inside kernels too) summed in order, on top of ``known`` (the tensors alive before the step:
    weights, buffers, gradients, optimizer state, batch).
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**20
    storages = {}
    for t in known:
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.profiler.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return (sum(storages.values()) + peak) / 2**20


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


THROUGHPUT_MODES = ("eager", "amp", "compile")


def _throughput(torch, build, args, device, sync, out: dict) -> None:
    """Fill ``out[f"{mode}_{eval|train}_ips"]`` (images/s) and the warm-up times per mode;
    ``build()`` makes the model (on the CPU, as in the other modes)."""
    amp_dtype = getattr(torch, args.amp_dtype)
    cl = torch.channels_last
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in THROUGHPUT_MODES]
    if unknown:  # before any mode runs
        raise SystemExit(f"unknown throughput mode {unknown[0]!r}: use eager, amp or compile")
    for mode in modes:
        fast = mode != "eager"
        torch.manual_seed(0)
        model = build().to(device)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        target = torch.randn(args.batch, 2, args.size, args.size, device=device)
        if fast:  # what a user writes for mixed precision; a no-op for a model that is already NHWC
            model = model.to(memory_format=cl)
            x = x.contiguous(memory_format=cl)
        net = torch.compile(model) if mode == "compile" else model

        def autocast(fast=fast):
            return torch.autocast(device.type, dtype=amp_dtype, enabled=fast)

        def infer(net=net, x=x):
            with torch.no_grad(), autocast():
                net(x)

        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        use_scaler = fast and amp_dtype == torch.float16
        scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

        def train(net=net, x=x, target=target, opt=opt, scaler=scaler):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.mse_loss(net(x).float(), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        for phase, fn, train_mode in (("eval", infer, False), ("train", train, True)):
            model.train(train_mode)
            if train_mode and device.type == "cuda":  # the train peak, not eval's
                torch.cuda.reset_peak_memory_stats(device)
            s = time.perf_counter()
            for _ in range(args.warmup):
                fn()
            sync()
            out[f"{mode}_{phase}_warmup_s"] = time.perf_counter() - s
            times = []
            for _ in range(args.reps):
                s = time.perf_counter()
                for _ in range(args.iters):
                    fn()
                sync()
                times.append(time.perf_counter() - s)
            out[f"{mode}_{phase}_ips"] = args.batch * args.iters / statistics.median(times)
        if device.type == "cuda":
            out[f"{mode}_train_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        del model, net, opt
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()


def _timed_builds(make, rebuilds: int):
    """``(model, seconds of the first make(), median seconds of `rebuilds` more or None)``; each
    rebuild frees the previous model first, and the last one built is returned."""
    s = time.perf_counter()
    model = make()
    first = time.perf_counter() - s
    times = []
    for _ in range(rebuilds):
        del model
        s = time.perf_counter()
        model = make()
        times.append(time.perf_counter() - s)
    return model, first, statistics.median(times) if times else None


def _write_hf_weights(torch, smp, encoder: str) -> None:
    """Random ``encoder`` weights where ``hf_hub_download`` looks for its "imagenet" repo offline."""
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    setting = smp.encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
    repo = "models--" + setting["repo_id"].replace("/", "--")
    snapshot = Path(os.environ["HF_HUB_CACHE"]) / repo / "snapshots" / setting["revision"]
    if (snapshot / "model.safetensors").exists():
        return
    snapshot.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    state = smp.encoders.get_encoder(encoder).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text("{}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["import", "peak", "infer", "train", "throughput", "hf-weights"])
    p.add_argument("--arch", default="Unet")
    p.add_argument("--encoder", default="resnet34")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bf16-reps", type=int, default=2, help="bf16 is very slow on CPUs without bf16 units")
    p.add_argument("--fast", default="", help="comma list of fast paths to time: fp32,bf16 (ours only)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensor-memory", action="store_true", help="train: also the peak of live tensors")
    p.add_argument("--pretrained", action="store_true", help="infer: also the build with weights")
    p.add_argument("--modes", default="eager,amp,compile", help="throughput: eager,amp,compile")
    p.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--iters", type=int, default=10, help="throughput: iterations per timed rep")
    p.add_argument("--warmup", type=int, default=3, help="throughput: untimed iterations (compile)")
    args = p.parse_args()

    t0 = time.perf_counter()
    import torch

    t1 = time.perf_counter()
    import segmentation_models_pytorch as smp

    t2 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {
        "what": args.what,
        "torch_import_s": t1 - t0,
        "import_s": t2 - t1,
        "smp_file": smp.__file__,
        "torch": torch.__version__,
    }
    if args.what == "import":
        print(json.dumps(out))
        return
    if args.what == "peak":
        n = 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        times = []
        for _ in range(args.reps):  # the best of several: a peak, not a typical value
            s = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - s)
        out["gflops"] = 2 * n**3 / min(times) / 1e9
        print(json.dumps(out))
        return

    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    cls = getattr(smp, args.arch)

    def build():
        return cls(encoder_name=args.encoder, encoder_weights=None, classes=2)

    if args.what == "throughput":
        _throughput(torch, build, args, device, sync, out)
        print(json.dumps(out))
        return
    if args.what == "hf-weights":
        _write_hf_weights(torch, smp, args.encoder)
        print(json.dumps(out))
        return

    torch.manual_seed(0)

    # The first build also pays for importing the encoder's backend (torchvision, timm...), which SMP
    # pays at `import` time instead; the later builds measure construction alone.
    model, out["first_build_s"], build_s = _timed_builds(build, 3 if args.what == "infer" else 0)
    if args.what == "infer":
        out["build_s"] = build_s
        if args.pretrained:  # what `smp.Unet(encoder_name)` does by default: load ImageNet weights
            # Built aside: eval and the fast paths below keep timing the seeded random model. The
            # first of these builds also pays for importing huggingface_hub.
            other, out["first_build_pretrained_s"], out["build_pretrained_s"] = _timed_builds(
                lambda: cls(encoder_name=args.encoder, classes=2), 3
            )
            del other

    model = model.to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    if args.what == "infer":
        model.eval()
        with torch.no_grad():
            out["flops"] = _flops(lambda: model(x))
            out["eval_s"] = _timed(lambda: model(x), args.reps, sync)
            for kind in filter(None, args.fast.split(",")):
                dtype = torch.bfloat16 if kind == "bf16" else None
                fast = smp.optimize_for_inference(model, dtype=dtype)
                reps = args.bf16_reps if kind == "bf16" else args.reps
                out[f"fast_{kind}_s"] = _timed(lambda fast=fast: fast(x), reps, sync)
                y, ref = fast(x).float(), model(x).float()
                out[f"fast_{kind}_err"] = float((y - ref).abs().max() / ref.abs().max())
                del fast
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

        out["train_s"] = _timed(step, args.reps, sync)
        out["peak_rss_mb"] = _peak_rss_mb()  # before the FLOP count, which adds its own overhead
        if args.tensor_memory:
            known = [*model.parameters(), *model.buffers(), x, target]
            known += [p.grad for p in model.parameters() if p.grad is not None]
            known += [v for state in opt.state.values() for v in state.values()]
            out["peak_tensor_mb"] = _peak_tensor_mb(step, known, device)
        out["flops"] = _flops(step)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
