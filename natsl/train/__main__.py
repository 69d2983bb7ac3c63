"""`python -m natsl.train [options]`: the same as `natsl train [options]`."""

import sys

from natsl.train.cli import train_main

sys.exit(train_main())
