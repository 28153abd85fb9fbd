"""``lowmag crossval``: patient-level k-fold cross-validation of a MIL model on saved features.

Features: a folder of ``<slide_id>.h5`` files, each with datasets ``features`` (N, D) and
``coords`` (N, 2) level-0 (x, y), optionally ``grid_rc`` (N, 2) (row, col) and the attribute
``l0_patch_size``. Without ``grid_rc`` the grid cell is derived from ``coords`` divided by the
patch spacing (``l0_patch_size``, else the smallest non-zero coordinate step).
Labels: a CSV with header ``patient_id,slide_id,label``; labels may be class names.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from analysis.devices import DEVICE_HELP
from analysis.errors import AnalysisError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "crossval",
        help="patient-level k-fold cross-validation of a MIL model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--features", required=True, type=Path, help="folder of <slide_id>.h5")
    parser.add_argument("--labels", required=True, type=Path, help="CSV patient_id,slide_id,label")
    parser.add_argument(
        "--model", default="gltrans", choices=["gltrans", "abmil", "clam_sb", "transmil"]
    )
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument(
        "--test-list",
        type=Path,
        help="CSV with a slide_id column: a fixed test set (e.g. CAMELYON16's official one); "
        "the other slides get --repeats patient-level train/validation splits",
    )
    parser.add_argument("--repeats", type=int, default=10, help="splits with --test-list")
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help="validation patients with --test-list"
    )
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--instance-subsample", type=float, default=1.0, help="fraction kept per training step"
    )
    parser.add_argument(
        "--max-instances", type=int, default=None, help="cap on instances per training step"
    )
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument(
        "--mil-config", default=None, help="model config as JSON, e.g. '{\"dim\": 256}'"
    )
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from analysis.devices import resolve_device
    from analysis.evaluate import crossval, fixed_test_splits
    from analysis.train import TrainConfig

    bags, classes = load_bags(args.features, args.labels)
    mil_config = _parse_mil_config(args.mil_config)
    splits = None
    if args.test_list is not None:
        test = read_test_list(args.test_list, bags, args.labels)
        try:
            splits = fixed_test_splits(bags, test, args.repeats, args.val_fraction, args.seed)
        except ValueError as exc:
            raise AnalysisError(f"--test-list {args.test_list}: {exc}") from exc
    train_cfg = TrainConfig(
        lr=args.lr,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        num_threads=args.threads,
        instance_subsample=args.instance_subsample,
        max_train_instances=args.max_instances,
        device=resolve_device(args.device),
    )
    try:
        result = crossval(
            bags,
            args.model,
            mil_config,
            train_cfg,
            folds=args.folds,
            out_dir=args.out,
            classes=classes,
            n_bootstrap=args.bootstrap,
            split_seed=args.seed,
            splits=splits,
        )
    except ValueError as exc:
        raise AnalysisError(f"cross-validation of {args.model} failed: {exc}") from exc
    print(result.paths["markdown"].read_text())
    print(f"report written to {args.out}")
    return 0


def _parse_mil_config(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnalysisError(
            f"--mil-config is not valid JSON ({exc}); pass e.g. '{{\"dim\": 256}}'"
        ) from exc
    if not isinstance(config, dict):
        raise AnalysisError("--mil-config must be a JSON object such as '{\"dim\": 256}'")
    return config


# --- loading ---------------------------------------------------------------------------------


def read_labels(path: Path) -> list[dict[str, str]]:
    """Rows of the labels CSV; refuses a file without the three required columns."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"patient_id", "slide_id", "label"} - set(reader.fieldnames or [])
        if missing:
            raise AnalysisError(
                f"labels file {path} lacks columns {sorted(missing)}; "
                "its header must be patient_id,slide_id,label"
            )
        rows = [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]
    if not rows:
        raise AnalysisError(f"labels file {path} has no rows")
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        if not (row["patient_id"] and row["slide_id"] and row["label"]):
            raise AnalysisError(
                f"labels file {path}, line {line}: empty patient_id, slide_id or label"
            )
        if row["slide_id"] in seen:
            raise AnalysisError(
                f"labels file {path}, line {line}: slide {row['slide_id']} is listed twice"
            )
        seen.add(row["slide_id"])
    classes_of: dict[str, set[str]] = {}
    for row in rows:
        classes_of.setdefault(row["patient_id"], set()).add(row["label"])
    for patient, labels in classes_of.items():
        if len(labels) > 1:
            raise AnalysisError(
                f"labels file {path}: patient {patient} has slides in {len(labels)} classes "
                f"({', '.join(sorted(labels))}); a patient's slides must share one label"
            )
    return rows


def read_test_list(path: Path, bags: list[Any], labels_csv: Path) -> list[int]:
    """Indices of the bags named in a test-list CSV (a ``slide_id`` column)."""
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if "slide_id" not in (reader.fieldnames or []):
                raise AnalysisError(f"test list {path} has no slide_id column")
            names = [(row.get("slide_id") or "").strip() for row in reader]
    except OSError as exc:
        raise AnalysisError(f"cannot read test list {path}: {exc.strerror}") from exc
    names = [n for n in names if n]
    if not names:
        raise AnalysisError(f"test list {path} names no slides")
    index = {str(bag.slide_id): i for i, bag in enumerate(bags)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise AnalysisError(
            f"test list {path} names {len(unknown)} slide(s) not in {labels_csv}, e.g. "
            f"{unknown[0]}; every test slide needs a label"
        )
    return sorted({index[n] for n in names})


def load_bags(features_dir: Path, labels_csv: Path) -> tuple[list[Any], list[str]]:
    """Bags for every labelled slide, and the sorted class names (label index order)."""
    from analysis.train import Bag

    rows = read_labels(labels_csv)
    classes = sorted({row["label"] for row in rows}, key=_class_sort_key)
    bags = []
    missing = [
        row["slide_id"] for row in rows if not (features_dir / f"{row['slide_id']}.h5").is_file()
    ]
    if missing:
        first = features_dir / f"{missing[0]}.h5"
        raise AnalysisError(
            f"no feature file {first} for slide {missing[0]} listed in {labels_csv}"
            + (f" (and {len(missing) - 1} more slides)" if len(missing) > 1 else "")
            + "; extract their features or remove them from the labels file"
        )
    for row in rows:
        path = features_dir / f"{row['slide_id']}.h5"
        features, grid_rc = read_feature_file(path)
        bags.append(
            Bag(features, grid_rc, classes.index(row["label"]), row["slide_id"], row["patient_id"])
        )
    return bags, classes


def _class_sort_key(name: str) -> tuple[int, float | str]:
    """Numeric labels sort as numbers ("2" < "10"), names alphabetically."""
    try:
        return (0, float(name))
    except ValueError:
        return (1, name)


def read_feature_file(path: Path) -> tuple[Any, np.ndarray]:
    """(features (N, D), grid_rc (N, 2) int64) of one slide's HDF5 file (ours or CLAM's).

    The features stay in the file (``H5Features``) until a bag is trained on or predicted.
    """
    from analysis.features import load_h5

    features = load_h5(path, lazy=True)
    if features.features.ndim != 2 or features.grid_rc.shape != (len(features.features), 2):
        raise AnalysisError(
            f"{path}: features {features.features.shape} and grid {features.grid_rc.shape} do not "
            "match; expected (N, D) and (N, 2): re-extract the slide's features"
        )
    return features.features, features.grid_rc
