"""transformers' own fast decoding route: a static cache that ``generate()`` compiles itself (issue 17).

``generate(cache_implementation="static")`` compiles the model's forward (``generation_config.compile_config``) on CUDA,
or anywhere when the compile config allows every device. With "plugin" the attention is one custom op, so the whole
decode step must trace without a graph break (``fullgraph=True`` turns any break into an error) and give eager's tokens.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.generation.configuration_utils import CompileConfig

import hf_attn_plugin  # noqa: F401  (registers "plugin")

from .models import DECODERS


def _compile_config(**kwargs) -> CompileConfig:
    config = CompileConfig(fullgraph=True, **kwargs)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told otherwise
    return config


def _prompt(batch: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, (batch, length), device=device)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_cache_compiled_generate_matches_eager(family, reference_backend):
    torch._dynamo.reset()
    model = transformers.AutoModelForCausalLM.from_config(DECODERS[family](), attn_implementation="eager").eval()
    ids, mask = _prompt(2, 10, "cpu")
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation="static")
    expected = model.generate(ids, **kwargs)

    model.set_attn_implementation("plugin")
    counters = torch._dynamo.utils.counters
    counters.clear()
    # backend="eager": Dynamo traces the decode step exactly as for inductor (fullgraph: a break is an error), without
    # spending CI minutes in code generation; the GPU test below runs inductor with CUDA graphs.
    got = model.generate(ids, **kwargs, compile_config=_compile_config(backend="eager", mode=None))
    assert counters["stats"]["unique_graphs"] >= 1, "generate() did not compile the decode step"
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_static_cache_compiled_generate_gpu_cuda_graphs():
    """Inductor + CUDA graphs (transformers' default compile config) give the uncompiled plugin's tokens."""
    torch._dynamo.reset()
    config = DECODERS["llama"]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="plugin", dtype=torch.float32)
    model = model.cuda().eval()
    ids, mask = _prompt(2, 12, "cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, cache_implementation="static")
    expected = model.generate(ids, **kwargs, disable_compile=True)
    got = model.generate(ids, **kwargs, compile_config=CompileConfig(fullgraph=True))
    assert torch.equal(got, expected)
