"""`python -m infer` = `pdlm-infer`."""

import sys

from infer.cli import main

sys.exit(main())
