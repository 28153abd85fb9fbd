from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("analyses", "0004_model_lifecycle"),
    ]

    operations = [
        migrations.AddField(
            model_name="prediction",
            name="evidence_scores",
            field=models.BinaryField(blank=True, default=b""),
        ),
        migrations.AddField(
            model_name="prediction",
            name="evidence_class",
            field=models.CharField(blank=True, max_length=100),
        ),
    ]
