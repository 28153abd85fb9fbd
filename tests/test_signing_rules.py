"""The diagnosis rules of portal.reviews.signing, called directly (no API in between)."""

from __future__ import annotations

import pytest

from portal.cases.models import Case
from portal.reviews import signing
from portal.reviews.models import Diagnosis
from tests.portal_fixtures import PASSWORD, make_user


def test_a_case_gets_one_draft_and_moves_into_review(case_a, path_a):
    draft = signing.do_create_draft(case_a, path_a, {"call": "tumor", "version": 7})
    assert (draft.version, draft.row_version, draft.call) == (1, 1, "tumor")
    assert Case.objects.get(pk=case_a.pk).status == Case.Status.IN_REVIEW
    with pytest.raises(signing.DiagnosisConflict, match=f"draft diagnosis \\({draft.pk}\\)"):
        signing.check_new_draft(case_a)


def test_only_the_author_edits_a_draft_and_only_at_the_current_row_version(
    case_a, path_a, cohort_a
):
    draft = signing.do_create_draft(case_a, path_a, {})
    with pytest.raises(signing.NotAllowed):
        signing.check_draft_editable(draft, make_user("other", cohort=cohort_a))
    with pytest.raises(signing.RowVersionRequired):
        signing.check_row_version(draft, None)
    signing.do_edit_draft(draft, {"call": "normal"})
    with pytest.raises(signing.StaleRowVersion, match="row_version 2, you sent 1"):
        signing.check_row_version(draft, 1)
    signing.check_row_version(draft, 2)


def test_amending_needs_the_latest_signed_version_the_password_and_a_reason(case_a, path_a):
    first = signing.do_sign(signing.do_create_draft(case_a, path_a, {"call": "x"}), path_a)
    with pytest.raises(signing.DiagnosisConflict, match="already signed"):
        signing.check_signable(first, path_a, PASSWORD)
    with pytest.raises(signing.NotAllowed, match="password"):
        signing.check_amendable(first, path_a, "wrong", "typo")
    with pytest.raises(signing.InvalidInput) as blank:
        signing.check_amendable(first, path_a, PASSWORD, "   ")
    assert blank.value.field == "reason"
    reason = signing.check_amendable(first, path_a, PASSWORD, "  typo ")
    second = signing.do_amend(first, path_a, reason, {"call": "y"})
    assert (second.version, second.previous_id, second.amendment_reason) == (2, first.pk, "typo")
    with pytest.raises(signing.DiagnosisConflict, match="superseded; amend version 2"):
        signing.check_amendable(first, path_a, PASSWORD, "again")
    assert Diagnosis.objects.filter(case=case_a).count() == 2
