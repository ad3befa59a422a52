"""`python -m pep_torchrec.report ...`: the same as `pep-torchrec report ...`."""

import sys

from pep_torchrec.commands.report_command import main

sys.exit(main())
