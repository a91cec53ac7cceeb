"""How many timm architectures work as ``tu-`` encoders in Unet and FPN.

For every architecture of ``timm.list_models()`` (one default tag each) with at most ``--max-params``
encoder parameters (counted on the meta device, nothing allocated), builds ``smp.Unet`` and
``smp.FPN`` with ``encoder_name="tu-<arch>"`` and random weights, runs one forward pass at
``--size`` x ``--size`` and records success or the error, one JSON line per architecture.

Fixed-size models (Swin, MaxViT, CoAtNet...) that fail at the default size are retried with
``img_size=--size`` (what a user must pass for them); such successes are counted separately.

Work is split over ``--jobs`` worker processes, each running chunks of architectures in a fresh
interpreter; a chunk that hangs or crashes is killed and resumed after the culprit, which is recorded
as a timeout / crash. Results are appended to ``--out``; architectures already there are skipped,
so an interrupted run resumes where it stopped. Examples::

    python benchmarks/timm_coverage.py --jobs 2                       # everything
    python benchmarks/timm_coverage.py --sample 300 --seed 0          # a random sample
    python benchmarks/timm_coverage.py --start 0 --stop 200           # a slice of the sorted list
    python benchmarks/timm_coverage.py --report                       # summarise --out only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "outputs" / "timm_coverage.jsonl"  # outputs/ is git-ignored
ARCHS = ("Unet", "FPN")


# ----------------------------------------------------------------------------- worker side
def _count_params(name: str) -> int:
    import timm
    import torch

    for kwargs in ({"features_only": True}, {}):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, **kwargs)
            return int(sum(p.numel() for p in model.parameters()))
        except Exception:
            continue
    return -1


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().replace("\n", " | ")
    return text[:600]


def _try_arch(arch: str, name: str, size: int, kwargs: Dict) -> Dict:
    import torch

    import segmentation_models_pytorch as smp

    rec: Dict = {"stage": "build"}
    t0 = time.time()
    try:
        torch.manual_seed(0)
        model = getattr(smp, arch)(
            encoder_name=f"tu-{name}", encoder_weights=None, classes=2, **kwargs
        ).eval()
        rec["stage"] = "forward"
        with torch.no_grad():
            out = model(torch.randn(1, 3, size, size))
        if tuple(out.shape) != (1, 2, size, size):
            raise RuntimeError(f"output shape {tuple(out.shape)} != (1, 2, {size}, {size})")
        rec.update(ok=True, out_channels=list(model.encoder.out_channels))
        rec["resampled"] = bool(getattr(model.encoder, "_resampled", False))
    except Exception as err:
        frames = [f.filename for f in traceback.extract_tb(err.__traceback__)]
        outside_torch = [f for f in frames if f"{os.sep}torch{os.sep}" not in f]
        rec.update(ok=False, error=_short(err), where=(outside_torch or frames or [""])[-1])
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def _fixed_size(name: str) -> bool:
    try:
        import timm

        return bool(timm.models.get_pretrained_cfg(name).fixed_input_size)
    except Exception:
        return False


def run_worker(names: List[str], out: str, size: int, max_params: float) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    with open(out, "a") as f:
        for name in names:
            f.write(json.dumps({"name": name, "started": True}) + "\n")
            f.flush()
            rec: Dict = {"name": name, "params": _count_params(name)}
            if rec["params"] > max_params:
                rec["status"] = "skipped_large"
            else:
                results = {}
                for arch in ARCHS:
                    r = _try_arch(arch, name, size, {})
                    if not r["ok"] and _fixed_size(name):
                        retry = _try_arch(arch, name, size, {"img_size": size})
                        if retry["ok"]:
                            retry["first_error"] = r["error"]
                            retry["with_img_size"] = True
                            r = retry
                    results[arch] = r
                rec["results"] = results
                ok = all(r["ok"] for r in results.values())
                with_size = any(r.get("with_img_size") for r in results.values())
                rec["status"] = ("ok_img_size" if with_size else "ok") if ok else "fail"
            f.write(json.dumps(rec) + "\n")
            f.flush()


# ----------------------------------------------------------------------------- parent side
def _load(path: Path) -> Dict[str, Dict]:
    done: Dict[str, Dict] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "status" in rec:
            done[rec["name"]] = rec
    return done


def _run_chunk(chunk: List[str], out: Path, args: argparse.Namespace) -> subprocess.Popen:
    part = out.with_suffix(f".part{os.getpid()}_{time.time_ns()}.jsonl")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--names",
        ",".join(chunk),
        "--part",
        str(part),
        "--size",
        str(args.size),
        "--max-params",
        str(args.max_params),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never touch the network
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.part = part  # type: ignore[attr-defined]
    proc.chunk = chunk  # type: ignore[attr-defined]
    proc.t0 = time.time()  # type: ignore[attr-defined]
    return proc


def _harvest(proc: subprocess.Popen, out: Path, reason: str = "") -> List[str]:
    """Move a finished/killed chunk's records to ``out``; return the names still to run."""
    part: Path = proc.part  # type: ignore[attr-defined]
    finished, started = [], None
    lines = part.read_text().splitlines() if part.exists() else []
    with open(out, "a") as f:
        for line in lines:
            rec = json.loads(line)
            if rec.get("started"):
                started = rec["name"]
                continue
            finished.append(rec["name"])
            f.write(line + "\n")
        culprit = started if started not in finished else None
        if reason and culprit:
            f.write(
                json.dumps(
                    {
                        "name": culprit,
                        "status": "fail",
                        "results": {a: {"ok": False, "error": reason, "stage": "worker"} for a in ARCHS},
                    }
                )
                + "\n"
            )
            finished.append(culprit)
    if part.exists():
        part.unlink()
    return [n for n in proc.chunk if n not in finished]  # type: ignore[attr-defined]


