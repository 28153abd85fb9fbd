"""Patch-encoder throughput on this machine: patches/s by size, precision, layout and batch size.

For each (size, batch) every mode embeds the same patches; bf16 modes report their largest
absolute difference and lowest cosine similarity to fp32. Prints a markdown table and writes
``benchmarks/out/encoder_throughput.json``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/encoder_throughput.py --threads 2
    python benchmarks/encoder_throughput.py --quick          # 64 px, batch 32 only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analysis.encoders import (  # noqa: E402
    Encoder,
    build_model,
    calibrate_batchnorm,
    fast_bf16_available,
    imagenet_normalize,
    load_weights,
)

MODES = {  # name -> (precision, channels_last)
    "fp32": ("fp32", False),
    "fp32+cl": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16+cl": ("bf16", True),
}
OUT_DIR = Path(__file__).resolve().parent / "out"


def synthetic_patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Stain-coloured textured uint8 patches (N, size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        fx, fy, phase = rng.uniform(1, 8, 3)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        colour = rng.uniform([150, 60, 120], [230, 140, 200])
        noisy = wave[..., None] * colour + 30 + rng.normal(0, 10, (size, size, 3))
        out[i] = np.clip(noisy, 0, 255)
    return out


def make_model(weights: str | None) -> torch.nn.Module:
    model = build_model("resnet50_trunc")
    if weights:
        return load_weights(model, weights)
    calib = imagenet_normalize(synthetic_patches(32, 64, seed=99))
    return calibrate_batchnorm(model, [calib[:16], calib[16:]])


def time_mode(
    model: torch.nn.Module, mode: str, patches: np.ndarray, batch: int, min_seconds: float
) -> tuple[float, np.ndarray]:
    precision, channels_last = MODES[mode]
    model = model.to(memory_format=torch.contiguous_format)
    enc = Encoder("resnet50_trunc", model, 1024, "bench", precision, channels_last, "cpu", batch)
    enc.embed(patches[:batch])  # warm-up (oneDNN primitive creation)
    done, started, result = 0, time.perf_counter(), None
    while True:
        out = enc.embed(patches[:batch])
        result = out if result is None else result
        done += batch
        if time.perf_counter() - started >= min_seconds:
            break
    return done / (time.perf_counter() - started), result


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = make_model(args.weights)
    rows = []
    for size in args.sizes:
        for batch in args.batches:
            patches = synthetic_patches(batch, size, seed=size)
            reference = None
            for mode in args.modes:
                rate, emb = time_mode(model, mode, patches, batch, args.min_seconds)
                row = {"size": size, "batch": batch, "mode": mode, "patches_per_s": rate}
                if mode == "fp32":
                    reference = emb
                elif reference is not None:
                    cos = (emb * reference).sum(1) / (
                        np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1)
                    )
                    row["max_abs_diff"] = float(np.abs(emb - reference).max())
                    row["max_rel_diff"] = float(
                        np.abs(emb - reference).max() / np.abs(reference).max()
                    )
                    row["min_cosine"] = float(cos.min())
                rows.append(row)
                print(_row_text(row), file=sys.stderr, flush=True)
    return {
        "machine": {
            "platform": platform.platform(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "fast_bf16": fast_bf16_available("cpu"),
            "amx": bool(torch.cpu._is_amx_tile_supported()),
            "threads": args.threads,
            "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "weights": args.weights or "seeded init, BN calibrated on synthetic patches",
        "min_seconds": args.min_seconds,
        "rows": rows,
    }


def _row_text(row: dict) -> str:
    diff = (
        f"{row['max_abs_diff']:.4f} | {row['max_rel_diff']:.4f} | {row['min_cosine']:.5f}"
        if "min_cosine" in row
        else "- | - | -"
    )
    return (
        f"| {row['size']} | {row['batch']} | {row['mode']} | {row['patches_per_s']:.1f} | {diff} |"
    )


def markdown(result: dict) -> str:
    head = (
        "| px | batch | mode | patches/s | max abs diff | max rel diff | min cosine |\n"
        "|---:|---:|---|---:|---:|---:|---:|"
    )
    return "\n".join([head, *(_row_text(r) for r in result["rows"])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timed time per cell")
    parser.add_argument("--weights", help="encoder weights; default: seeded init")
    parser.add_argument("--quick", action="store_true", help="64 px, batch 32 only")
    parser.add_argument("-o", "--out", type=Path, default=OUT_DIR / "encoder_throughput.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batches = [64], [32]
    result = run(args)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
