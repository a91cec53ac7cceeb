"""Train a segmentation model on built-in synthetic data (no download) or on your own images.

Usage::

    python examples/train.py                                     # Unet/resnet18, about a minute on CPU
    python examples/train.py --arch fpn --encoder resnet34 --loss focal --epochs 20
    python examples/train.py --data-dir my_data                  # my_data/images/*, my_data/masks/*
    torchrun --nproc_per_node=2 examples/train.py                # DDP (gloo on CPU, nccl on GPU)
    torchrun --nproc_per_node=4 examples/train.py --sync-bn      # SyncBatchNorm (GPU only)

The built-in data is :class:`segmentation_models_pytorch.datasets.SyntheticShapesDataset`: textured
circles, rectangles and triangles (classes 1-3) on textured backgrounds (class 0), drawn from a seed.
Everything is written to ``--out``:

* ``model/``: the trained model (``model.save_pretrained``); reload it with
  ``smp.from_pretrained("<out>/model")``;
* ``predictions.png``: validation images, their ground truth and the model's prediction;
* ``metrics.json``: the arguments, per-epoch train loss and validation IoU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

# Run from a source checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import segmentation_models_pytorch as smp  # noqa: E402

ARCHITECTURES = {
    name.lower(): name for name in smp.__all__ if name[:1].isupper() and name != "MODEL_ARCHITECTURES_MAPPING"
}
LOSSES = ("dice+ce", "ce", "dice", "jaccard", "focal", "lovasz", "tversky")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Train a segmentation model (synthetic shapes by default; --data-dir for your images).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--arch", type=str.lower, default="unet", choices=sorted(ARCHITECTURES), help="architecture"
    )
    p.add_argument(
        "--encoder", default="resnet18", help="encoder name, e.g. resnet34, efficientnet-b0, tu-..."
    )
    p.add_argument(
        "--encoder-depth",
        type=int,
        default=None,
        help="encoder stages used (1-5); None: 3 (enough for 64px images) for architectures whose own "
        "default is 5, else the architecture's default (DPT 4, PSPNet 3)",
    )
    p.add_argument(
        "--encoder-weights",
        default=None,
        help="pretrained encoder weights, e.g. imagenet (needs network or a local cache); None: random init",
    )
    p.add_argument("--loss", type=str.lower, default="dice+ce", choices=LOSSES, help="training loss")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (one-cycle schedule, AdamW)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument(
        "--image-size", type=int, default=64, help="training images are resized/drawn at this size"
    )
    p.add_argument("--train-size", type=int, default=512, help="number of synthetic training images")
    p.add_argument("--val-size", type=int, default=128, help="number of synthetic validation images")
    p.add_argument("--data-dir", default=None, help="folder with images/ and masks/ (class-index PNGs)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of --data-dir used for validation")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (GPU only)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--figure-samples", type=int, default=6, help="validation images shown in predictions.png")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    p.add_argument("--dump-rank-weights", action="store_true", help=argparse.SUPPRESS)  # used by tests
    args = p.parse_args(argv)

    positive = ("epochs", "batch_size", "image_size", "train_size", "val_size", "encoder_depth")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not args.lr > 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.val_fraction < 1:
        p.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.encoder_weights is not None and args.encoder_weights.lower() in ("none", "null", ""):
        args.encoder_weights = None
    return args


# ------------------------------------------------------------------------------------------- setup


class Context:
    """Process-group facts: rank, world size, device; the single-process case is world size 1."""

    def __init__(self, device_choice: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda was requested but CUDA is not available.")
        self.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.distributed:
            # gloo runs collectives on CPU tensors, nccl on CUDA ones.
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, message: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def build_data(args: argparse.Namespace) -> Tuple[Dataset, Dataset, List[str]]:
    """Return ``(train, validation, class names)``; synthetic data is rendered once into memory."""
    if args.data_dir is None:

        def render(length: int, seed: int) -> TensorDataset:
            ds = smp.datasets.SyntheticShapesDataset(length, image_size=args.image_size, seed=seed)
            samples = [ds[i] for i in range(len(ds))]
            return TensorDataset(
                torch.stack([s["image"] for s in samples]), torch.stack([s["mask"] for s in samples])
            )

        # Validation images come from another seed, so they never repeat training images.
        classes = list(smp.datasets.SyntheticShapesDataset.classes)
        return render(args.train_size, args.seed), render(args.val_size, args.seed + 1_000_003), classes

    full = smp.datasets.MaskFolderDataset(args.data_dir, image_size=args.image_size)
    if len(full) < 2:
        raise SystemExit(
            f"--data-dir {args.data_dir!r} needs at least 2 image/mask pairs, found {len(full)}."
        )
    every = max(2, round(1 / args.val_fraction))
    val_idx = [i for i in range(len(full)) if i % every == 0]
    train_idx = [i for i in range(len(full)) if i % every != 0]
    classes = [f"class {i}" for i in range(full.count_classes())]
    return _Pairs(Subset(full, train_idx)), _Pairs(Subset(full, val_idx)), classes


class _Pairs(Dataset):
    """Adapts dict samples to the ``(image, mask)`` tuples the training loop uses."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        sample = self.dataset[index]
        return sample["image"], sample["mask"]


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The chosen architecture with ``num_classes`` output channels and ``--encoder-depth`` stages."""
    model_class = getattr(smp, ARCHITECTURES[args.arch])
    kwargs: Dict[str, Any] = {}
    parameters = inspect.signature(model_class).parameters
    if "encoder_depth" in parameters:
        if args.encoder_depth is None:
            # 64px images need no 32x down-sampling: 3 stages train twice as fast, and better.
            default_depth = parameters["encoder_depth"].default
            args.encoder_depth = 3 if default_depth == 5 else default_depth
        kwargs["encoder_depth"] = args.encoder_depth
        # Decoders with one block per stage (Unet, Unet++, MAnet) need as many channel entries as
        # stages: keep the architecture's default widths of the shallowest ones.
        default = parameters["decoder_channels"].default if "decoder_channels" in parameters else None
        if isinstance(default, (tuple, list)) and len(default) != args.encoder_depth:
            kwargs["decoder_channels"] = tuple(default[-args.encoder_depth :])
    return model_class(
        encoder_name=args.encoder, encoder_weights=args.encoder_weights, classes=num_classes, **kwargs
    )


def build_loss(name: str) -> nn.Module:
    """A multiclass loss on logits ``(N, C, H, W)`` and integer masks ``(N, H, W)``."""
    losses = smp.losses
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "dice+ce":
        dice, ce = losses.DiceLoss(losses.MULTICLASS_MODE), nn.CrossEntropyLoss()
        return _Sum(dice, ce)
    factory = {
        "dice": losses.DiceLoss,
        "jaccard": losses.JaccardLoss,
        "focal": losses.FocalLoss,
        "lovasz": losses.LovaszLoss,
        "tversky": losses.TverskyLoss,
    }[name]
    return factory(losses.MULTICLASS_MODE)


class _Sum(nn.Module):
    def __init__(self, *terms: nn.Module) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(term(logits, target) for term in self.terms)  # type: ignore[return-value]


def _masks(output: Any) -> torch.Tensor:
    # Models built with aux_params return (masks, labels).
    return output[0] if isinstance(output, (tuple, list)) else output


# ------------------------------------------------------------------------------------- train / eval


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, num_classes: int, ctx: Context, batch_size: int
) -> torch.Tensor:
    """Per-class IoU over the whole validation set (each process scores a shard; sums are reduced)."""
    model.eval()
    shard = Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))  # type: ignore[arg-type]
    stats = torch.zeros(4, num_classes, dtype=torch.long, device=ctx.device)
    for images, masks in DataLoader(shard, batch_size=batch_size):
        logits = _masks(model(images.to(ctx.device)))
        tp, fp, fn, tn = smp.metrics.get_stats(
            logits.argmax(1), masks.to(ctx.device), mode="multiclass", num_classes=num_classes
        )
        stats += torch.stack([tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0)])
    tp, fp, fn, tn = ctx.all_reduce_sum(stats).cpu()[:, None]  # each (1, C): one "image" of summed counts
    return smp.metrics.iou_score(tp, fp, fn, tn, reduction="none", zero_division=1.0)[0]


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the whole training; returns the history (also written to ``metrics.json``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = Context(args.device)
    if args.sync_bn and ctx.device.type != "cuda":
        ctx.close()
        raise SystemExit(
            "--sync-bn needs CUDA: torch's SyncBatchNorm only runs on GPUs. On CPU, train without it "
            "(each process then normalises with its own batch statistics)."
        )
    try:
        return _train(args, ctx)
    finally:
        ctx.close()


def _train(args: argparse.Namespace, ctx: Context) -> Dict[str, Any]:
    from tqdm import tqdm

    started = time.perf_counter()
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts them)
    train_set, val_set, classes = build_data(args)
    num_classes = len(classes)
    net = build_model(args, num_classes).to(ctx.device)
    if args.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model: nn.Module = net
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # Encoders keep their deeper stages when encoder_depth < 5 (for checkpoint compatibility);
        # those parameters get no gradient, which DDP must be told about.
        model = nn.parallel.DistributedDataParallel(net, device_ids=device_ids, find_unused_parameters=True)

    sampler = DistributedSampler(train_set, seed=args.seed, drop_last=True) if ctx.distributed else None
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(train_set) // ctx.world_size
        > args.batch_size,  # keep BatchNorm away from 1-image batches
        num_workers=args.workers,
        generator=generator,
    )
    steps_per_epoch = min(len(loader), args.max_steps or len(loader))
    if steps_per_epoch == 0:
        raise SystemExit(f"No training batches: {len(train_set)} images for {ctx.world_size} process(es).")
    criterion = build_loss(args.loss)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )

    ctx.log(
        f"{ARCHITECTURES[args.arch]}({args.encoder}, depth {args.encoder_depth}, "
        f"weights={args.encoder_weights}) | {num_classes} classes {classes} | "
        f"{len(train_set)} train / {len(val_set)} val images of {args.image_size}px | "
        f"{ctx.world_size} process(es) on {ctx.device.type} | loss {args.loss}"
    )
    history: List[Dict[str, Any]] = []
    for epoch in range(1, args.epochs + 1):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # (sum, count)
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{args.epochs}",
            disable=args.no_progress or not ctx.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        for step, (images, masks) in enumerate(loader):
            if step >= steps_per_epoch:
                break
            images, masks = images.to(ctx.device), masks.to(ctx.device)
            loss = criterion(_masks(model(images)), masks)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"Loss became {loss.item()} at epoch {epoch}, step {step}; "
                    f"try a lower --lr (now {args.lr})."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += torch.stack([loss.detach().double(), loss.new_ones((), dtype=torch.float64)])
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()

        if ctx.distributed:
            # BatchNorm running statistics are per process; give every rank rank 0's.
            for buffer in net.buffers():
                dist.broadcast(buffer, src=0)
        total, count = ctx.all_reduce_sum(loss_sum).tolist()
        iou = evaluate(net, val_set, num_classes, ctx, args.batch_size)
        record = {
            "epoch": epoch,
            "train_loss": total / count,
            "val_miou": iou.mean().item(),
            "val_iou": {name: round(v, 4) for name, v in zip(classes, iou.tolist())},
            "time_s": round(time.perf_counter() - started, 1),
        }
        history.append(record)
        per_class = " ".join(f"{name} {v:.3f}" for name, v in record["val_iou"].items())
        ctx.log(
            f"epoch {epoch:>2}/{args.epochs}  train loss {record['train_loss']:.4f}  "
            f"val mIoU {record['val_miou']:.4f}  ({per_class})  {record['time_s']:.0f}s"
        )

    result = {"args": vars(args), "classes": classes, "history": history, "val_miou": history[-1]["val_miou"]}
    out = Path(args.out)
    if args.dump_rank_weights:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in net.state_dict().items()}, out / f"rank{ctx.rank}_state.pt")
    if ctx.is_main:
        _save_outputs(net, val_set, classes, result, out, args)
        ctx.log(f"done in {time.perf_counter() - started:.0f}s: final val mIoU {result['val_miou']:.4f}")
    if ctx.distributed:
        dist.barrier()  # nobody exits (and tears down the group) before rank 0 has saved
    return result


def _save_outputs(
    net: nn.Module,
    val_set: Dataset,
    classes: List[str],
    result: Dict[str, Any],
    out: Path,
    args: argparse.Namespace,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    (model_dir / "README.md").unlink(missing_ok=True)  # regenerate the card with this run's metrics
    net.save_pretrained(  # type: ignore[operator]
        model_dir,
        dataset="synthetic shapes (smp.datasets.SyntheticShapesDataset)"
        if args.data_dir is None
        else args.data_dir,
        metrics={"val_mIoU": round(result["val_miou"], 4), **result["history"][-1]["val_iou"]},
    )
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    figure = out / "predictions.png"
    save_figure(net, val_set, classes, figure, args.figure_samples, result["val_miou"])
    print(f"saved {model_dir}/ (reload with smp.from_pretrained({str(model_dir)!r}))")
    print(f"saved {figure} and {out / 'metrics.json'}")


@torch.no_grad()
def save_figure(
    model: nn.Module, dataset: Dataset, classes: List[str], path: Path, samples: int, miou: float
) -> None:
    """Save a grid with one column per validation image: image / ground truth / prediction."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    n = max(1, min(samples, len(dataset)))  # type: ignore[arg-type]
    images, masks = zip(*(dataset[i] for i in range(n)))
    batch = torch.stack(images)
    device = next(model.parameters()).device
    model.eval()
    preds = _masks(model(batch.to(device))).argmax(1).cpu()

    palette = ["#202020", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]
    colours = [palette[i % len(palette)] for i in range(len(classes))]
    cmap = ListedColormap(colours)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6.2), squeeze=False)
    rows = [("image", batch), ("ground truth", torch.stack(masks)), ("prediction", preds)]
    for r, (title, data) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            if r == 0:
                ax.imshow(data[c].permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                ax.imshow(data[c].numpy(), cmap=cmap, vmin=0, vmax=len(classes) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=11)
    fig.legend(
        handles=[Patch(color=col, label=name) for col, name in zip(colours, classes)],
        loc="lower center",
        ncol=min(len(classes), 8),
        frameon=False,
    )
    fig.suptitle(f"validation samples - mean IoU over the validation set: {miou:.3f}")
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Entry point: parse ``argv`` (default ``sys.argv[1:]``) and train."""
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
