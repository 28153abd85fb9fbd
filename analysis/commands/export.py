"""``lowmag export``: write the low-magnification copy of a slide."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.export import ExportResult, export_lowmag
from analysis.slides import open_slide


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a low-magnification pyramidal TIFF of a slide (what a hospital sends)"
    )
    parser.add_argument("slide", type=Path, help="source slide")
    parser.add_argument("--mag", type=float, default=5.0, help="target magnification (5 = 2 µm/px)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output file")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality 1-100")
    parser.add_argument(
        "--mpp", type=float, default=None, help="source µm/px when the file lacks or misstates it"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    result = export_lowmag(
        args.slide, args.output, magnification=args.mag, quality=args.quality, mpp=args.mpp
    )
    with open_slide(result.path) as written:  # what a reader of the export will see
        out_mpp, out_mag = written.mpp, written.magnification
    if args.json:
        print(json.dumps(_summary(result, out_mpp, out_mag)))
        return 0
    print(
        f"source {result.source_path}: {result.source_width}x{result.source_height} px, "
        f"{result.source_bytes / 1e6:.2f} MB, {result.source_mpp:.4g} µm/px "
        f"({10 / result.source_mpp:.3g}x)"
    )
    print(
        f"export {result.path}: {result.width}x{result.height} px, {result.bytes / 1e6:.2f} MB, "
        f"{out_mpp:.4g} µm/px ({out_mag:.3g}x), read from source level {result.source_level}"
    )
    print(f"size ratio {result.size_ratio:.1f}x smaller")
    return 0


def _summary(result: ExportResult, out_mpp: float, out_mag: float) -> dict:
    return {
        "source": str(result.source_path),
        "source_width": result.source_width,
        "source_height": result.source_height,
        "source_bytes": result.source_bytes,
        "source_mpp": result.source_mpp,
        "source_magnification": 10 / result.source_mpp,
        "output": str(result.path),
        "width": result.width,
        "height": result.height,
        "bytes": result.bytes,
        "mpp": out_mpp,
        "magnification": out_mag,
        "size_ratio": result.size_ratio,
        "source_level": result.source_level,
    }
