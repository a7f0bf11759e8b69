"""A one-minute demo: a small random Llama-style GQA model under ``"plugin"``, checked against ``"eager"``.

The model has SmolLM2-135M's attention shapes (9 query heads, 3 KV heads, head_dim 64) and random weights.
On a CUDA GPU the plugin runs its Triton kernels in bfloat16; on CPU it runs ``reference.py`` (pure PyTorch)
in float32: no Triton kernel runs on CPU. Checks, each printed:

* logits of a right-padded batch: ``max |plugin - eager| <= 3 * max |sdpa - eager| + eps``, i.e. within a
  small multiple of the noise floor between transformers' own two implementations on the same input;
* greedy ``generate()`` on a left-padded batch with a KV cache: tokens identical to eager's. In bfloat16 a
  greedy token may differ only where eager's own top two logits are within that tolerance (a near-tie); from
  there on every token the plugin picks must still be (within the tolerance) eager's argmax for the plugin's
  own sequence. In float32 (CPU) tokens must be identical.

Exit status 0 when every check passes, 1 otherwise. ``hf-attn-plugin-demo --help`` lists the options.
"""

from __future__ import annotations

import argparse
import sys
import time

NOISE_MULTIPLE = 3.0  # plugin vs eager may differ by this many times the eager-vs-sdpa difference (+ eps)


def _parse(argv):
    parser = argparse.ArgumentParser(
        prog="hf-attn-plugin-demo",
        description="Build a small random Llama-style GQA model (9/3 heads, head_dim 64), run a padded batch "
        "and greedy generate() with attn_implementation='plugin', and check them against 'eager'. "
        "Exit status 1 when a check fails.",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens per sequence (default 24)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    return parser.parse_args(argv)


def build_models(device, dtype, layers: int, seed: int = 0):
    """Three copies of one random model: ``"plugin"``, ``"eager"`` and ``"sdpa"`` (the noise-floor reference)."""
    import copy

    import torch
    import transformers

    import hf_attn_plugin

    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=2048,
        rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.05,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    models = {}
    state = None
    for impl in (hf_attn_plugin.ATTN_IMPLEMENTATION, "eager", "sdpa"):
        # A copy of the config per model: from_config records the attention implementation on it.
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=impl,
                                                              dtype=dtype)
        if model.config._attn_implementation != impl:
            raise RuntimeError(f"asked for attn_implementation={impl!r}, got {model.config._attn_implementation!r}")
        if state is None:
            state = model.state_dict()
        else:
            model.load_state_dict(state)
        models[impl] = model.to(device).eval()
    return models


def _our_kernel_names() -> set[str]:
    """Names of the package's Triton kernels (what the CUDA profiler reports when they run)."""
    import importlib
    import pkgutil

    import triton

    import hf_attn_plugin.kernels as kernels

    names = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        names.update(n for n, obj in vars(module).items() if isinstance(obj, triton.runtime.jit.JITFunction))
    return names


def _forward_logits(model, ids, mask, left_padded: bool = False):
    import torch

    # Left padding: positions count real tokens only, as generate() does.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) if left_padded else None
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=position_ids).logits.float()