def run_parent(args: argparse.Namespace) -> None:
    import timm

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(timm.list_models())
    if args.names:
        names = [n for n in args.names.split(",") if n]
    names = names[args.start : args.stop]
    if args.sample:  # random order: any prefix of the run is itself a random sample
        names = random.Random(args.seed).sample(names, min(args.sample, len(names)))
    done = _load(out)
    todo = [n for n in names if n not in done]
    print(f"{len(names)} architectures selected, {len(names) - len(todo)} already done, {len(todo)} to run")
    queue = [todo[i : i + args.chunk] for i in range(0, len(todo), args.chunk)]
    running: List[subprocess.Popen] = []
    last = -1
    while queue or running:
        while queue and len(running) < args.jobs:
            running.append(_run_chunk(queue.pop(0), out, args))
        time.sleep(2)
        for proc in list(running):
            code = proc.poll()
            budget = args.timeout * len(proc.chunk)  # type: ignore[attr-defined]
            part: Path = proc.part  # type: ignore[attr-defined]
            stalled = part.exists() and time.time() - part.stat().st_mtime > args.timeout
            if code is None and not stalled and time.time() - proc.t0 < budget:  # type: ignore[attr-defined]
                continue
            reason = ""
            if code is None:
                proc.kill()
                proc.wait()
                reason = f"timeout (> {args.timeout} s for one architecture)"
            elif code != 0:
                reason = f"worker crashed (exit code {code})"
            running.remove(proc)
            left = _harvest(proc, out, reason)
            if left:
                queue.insert(0, left)
        n_done = len(set(_load(out)) & set(names))
        if n_done != last:
            print(f"{n_done}/{len(names)} done", flush=True)
            last = n_done
    report(out, names)


def _cause(error: str, where: str = "") -> str:
    """Group an error message by its likely cause."""
    e = error.lower()
    rules = [
        ("minimum input size", "input smaller than timm's min_input_size"),
        ("timeout", "timeout"),
        ("crashed", "worker crash"),
        ("doesn't match model", "fixed input size (needs img_size)"),
        ("must be divisible by", "input size constraint"),
        ("divisible", "input size constraint"),
        ("out of memory", "out of memory"),
        ("does not support `forward_intermediates`", "no feature extraction in timm"),
        ("features_only not implemented", "no feature extraction in timm"),
        ("feature_info", "no feature extraction in timm"),
        ("unexpected keyword", "unsupported timm argument"),
        ("size of tensor", "shape mismatch inside timm model"),
        ("shape", "shape mismatch"),
    ]
    for needle, cause in rules:
        if needle in e:
            return cause
    kind = error.split(":")[0] or "other"
    return f"{kind} in {os.path.basename(where)}" if where else kind


def report(out: Path, names: Iterable[str] = ()) -> Dict:
    done = _load(out)
    names = list(names) or sorted(done)
    recs = [done[n] for n in names if n in done]
    counts = Counter(r["status"] for r in recs)
    tried = [r for r in recs if r["status"] != "skipped_large"]
    ok = [r for r in tried if r["status"].startswith("ok")]
    print(f"results: {out}")
    print(f"architectures with a result: {len(recs)} (skipped, > max params: {counts['skipped_large']})")
    if tried:
        print(
            f"tried: {len(tried)}  success in Unet and FPN: {len(ok)} ({100 * len(ok) / len(tried):.1f}%)"
            f"  [of which needing img_size: {counts['ok_img_size']}]"
        )
    resampled = sum(1 for r in ok if any(x.get("resampled") for x in r.get("results", {}).values()))
    print(f"successes through the resampling adapter (plain ViTs & co): {resampled}")
    groups: Dict[str, List[str]] = defaultdict(list)
    for r in tried:
        if r["status"] == "fail":
            bad = [x for x in r["results"].values() if not x["ok"]]
            groups[_cause(bad[0]["error"], bad[0].get("where", ""))].append(r["name"])
    for cause, members in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(members):4d}  {cause}: {', '.join(members)}")
    return {"tried": len(tried), "ok": len(ok), "groups": groups}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSONL results file (appended, resumable)")
    p.add_argument("--start", type=int, default=0, help="first index in the sorted architecture list")
    p.add_argument("--stop", type=int, default=None, help="end index (exclusive)")
    p.add_argument(
        "--sample",
        type=int,
        default=0,
        help="random sample of this many architectures, run in random order (a large number: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--names", default="", help="comma-separated architectures (overrides the list)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--chunk", type=int, default=10, help="architectures per worker process")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-params", type=float, default=60e6)
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per architecture")
    p.add_argument("--report", action="store_true", help="only summarise --out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        run_worker([n for n in args.names.split(",") if n], args.part, args.size, args.max_params)
    elif args.report:
        report(Path(args.out))
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
