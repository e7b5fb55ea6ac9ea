from __future__ import annotations

import hashlib
import os
import sys

from django.core.management.base import BaseCommand, CommandError

from core.exceptions import LifeboatError
from replication.engine import disk_image_stream
from replication.models import ProtectedItem, RecoveryPoint


class Command(BaseCommand):
    help = "Write a replica disk's raw bytes as of a recovery point to a file (and print its SHA-256)."

    def add_arguments(self, parser):
        parser.add_argument("point", help="Recovery point id (the API's recoveryPoints id)")
        parser.add_argument("disk", type=int, help="Disk index within the item")
        parser.add_argument("output", help="File to write ('-' for standard output)")

    def handle(self, *args, point, disk, output, **options):
        rp = RecoveryPoint.objects.filter(pk=point).first()
        if rp is None:
            raise CommandError(f"No recovery point {point}.")
        item = ProtectedItem.objects.select_related("vault").prefetch_related("replica_disks").get(pk=rp.item_id)
        if not any(d.index == disk for d in item.replica_disks.all()):
            raise CommandError(f"{item.name} has no disk {disk}.")
        try:
            size, chunks = disk_image_stream(item=item, point=rp, disk_index=disk)
        except LifeboatError as exc:
            raise CommandError(exc.message) from None
        digest = hashlib.sha256()
        to_stdout = output == "-"
        out = sys.stdout.buffer if to_stdout else open(output + ".part", "wb")
        written = 0
        try:
            for chunk in chunks:
                out.write(chunk)
                digest.update(chunk)
                written += len(chunk)
        finally:
            if not to_stdout:
                out.close()
        if not to_stdout:
            os.replace(output + ".part", output)
        self.stderr.write(f"{written} bytes of {item.name} disk {disk} at {rp.time:%Y-%m-%d %H:%M:%S}; sha256 {digest.hexdigest()}")
