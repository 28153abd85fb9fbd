"""``lowmag train-maga`` (align a low-magnification encoder) and ``lowmag extract`` (features)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from analysis.devices import DEVICE_HELP
from analysis.errors import AnalysisError

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms"}


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train-maga",
        help="align a low-magnification encoder to a 20x teacher (self-supervised, no labels)",
    )
    train.add_argument("--slides", required=True, type=Path, help="folder of whole-slide images")
    train.add_argument("--mag", type=float, default=5, help="student magnification (5 or 10)")
    train.add_argument("--high-mag", type=float, default=20, help="teacher magnification")
    train.add_argument("--teacher", type=Path, help="teacher weights (.pth/.safetensors)")
    train.add_argument("--encoder", default="resnet50_trunc")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument(
        "--pairs-per-slide",
        "--patches-per-slide",
        dest="pairs_per_slide",
        type=int,
        default=512,
        help="tissue cells sampled per slide (seeded)",
    )
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--max-steps", type=int, help="cap on steps per epoch")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=2, help="pair-reading worker processes")
    train.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
    train.add_argument(
        "--pair-cache",
        action="store_true",
        help="cache both reads of every pair under OUT/pairs (~200 KB per 5x pair) instead of "
        "reading the slides while training",
    )
    train.add_argument("--mpp", type=float, help="level-0 µm/px for slides that carry none")
    train.add_argument("--threads", type=int, help="torch CPU threads")
    train.add_argument("--device", help=DEVICE_HELP)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    train.set_defaults(handler=train_maga_command)

    extract = subparsers.add_parser("extract", help="encode a slide's tissue patches to HDF5")
    extract.add_argument("slide", type=Path)
    extract.add_argument("--mag", type=float, required=True, help="read magnification (5, 10, 20)")
    extract.add_argument("--encoder", default="resnet50_trunc")
    extract.add_argument("--weights", type=Path, help="encoder weights (.pth/.safetensors)")
    extract.add_argument("--mpp", type=float, help="level-0 µm/px for slides that carry none")
    extract.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
    extract.add_argument("--batch-size", type=int, default=64)
    extract.add_argument("--min-tissue", type=float, default=0.25)
    extract.add_argument("--threads", type=int, help="torch CPU threads")
    extract.add_argument("--device", help=DEVICE_HELP)
    extract.add_argument("-o", "--out", required=True, type=Path, help="output .h5")
    extract.set_defaults(handler=extract_command)

    cohort = subparsers.add_parser(
        "extract-cohort",
        help="encode every slide of a folder to OUT/<slide id>.h5 (skips slides already done)",
    )
    cohort.add_argument("--slides", required=True, type=Path, help="folder of whole-slide images")
    cohort.add_argument("--mag", type=float, default=5.0, help="read magnification")
    cohort.add_argument("--encoder", default="resnet50_trunc")
    cohort.add_argument("--weights", type=Path, help="encoder weights (.pth/.safetensors)")
    cohort.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
    cohort.add_argument("--batch-size", type=int, default=64)
    cohort.add_argument("--min-tissue", type=float, default=0.25)
    cohort.add_argument("--mpp", type=float, help="level-0 µm/px for slides that carry none")
    cohort.add_argument("--threads", type=int, help="torch CPU threads")
    cohort.add_argument("--device", help=DEVICE_HELP)
    cohort.add_argument("-o", "--out", required=True, type=Path, help="feature folder")
    cohort.set_defaults(handler=extract_cohort_command)


def find_slides(folder: Path) -> list[Path]:
    """Whole-slide files directly in ``folder`` (sorted), by extension."""
    if not folder.is_dir():
        raise AnalysisError(f"slide folder {folder} does not exist or is not a folder")
    slides = sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    if not slides:
        raise AnalysisError(
            f"no whole-slide files ({', '.join(sorted(SLIDE_SUFFIXES))}) in {folder}"
        )
    return slides


def train_maga_command(args: argparse.Namespace) -> int:
    import torch

    from analysis.devices import resolve_device
    from analysis.maga import (
        MagaConfig,
        PairSource,
        SlidePairs,
        build_pair_cache,
        init_distributed,
        train_maga,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    slides = find_slides(args.slides)
    device = init_distributed() or resolve_device(args.device)
    pairs: PairSource
    if args.pair_cache and args.mpp:
        raise AnalysisError("--mpp works with slides read while training; drop --pair-cache")
    if args.pair_cache:
        pairs = build_pair_cache(
            slides,
            args.out / "pairs",
            low_mag=args.mag,
            high_mag=args.high_mag,
            max_patches_per_slide=args.pairs_per_slide,
            seed=args.seed,
            log=_log,
        )
    else:
        pairs = SlidePairs(
            slides,
            low_mag=args.mag,
            high_mag=args.high_mag,
            pairs_per_slide=args.pairs_per_slide,
            seed=args.seed,
            log=_log,
            mpp=args.mpp,
        )
    config = MagaConfig(
        encoder=args.encoder,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_steps_per_epoch=args.max_steps,
        device=device,
        workers=args.workers,
        precision=args.precision,
    )
    result = train_maga(pairs, args.out, config, args.teacher, resume=args.resume, log=_log)
    print(json.dumps({"student": str(result.student_path), "alignment": result.alignment}))
    return 0


def extract_command(args: argparse.Namespace) -> int:
    import torch

    from analysis.devices import resolve_device
    from analysis.encoders import build_encoder
    from analysis.features import extract_features, save_h5
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    encoder = build_encoder(
        args.encoder,
        args.weights,
        precision=args.precision,
        batch_size=args.batch_size,
        device=resolve_device(args.device),
    )
    if args.weights is None:
        _log(f"no --weights: using the {encoder.weights_source} {args.encoder} (not pretrained)")
    with open_slide(args.slide, mpp=args.mpp) as slide:
        grid = patch_grid(slide, min_tissue=args.min_tissue)
        features = extract_features(slide, grid, encoder, args.mag, batch_size=args.batch_size)
    save_h5(args.out, features)
    print(f"{args.out}: {len(features)} patches x {encoder.dim} features at {args.mag:g}x")
    return 0


def extract_cohort_command(args: argparse.Namespace) -> int:
    import torch

    from analysis.cohort import ExtractSettings, extract_cohort

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.weights is not None and not args.weights.is_file():
        raise AnalysisError(f"weight file {args.weights} does not exist: check the path")
    settings = ExtractSettings(
        mag=args.mag,
        encoder=args.encoder,
        weights=str(args.weights) if args.weights else None,
        precision=args.precision,
        device=args.device,
        batch_size=args.batch_size,
        min_tissue=args.min_tissue,
        mpp=args.mpp,
    )
    results = extract_cohort(find_slides(args.slides), args.out, settings, log=_log)
    done = sum(r["status"] == "extracted" for r in results)
    print(f"{args.out}: {done} slide(s) extracted, {len(results) - done} already there")
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr)
