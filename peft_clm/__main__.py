"""`python -m peft_clm ...` is the `peft-clm` command (also under `accelerate launch -m peft_clm ...`)."""

import sys

from .tools.cli import main


sys.exit(main())
