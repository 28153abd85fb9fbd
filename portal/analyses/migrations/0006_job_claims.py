from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("analyses", "0005_prediction_evidence"),
    ]

    operations = [
        migrations.AddField(
            model_name="analysisjob",
            name="claimed_by",
            field=models.CharField(blank=True, max_length=100),
        ),
        migrations.AddField(
            model_name="analysisjob",
            name="lease_expires_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
