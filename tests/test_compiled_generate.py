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
from hf_attn_plugin import decode_ops

from .models import DECODERS

DECODE_OP = torch.ops.hf_attn_plugin.decode_attention.default
FLASH_OP = torch.ops.hf_attn_plugin.attention_fwd.default


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


def _compiled_graphs(model, ids, **kwargs) -> tuple[torch.Tensor, int]:
    """Tokens of ``generate()`` with its decode step compiled, and the number of graphs dynamo traced."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    # backend="eager": Dynamo traces the decode step exactly as for inductor (fullgraph: a break is an error), without
    # spending CI minutes in code generation; the GPU test below runs inductor with CUDA graphs.
    out = model.generate(ids, **kwargs, compile_config=_compile_config(backend="eager", mode=None))
    return out, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("batch", [1, 2], ids=["b1", "left_padded_b2"])
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_static_cache_compiled_generate_matches_eager(family, batch, reference_backend):
    """Eager's tokens, traced into as many graphs as eager's own compiled run: a Llama decode step compiles once.
    (transformers' static sliding-window layers recompile once for every implementation.)"""
    model = transformers.AutoModelForCausalLM.from_config(DECODERS[family](), attn_implementation="eager").eval()
    ids, mask = _prompt(batch, 10, "cpu")
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation="static")
    expected = model.generate(ids, **kwargs)
    _, eager_graphs = _compiled_graphs(model, ids, **kwargs)

    model.set_attn_implementation("plugin")
    got, graphs = _compiled_graphs(model, ids, **kwargs)
    assert torch.equal(got, expected)
    assert graphs == eager_graphs >= 1
    if family == "llama":
        assert graphs == 1


def _recording_backend(graphs: list):
    """A dynamo backend that keeps each traced graph, then runs it through AOTAutograd (fake implementations,
    functionalisation: what inductor sees) without code generation."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


def _targets(gm) -> list:
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp32 CPU identity test (the Triton interpreter)")
@pytest.mark.parametrize("batch", [1, 2], ids=["b1", "left_padded_b2"])
def test_static_cache_compiled_generate_takes_the_decode_op(batch, triton_backend, monkeypatch):
    """Triton backend (the interpreter on CPU): the compiled decode step calls the decode op in every layer (never
    the flash op) and gives eager's tokens. The op runs under AOTAutograd (its fake implementation, functionalised
    cache updates), not only in dynamo's graph."""
    torch._dynamo.reset()
    model = transformers.AutoModelForCausalLM.from_config(DECODERS["llama"](), attn_implementation="eager").eval()
    ids, mask = _prompt(batch, 10, "cpu")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, cache_implementation="static")
    expected = model.generate(ids, **kwargs)

    model.set_attn_implementation("plugin")
    launched = []
    original = decode_ops._launch
    monkeypatch.setattr(decode_ops, "_launch", lambda q, *a: launched.append(q.shape[1]) or original(q, *a))
    graphs = []
    got = model.generate(ids, **kwargs, compile_config=_compile_config(backend=_recording_backend(graphs), mode=None))
    assert torch.equal(got, expected)
    assert graphs, "generate() did not compile the decode step"
    layers = model.config.num_hidden_layers
    # fullgraph: one graph for every decode step. (The key mask used to become None at the step that fills the static
    # cache, a change of the step's kwargs that recompiled it: a second graph and its compile time, 10 s on the H200.)
    assert len(graphs) == 1
    targets = _targets(graphs[0])
    assert targets.count(DECODE_OP) == layers and FLASH_OP not in targets
    assert launched.count(1) == 7 * layers  # 7 compiled decode steps (the prefill runs uncompiled)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2], ids=["b1", "left_padded_b2"])
def test_static_cache_compiled_generate_gpu_cuda_graphs(batch, monkeypatch):
    """Inductor + CUDA graphs (transformers' default compile config): the decode steps run the decode op (the
    graph's warm-up runs call it from Python: counted there; replays do not) on the cache's own buffers, never the
    flash op, and the tokens equal the uncompiled plugin's."""
    from hf_attn_plugin.kernels import flash

    monkeypatch.delenv("HF_ATTN_PLUGIN_DECODE", raising=False)
    monkeypatch.delenv("HF_ATTN_PLUGIN_BACKEND", raising=False)
    torch._dynamo.reset()
    config = DECODERS["llama"]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="plugin", dtype=torch.float32)
    model = model.cuda().eval()
    ids, mask = _prompt(batch, 12, "cuda")
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, cache_implementation="static")
    expected = model.generate(ids, **kwargs, disable_compile=True)
    decode_calls, flash_q_lens = [], []
    original_launch, original_flash = decode_ops._launch, flash.flash_attn_forward
    monkeypatch.setattr(decode_ops, "_launch", lambda q, k, *a: decode_calls.append(
        (q.shape[1], k.untyped_storage().data_ptr())) or original_launch(q, k, *a))
    monkeypatch.setattr(flash, "flash_attn_forward",
                        lambda q, *a, **k: flash_q_lens.append(q.shape[1]) or original_flash(q, *a, **k))
    out = model.generate(ids, **kwargs, compile_config=CompileConfig(fullgraph=True), return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    decode_keys = [ptr for q_len, ptr in decode_calls if q_len == 1]
    assert len(decode_keys) >= config.num_hidden_layers, "the compiled decode step never ran the decode op"
    assert 1 not in flash_q_lens, "a compiled decode step ran the flash op"
    # inductor updates the static cache in place and the op reads it there (no copy of the cache per step)
    cache = {layer.keys.untyped_storage().data_ptr() for layer in out.past_key_values.layers}
    assert set(decode_keys) <= cache
