from django.apps import AppConfig


class ViewerConfig(AppConfig):
    name = "portal.viewer"
    label = "viewer"

    def ready(self) -> None:
        """Pre-render new slides; tile grants are cached per process for seconds, so drop them
        at once when they change."""
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import post_delete, post_save

        from portal.cases.models import Membership
        from portal.cases.signals import slide_ready

        slide_ready.connect(_pretile, dispatch_uid="viewer-pretile")
        user_logged_out.connect(_forget_logged_out_session, dispatch_uid="tiles-logout")
        for signal in (post_save, post_delete):
            signal.connect(_forget_grants, sender=Membership, dispatch_uid=f"tiles-{signal}")


def _pretile(sender, slide, **kwargs) -> None:
    """Tiles ready before the pathologist opens the case."""
    from portal.core.dispatch import dispatch
    from portal.viewer.tasks import pretile_slide

    dispatch(pretile_slide, slide.pk)


def _forget_logged_out_session(sender, request, user, **kwargs) -> None:
    from portal.viewer.fastpath import forget_session

    forget_session(getattr(getattr(request, "session", None), "session_key", None))


def _forget_grants(sender, **kwargs) -> None:
    from portal.viewer.tiles import forget_access

    forget_access()
