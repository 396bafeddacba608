"""`python -m trl_cpo.scripts.demo`."""

import sys

from .run import main

sys.exit(main())
