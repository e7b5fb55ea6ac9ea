from django.db import migrations, models

# Every item's row is rewritten often: its RPO by every monitoring sweep (all items, every
# 30 s), its applied position by every apply pass. Half of each page is left free for those
# new row versions, so PostgreSQL keeps them on the same page as heap-only (HOT) updates,
# which write no index; without the room each one writes every index of the table.
# Rows written before keep their full pages until they move: each page gets the room as its
# rows are next rewritten, without the lock a table rewrite would take now.
# (PostgreSQL only; on another database the table is left as it is.)
FILLFACTOR = 50


def fillfactor_set(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"ALTER TABLE replication_protecteditem SET (fillfactor = {FILLFACTOR})")


def fillfactor_reset(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("ALTER TABLE replication_protecteditem RESET (fillfactor)")


class Migration(migrations.Migration):

    dependencies = [
        ('replication', '0010_last_applied_at'),
    ]

    operations = [
        migrations.AlterField(
            model_name='protecteditem',
            name='rpo_seconds',
            field=models.PositiveIntegerField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(fillfactor_set, fillfactor_reset),
    ]
