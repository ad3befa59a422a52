"""`python -m pep_torchrec.report ...`: the same as `pep-torchrec report ...`."""

import sys

from pep_torchrec.report import main

sys.exit(main())
