"""``python -m langgraph.checkpoint.kusto.loadtests``: the load test (see :mod:`.cli`)."""

import sys

from .cli import main

sys.exit(main())
