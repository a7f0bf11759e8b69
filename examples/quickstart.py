"""Quick start: `import hf_attn_plugin`, then load any supported model with attn_implementation="plugin".

    python examples/quickstart.py            # CPU or GPU
    python examples/quickstart.py --help

This runs the package demo (hf_attn_plugin/demo.py): a small random Llama-style GQA model, a padded batch
and greedy generate() with "plugin", checked against "eager".
"""

import sys

from hf_attn_plugin.demo import main

if __name__ == "__main__":
    sys.exit(main())
