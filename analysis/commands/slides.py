"""``lowmag info`` (what a slide is, at which magnifications it can be read) and ``lowmag grid``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from analysis.slides import STANDARD_MAGNIFICATIONS, Slide, open_slide, patch_size_px


def register(subparsers: argparse._SubParsersAction) -> None:
    info = subparsers.add_parser(
        "info", help="describe a slide: vendor, levels, scale, readability"
    )
    info.add_argument("slide", help="slide file (or DICOM series folder)")
    info.add_argument("--mpp", type=float, help="µm per level-0 pixel, overrides the file's")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(handler=run_info)

    grid = subparsers.add_parser("grid", help="the tissue patch grid of a slide")
    grid.add_argument("slide", help="slide file (or DICOM series folder)")
    grid.add_argument("--mag", type=float, required=True, help="magnification to read at, e.g. 5")
    grid.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction")
    grid.add_argument("--mpp", type=float, help="µm per level-0 pixel, overrides the file's")
    grid.add_argument("--json", action="store_true", help="print JSON")
    grid.set_defaults(handler=run_grid)


def slide_description(slide: Slide) -> dict[str, Any]:
    """A JSON-ready description of a slide."""
    readable = slide.readable_magnifications(STANDARD_MAGNIFICATIONS)
    return {
        "slide": str(slide.path),
        "vendor": slide.vendor,
        "dimensions": list(slide.dimensions),
        "levels": [
            {"level": i, "dimensions": list(dims), "downsample": down, "mpp": level_mpp}
            for i, (dims, down, level_mpp) in enumerate(
                zip(slide.level_dimensions, slide.level_downsamples, slide.level_mpps, strict=True)
            )
        ],
        "mpp": slide.mpp,
        "mpp_source": slide.mpp_source,
        "magnification": slide.magnification,
        "objective_power": slide.objective_power,
        "associated_images": {
            name: list(slide.associated_image(name).size) for name in slide.associated_image_names
        },
        "readable_magnifications": {f"{mag:g}": level for mag, level in readable.items()},
    }


def run_info(args: argparse.Namespace) -> int:
    with open_slide(args.slide, mpp=args.mpp) as slide:
        slide.check_readable()
        description = slide_description(slide)
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    w, h = description["dimensions"]
    power = description["objective_power"]
    print(f"slide:          {description['slide']}")
    print(f"vendor:         {description['vendor']}")
    print(f"dimensions:     {w} x {h} px (level 0)")
    print(f"mpp:            {description['mpp']:.4f} µm/px ({description['mpp_source']})")
    print(f"magnification:  {description['magnification']:.2f}x")
    print(f"objective:      {f'{power:g}x' if power else 'not recorded'}")
    print("levels:")
    for level in description["levels"]:
        lw, lh = level["dimensions"]
        print(
            f"  {level['level']}: {lw} x {lh} px, downsample {level['downsample']:.3f}, "
            f"{level['mpp']:.4f} µm/px"
        )
    assoc = description["associated_images"]
    print(
        "associated:     " + (", ".join(f"{n} ({s[0]}x{s[1]})" for n, s in assoc.items()) or "none")
    )
    print("readable at:")
    for mag, level in description["readable_magnifications"].items():
        verdict = f"level {level}" if level is not None else "no (slide too coarse)"
        print(f"  {mag}x: {verdict}")
    return 0


def run_grid(args: argparse.Namespace) -> int:
    from analysis.tissue import patch_grid

    with open_slide(args.slide, mpp=args.mpp) as slide:
        slide.level_for_magnification(args.mag)  # refuse before any work
        grid = patch_grid(slide, min_tissue=args.min_tissue)
    size_px = patch_size_px(args.mag, grid.patch_um)
    if args.json:
        out = {
            "slide": str(args.slide),
            "mag": args.mag,
            "patch_size_px": size_px,
            "l0_patch_size": grid.l0_patch_size,
            "n_rows": grid.n_rows,
            "n_cols": grid.n_cols,
            "l0_xy": grid.l0_xy.tolist(),
            "grid_rc": grid.grid_rc.tolist(),
            "tissue_fraction": [round(float(f), 4) for f in grid.tissue_fraction],
            "mpp": grid.mpp,
            "patch_um": grid.patch_um,
            "min_tissue": args.min_tissue,
        }
        print(json.dumps(out))
        return 0
    print(f"slide:            {args.slide}")
    print(f"patches:          {len(grid.l0_xy)} (tissue >= {args.min_tissue:.0%})")
    print(f"patch size:       {size_px} px at {args.mag:g}x ({grid.patch_um:g} µm)")
    print(f"level-0 size:     {grid.l0_patch_size:.2f} px")
    print(f"grid:             {grid.n_rows} rows x {grid.n_cols} cols")
    return 0
