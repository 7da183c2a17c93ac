"""`python -m agents.emulation`: the sa-emulation agent."""

import sys

from agents.emulation import main

sys.exit(main())
