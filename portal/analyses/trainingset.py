"""Training sets from sign-offs: a cohort's signed cases in a date range, labelled by their calls.

What goes in: every case of the cohort whose diagnosis was first signed inside the range, with
the call of its *current* diagnosis (the latest signed version) as the label of each ready slide.
What stays out (counted in ``excluded``):
- ``withdrawn``: the current version carries no call (an amendment withdrew it);
- ``ai_not_reviewed``: the current version was signed without an AI call on the case
  (nothing to learn from the pathologist's review of the model);
- ``no_slide``: the case has no ready slide.
Refused with one sentence each (nothing is written): one class only, fewer than
``MIN_PATIENTS`` patients, a patient whose cases carry different calls, a slide file missing or
different from the one recorded at upload (size here, SHA-256 when the set is written).

The set on disk is what ``lowmag crossval`` and ``bundle build`` read: ``labels.csv``
(``patient_id,slide_id,label``) and ``features/<slide_id>.h5``, plus ``cases.csv`` (which case
each slide came from) and ``provenance.json`` (the data hash). All slides of a patient share
the patient id, so every split made from it is patient-level.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

from django.db.models import Max, Min

from portal.cases.models import Case, Cohort, Slide
from portal.reviews.models import Diagnosis

MIN_PATIENTS = 10


class TrainingSetError(Exception):
    """The requested training set cannot be built; the message says why and what to do."""


@dataclass
class TrainingCase:
    case_id: int
    accession_number: str
    patient_id: str
    slide_id: str  # "slide-<pk>": the id in labels.csv and the feature file's name
    slide_pk: int
    slide_sha256: str
    slide_path: str
    label: str
    diagnosis_id: int
    diagnosis_version: int


@dataclass
class TrainingSet:
    cohort: str
    signed_from: str
    signed_to: str
    cases: list[TrainingCase]
    excluded: dict[str, list[str]]  # reason -> accession numbers

    @property
    def classes(self) -> list[str]:
        return sorted({c.label for c in self.cases})

    @property
    def patients(self) -> set[str]:
        return {c.patient_id for c in self.cases}

    def class_counts(self) -> dict[str, int]:
        counts: dict[str, set[str]] = defaultdict(set)
        for c in self.cases:
            counts[c.label].add(c.patient_id)
        return {label: len(patients) for label, patients in sorted(counts.items())}

    def data_sha256(self) -> str:
        """One hash of what the model learns from: each slide's content hash with its label."""
        rows = sorted((c.slide_sha256, c.patient_id, c.label) for c in self.cases)
        return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def collect(
    cohort: Cohort, signed_from: date, signed_to: date, *, check_files: bool = True
) -> TrainingSet:
    """The cohort's signed cases in the range, validated; raises ``TrainingSetError``."""
    if signed_from > signed_to:
        raise TrainingSetError(
            f"the date range is empty ({signed_from} is after {signed_to}); swap the dates"
        )
    signed = Diagnosis.objects.filter(case__cohort=cohort, status=Diagnosis.SIGNED)
    per_case = signed.values("case_id").annotate(first=Min("signed_at"), latest=Max("version"))
    in_range = [
        row
        for row in per_case
        if row["first"] is not None and signed_from <= row["first"].date() <= signed_to
    ]
    latest = {row["case_id"]: row["latest"] for row in in_range}
    current = {
        d.case_id: d
        for d in signed.filter(case_id__in=latest).select_related("case")
        if d.version == latest[d.case_id]
    }
    slides: dict[int, list[Slide]] = defaultdict(list)
    for slide in Slide.objects.filter(case_id__in=current, status="ready").order_by("pk"):
        slides[slide.case_id].append(slide)
    cases: list[TrainingCase] = []
    excluded: dict[str, list[str]] = {"withdrawn": [], "ai_not_reviewed": [], "no_slide": []}
    for case_id in sorted(current):
        diagnosis = current[case_id]
        case: Case = diagnosis.case
        if not diagnosis.call.strip():
            excluded["withdrawn"].append(case.accession_number)
        elif not diagnosis.ai_suggestion:
            excluded["ai_not_reviewed"].append(case.accession_number)
        elif not slides[case_id]:
            excluded["no_slide"].append(case.accession_number)
        else:
            for slide in slides[case_id]:
                cases.append(
                    TrainingCase(
                        case_id=case.pk,
                        accession_number=case.accession_number,
                        patient_id=case.patient_id,
                        slide_id=f"slide-{slide.pk}",
                        slide_pk=slide.pk,
                        slide_sha256=slide.sha256,
                        slide_path=str(slide.path),
                        label=diagnosis.call.strip(),
                        diagnosis_id=diagnosis.pk,
                        diagnosis_version=diagnosis.version,
                    )
                )
    training_set = TrainingSet(
        cohort.name, signed_from.isoformat(), signed_to.isoformat(), cases, excluded
    )
    validate(training_set)
    if check_files:
        check_files_present(training_set)
    return training_set


