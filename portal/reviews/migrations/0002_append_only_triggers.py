"""On PostgreSQL, the database itself refuses changes to audit events and signed diagnoses.

The models already refuse them through the ORM; these triggers also stop raw SQL.
"""

from django.db import migrations

FORWARD = """
CREATE OR REPLACE FUNCTION lowmag_refuse_change() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '% rows are write-once (% refused)', TG_TABLE_NAME, TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER reviews_auditevent_append_only
    BEFORE UPDATE OR DELETE ON reviews_auditevent
    FOR EACH ROW EXECUTE FUNCTION lowmag_refuse_change();
CREATE TRIGGER reviews_diagnosis_signed_immutable
    BEFORE UPDATE OR DELETE ON reviews_diagnosis
    FOR EACH ROW WHEN (OLD.status = 'signed') EXECUTE FUNCTION lowmag_refuse_change();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS reviews_diagnosis_signed_immutable ON reviews_diagnosis;
DROP TRIGGER IF EXISTS reviews_auditevent_append_only ON reviews_auditevent;
DROP FUNCTION IF EXISTS lowmag_refuse_change();
"""


def _run(sql):
    def apply(apps, schema_editor):
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql, params=None)

    return apply


class Migration(migrations.Migration):
    dependencies = [("reviews", "0001_initial")]

    operations = [migrations.RunPython(_run(FORWARD), _run(BACKWARD))]
