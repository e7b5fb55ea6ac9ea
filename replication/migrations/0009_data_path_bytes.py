# The data path in bytes and its rates (replication/data_path.py).

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('replication', '0008_agent_registrations_token_generations'),
        ('vault', '0003_names_single_line'),
    ]

    operations = [
        migrations.AddField(
            model_name='protecteditem',
            name='applied_bytes_per_s',
            field=models.FloatField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='applied_log_bytes',
            field=models.BigIntegerField(default=0, editable=False),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='data_path_measured_at',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='ps_pending_bytes',
            field=models.BigIntegerField(default=0, editable=False),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='sent_bytes_per_s',
            field=models.FloatField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='storage_measured_at',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='storage_waiting_bytes',
            field=models.BigIntegerField(default=0, editable=False),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='uploaded_bytes_per_s',
            field=models.FloatField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='protecteditem',
            name='uploaded_seq',
            field=models.BigIntegerField(default=0, editable=False),
        ),
        migrations.CreateModel(
            name='DataPathSample',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('at', models.DateTimeField()),
                ('started_at', models.FloatField()),
                ('received_bytes', models.BigIntegerField()),
                ('uploaded_bytes', models.BigIntegerField()),
                ('applied_log_bytes', models.BigIntegerField(blank=True, null=True)),
                ('item', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.CASCADE, related_name='data_path_samples', to='replication.protecteditem')),
                ('server', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='data_path_samples', to='vault.processserver')),
            ],
            options={
                'ordering': ['at'],
                'indexes': [models.Index(fields=['server', 'at'], name='replication_server__59ad1a_idx')],
            },
        ),
    ]
