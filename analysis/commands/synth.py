"""``lowmag synth``: write synthetic H&E-like slides (one, or a labelled cohort)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from analysis.synth import write_cohort, write_synthetic_slide


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth", help="write synthetic slides with known ground truth (demo, tests, experiments)"
    )
    kinds = parser.add_subparsers(dest="synth_kind", metavar="KIND", required=True)

    slide = kinds.add_parser("slide", help="one synthetic 20x slide and its lesion mask")
    slide.add_argument("out", type=Path, help="output slide file (e.g. slide.svs)")
    _add_size_args(slide)
    slide.add_argument("--label", type=int, choices=(0, 1), default=0)
    _add_content_args(slide)
    slide.add_argument("--json", action="store_true", help="print the result as JSON")
    slide.set_defaults(handler=run_slide)

    cohort = kinds.add_parser("cohort", help="patients' slides plus labels.csv")
    cohort.add_argument("out_dir", type=Path, help="output folder")
    cohort.add_argument("--patients", type=int, required=True)
    cohort.add_argument("--slides-per-patient", type=int, default=1)
    cohort.add_argument("--positive-fraction", type=float, default=0.5)
    _add_size_args(cohort)
    _add_content_args(cohort)
    cohort.set_defaults(handler=run_cohort)


def _add_size_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, required=True, help="level-0 width in pixels")
    parser.add_argument("--height", type=int, required=True, help="level-0 height in pixels")
    parser.add_argument("--seed", type=int, default=0)


def _add_content_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mpp", type=float, default=0.5, help="µm per pixel (0.5 = 20x)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1-100")
    parser.add_argument(
        "--lesion-fraction", type=float, default=0.3, help="lesion share of tissue (label 1)"
    )
    parser.add_argument(
        "--morphology-strength",
        type=float,
        default=1.0,
        help="lesion chromatin speckle strength (0 makes the classes identical)",
    )


def run_slide(args: argparse.Namespace) -> int:
    slide = write_synthetic_slide(
        args.out,
        width=args.width,
        height=args.height,
        seed=args.seed,
        label=args.label,
        mpp=args.mpp,
        quality=args.quality,
        lesion_fraction=args.lesion_fraction,
        morphology_strength=args.morphology_strength,
    )
    summary = {
        "path": str(slide.path),
        "label": slide.label,
        "seed": slide.seed,
        "width": slide.width,
        "height": slide.height,
        "mpp": slide.mpp,
        "bytes": slide.bytes,
        "mask": str(slide.mask_path),
        "mask_l0_per_px": slide.mask_l0_per_px,
        "lesion_area_fraction": round(slide.lesion_area_fraction, 4),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {slide.path} ({slide.width}x{slide.height} px, {slide.mpp:g} µm/px, "
            f"label {slide.label}, {slide.bytes / 1e6:.1f} MB); lesion mask {slide.mask_path} "
            f"({slide.lesion_area_fraction:.0%} of tissue)"
        )
    return 0


def run_cohort(args: argparse.Namespace) -> int:
    labels_path = write_cohort(
        args.out_dir,
        n_patients=args.patients,
        slides_per_patient=args.slides_per_patient,
        width=args.width,
        height=args.height,
        seed=args.seed,
        positive_fraction=args.positive_fraction,
        lesion_fraction=args.lesion_fraction,
        morphology_strength=args.morphology_strength,
        quality=args.quality,
        mpp=args.mpp,
    )
    with open(labels_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    positives = len({r["patient_id"] for r in rows if r["label"] == "1"})
    print(
        f"wrote {len(rows)} slides of {args.patients} patients ({positives} positive) "
        f"to {args.out_dir}; labels in {labels_path}"
    )
    return 0
