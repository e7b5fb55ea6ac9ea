"""``python -m replication.dataplane.process_server --config FILE``."""
import sys

from replication.dataplane.process_server.process import main

sys.exit(main())
