"""``manage.py extract_cohort --slides DIR -o OUT``: one feature-extraction task per slide.

With ``LOWMAG_TASK_MODE=celery`` (a Redis broker) the tasks go to the ``gpu`` queue and run on
as many workers as are listening; otherwise they run here, one after the other. Re-running the
command skips the slides already done.
"""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from analysis.errors import AnalysisError


class Command(BaseCommand):
    help = "Queue one idempotent feature-extraction task per slide of a folder (gpu queue)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--slides", required=True, type=Path, help="folder of slides")
        parser.add_argument("-o", "--out", required=True, type=Path, help="feature folder")
        parser.add_argument("--mag", type=float, default=5.0)
        parser.add_argument("--encoder", default="resnet50_trunc")
        parser.add_argument("--weights", help="encoder weights (.safetensors/.pth)")
        parser.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="auto")
        parser.add_argument("--device", help="torch device (default: LOWMAG_DEVICE, else auto)")
        parser.add_argument("--batch-size", type=int, default=64)
        parser.add_argument("--min-tissue", type=float, default=0.25)

    def handle(self, *args, **options) -> None:
        from analysis.cohort import ExtractSettings, is_done, settings_to_dict
        from analysis.commands.maga import find_slides
        from portal.analyses.extraction import extract_slide_features
        from portal.core.dispatch import dispatch, task_mode

        try:
            slides = find_slides(options["slides"])
        except AnalysisError as exc:
            raise CommandError(str(exc)) from None
        weights = options["weights"]
        if weights and not Path(weights).is_file():
            raise CommandError(f"weight file {weights} does not exist")
        settings = ExtractSettings(
            mag=options["mag"],
            encoder=options["encoder"],
            weights=str(Path(weights).resolve()) if weights else None,
            precision=options["precision"],
            device=options["device"],
            batch_size=options["batch_size"],
            min_tissue=options["min_tissue"],
        )
        out = options["out"].absolute()
        todo = [s for s in slides if not is_done(s, out, settings)]
        for slide in todo:
            dispatch(
                extract_slide_features, str(slide.absolute()), str(out), settings_to_dict(settings)
            )
        self.stdout.write(
            f"{len(todo)} slide(s) queued ({task_mode()} mode), "
            f"{len(slides) - len(todo)} already extracted, features in {out}"
        )
