"""One-shot check of the analysis library on an accelerator (or the CPU), JSON out.

Measures, each part guarded (a failure is recorded with its traceback and the next part runs):

- ``predict``: ``analysis.pipeline.predict_slide`` stage timings at 5x (the 5x export) and 20x
  (the original) of the same slide, models loaded and warmed first, best of ``--repeats``; the
  cluster map is timed separately (it runs after the result: ``clusters=False``);
- ``tissue``: the tissue mask + grid alone on both files (CPU time too: one core's cost);
- ``read``: reading + decoding the grid's patches without the encoder, at 5x and 20x;
- ``encoder``: ResNet50-trunc patches/s at 64 and 256 px;
- ``gltrans_bag``: GLTrans (published width) on bags of 10k / 50k / 200k instances: time and
  peak memory (GPU: ``max_memory_allocated``; CPU: the process's peak RSS growth);
- ``maga_step``: MAGA training steps/s (frozen teacher at 256 px, student forward + backward
  at 64 px, Adam).

Needs only the analysis library, torch, numpy, scipy, Pillow, openslide and slide files: give
``--slide20 big.svs --slide5 big.5x.svs``, or neither and a synthetic slide of ``--size`` px
and its 5x export are written under ``--work`` (cached). Writes ``$OUT/gpu_check.json`` (or
``--out``) after every measurement, so a run cut short keeps what it measured.

    # on a GPU machine (about 2 minutes on an H200)
    PYTHONPATH=. python benchmarks/gpu_check.py --slide20 big.svs --slide5 big.5x.svs
    # on this CPU, small sizes (proves the script end to end)
    PYTHONPATH=. python benchmarks/gpu_check.py --device cpu --small
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS: list[dict[str, Any]] = []
OUT_FILE = Path("gpu_check.json")


def record(name: str, **values: Any) -> None:
    row = {"name": name, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)
    OUT_FILE.write_text(json.dumps(RESULTS, indent=1) + "\n")


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    def run(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - recorded, and the next part runs
            record(
                fn.__name__,
                error=repr(exc)[:500],
                traceback=traceback.format_exc()[-3000:],
                s=round(time.perf_counter() - started, 2),
            )

    return run


def sync(device: str) -> None:
    from analysis.devices import synchronize

    synchronize(device)


class RssPeak:
    """Peak resident memory above the starting level while the block runs (sampled every 2 ms
    from /proc; the CPU stand-in for ``torch.cuda.max_memory_allocated``)."""

    def __enter__(self) -> RssPeak:
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


# -- parts -------------------------------------------------------------------------------------


@guarded
def environment(args: argparse.Namespace) -> None:
    import openslide

    cuda = torch.cuda.is_available()
    record(
        "environment",
        device=args.device,
        gpu=torch.cuda.get_device_name(0) if cuda else None,
        torch=torch.__version__,
        cuda_runtime=torch.version.cuda,
        openslide=openslide.__library_version__,
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        small=args.small,
    )


def slides(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.slide20 and args.slide5:
        return args.slide20, args.slide5
    from analysis.export import export_lowmag
    from analysis.synth import write_synthetic_slide

    args.work.mkdir(parents=True, exist_ok=True)
    src = args.work / f"synthetic-{args.size}.svs"
    dst = args.work / f"synthetic-{args.size}.5x.svs"
    started = time.perf_counter()
    if not src.is_file():
        write_synthetic_slide(src, width=args.size, height=args.size, seed=3, label=1)
    if not dst.is_file():
        export_lowmag(src, dst, magnification=5)
    record("slides", slide20=str(src), slide5=str(dst), s=round(time.perf_counter() - started, 2))
    return src, dst


def make_bundle(folder: Path, magnification: float, mil_dim: int) -> Path:
    from analysis.bundle import BundleManifest, write_bundle
    from analysis.mil import build_mil, mil_config_to_dict

    torch.manual_seed(0)
    mil = build_mil("gltrans", {"in_dim": 1024, "dim": mil_dim})
    manifest = BundleManifest(
        name=f"check-{int(magnification)}x",
        version="0",
        task="timing",
        classes=["benign", "lesion"],
        magnification=float(magnification),
        patch_size=int(round(128.0 * magnification / 10.0)),
        encoder={"name": "resnet50_trunc", "params": {}},
        mil={"name": "gltrans", "config": mil_config_to_dict(mil.config)},
        is_demo=True,
    )
    return write_bundle(folder, manifest, mil_state=mil.state_dict())


@guarded
def predict(args: argparse.Namespace, slide20: Path, slide5: Path) -> None:
    from analysis.bundle import load_bundle
    from analysis.pipeline import predict_slide

    work = Path(tempfile.mkdtemp(prefix="gpu_check_bundles_"))
    for mag, slide in ((5.0, slide5), (20.0, slide20)):
        bundle = load_bundle(make_bundle(work / f"b{int(mag)}", mag, 512), device=args.device)
        bundle.encoder.batch_size = args.batch
        size = bundle.manifest.patch_size
        bundle.encoder.embed(np.full((8, size, size, 3), 200, np.uint8))  # warm-up
        repeats = args.repeats if mag == 5.0 else args.repeats_20x
        runs, walls = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            result = predict_slide(
                bundle, slide, batch_size=args.batch, workers=args.workers, clusters=False
            )
            sync(args.device)
            walls.append(round(time.perf_counter() - started, 4))
            result.compute_clusters()
            runs.append(result)
        best = min(range(len(runs)), key=lambda i: walls[i])
        record(
            "predict",
            mag=f"{mag:g}x",
            slide=str(slide),
            patches=runs[best].n_patches,
            batch=args.batch,
            workers=args.workers,
            precision="bf16" if bundle.encoder.use_bf16 else "fp32",
            wall_s=walls,
            timings=runs[best].timings,  # "clusters" ran after the result, outside "total"
        )
        del bundle
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@guarded
def tissue(args: argparse.Namespace, slide20: Path, slide5: Path) -> None:
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    for tag, slide_path in (("5x", slide5), ("20x", slide20)):
        wall, cpu = [], []
        for _ in range(5):
            with open_slide(slide_path) as slide:
                started, cpu_started = time.perf_counter(), time.process_time()
                grid = patch_grid(slide)
                wall.append(round(time.perf_counter() - started, 4))
                cpu.append(round(time.process_time() - cpu_started, 4))
        record("tissue", file=tag, cells=len(grid), wall_s=wall, cpu_s=cpu, best_ms=min(wall) * 1e3)


@guarded
def read(args: argparse.Namespace, slide20: Path, slide5: Path) -> None:
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    for tag, mag, slide_path in (("5x", 5.0, slide5), ("20x", 20.0, slide20)):
        for workers in sorted({1, args.workers}):
            with open_slide(slide_path) as slide:
                grid = patch_grid(slide)
                started = time.perf_counter()
                n = sum(
                    len(idx)
                    for idx, _ in slide.iter_patch_batches(
                        grid.l0_xy, mag, batch_size=args.batch, workers=workers
                    )
                )
                seconds = time.perf_counter() - started
            record(
                "read", mag=tag, workers=workers, patches=n, s=round(seconds, 4),
                patches_per_s=round(n / seconds, 1),
            )  # fmt: skip


@guarded
def encoder(args: argparse.Namespace) -> None:
    from analysis.encoders import build_encoder

    enc = build_encoder("resnet50_trunc", precision="auto", device=args.device)
    for px, batch in ((64, args.encoder_batch), (256, max(8, args.encoder_batch // 4))):
        x = torch.randn(batch, 3, px, px)
        xd = x.to(enc.device)
        for _ in range(2):
            enc.embed_tensor(xd)
        sync(args.device)
        reps = args.encoder_reps
        started = time.perf_counter()
        for _ in range(reps):
            enc.embed_tensor(xd)  # returns on the CPU: the copy back is part of the cost
        sync(args.device)
        seconds = (time.perf_counter() - started) / reps
        record(
            "encoder", px=px, batch=batch, bf16=enc.use_bf16,
            patches_per_s=round(batch / seconds, 1), ms_per_batch=round(seconds * 1e3, 2),
        )  # fmt: skip


@guarded
def gltrans_bag(args: argparse.Namespace) -> None:
    from analysis.mil import build_mil
    from analysis.pipeline import run_mil

    mil = build_mil("gltrans", {"in_dim": 1024, "dim": 512}).eval().to(args.device)
    for n in args.bags:
        side = int(np.ceil(np.sqrt(n)))
        grid_rc = np.stack(np.divmod(np.arange(n), side), axis=1).astype(np.int64)  # (N, 2)
        features = np.random.default_rng(0).standard_normal((n, 1024), dtype=np.float32)
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with RssPeak() as rss:
            try:
                run_mil(mil, features, grid_rc)  # production path: bag to device, one copy back
                sync(args.device)
                seconds, error = time.perf_counter() - started, None
            except Exception as exc:  # noqa: BLE001 - e.g. the clear out-of-memory error
                seconds, error = time.perf_counter() - started, str(exc)[:300]
        if torch.cuda.is_available() and args.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated()
            memory = "gpu max_memory_allocated"
        else:
            peak, memory = rss.growth, "cpu peak RSS growth"
        record(
            "gltrans_bag", n=n, s=round(seconds, 4), peak_gib=round(peak / 2**30, 3),
            memory=memory, error=error,
        )  # fmt: skip


@guarded
def maga_step(args: argparse.Namespace) -> None:
    import copy

    from analysis.encoders import build_model, forward_blocks
    from analysis.maga import maga_loss

    device, batch = args.device, args.maga_batch
    teacher = build_model("resnet50_trunc").to(device).eval()
    student = copy.deepcopy(teacher).train()
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-4)
    high = torch.randn(batch, 3, 256, 256, device=device)
    low = torch.nn.functional.avg_pool2d(high, 4)  # (B, 3, 64, 64)
    use_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    device_type = "cuda" if device.startswith("cuda") else "cpu"

    def step() -> None:
        with torch.inference_mode(), torch.autocast(device_type, torch.bfloat16, enabled=use_bf16):
            targets = {k: v.clone() for k, v in forward_blocks(teacher, high).items()}
        with torch.autocast(device_type, torch.bfloat16, enabled=use_bf16):
            outputs = forward_blocks(student, low)
        loss, _ = maga_loss(targets, outputs, (1.0, 5.0, 10.0, 200.0))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    step()
    sync(device)
    started = time.perf_counter()
    for _ in range(args.maga_steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - started) / args.maga_steps
    record(
        "maga_step", batch=batch, bf16=use_bf16, steps_per_s=round(1 / seconds, 3),
        pairs_per_s=round(batch / seconds, 1), ms_per_step=round(seconds * 1e3, 1),
    )  # fmt: skip


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", help="auto (default: $LOWMAG_DEVICE, else cuda when present)")
    p.add_argument("--small", action="store_true", help="CPU-sized work (a few minutes at most)")
    p.add_argument("--slide20", type=Path, help="the original (20x) slide")
    p.add_argument("--slide5", type=Path, help="its 5x export")
    p.add_argument("--size", type=int, help="synthetic slide side without --slide20/--slide5")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gpu_check_slides")
    p.add_argument("--out", type=Path, help="JSON file (default $OUT/gpu_check.json)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--workers", type=int, help="patch reader threads")
    p.add_argument("--parts", default="predict,tissue,read,encoder,gltrans,maga")
    args = p.parse_args(argv)
    from analysis.devices import resolve_device

    args.device = resolve_device(args.device)
    small = args.small
    args.size = args.size or (4000 if small else 16000)
    args.workers = args.workers or (2 if small else min(12, os.cpu_count() or 1))
    args.batch = 64 if small else 512
    args.repeats, args.repeats_20x = (2, 1) if small else (5, 3)
    args.encoder_batch, args.encoder_reps = (32, 2) if small else (1024, 10)
    args.bags = (2_000, 5_000) if small else (10_000, 50_000, 200_000)
    args.maga_batch, args.maga_steps = (8, 2) if small else (256, 10)
    return args


def main(argv: list[str] | None = None) -> int:
    global OUT_FILE
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    OUT_FILE = args.out or Path(os.environ.get("OUT") or ".") / "gpu_check.json"
    OUT_FILE.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts = set(args.parts.split(","))
    environment(args)
    if parts & {"predict", "tissue", "read"}:
        slide20, slide5 = slides(args)
        if "tissue" in parts:
            tissue(args, slide20, slide5)
        if "predict" in parts:
            predict(args, slide20, slide5)
        if "read" in parts:
            read(args, slide20, slide5)
    if "encoder" in parts:
        encoder(args)
    if "gltrans" in parts:
        gltrans_bag(args)
    if "maga" in parts:
        maga_step(args)
    record(
        "done",
        s=round(time.perf_counter() - started, 1),
        errors=sum("error" in r and r["error"] is not None for r in RESULTS),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
