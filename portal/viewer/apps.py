from django.apps import AppConfig


class ViewerConfig(AppConfig):
    name = "portal.viewer"
    label = "viewer"

    def ready(self) -> None:
        """Pre-render new slides; tile grants are cached for seconds, so revoke them in every
        process when they change."""
        from django.contrib.auth import get_user_model
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import post_delete, post_save

        from portal.cases.models import Case, Membership
        from portal.cases.signals import slide_ready

        slide_ready.connect(_pretile, dispatch_uid="viewer-pretile")
        post_save.connect(_announce_case, sender=Case, dispatch_uid="worklist-live-case")
        user_logged_out.connect(_forget_logged_out_session, dispatch_uid="tiles-logout")
        for signal in (post_save, post_delete):
            signal.connect(_revoke, sender=Membership, dispatch_uid=f"tiles-{signal}")
        post_save.connect(
            _revoke_if_deactivated, sender=get_user_model(), dispatch_uid="tiles-user"
        )


def _pretile(sender, slide, **kwargs) -> None:
    """Tiles ready before the pathologist opens the case."""
    from portal.core.dispatch import dispatch
    from portal.viewer.tasks import pretile_slide

    dispatch(pretile_slide, slide.pk)


def _forget_logged_out_session(sender, request, user, **kwargs) -> None:
    from portal.viewer import tileservice

    tileservice.forget_session(getattr(getattr(request, "session", None), "session_key", None))
    tileservice.revoke_grants()  # other processes cached this session too


def _revoke(sender, **kwargs) -> None:
    from portal.viewer import tileservice

    tileservice.revoke_grants()


def _revoke_if_deactivated(sender, instance, created=False, **kwargs) -> None:
    if not created and not instance.is_active:
        _revoke(sender)


def _announce_case(sender, instance, **kwargs) -> None:
    """Worklists showing the case's cohort refresh when a case is created or changes (admin,
    API, LIS or a task), once the change is committed."""
    from django.db import transaction

    from portal.analyses.progress import worklist_update

    transaction.on_commit(lambda: worklist_update(instance))