def check_generation(tokens_plugin, tokens_eager, eager, mask, prompt_len: int, tol: float, exact: bool):
    """Per row: (identical prefix length, ok, message). See the module docstring for the rule."""
    import torch

    results = []
    full_mask = torch.cat([mask, torch.ones_like(tokens_plugin[:, prompt_len:])], dim=1)
    # Eager's logits on each implementation's own sequence (teacher forcing, no cache).
    on_plugin = _forward_logits(eager, tokens_plugin, full_mask, left_padded=True)
    on_eager = _forward_logits(eager, tokens_eager, full_mask, left_padded=True)
    new = tokens_plugin.shape[1] - prompt_len
    for row in range(tokens_plugin.shape[0]):
        ours, theirs = tokens_plugin[row, prompt_len:], tokens_eager[row, prompt_len:]
        differ = (ours != theirs).nonzero()
        first = int(differ[0]) if len(differ) else new
        if first == new:
            results.append((first, True, "identical"))
            continue
        if exact:
            results.append((first, False, f"differs at new token {first} (float32 must be identical)"))
            continue
        pos = prompt_len + first - 1  # logits at pos predict the token at pos + 1
        gap = float(on_eager[row, pos, theirs[first]] - on_eager[row, pos, ours[first]])
        if gap > tol:
            results.append((first, False, f"differs at new token {first}, where eager prefers its token by "
                                          f"{gap:.3g} > tolerance {tol:.3g}: not a near-tie"))
            continue
        # After the near-tie: the plugin's own continuation must still be eager's greedy choice (within tol).
        steps = torch.arange(prompt_len - 1, tokens_plugin.shape[1] - 1, device=tokens_plugin.device)
        logits = on_plugin[row, steps]
        chosen = logits.gather(1, tokens_plugin[row, prompt_len:, None])[:, 0]
        worst = float((logits.max(dim=1).values - chosen).max())
        if worst > tol:
            results.append((first, False, f"near-tie at new token {first} (gap {gap:.3g}), but afterwards a "
                                          f"token is {worst:.3g} below eager's argmax (> tolerance {tol:.3g})"))
        else:
            results.append((first, True, f"near-tie at new token {first} (gap {gap:.3g} <= {tol:.3g}); every "
                                         f"later token within {worst:.3g} of eager's argmax"))
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)  # before the heavy imports: --help and argument errors are instant

    import torch
    import transformers

    import hf_attn_plugin
    from hf_attn_plugin.ops import backend_for

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("FAILED: --device cuda, but torch.cuda.is_available() is False (a CPU build of PyTorch, or no "
              "driver). Install a CUDA build of PyTorch or use --device cpu.", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = backend_for(device)
    if backend == "triton":
        where = ("Triton flash kernels on the GPU" if device.type == "cuda"
                 else "Triton kernels under the Triton interpreter (TRITON_INTERPRET=1, slow)")
    else:
        where = "the pure-PyTorch reference (hf_attn_plugin/reference.py): no Triton kernel runs on CPU"
    print(f"hf_attn_plugin {hf_attn_plugin.__version__}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}, device {device}, {str(dtype).replace('torch.', '')}")
    print(f"attention backend: {backend}: {where}")
    print(f"model: random Llama-style GQA, {args.layers} layers, 9 query / 3 KV heads, head_dim 64 "
          f"(SmolLM2-135M's attention shapes)")
    models = build_models(device, dtype, args.layers)
    ours, eager, sdpa = models[hf_attn_plugin.ATTN_IMPLEMENTATION], models["eager"], models["sdpa"]
    vocab = ours.config.vocab_size
    failures = []

    # 1. Logits of a right-padded batch (training / scoring shape), against the eager-vs-sdpa noise floor.
    gen = torch.Generator().manual_seed(1)
    lengths = [96, 61, 33, 7]
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen).to(device)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long().to(device)
    kernel_calls = None
    if device.type == "cuda" and backend == "triton":
        names = _our_kernel_names()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            got = _forward_logits(ours, ids, mask)
            torch.cuda.synchronize()
        kernel_calls = sum(e.count for e in prof.key_averages() if e.key in names)
    else:
        got = _forward_logits(ours, ids, mask)
    want = _forward_logits(eager, ids, mask)
    floor_logits = _forward_logits(sdpa, ids, mask)
    valid = mask.bool()
    diff = (got[valid] - want[valid]).abs().max().item()
    floor = (floor_logits[valid] - want[valid]).abs().max().item()
    eps = 1e-3 if dtype == torch.bfloat16 else 1e-4
    tol = NOISE_MULTIPLE * floor + eps
    ok = diff <= tol
    print(f"[{'ok' if ok else 'FAIL'}] padded batch, lengths {lengths}: max |logits plugin - eager| = {diff:.3g}; "
          f"noise floor max |sdpa - eager| = {floor:.3g}; tolerance {NOISE_MULTIPLE:g} x floor + {eps:g} = {tol:.3g}")
    if not ok:
        failures.append("logits")
    if kernel_calls is not None:
        ran = kernel_calls >= args.layers
        print(f"[{'ok' if ran else 'FAIL'}] Triton kernels launched in that forward: {kernel_calls} "
              f"(expected one per layer or more)")
        if not ran:
            failures.append("kernels did not run")

    # 2. Greedy generate() on a left-padded batch with a KV cache.
    prompt = torch.randint(3, vocab, (3, 16), generator=gen).to(device)
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[1, :5] = 0
    prompt_mask[2, :11] = 0
    kwargs = dict(attention_mask=prompt_mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    with torch.no_grad():
        tokens_ours = ours.generate(prompt, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens_eager = eager.generate(prompt, **kwargs)
    exact = dtype == torch.float32
    rows = check_generation(tokens_ours, tokens_eager, eager, prompt_mask, prompt.shape[1], tol, exact)
    identical = sum(first == args.new_tokens for first, _, _ in rows)
    ok = all(r[1] for r in rows)
    print(f"[{'ok' if ok else 'FAIL'}] greedy generate(), left-padded batch of 3, {args.new_tokens} new tokens: "
          f"{identical}/3 sequences token-identical to eager ({elapsed:.2f} s with plugin)")
    for row, (first, row_ok, message) in enumerate(rows):
        if first < args.new_tokens:
            print(f"    row {row}: {message}")
    if not ok:
        failures.append("generate")

    if failures:
        print(f"FAILED ({', '.join(failures)}): the plugin's outputs differ from eager beyond the tolerance. "
              "Please report it with the lines above.", file=sys.stderr)
        return 1
    print(f"OK: plugin matches eager ({'Triton kernels' if backend == 'triton' else 'reference backend'}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
