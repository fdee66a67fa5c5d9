"""`python -m gembed <sub-command>`, the same as the `gembed` console script."""
import sys

from gembed.cli import main

sys.exit(main())
