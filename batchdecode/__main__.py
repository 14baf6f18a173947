"""`python -m batchdecode ...` runs the `batchdecode` command."""
import sys

from .cli import main

sys.exit(main())
