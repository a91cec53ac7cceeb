"""Side-by-side benchmark of this library against SMP 0.6.0, in one run (``make bench``).

Each measurement runs in a fresh process (benchmarks/_worker.py). The two libraries alternate
(A B, then B A, ...) for ``--rounds`` rounds and the medians are compared, so drifting machine load
hits both sides alike.

Both sides run on the *same* interpreter and the very same torch / torchvision / timm files: SMP 0.6.0
is installed without dependencies into ``.bench/smp06-pkg`` and put on ``PYTHONPATH`` for its side
(it has the same import name). Two separate installations of the same torch wheel differ by up to
200 MB of resident file-backed pages, which would swamp the memory comparison. ``--smp-python``
runs SMP's side with another interpreter instead.

Per model, two processes per side and round: ``infer`` (build time, eval latency, and for us the
fast path in fp32 and bf16) and ``train`` (train-step latency and peak RSS, alone in its process).
The first round's ``train`` process also measures the peak of live tensor memory during a step (the
profiler's allocation events; deterministic, so once is enough): what each library allocates,
without the C allocator's retention that peak RSS includes. ``--env NAME=VALUE`` sets a variable
for both sides (e.g. ``MALLOC_MMAP_THRESHOLD_=131072`` to see RSS under a non-adaptive glibc).

``--throughput`` adds the GPU comparison the issue asks for (it also runs on a CPU, slowly): images/s
of eval and of a train step, per model, in three modes each side runs with the same user code:
``eager`` (as built), ``amp`` (``channels_last`` model and input + autocast) and ``compile`` (``amp`` +
``torch.compile``); one process per model, side and round, modes in order inside it.

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
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_worker.py")
SMP_PKG = ROOT / ".bench" / "smp06-pkg"

FULL_ARCHS = ["Unet", "FPN", "Linknet", "PSPNet", "DeepLabV3Plus"]
FULL_ENCODERS = ["resnet34", "efficientnet-b0", "mobilenet_v2"]

# (row label, result key, which side's key SMP is compared on, kind)
TIME_ROWS = [
    ("build", "build_s", "build_s"),
    ("build, pretrained", "build_pretrained_s", "build_pretrained_s"),
    ("eval", "eval_s", "eval_s"),
    ("train step", "train_s", "train_s"),
    ("fast path fp32", "fast_fp32_s", "eval_s"),
    ("fast path bf16", "fast_bf16_s", "eval_s"),
]
TARGETS = {  # row label -> (kind, threshold) from issue 7
    "build": ("speed", 1 / 0.8),
    "build, pretrained": ("speed", 1 / 0.8),
    "eval": ("speed", 1.25),
    "train step": ("speed", 1.25),
    "fast path fp32": ("speed", 1.8),
    "fast path bf16": ("speed", 2.5),
    "train peak RSS": ("memory", 0.9),
    "train peak tensor memory": ("memory", 0.9),
}


def ensure_smp_package(target: Path) -> Path:
    """Install SMP 0.6.0 (code only) into ``target``; its dependencies are ours, shared."""
    if not (target / "segmentation_models_pytorch" / "__init__.py").exists():
        print(f"Installing segmentation-models-pytorch==0.6.0 into {target} ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--target",
                str(target),
                "segmentation-models-pytorch==0.6.0",
            ],
            check=True,
        )
    return target


def cpu_description() -> str:
    """CPU model and the vector/matrix units that decide fp32 and bf16 speed (Linux; else the arch).

    Sessions land on different machines (an AVX2-only AMD EPYC, an Intel Xeon with AMX), and the
    bf16 results differ by 30x between them, so every table says which one it came from.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return f"{fields.get('model name', platform.machine())} ({', '.join(units) or 'no AVX2'})"


