"""Patch reading and file size: a 20x slide with a pyramid vs its 5x export.

1. Patches per second reading one tissue grid (128 µm cells) at 20x, 10x and 5x from a
   synthetic 20x slide, and at 5x from its 5x export; bytes of pixels read; file sizes.
2. Export size ratio at JPEG qualities 60/75/90: the 20x slide written at a quality vs its
   5x export at that same quality (and the CMU vendor slide as stored, when present).
3. ``--big``: peak memory (``/usr/bin/time -v``) of writing and exporting a 50000x50000 slide.

Prints markdown tables and writes ``benchmarks/out/read_patches.json``
(``read_patches_big.json`` for ``--big``).

    python benchmarks/read_patches.py                  # 12000x12000, about a minute
    python benchmarks/read_patches.py --size 6000 --qualities 75
    python benchmarks/read_patches.py --big            # 50000x50000: minutes, ~0.5 GB disk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.export import export_lowmag, path_bytes  # noqa: E402
from analysis.slides import open_slide, patch_size_px  # noqa: E402
from analysis.synth import write_synthetic_slide  # noqa: E402
from analysis.tissue import patch_grid  # noqa: E402

OUT_DIR = ROOT / "benchmarks" / "out"
CMU_SLIDE = ROOT.parent / "shared" / "slides" / "cmu-1-small-region.svs"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000, help="20x slide side in pixels")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality of the read test")
    parser.add_argument("--qualities", type=int, nargs="+", default=[60, 75, 90])
    parser.add_argument("--workers", type=int, default=2, help="reader threads")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep slides here")
    parser.add_argument("--big", action="store_true", help="peak memory of a 50000^2 export")
    parser.add_argument("--big-size", type=int, default=50000)
    return parser.parse_args()


# -- reading ---------------------------------------------------------------------------------------


def time_reads(path: Path, l0_xys: np.ndarray, mag: float, workers: int) -> dict:
    """Read every cell at ``mag`` (after a short warm-up) and time it."""
    with open_slide(path) as slide:
        slide.read_patches(l0_xys[:32], mag, workers=workers)  # warm-up: open, first tiles
        start = time.perf_counter()
        patches = slide.read_patches(l0_xys, mag, workers=workers)
        seconds = time.perf_counter() - start
    return {
        "file": path.name,
        "magnification": mag,
        "patch_px": patch_size_px(mag),
        "patches": len(l0_xys),
        "seconds": seconds,
        "patches_per_s": len(l0_xys) / seconds,
        "bytes_read": int(patches.size),  # pixels * 3
    }


def read_benchmark(work: Path, args: argparse.Namespace) -> dict:
    source = work / f"bench-20x-{args.size}-q{args.quality}.svs"
    if not source.exists():
        write_synthetic_slide(
            source, width=args.size, height=args.size, seed=args.seed, label=1, quality=args.quality
        )
    export = export_lowmag(
        source, work / f"bench-5x-{args.size}-q{args.quality}.svs", 5, args.quality
    )
    with open_slide(source) as slide:
        grid = patch_grid(slide)
        scale = slide.mpp / export.mpp  # export level-0 px per source level-0 px
    rows = [time_reads(source, grid.l0_xy, mag, args.workers) for mag in (20.0, 10.0, 5.0)]
    export_xy = np.floor(grid.l0_xy * scale).astype(np.int64)
    rows.append(time_reads(export.path, export_xy, 5.0, args.workers))
    base = rows[0]
    for row in rows:
        row["speedup_vs_20x"] = row["patches_per_s"] / base["patches_per_s"]
        row["bytes_read_ratio_vs_20x"] = base["bytes_read"] / row["bytes_read"]
    return {
        "source": {"file": source.name, "bytes": path_bytes(source), "size": args.size},
        "export": {"file": export.path.name, "bytes": export.bytes, "size": export.width},
        "file_size_ratio": path_bytes(source) / export.bytes,
        "grid_cells": len(grid.l0_xy),
        "reads": rows,
    }


# -- sizes -----------------------------------------------------------------------------------------


def size_sweep(work: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for quality in args.qualities:
        source = work / f"bench-20x-{args.size}-q{quality}.svs"
        if not source.exists():
            write_synthetic_slide(
                source, width=args.size, height=args.size, seed=args.seed, label=1, quality=quality
            )
        export = export_lowmag(source, work / f"bench-5x-{args.size}-q{quality}.svs", 5, quality)
        rows.append(size_row(f"synthetic {args.size}^2", quality, quality, export))
    if CMU_SLIDE.exists():  # a vendor original as stored, at its own JPEG quality
        for quality in (30, 80):
            export = export_lowmag(CMU_SLIDE, work / f"cmu-5x-q{quality}.svs", 5, quality)
            rows.append(size_row("CMU-1-Small-Region as stored", 30, quality, export))
    return rows


def pyramid_bytes(path: Path) -> int:
    """Bytes of the tiled pyramid levels only (no thumbnail, label or macro)."""
    with tifffile.TiffFile(path) as tif:
        return sum(sum(page.databytecounts) for page in tif.pages if page.is_tiled)


def size_row(name: str, source_quality: int, export_quality: int, export) -> dict:
    source_pyramid, export_pyramid = pyramid_bytes(export.source_path), pyramid_bytes(export.path)
    return {
        "slide": name,
        "source_quality": source_quality,
        "export_quality": export_quality,
        "source_bytes": export.source_bytes,
        "export_bytes": export.bytes,
        "ratio": export.size_ratio,
        "source_pyramid_bytes": source_pyramid,
        "export_pyramid_bytes": export_pyramid,
        "pyramid_ratio": source_pyramid / export_pyramid,
        "pixel_ratio": export.source_width * export.source_height / (export.width * export.height),
    }


# -- peak memory ----------------------------------------------------------------------------------


def peak_rss(code: str) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of ``python -c code`` measured by /usr/bin/time -v."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-c", code]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{code!r} failed:\n{proc.stderr[-2000:]}")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    if match is None:
        raise RuntimeError("/usr/bin/time -v printed no peak memory")
    return int(match.group(1)) / 1024, seconds


def big_benchmark(work: Path, args: argparse.Namespace) -> dict:
    n = args.big_size
    source, target = work / f"big-20x-{n}.svs", work / f"big-5x-{n}.svs"
    write_code = (
        "from analysis.synth import write_synthetic_slide as w; "
        f"w({str(source)!r}, width={n}, height={n}, seed=1, label=1, quality=80)"
    )
    export_code = (
        "from analysis.export import export_lowmag as e; "
        f"e({str(source)!r}, {str(target)!r}, 5, 80)"
    )
    write_mb, write_s = peak_rss(write_code)
    export_mb, export_s = peak_rss(export_code)
    result = {
        "size": n,
        "write_peak_rss_mb": write_mb,
        "write_seconds": write_s,
        "export_peak_rss_mb": export_mb,
        "export_seconds": export_s,
        "source_bytes": path_bytes(source),
        "export_bytes": path_bytes(target),
    }
    result["size_ratio"] = result["source_bytes"] / result["export_bytes"]
    return result


# -- report ----------------------------------------------------------------------------------------


def print_reads(report: dict) -> None:
    print(f"\nPatch reads: {report['grid_cells']} tissue cells of 128 µm\n")
    print("| file | mag | patch px | patches/s | vs 20x | MB read | fewer bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in report["reads"]:
        print(
            f"| {r['file']} | {r['magnification']:g}x | {r['patch_px']} | "
            f"{r['patches_per_s']:.0f} | {r['speedup_vs_20x']:.1f}x | {r['bytes_read'] / 1e6:.1f} | "
            f"{r['bytes_read_ratio_vs_20x']:.0f}x |"
        )
    src, exp = report["source"], report["export"]
    print(
        f"\nfiles: {src['file']} {src['bytes'] / 1e6:.1f} MB, {exp['file']} "
        f"{exp['bytes'] / 1e6:.2f} MB: {report['file_size_ratio']:.1f}x smaller"
    )


def print_sizes(rows: list[dict]) -> None:
    print("\nExport size (5x) vs source\n")
    print(
        "| slide | source Q | export Q | source MB | 5x MB | file ratio | pyramid-only ratio "
        "| pixel ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['slide']} | {r['source_quality']} | {r['export_quality']} | "
            f"{r['source_bytes'] / 1e6:.2f} | {r['export_bytes'] / 1e6:.3f} | "
            f"{r['ratio']:.1f}x | {r['pyramid_ratio']:.1f}x | {r['pixel_ratio']:.1f}x |"
        )


def print_big(big: dict) -> None:
    print(f"\nPeak memory, {big['size']}x{big['size']} slide\n")
    print("| step | peak RSS MB | seconds |")
    print("|---|---|---|")
    print(f"| write synthetic 20x | {big['write_peak_rss_mb']:.0f} | {big['write_seconds']:.0f} |")
    print(f"| export 5x | {big['export_peak_rss_mb']:.0f} | {big['export_seconds']:.0f} |")
    print(
        f"\nsource {big['source_bytes'] / 1e6:.0f} MB, export {big['export_bytes'] / 1e6:.1f} MB: "
        f"{big['size_ratio']:.1f}x smaller"
    )


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}


def main() -> int:
    args = parse_args()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lowmag-bench-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.big:
            big = big_benchmark(work, args)
            print_big(big)
            out = OUT_DIR / "read_patches_big.json"
            out.write_text(json.dumps({"machine": machine(), "big": big}, indent=2))
        else:
            report = read_benchmark(work, args)
            sizes = size_sweep(work, args)
            print_reads(report)
            print_sizes(sizes)
            out = OUT_DIR / "read_patches.json"
            payload = {"machine": machine(), "args": vars(args), "reads": report, "sizes": sizes}
            out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
