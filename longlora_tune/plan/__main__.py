"""``python -m longlora_tune.plan``: see :mod:`longlora_tune.plan.planner`."""

import sys

from longlora_tune.plan.planner import main

sys.exit(main())
