"""``python -m hf_attn_plugin.conversion`` == ``convert-to-gqa``."""

import sys

from .cli import main

sys.exit(main())
