"""``manage.py register_model BUNDLE [--activate] [--cohort NAME]``.

Reads the bundle's ``manifest.json`` (through ``analysis.bundle`` when it is installed),
checksums its weight files, copies the bundle under ``settings.BUNDLE_DIR`` and records a
``ModelVersion``. Registering the same name and version again with the same weights is a no-op.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from analysis.bundle import weights_sha256 as bundle_weights_sha256
from portal.analyses.models import ModelVersion
from portal.cases.models import Cohort


def read_manifest(bundle: Path) -> dict:
    """The manifest as a dict, validated; raises CommandError saying what is wrong."""
    from analysis.bundle import load_manifest
    from analysis.errors import AnalysisError

    try:
        manifest = load_manifest(bundle)
    except AnalysisError as exc:
        raise CommandError(str(exc)) from exc
    return dataclasses.asdict(manifest) if dataclasses.is_dataclass(manifest) else dict(manifest)


def weights_sha256(bundle: Path) -> str:
    """One SHA-256 over the bundle's weight files, in name order (name and content)."""
    if not list(bundle.glob("*.safetensors")):
        raise CommandError(f"{bundle}: no *.safetensors weight files")
    return bundle_weights_sha256(bundle)


class Command(BaseCommand):
    help = "Register a model bundle (directory with manifest.json and safetensors weights)."

    def add_arguments(self, parser):
        parser.add_argument("bundle", type=Path)
        parser.add_argument("--activate", action="store_true", help="mark the model active")
        parser.add_argument("--cohort", help="with --activate: make it this cohort's model")
        parser.add_argument(
            "--reason",
            default="registered and activated from the command line",
            help="with --activate: why (kept in the audit trail)",
        )

    def handle(
        self, *args, bundle: Path, activate: bool, cohort: str | None, reason: str, **options
    ):
        if cohort and not activate:
            raise CommandError("--cohort only makes sense with --activate")
        bundle = self._bundle_dir(bundle)
        manifest = read_manifest(bundle)
        sha256 = weights_sha256(bundle)
        target = self._cohort(cohort) if cohort else None
        if activate and target is not None and manifest.get("is_demo") and not target.is_demo:
            raise CommandError(
                f"{bundle} is a demo model (not for diagnosis) and cohort '{target.name}' is not "
                "a demo cohort; register it without --activate or use a clinical model"
            )
        model = self._register(bundle, manifest, sha256)
        if activate:
            self._activate(model, target, reason)
        state = " (active" + (f" in {target.name})" if target else ")") if activate else ""
        self.stdout.write(f"Registered {model}{state}: sha256 {sha256[:12]}…, {model.bundle_path}")

    @staticmethod
    def _activate(model: ModelVersion, target: Cohort | None, reason: str) -> None:
        from portal.analyses.lifecycle import ActivationError, activate, mark_active

        try:
            if target is None:
                mark_active(model, None, reason, system=True)
            elif target.active_model_id != model.pk:
                activate(model, target, None, reason, system=True)
        except ActivationError as exc:
            raise CommandError(str(exc)) from exc

    @staticmethod
    def _bundle_dir(bundle: Path) -> Path:
        if bundle.is_file() and bundle.suffix == ".zip":
            from analysis.bundle import resolve_bundle_dir

            return Path(resolve_bundle_dir(bundle))
        if not bundle.is_dir():
            raise CommandError(f"{bundle} is not a bundle directory")
        return bundle

    @staticmethod
    def _cohort(name: str) -> Cohort:
        found = Cohort.objects.filter(name=name).first() or Cohort.objects.filter(slug=name).first()
        if found is None:
            raise CommandError(f"no cohort named {name!r}")
        return found

    @staticmethod
    def _register(bundle: Path, manifest: dict, sha256: str) -> ModelVersion:
        name, version = str(manifest["name"]), str(manifest["version"])
        for value in (name, version):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", value):
                raise CommandError(f"manifest name/version {value!r}: use letters, digits, . _ + -")
        existing = ModelVersion.objects.filter(name=name, version=version).first()
        if existing is not None:
            if existing.sha256 != sha256:
                raise CommandError(
                    f"{name}@{version} is already registered with different weights; "
                    "give the new bundle a new version"
                )
            return existing
        destination = Path(settings.BUNDLE_DIR) / f"{name}-{version}"
        if destination.resolve() != bundle.resolve():
            shutil.rmtree(destination, ignore_errors=True)
            shutil.copytree(bundle, destination)
        return ModelVersion.objects.create(
            name=name,
            version=version,
            task=str(manifest["task"]),
            classes=[str(c) for c in manifest["classes"]],
            magnification=float(manifest["magnification"]),
            bundle_path=str(destination),
            manifest=json.loads(json.dumps(manifest, default=str)),
            sha256=sha256,
            is_demo=bool(manifest.get("is_demo", False)),
        )
