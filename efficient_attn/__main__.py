"""``python -m efficient_attn`` is the ``effattn`` command."""

import sys

from efficient_attn.cli import main

sys.exit(main())
