from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin

from portal.cases.models import Case, Cohort, Membership, Slide

User = get_user_model()


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Cohort)
class CohortAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "required_magnification", "active_model", "created_at"]
    search_fields = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    # Activation goes through the model card (guards, who and why, audit, rollback).
    readonly_fields = ["active_model"]
    inlines = [MembershipInline]


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "cohort", "role"]
    list_filter = ["role", "cohort"]
    search_fields = ["user__username", "cohort__name"]
    autocomplete_fields = ["user"]


class SlideInline(admin.TabularInline):
    model = Slide
    extra = 0
    fields = ("original_name", "status", "vendor", "mpp", "magnification", "failure_reason")
    readonly_fields = fields


@admin.register(Case)
class CaseAdmin(admin.ModelAdmin):
    list_display = ["accession_number", "patient_id", "cohort", "priority", "status", "created_at"]
    list_filter = ["cohort", "status", "priority"]
    search_fields = ["accession_number", "patient_id"]
    inlines = [SlideInline]


@admin.register(Slide)
class SlideAdmin(admin.ModelAdmin):
    list_display = ["original_name", "case", "status", "vendor", "magnification", "created_at"]
    list_filter = ["status", "vendor"]
    search_fields = ["original_name", "sha256", "case__accession_number"]


class UserMembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    fk_name = "user"


admin.site.unregister(User)


@admin.register(User)
class PortalUserAdmin(UserAdmin):
    """Django's user admin with the user's cohort memberships inline."""

    inlines = [UserMembershipInline]