def run_worker(python: str, env: dict, args: list) -> dict:
    proc = subprocess.run([python, str(WORKER), *args], capture_output=True, text=True, env=env, cwd="/tmp")
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(results: List[dict], key: str) -> Optional[float]:
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def train_delta(results: List[dict]) -> Optional[float]:
    """What training adds on top of the built model (libraries and weights excluded)."""
    deltas = [r["peak_rss_mb"] - r["rss_before_train_mb"] for r in results if "peak_rss_mb" in r]
    return statistics.median(deltas) if deltas else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smp-python",
        default=os.environ.get("SMP_REF_PYTHON"),
        help="run SMP's side with this interpreter (default: ours + .bench/smp06-pkg)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions inside each process")
    p.add_argument("--bf16-reps", type=int, default=1, help="bf16 is slow on CPUs without bf16 units")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--archs", nargs="+", default=FULL_ARCHS)
    p.add_argument("--encoders", nargs="+", default=FULL_ENCODERS)
    p.add_argument("--quick", action="store_true", help="Unet/FPN x resnet34 only")
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-infer", action="store_true", help="train step and peak memory only")
    p.add_argument(
        "--no-pretrained", action="store_true", help="skip the build with (cached) ImageNet weights"
    )
    p.add_argument("--fast", default="fp32,bf16", help="fast paths to time (ours): fp32,bf16 or ''")
    p.add_argument("--device", default="cpu")
    p.add_argument("--throughput", action="store_true", help="also images/s in eager/amp/compile modes")
    p.add_argument("--tp-modes", default="eager,amp,compile", help="throughput modes, in order")
    p.add_argument("--tp-archs", nargs="+", help="throughput models (default: --archs)")
    p.add_argument("--tp-batch", type=int, default=16, help="throughput batch size")
    p.add_argument("--tp-iters", type=int, default=10, help="throughput iterations per timed rep")
    p.add_argument("--tp-rounds", type=int, help="throughput rounds (default: --rounds)")
    p.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set for both sides")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = p.parse_args()
    if args.quick:
        args.archs, args.encoders = ["Unet", "FPN"], ["resnet34"]
    unknown = [m for m in args.tp_modes.split(",") if m and m not in ("eager", "amp", "compile")]
    if unknown:
        p.error(f"--tp-modes: unknown mode {unknown[0]!r}; use a comma list of eager, amp, compile")

    # Each side's library goes first; an existing PYTHONPATH (e.g. dependencies unpacked from wheels
    # on a machine without an index) follows for both.
    extra_path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    ours_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *extra_path])}
    if args.smp_python:
        smp_side = (args.smp_python, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    else:
        smp_path = os.pathsep.join([str(ensure_smp_package(SMP_PKG)), *extra_path])
        smp_side = (sys.executable, {**os.environ, "PYTHONPATH": smp_path})
    extra_env = dict(item.split("=", 1) for item in args.env)
    # Pretrained builds read random stand-in weights from a local Hugging Face cache, offline: both
    # libraries name the same hub repos and revisions, so the same files serve both.
    hf_env = {"HF_HUB_CACHE": str(ROOT / ".bench" / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    for env in (ours_env, smp_side[1]):
        env.update(hf_env)
        env.update(extra_env)
    sides = {"ours": (sys.executable, ours_env), "smp": smp_side}
    common = [
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--reps",
        str(args.reps),
        "--device",
        args.device,
        "--bf16-reps",
        str(args.bf16_reps),
    ]

    def order(round_index: int):
        names = list(sides)
        return names if round_index % 2 == 0 else names[::-1]

    # Both sides must really load their own library (a stray install would make this a self-race).
    probes = {s: run_worker(py, env, ["import"]) for s, (py, env) in sides.items()}
    files = {s: r.get("smp_file", "?") for s, r in probes.items()}
    if files["ours"] == files["smp"] or not files["ours"].startswith(str(ROOT)):
        sys.exit(f"both sides import the same library: {files}")

    peak = max(
        run_worker(sys.executable, ours_env, ["peak", "--reps", "10"]).get("gflops", 0) for _ in range(3)
    )
    lines = [
        f"Machine: {cpu_description()}, {os.cpu_count()} cores; "
        f"fp32 matmul peak {peak:.0f} GFLOP/s (best 2048x2048 matmul); device {args.device}; "
        f"torch {probes['ours'].get('torch', '?')}; input {args.batch}x3x{args.size}x{args.size}; "
        f"{args.rounds} rounds (sides alternate, a fresh process each), medians of {args.reps} reps."
        + (f" Environment for both sides: {' '.join(args.env)}." if args.env else "")
    ]
    print(lines[0], flush=True)

    imports: Dict[str, list] = {side: [] for side in sides}
    for r in range(max(args.rounds, 3)):
        for side in order(r):
            imports[side].append(run_worker(*sides[side], ["import"]))
    imp = {side: median(res, "import_s") for side, res in imports.items()}
    lines.append(
        f"\n`import segmentation_models_pytorch` on top of `import torch`: ours {imp['ours']:.3f} s, "
        f"SMP 0.6.0 {imp['smp']:.3f} s (target: ours <= 0.1 s)."
    )
    print(lines[-1], flush=True)

    header = (
        "| model | metric | ours | SMP 0.6.0 | ratio | target | ours GFLOP/s (% peak) "
        "| SMP GFLOP/s (% peak) |"
    )
    lines += ["", header, "|---|---|---|---|---|---|---|---|"]
    print(header, flush=True)
    verdicts: Dict[str, List[bool]] = {label: [] for label in TARGETS}
    ratios: Dict[str, List[float]] = {label: [] for label in TARGETS}
    started = time.time()
    with_weights = set()
    if not (args.no_infer or args.no_pretrained):
        for encoder in args.encoders:
            made = run_worker(sys.executable, ours_env, ["hf-weights", "--encoder", encoder])
            if "error" in made:
                print(f"no pretrained build for {encoder}: {made['error']}", flush=True)
            else:
                with_weights.add(encoder)
    for arch in args.archs:
        for encoder in args.encoders:
            model = ["--arch", arch, "--encoder", encoder, *common]
            if encoder in with_weights:
                model.append("--pretrained")
            res: Dict[str, Dict[str, list]] = {
                "infer": {s: [] for s in sides},
                "train": {s: [] for s in sides},
            }
            for r in range(args.rounds):
                for side in order(r):
                    fast = ["--fast", args.fast] if side == "ours" else []
                    if not args.no_infer:
                        res["infer"][side].append(run_worker(*sides[side], ["infer", *model, *fast]))
                    if not args.no_train:
                        tensors = ["--tensor-memory"] if r == 0 else []
                        res["train"][side].append(run_worker(*sides[side], ["train", *model, *tensors]))
            rows = _model_rows(f"{arch}-{encoder}", res, peak, verdicts, ratios)
            for row in rows:
                print(row, flush=True)
            lines += rows

    if args.throughput:
        lines += _throughput_section(args, sides, order)

    summary_start = len(lines)
    if any(verdicts.values()):  # a latency/memory run (not --throughput alone)
        lines += [
            "",
            "## Targets (issue 7) over this run",
            "",
            "| metric | target | met | geometric mean ratio |",
            "|---|---|---|---|",
        ]
        for label, (kind, threshold) in TARGETS.items():
            if not verdicts[label]:
                continue
            gm = statistics.geometric_mean(ratios[label])
            sign = ">=" if kind == "speed" else "<="
            unit = "x faster" if kind == "speed" else "x memory"
            lines.append(
                f"| {label} | {sign} {threshold:.2f}{unit} | {sum(verdicts[label])}/{len(verdicts[label])} "
                f"| {gm:.2f}{unit} |"
            )
        lines.append(
            f"\nRatios: SMP time / our time (> 1: we are faster); our memory / SMP memory (< 1: we use "
            f"less). `fast path` = `smp.optimize_for_inference(model)` (bf16: `dtype=torch.bfloat16`), "
            f"compared with SMP's eager fp32 eval; its max relative error against our eager output is "
            f"in brackets. "
            f"Train peak RSS is the whole process (torch, libraries, weights, gradients, momentum, "
            f"activations, and what the C allocator keeps after frees); train peak tensor memory is the "
            f"most tensor bytes alive at once during a step (weights, gradients, momentum, batch, "
            f"activations, temporaries). Took {time.time() - started:.0f} s."
        )
    else:
        lines.append(f"\nTook {time.time() - started:.0f} s.")
    print("\n".join(lines[summary_start:]))
    Path(args.out).write_text(
        "# Benchmarks: ours vs SMP 0.6.0\n\nGenerated by `make bench` (benchmarks/compare_smp.py); "
        "see {doc}`performance` for what the numbers mean and why some targets are out of reach "
        "on this hardware.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {args.out}")


def _model_rows(name: str, res, peak: float, verdicts, ratios) -> List[str]:
    rows = []
    for label, key, smp_key in TIME_ROWS:
        group = "train" if key == "train_s" else "infer"
        ours_rs, smp_rs = res[group]["ours"], res[group]["smp"]
        o, s = median(ours_rs, key), median(smp_rs, smp_key)
        if o is None or s is None:
            err = next((r["error"] for r in ours_rs + smp_rs if "error" in r), None)
            if err:
                rows.append(f"| {name} | {label} | error: {err} | | | | | |")
            continue

        def gflops(rs, t, key=key):
            f = median(rs, "flops")
            if not f or key.startswith("build"):
                return ""
            return f"{f / t / 1e9:.0f} ({100 * f / t / 1e9 / peak:.0f}%)"

        ratio = s / o
        kind, threshold = TARGETS[label]
        met = ratio >= threshold
        verdicts[label].append(met)
        ratios[label].append(ratio)
        extra = ""
        if key.startswith("fast_"):
            e = median(ours_rs, key.replace("_s", "_err"))
            extra = f" [{e:.1e}]" if e is not None else ""
        rows.append(
            f"| {name} | {label} | {o * 1000:.0f} ms{extra} | {s * 1000:.0f} ms | {ratio:.2f}x faster | "
            f"{'met' if met else 'no'} | {gflops(ours_rs, o)} | {gflops(smp_rs, s)} |"
        )
    ours_t, smp_t = res["train"]["ours"], res["train"]["smp"]
    mo, ms = median(ours_t, "peak_rss_mb"), median(smp_t, "peak_rss_mb")
    if mo and ms:
        rows.append(_memory_row(name, "train peak RSS", mo, ms, verdicts, ratios))
        to, ts = median(ours_t, "peak_tensor_mb"), median(smp_t, "peak_tensor_mb")
        if to and ts:
            rows.append(_memory_row(name, "train peak tensor memory", to, ts, verdicts, ratios))
        do, ds = train_delta(ours_t), train_delta(smp_t)
        if do and ds:
            rows.append(
                f"| {name} | training memory (peak - after build) | {do:.0f} MB | {ds:.0f} MB | "
                f"{do / ds:.2f}x memory | | | |"
            )
    return rows


def _throughput_section(args, sides, order) -> List[str]:
    """Run the throughput workers (alternating sides) and return the section's markdown lines."""
    modes = [m for m in args.tp_modes.split(",") if m]
    head = [
        "",
        f"## Throughput on {args.device}: eager, AMP + channels_last, + torch.compile",
        "",
        f"Images/s (higher is better), batch {args.tp_batch} at {args.size}x{args.size}, autocast "
        f"{args.amp_dtype}; ratio = ours / SMP. `amp`: each side's user code moves model and input to "
        f"channels_last and runs under autocast (float16 training with a GradScaler); `compile`: the "
        f"same plus `torch.compile(model)`, whose compilation is in the warm-up column (eval + train).",
        "",
        "| model | mode | eval ours | eval SMP | ratio | train ours | train SMP | ratio "
        "| warm-up s ours / SMP | train peak MB ours / SMP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in head:
        print(line, flush=True)
    rows, ratios = [], {m: [] for m in modes}
    common = ["--size", str(args.size), "--batch", str(args.tp_batch), "--device", args.device]
    common += ["--iters", str(args.tp_iters), "--reps", str(args.reps), "--amp-dtype", args.amp_dtype]
    rounds = args.tp_rounds or args.rounds
    for arch in args.tp_archs or args.archs:
        for encoder in args.encoders:
            res = {s: [] for s in sides}
            for r in range(rounds):
                for side in order(r):
                    cmd = ["throughput", "--arch", arch, "--encoder", encoder, "--modes", ",".join(modes)]
                    res[side].append(run_worker(*sides[side], cmd + common))
            for mode in modes:
                pairs = [
                    (median(res["ours"], f"{mode}_{phase}_ips"), median(res["smp"], f"{mode}_{phase}_ips"))
                    for phase in ("eval", "train")
                ]
                if any(None in pair for pair in pairs):  # no eval/train ratio counts for this mode
                    err = next((r["error"] for r in res["ours"] + res["smp"] if "error" in r), "?")
                    cells = [f"error: {err}", "", "", "", "", ""]
                else:
                    cells = [cell for o, s in pairs for cell in (f"{o:.1f}", f"{s:.1f}", f"{o / s:.2f}x")]
                    ratios[mode] += [o / s for o, s in pairs]

                warmup = _pair(res, [f"{mode}_eval_warmup_s", f"{mode}_train_warmup_s"], "{:.1f}")
                peak_mb = _pair(res, [f"{mode}_train_peak_mb"], "{:.0f}")
                row = f"| {arch}-{encoder} | {mode} | {' | '.join(cells)} | {warmup} | {peak_mb} |"
                print(row, flush=True)
                rows.append(row)
    summary = ["", "| mode | geometric mean ours / SMP (eval and train rows) |", "|---|---|"]
    summary += [
        f"| {mode} | {statistics.geometric_mean(v):.2f}x |" for mode, v in ratios.items() if v
    ]
    print("\n".join(summary), flush=True)
    return head + rows + summary


def _pair(res, keys: List[str], fmt: str) -> str:
    """"ours / SMP" of the medians of ``keys`` summed (``-`` where a side lacks one)."""
    cells = []
    for side in ("ours", "smp"):
        values = [median(res[side], key) for key in keys]
        cells.append(fmt.format(sum(values)) if None not in values else "-")
    return " / ".join(cells)


def _memory_row(name: str, label: str, ours: float, smp: float, verdicts, ratios) -> str:
    met = ours / smp <= TARGETS[label][1]
    verdicts[label].append(met)
    ratios[label].append(ours / smp)
    verdict = "met" if met else "no"
    return f"| {name} | {label} | {ours:.0f} MB | {smp:.0f} MB | {ours / smp:.2f}x memory | {verdict} | | |"


if __name__ == "__main__":
    main()
