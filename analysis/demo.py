"""``python -m analysis.demo``: a synthetic 20x slide, its 5x export, their sizes (the library
alone; ``make demo`` runs the portal's ``manage.py demo``, which does this and more).

Writes into ``./data/demo/`` and reuses a slide already written with the same parameters.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.export import ExportResult, export_lowmag, path_bytes
from analysis.slides import open_slide
from analysis.synth import write_synthetic_slide

DEMO_DIR = Path("data/demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m analysis.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output folder")
    parser.add_argument("--size", type=int, default=12000, help="slide side in 20x pixels")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality of both files")
    parser.add_argument("--force", action="store_true", help="rewrite the slide even if present")
    return parser.parse_args(argv)


def make_source(args: argparse.Namespace) -> Path:
    """The synthetic 20x slide (label 1: it holds lesions), written once per parameters."""
    path = args.out / f"synthetic-20x-{args.size}-seed{args.seed}-q{args.quality}.svs"
    if path.exists() and not args.force:
        print(f"reusing {path}")
        return path
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    slide = write_synthetic_slide(
        path, width=args.size, height=args.size, seed=args.seed, label=1, quality=args.quality
    )
    elapsed = time.perf_counter() - start
    print(f"wrote {path} in {elapsed:.1f} s ({slide.lesion_area_fraction:.0%} of tissue lesion)")
    return path


def make_export(source: Path, args: argparse.Namespace) -> ExportResult:
    target = source.with_name(source.stem.replace("-20x-", "-5x-") + ".svs")
    start = time.perf_counter()
    result = export_lowmag(source, target, magnification=5, quality=args.quality)
    print(f"exported {target} in {time.perf_counter() - start:.1f} s")
    return result


def describe(path: Path) -> str:
    """How analysis.slides resolves a file: size, scale and where 20x/10x/5x are read from."""
    with open_slide(path) as slide:
        w, h = slide.dimensions
        levels = slide.readable_magnifications((20.0, 10.0, 5.0))
        reads = ", ".join(
            f"{mag:g}x: {'refused' if level is None else f'level {level}'}"
            for mag, level in levels.items()
        )
        return (
            f"{path.name}: {w}x{h} px, {path_bytes(path) / 1e6:.1f} MB, {slide.vendor}, "
            f"{slide.mpp:.4g} µm/px [{slide.mpp_source}] = {slide.magnification:.3g}x; "
            f"reads {reads}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = make_source(args)
    result = make_export(source, args)
    print(describe(source))
    print(describe(result.path))
    print(
        f"5x export is {result.size_ratio:.1f}x smaller than the 20x slide "
        f"(JPEG quality {args.quality} for both; {result.source_width * result.source_height / (result.width * result.height):.0f}x fewer pixels)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
