from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("replication", "0004_resync_retry_and_point_consistency"),
    ]

    operations = [
        migrations.AddField(
            model_name="replicadisk",
            name="removed_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
    ]
