"""`python -m pep_torchrec.data.prepare`: the same as `pep-torchrec data prepare`."""

import sys

from pep_torchrec.commands.data_prepare_command import main

sys.exit(main())
