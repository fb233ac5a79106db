"""`python -m dsvl2.serve --model DIR ...`: the same as `dsvl2 serve`."""

import sys

from dsvl2.serve.cli import main

sys.exit(main())
