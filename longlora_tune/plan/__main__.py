"""``python -m longlora_tune.plan``: see :mod:`longlora_tune.plan.cli`."""

import sys

from longlora_tune.plan.cli import main

sys.exit(main())
