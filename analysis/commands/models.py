"""``lowmag predict`` and ``lowmag bundle build|info|verify``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from analysis.devices import DEVICE_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    predict = subparsers.add_parser("predict", help="analyse one slide with a model bundle")
    predict.add_argument("bundle", type=Path, help="bundle directory or .zip")
    predict.add_argument("slide", type=Path)
    predict.add_argument("--mpp", type=float, help="level-0 µm/px when the slide lacks scale")
    predict.add_argument("--min-tissue", type=float, default=0.25)
    predict.add_argument(
        "--batch-size", type=int, help="encoder batch (default: 64 on a CPU, 512 on a GPU)"
    )
    predict.add_argument("--device", help=DEVICE_HELP)
    predict.add_argument("--json", action="store_true", help="machine-readable output")
    predict.set_defaults(handler=run_predict)

    bundle = subparsers.add_parser("bundle", help="build, inspect or verify model bundles")
    actions = bundle.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)
    build = actions.add_parser("build", help="train a MIL model on extracted features -> bundle")
    build.add_argument("--features", type=Path, required=True, help="folder of <slide_id>.h5")
    build.add_argument("--labels", type=Path, required=True, help="patient_id,slide_id,label CSV")
    build.add_argument("--mag", type=float, required=True, help="magnification of the features")
    build.add_argument("--encoder", default="resnet50_trunc")
    build.add_argument("--encoder-weights", type=Path, help="safetensors/.pth of the encoder")
    build.add_argument("--maga-config", type=Path, help="MAGA run summary JSON to record")
    build.add_argument("--model", default="gltrans", help="gltrans | abmil | clam_sb | transmil")
    build.add_argument("--mil-config", help="JSON object of MIL hyper-parameters")
    build.add_argument("--epochs", type=int, default=30)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--name", required=True)
    build.add_argument("--version", default="1")
    build.add_argument("--task", default="classification")
    build.add_argument("--demo", action="store_true", help="label as a demo model")
    build.add_argument("--zip", action="store_true", help="also write OUT.zip")
    build.add_argument("-o", "--out", type=Path, required=True)
    build.set_defaults(handler=run_bundle_build)

    info = actions.add_parser("info", help="print a bundle's manifest")
    info.add_argument("bundle", type=Path)
    info.set_defaults(handler=run_bundle_info)
    verify = actions.add_parser("verify", help="check a bundle's weight checksums")
    verify.add_argument("bundle", type=Path)
    verify.set_defaults(handler=run_bundle_verify)


def run_predict(args: argparse.Namespace) -> int:
    from analysis.bundle import load_bundle
    from analysis.devices import resolve_device
    from analysis.pipeline import predict_slide

    bundle = load_bundle(args.bundle, device=resolve_device(args.device))
    result = predict_slide(
        bundle,
        args.slide,
        mpp=args.mpp,
        min_tissue=args.min_tissue,
        batch_size=args.batch_size,
        clusters=args.json,  # the cluster map is only printed with --json
    )
    if args.json:
        json.dump(result.to_dict(include_scores=True), sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(f"slide      {args.slide}")
    print(f"model      {bundle.manifest.label}")
    print(f"call       {result.predicted_class} (confidence {result.confidence:.3f})")
    for name, p in result.probabilities.items():
        print(f"  p({name}) = {p:.4f}")
    print(f"patches    {result.n_patches} at {result.magnification:g}x (one score per grid cell)")
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
    print(f"timings    {timings}")
    return 0


def run_bundle_build(args: argparse.Namespace) -> int:
    from analysis.bundle import build_bundle_from_features

    mil_config = json.loads(args.mil_config) if args.mil_config else None
    maga = json.loads(args.maga_config.read_text()) if args.maga_config else None
    path = build_bundle_from_features(
        args.features,
        args.labels,
        args.out,
        name=args.name,
        version=args.version,
        task=args.task,
        magnification=args.mag,
        encoder_name=args.encoder,
        encoder_weights=args.encoder_weights,
        mil_name=args.model,
        mil_config=mil_config,
        epochs=args.epochs,
        seed=args.seed,
        maga=maga,
        is_demo=args.demo,
        as_zip=args.zip,
    )
    print(f"bundle written to {path}")
    return 0


def run_bundle_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from analysis.bundle import load_manifest

    print(json.dumps(asdict(load_manifest(args.bundle)), indent=2, sort_keys=True))
    return 0


def run_bundle_verify(args: argparse.Namespace) -> int:
    from analysis.bundle import verify_bundle

    manifest = verify_bundle(args.bundle)
    print(f"{args.bundle}: {manifest.label}: weights match their checksums")
    return 0
