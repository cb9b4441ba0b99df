"""`python -m fastdllm.cli`: the `fastdllm` command."""

import sys

from .main import main

sys.exit(main())