def validate(training_set: TrainingSet) -> None:
    """Refuse a set the portal cannot train and validate a model on (cheap checks only)."""
    where = (
        f"cohort '{training_set.cohort}', signed {training_set.signed_from} to "
        f"{training_set.signed_to}"
    )
    if not training_set.cases:
        raise TrainingSetError(f"no usable signed cases in {where}; widen the date range")
    calls: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for c in training_set.cases:
        calls[c.patient_id][c.label].add(c.accession_number)
    for patient, by_label in sorted(calls.items()):
        if len(by_label) > 1:
            detail = "; ".join(
                f"'{label}' in {', '.join(sorted(acc))}" for label, acc in sorted(by_label.items())
            )
            raise TrainingSetError(
                f"patient {patient} has conflicting calls ({detail}); amend the wrong call or "
                "leave the patient out of the date range"
            )
    counts = training_set.class_counts()
    if len(counts) < 2:
        only = next(iter(counts))
        raise TrainingSetError(
            f"every case in {where} is called '{only}'; a model needs at least two classes"
        )
    n_patients = len(training_set.patients)
    if n_patients < MIN_PATIENTS:
        raise TrainingSetError(
            f"{where} has {n_patients} patients; training and validating needs at least "
            f"{MIN_PATIENTS} (widen the date range)"
        )


def check_files_present(training_set: TrainingSet) -> None:
    """Every slide file is there with the size recorded at upload (the hash: ``verify_files``)."""
    for c in training_set.cases:
        path = Path(c.slide_path)
        if not path.exists():
            raise TrainingSetError(
                f"the file of slide {c.slide_pk} (case {c.accession_number}) is missing; "
                "restore it or leave the case out"
            )
        expected = Slide.objects.filter(pk=c.slide_pk).values_list("size_bytes", flat=True).get()
        if path.is_file() and expected and path.stat().st_size != expected:
            raise TrainingSetError(_changed(c))


def _changed(c: TrainingCase) -> str:
    return (
        f"the file of slide {c.slide_pk} (case {c.accession_number}) does not match the "
        "SHA-256 recorded at upload (it was changed on disk); restore the original file"
    )


def _sha256(path: Path) -> str:
    from analysis.files import sha256_file

    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()  # a multi-file slide: every file, in name order
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def verify_files(training_set: TrainingSet, progress: Callable[[float], None] | None = None):
    """Check every slide file against the SHA-256 recorded at upload."""
    for i, c in enumerate(training_set.cases):
        if _sha256(Path(c.slide_path)) != c.slide_sha256:
            raise TrainingSetError(_changed(c))
        if progress:
            progress((i + 1) / len(training_set.cases))


def write(
    training_set: TrainingSet,
    out_dir: Path,
    encoder,
    magnification: float,
    progress: Callable[[float], None] | None = None,
) -> Path:
    """Write labels.csv, features/, cases.csv and provenance.json into ``out_dir`` (atomic)."""
    import analysis
    from analysis.features import extract_features, save_h5
    from analysis.slides import open_slide
    from analysis.tissue import patch_grid

    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "features").mkdir(parents=True)
    try:
        for i, c in enumerate(training_set.cases):
            with open_slide(c.slide_path) as slide:
                grid = patch_grid(slide)
            features = extract_features(c.slide_path, grid, encoder, magnification, workers=1)
            save_h5(staging / "features" / f"{c.slide_id}.h5", features)
            if progress:
                progress((i + 1) / len(training_set.cases))
        with open(staging / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["patient_id", "slide_id", "label"])
            writer.writerows((c.patient_id, c.slide_id, c.label) for c in training_set.cases)
        with open(staging / "cases.csv", "w", newline="") as handle:
            fields = list(asdict(training_set.cases[0]))
            fields.remove("slide_path")  # no server paths leave the portal
            dict_writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
            dict_writer.writeheader()
            dict_writer.writerows(asdict(c) for c in training_set.cases)
        (staging / "provenance.json").write_text(
            json.dumps(
                {
                    "cohort": training_set.cohort,
                    "signed_from": training_set.signed_from,
                    "signed_to": training_set.signed_to,
                    "data_sha256": training_set.data_sha256(),
                    "code_version": analysis.__version__,
                    "encoder": encoder.name,
                    "encoder_weights": Path(str(encoder.weights_source)).name,
                    "magnification": magnification,
                    "n_slides": len(training_set.cases),
                    "n_patients": len(training_set.patients),
                    "classes": training_set.class_counts(),
                    "excluded": training_set.excluded,
                },
                indent=2,
            )
        )
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
