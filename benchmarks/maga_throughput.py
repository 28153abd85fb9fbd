"""MAGA throughput (pairs/s) and disk per 1,000 pairs: cached pairs + targets vs streaming.

    python benchmarks/maga_throughput.py [--slides N] [--size PX] [--steps S] [--workers W]

A synthetic 20x cohort (``--slides`` slides of ``--size`` px square) is written once to
``benchmarks/out/maga_cohort``. Measured:

- disk per 1,000 pairs, before: the pair cache (20x and 5x uint8 patches, measured on disk)
  plus the float16 teacher-target files the earlier trainer wrote beside it (their size follows
  from the block shapes, computed here); after: what a streaming run writes per pair (0: only
  weights and checkpoints, whose size does not depend on the number of pairs);
- pairs/s of reading alone (DataLoader workers, one 20x read per pair, 5x derived), of the
  teacher pass alone, and of full training steps (read + teacher at 256 px + student
  forward/backward at 64 px), fp32 and bf16 autocast.

Writes ``benchmarks/out/maga_throughput.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=6144, help="slide side in 20x pixels")
    parser.add_argument("--pairs-per-slide", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="training steps timed per setting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from analysis.encoders import BLOCK_NAMES, build_model, default_device, fast_bf16_available
    from analysis.maga import (
        MagaConfig,
        SlidePairs,
        _loader,
        _student_shapes,
        _TargetMemo,
        build_pair_cache,
        train_maga,
    )
    from analysis.synth import write_cohort

    torch.set_num_threads(args.threads)
    device = args.device or default_device()
    cohort = OUT / "maga_cohort"
    if not (cohort / "labels.csv").is_file():
        print(f"writing {args.slides} synthetic slides to {cohort} ...", file=sys.stderr)
        write_cohort(
            cohort,
            n_patients=args.slides,
            slides_per_patient=1,
            width=args.size,
            height=args.size,
            seed=13,
        )
    slides = sorted(cohort.glob("*.svs"))[: args.slides]
    report: dict = {"device": device, "threads": args.threads, "slides": len(slides)}

    # -- disk, before: pair cache on disk + float16 teacher targets --------------------------
    work = Path(tempfile.mkdtemp(prefix="maga-bench-"))
    try:
        started = time.perf_counter()
        cache = build_pair_cache(
            slides, work / "pairs", max_patches_per_slide=args.pairs_per_slide, workers=2
        )
        cache_seconds = time.perf_counter() - started
        cache_bytes = sum(p.stat().st_size for p in (work / "pairs").iterdir())
        shapes = _student_shapes(build_model("resnet50_trunc"), cache.low_size, "cpu")
        target_bytes = sum(2 * math.prod(shapes[b]) for b in BLOCK_NAMES)  # float16 per pair
        per_pair_before = cache_bytes / len(cache) + target_bytes
        report["disk_before"] = {
            "pairs": len(cache),
            "pair_cache_bytes_per_pair": round(cache_bytes / len(cache)),
            "target_bytes_per_pair": target_bytes,
            "mb_per_1000_pairs": round(per_pair_before * 1000 / 1e6, 1),
            "cache_build_pairs_per_s": round(len(cache) / cache_seconds, 1),
        }

        # -- streaming: reading alone -------------------------------------------------------
        pairs = SlidePairs(slides, pairs_per_slide=args.pairs_per_slide, seed=0)
        cfg = MagaConfig(batch_size=args.batch_size, workers=args.workers, device=device)
        n_read = min(len(pairs), args.steps * args.batch_size * 2)
        started = time.perf_counter()
        got = sum(len(i) for i, _, _ in _loader(pairs, np.arange(n_read), cfg, False))
        report["read_pairs_per_s"] = round(got / (time.perf_counter() - started), 1)

        # -- teacher pass alone, and full training steps, per precision ------------------------
        precisions = ["fp32"] + (["bf16"] if fast_bf16_available(device) else [])
        report["teacher_pairs_per_s"] = {}
        report["train_pairs_per_s"] = {}
        batch = torch.from_numpy(
            np.stack([pairs[i][1] for i in range(args.batch_size)])
        )  # (B, 256, 256, 3)
        for precision in precisions:
            cfg = MagaConfig(
                batch_size=args.batch_size,
                workers=args.workers,
                device=device,
                precision=precision,
                target_memory_mb=0,
            )
            memo = _TargetMemo(build_model("resnet50_trunc").to(device).eval(), shapes, cfg, 0)
            memo.compute(batch)  # warm-up
            started = time.perf_counter()
            for _ in range(2):
                memo.compute(batch)
            report["teacher_pairs_per_s"][precision] = round(
                2 * args.batch_size / (time.perf_counter() - started), 1
            )
            run_dir = work / f"run-{precision}"
            cfg = MagaConfig(
                epochs=1,
                batch_size=args.batch_size,
                workers=args.workers,
                device=device,
                precision=precision,
                target_memory_mb=0,
                max_steps_per_epoch=args.steps,
                holdout_fraction=0,
                calibration_patches=args.batch_size,
            )
            result = train_maga(pairs, run_dir, cfg)
            report["train_pairs_per_s"][precision] = result.history[0]["pairs_per_s"]
            written = [p for p in run_dir.rglob("*") if p.is_file()]
            pair_data = [
                p for p in written if p.suffix not in (".safetensors", ".pt", ".json")
            ]  # anything besides weights, checkpoints and summaries
            report["disk_after"] = {
                "pair_bytes": sum(p.stat().st_size for p in pair_data),
                "mb_per_1000_pairs": 0.0 if not pair_data else None,
                "fixed_bytes_weights_and_checkpoints": sum(p.stat().st_size for p in written),
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "maga_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    before = report["disk_before"]
    print(f"device {device}, {args.threads} threads, {args.workers} reader workers")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| disk per 1,000 pairs, cached pairs + targets | {before['mb_per_1000_pairs']} MB |")
    print(f"| disk per 1,000 pairs, streaming | {report['disk_after']['pair_bytes']} bytes |")
    print(f"| pair cache build | {before['cache_build_pairs_per_s']} pairs/s |")
    print(f"| streaming read (workers) | {report['read_pairs_per_s']} pairs/s |")
    for precision, rate in report["teacher_pairs_per_s"].items():
        print(f"| teacher pass 256 px, {precision} | {rate} pairs/s |")
    for precision, rate in report["train_pairs_per_s"].items():
        print(f"| full step (read + teacher + student), {precision} | {rate} pairs/s |")


if __name__ == "__main__":
    main()
