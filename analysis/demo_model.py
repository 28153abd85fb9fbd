"""The demo model: MAGA-GLTrans trained end to end on a small synthetic cohort.

Steps, each reused when its output already exists: a synthetic 20x cohort with labels ->
a 5x/20x pair cache -> MAGA alignment of a ResNet50-trunc student to the seeded fallback
teacher (no ImageNet file is needed, and the teacher never sees a label) -> 5x embeddings of
every slide -> GLTrans trained on them -> a bundle labelled as a demo model, not for diagnosis.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from analysis.bundle import MANIFEST, build_bundle_from_features

Log = Callable[[str], None]


@dataclass
class DemoModelConfig:
    n_patients: int = 16  # one slide each; half of them carry lesions
    slide_size: int = 4096  # 20x pixels per side of each training slide (2 mm of tissue)
    maga_slides: int = 8  # slides whose cells make the MAGA pair cache
    maga_pairs_per_slide: int = 96
    maga_epochs: int = 4
    maga_lr: float = 1e-3  # with a few hundred pairs 1e-4 barely moves (benchmarks/README.md)
    mil_epochs: int = 25
    magnification: float = 5.0
    seed: int = 7


CLASS_NAMES = {"0": "normal", "1": "lesion"}


def _named_labels(cohort_dir: Path) -> Path:
    """labels.csv with class names a pathologist reads (``normal``/``lesion``, not 0/1)."""
    target = cohort_dir / "labels-named.csv"
    with open(cohort_dir / "labels.csv", newline="") as src, open(target, "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=["patient_id", "slide_id", "label"])
        writer.writeheader()
        for row in reader:
            writer.writerow({**row, "label": CLASS_NAMES.get(row["label"], row["label"])})
    return target


def _slide_paths(cohort_dir: Path) -> list[tuple[str, Path]]:
    with open(cohort_dir / "labels.csv", newline="") as handle:
        return [
            (row["slide_id"], cohort_dir / f"{row['slide_id']}.svs")
            for row in csv.DictReader(handle)
        ]


def train_demo_bundle(work_dir: Path, cfg: DemoModelConfig | None = None, log: Log = print) -> Path:
    """Build (or reuse) the demo bundle under ``work_dir``; returns the bundle directory."""
    from analysis.encoders import build_encoder
    from analysis.features import Features, extract_features, save_h5
    from analysis.maga import MagaConfig, build_pair_cache, train_maga
    from analysis.slides import open_slide
    from analysis.synth import write_cohort
    from analysis.tissue import patch_grid

    cfg = cfg or DemoModelConfig()
    bundle_dir = work_dir / "bundle"
    if (bundle_dir / MANIFEST).is_file():
        log(f"reusing the demo model in {bundle_dir}")
        return bundle_dir
    start = time.perf_counter()
    cohort_dir = work_dir / "training-cohort"
    if not (cohort_dir / "labels.csv").is_file():
        log(f"writing a synthetic training cohort of {cfg.n_patients} slides ...")
        write_cohort(
            cohort_dir,
            n_patients=cfg.n_patients,
            slides_per_patient=1,
            width=cfg.slide_size,
            height=cfg.slide_size,
            seed=cfg.seed,
        )
    slides = _slide_paths(cohort_dir)
    log("MAGA: caching 20x/5x pairs and aligning the 5x student to the 20x teacher ...")
    cache = build_pair_cache(
        [path for _, path in slides[: cfg.maga_slides]],
        work_dir / "maga-pairs",
        low_mag=cfg.magnification,
        max_patches_per_slide=cfg.maga_pairs_per_slide,
        seed=cfg.seed,
    )
    maga = train_maga(
        cache, work_dir / "maga", MagaConfig(epochs=cfg.maga_epochs, lr=cfg.maga_lr, seed=cfg.seed)
    )
    log(f"  alignment on held-out pairs: {maga.alignment}")
    encoder = build_encoder("resnet50_trunc", weights=maga.student_path, precision="auto")
    features_dir = work_dir / "features-5x"
    features_dir.mkdir(parents=True, exist_ok=True)
    log(f"embedding {len(slides)} slides at {cfg.magnification:g}x ...")
    for slide_id, path in slides:
        target = features_dir / f"{slide_id}.h5"
        if target.is_file():
            continue
        with open_slide(path) as slide:
            grid = patch_grid(slide)
        feats: Features = extract_features(path, grid, encoder, cfg.magnification)
        save_h5(target, feats)
    log("training GLTrans on the 5x embeddings ...")
    bundle = build_bundle_from_features(
        features_dir,
        _named_labels(cohort_dir),
        bundle_dir,
        name="lowmag-demo",
        version="1",
        task="synthetic lesion detection (demo model, not for diagnosis)",
        magnification=cfg.magnification,
        encoder_weights=maga.student_path,
        mil_name="gltrans",
        mil_config={"dim": 128, "n_heads": 4, "depth": 1},
        epochs=cfg.mil_epochs,
        seed=cfg.seed,
        maga={"teacher": maga.teacher_source, "epochs": cfg.maga_epochs, **maga.alignment},
        is_demo=True,
    )
    log(f"demo model written to {bundle} in {time.perf_counter() - start:.0f} s")
    return bundle
