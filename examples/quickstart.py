"""Quick start: `import hf_attn_plugin`, then load any supported model with attn_implementation="plugin".

    python examples/quickstart.py            # CPU or GPU; same as the installed command `hf-attn-plugin-demo`
    python examples/quickstart.py --help

Runs the package demo (hf_attn_plugin/demo.py): a small random Llama-style GQA model with SmolLM2-135M's
attention shapes (9 query / 3 KV heads, head_dim 64), a padded batch and greedy generate() with "plugin",
checked against "eager" (Triton kernels in bfloat16 on a GPU; the pure-PyTorch reference in float32 on CPU,
where no kernel runs). Exit status 1 when a check fails.
"""

import sys

from hf_attn_plugin.demo import main

if __name__ == "__main__":
    sys.exit(main())
