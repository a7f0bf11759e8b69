"""``attn_implementation="plugin"`` under transformers' tensor parallelism (``tp_plan="auto"``), on CPU.

Each test launches two gloo processes with ``torchrun`` (transformers' TP builds its mesh on CPU when the
machine has no accelerator, so the subprocesses hide any GPU) and runs ``benchmarks/tp_check.py --tiny``:
every rank holds half the heads, and "plugin"'s greedy tokens must equal sdpa's (eager's for the sinks model).
Small worker scripts check what a TP job can hand "plugin" directly (DTensor sinks or q/k/v, PagedCache(config)).
The GPU run of the same script (~1B model, bf16, two H200s) is in docs/multi_gpu.md.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "tp_check.py"


def _tp_skip_reason() -> str | None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch was built without torch.distributed / gloo: no CPU process group for tensor parallelism"
    config_cls = getattr(transformers, "DistributedConfig", None)
    if config_cls is None or "tp_plan" not in {f.name for f in dataclasses.fields(config_cls)}:
        return (f"transformers {transformers.__version__} has no DistributedConfig(tp_plan=...): its tensor "
                "parallelism predates the DTensor path this check was written against (5.17+)")
    return None


pytestmark = pytest.mark.skipif(_tp_skip_reason() is not None, reason=_tp_skip_reason() or "")


def _torchrun(args: list[str], cwd: Path, timeout: int = 600, path: tuple = ()) -> subprocess.CompletedProcess:
    """``torchrun`` on 2 CPU processes; ``path``: folders the workers import from, besides the checkout."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), *map(str, path), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _errors(proc: subprocess.CompletedProcess) -> str:
    """The ranks' own error lines (torchrun's summary says only that a child failed)."""
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if ln.startswith("[rank")]
    failed = out[out.index("FAIL:"):].splitlines()[:10] if "FAIL:" in out else []  # tp_check's own verdict
    return "\n".join(failed + lines[-20:]) or (proc.stdout[-2000:] + proc.stderr[-2000:])


def _rows(path: Path) -> dict[str, dict]:
    with open(path) as f:
        return {row["impl"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def llama_tp(tmp_path_factory):
    """One two-process run on the tiny Llama-style GQA model (4 query / 2 KV heads), all routes."""
    out = tmp_path_factory.mktemp("tp_llama")
    proc = _torchrun([str(SCRIPT), "--device", "cpu", "--tiny", "--extra-paths", "--out", str(out)], cwd=ROOT)
    path = out / "tp_check.csv"
    assert path.exists(), f"tp_check wrote no CSV:\n{_errors(proc)}"
    return proc, _rows(path)


def test_plugin_tokens_equal_sdpa_and_eager_under_tp(llama_tp):
    _, rows = llama_tp
    for impl in ("plugin", "sdpa", "eager"):
        row = rows[impl]
        assert row["world_size"] == "2" and row["error"] == "", row
        assert row["q_proj_param"] == "DTensor", "the model was not sharded: q_proj weights are not DTensors"
        assert row["tokens_equal"] == "True", f"{impl} greedy tokens differ from sdpa's under TP: {row}"
    assert float(rows["plugin"]["max_abs_logit_diff_vs_ref"]) < 1e-4
    # each rank attends over its own heads, as plain local tensors
    assert rows["plugin"]["attn_input"] == "Tensor q2/kv1", rows["plugin"]["attn_input"]


@pytest.mark.parametrize("route", ["plugin+static_cache", "plugin+generate_batch"])
def test_other_decoding_routes_under_tp(llama_tp, route):
    row = llama_tp[1][route]
    assert row["error"] == "" and row["tokens_equal"] == "True", row


def test_paged_cache_under_tp(llama_tp):
    """PagedCache(model) sizes its pools for the rank's num_key_value_heads / tp_size heads (1 of 2 here)."""
    row = llama_tp[1]["plugin+PagedCache"]
    assert row["error"] == "" and row["tokens_equal"] == "True", row


@pytest.mark.parametrize("tp_size, plan, want", [
    (None, None, 2),           # not sharded: every KV head
    (2, None, 1),              # the model's own plan (k_proj colwise): half of them
    (2, {"model.layers.*.self_attn.o_proj": "rowwise"}, 2),  # a plan that leaves k/v whole (gpt_oss-like)
    (4, None, "does not divide evenly"),
])
def test_paged_cache_pools_per_rank(tp_size, plan, want):
    """The rule behind test_paged_cache_under_tp, in one process: tp_size and the plan as transformers sets them."""
    from hf_attn_plugin import PagedCache
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    model._tp_size = tp_size  # what from_pretrained(tp_plan=...) sets (read through model.tp_size)
    if plan is not None:
        model._tp_plan = plan
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            PagedCache(model, max_batch_size=1, num_pages=4)
        return
    cache = PagedCache(model, max_batch_size=1, num_pages=4, page_size=4)
    assert [tuple(p.shape) for p in cache.kv.k_pools] == [(4, 4, want, 16)] * 2


def _sinks_sharded_locally() -> bool:
    """transformers releases whose plans hand the attention module local sinks ("local_params" style)."""
    plan = transformers.AutoConfig.for_model("granite_swa").base_model_tp_plan or {}
    return plan.get("layers.*.self_attn") == "local_params"


@pytest.mark.skipif(not _sinks_sharded_locally(), reason=(
    f"transformers {transformers.__version__}'s granite_swa plan shards sinks 'colwise' without 'local_params', so "
    "the attention function is handed the sinks as a DTensor and eager itself fails under TP "
    "(aten.sub got mixed torch.Tensor and DTensor): no reference to compare with"))
def test_sinks_sharded_with_heads_under_tp(tmp_path):
    """Per-head attention sinks (granite_swa: sinks colwise + self_attn local_params) and sliding windows."""
    proc = _torchrun([str(SCRIPT), "--device", "cpu", "--tiny", "--arch", "granite_swa", "--out", str(tmp_path)],
                     cwd=ROOT)
    assert proc.returncode == 0, _errors(proc)
    rows = _rows(tmp_path / "tp_check_granite_swa.csv")
    assert rows["plugin"]["tokens_equal"] == "True", rows["plugin"]
    assert rows["plugin"]["attn_input"] == "Tensor q2/kv1 sinks Tensor[2]", rows["plugin"]["attn_input"]


_SINKS_MODEL_WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist, transformers
    from torch.distributed.tensor import DTensor
    import tp_check  # benchmarks/tp_check.py (on PYTHONPATH): the same tiny granite_swa model (distinct sinks per head)
    import hf_attn_plugin

    out = sys.argv[1]
    a = tp_check.parse_args(["--out", out, "--device", "cpu", "--tiny", "--arch", "granite_swa"])
    rank, _, dev = tp_check.init_distributed("cpu")
    model_dir = tp_check.Path(out) / "model"
    tp_check.ensure_model(a, model_dir, rank, dev)
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    gen = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False,
               pad_token_id=0)
    model = tp_check.load(model_dir, "plugin", torch.float32)
    with torch.no_grad():
        with tp_check.Probe() as probe:  # what the attention function is handed
            logits = model(input_ids=ids).logits[:, -1]
        tokens = model.generate(input_ids=ids, **gen)
        paged = model.generate(input_ids=ids, past_key_values=hf_attn_plugin.PagedCache(
            model, max_batch_size=2, num_pages=8, page_size=16), **gen)
    if rank == 0:  # reference: eager in one process, whole model (eager itself fails on DTensor sinks)
        ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                                dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (logits - ref(input_ids=ids).logits[:, -1]).abs().max().item()
            want = ref.generate(input_ids=ids, **gen)
        assert diff < 1e-4, diff
        assert torch.equal(tokens, want) and torch.equal(paged, want), (tokens, paged, want)
        print("SINKS", *probe.calls[0]["sinks"], f"{diff:.2g}")
    dist.barrier()
    dist.destroy_process_group()
    print("WORKER OK", flush=True)
    os._exit(0)  # no interpreter teardown: gloo's shutdown once aborted a rank after "WORKER OK" (CI, SIGABRT)
""")


def test_sinks_under_tp_equal_single_process_eager(tmp_path):
    """granite_swa under TP against eager in one process, on every release: 5.17 hands plugin the sinks as a
    Shard(0) DTensor (its plan has no 'local_params'; eager fails there), later releases as local tensors."""
    worker = tmp_path / "worker.py"
    worker.write_text(_SINKS_MODEL_WORKER)
    proc = _torchrun([str(worker), str(tmp_path)], cwd=tmp_path, path=(ROOT / "benchmarks",))
    assert proc.returncode == 0 and "WORKER OK" in proc.stdout, _errors(proc)
    handed = "Tensor (2,)" if _sinks_sharded_locally() else "DTensor (4,)"  # 4 sinks in all, 2 per rank
    assert f"SINKS {handed}" in proc.stdout, proc.stdout[-2000:]


def test_gpt_oss_under_tp(tmp_path):
    """GPT-OSS (sinks, sliding windows, MoE): its plan leaves attention whole on every rank (5.17: no plan;
    later: embeddings only), so "plugin" sees all heads and the sinks as a plain parameter."""
    proc = _torchrun([str(SCRIPT), "--device", "cpu", "--tiny", "--arch", "gpt_oss", "--out", str(tmp_path)], cwd=ROOT)
    assert proc.returncode == 0, _errors(proc)
    rows = _rows(tmp_path / "tp_check_gpt_oss.csv")
    assert rows["plugin"]["tokens_equal"] == "True", rows["plugin"]
    assert rows["plugin"]["attn_input"] == "Tensor q4/kv2 sinks Parameter[4]", rows["plugin"]["attn_input"]


_DTENSOR_WORKER = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from hf_attn_plugin.integration.attention import plugin_attention

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))  # this rank's 2 of 4 query heads, 2 KV heads

    class Attn(torch.nn.Module):
        is_causal = True

    sinks = distribute_tensor(torch.randn(4), mesh, [Shard(0)])  # what a 'colwise' sinks rule makes (5.17)
    want, _ = plugin_attention(Attn(), q, k, v, None, scaling=0.25, s_aux=sinks.to_local())
    case = sys.argv[1]
    if case == "sinks":
        got, _ = plugin_attention(Attn(), q, k, v, None, scaling=0.25, s_aux=sinks)
        assert not isinstance(got, DTensor) and torch.allclose(got, want, atol=1e-5)
        other = plugin_attention(Attn(), q, k, v, None, scaling=0.25, s_aux=sinks.to_local().flip(0))[0]
        assert not torch.allclose(got, other, atol=1e-3), "the sinks do not change the output: weak check"
    elif case in ("sinks_replicated", "sinks_wrong_heads"):  # not sharded like q_proj: refused, not misread
        bad = (distribute_tensor(torch.randn(2), mesh, [Replicate()]) if case == "sinks_replicated"
               else distribute_tensor(torch.randn(8), mesh, [Shard(0)]))  # 4 local sinks for 2 local heads
        try:
            plugin_attention(Attn(), q, k, v, None, scaling=0.25, s_aux=bad)
        except ValueError as e:
            assert "DTensor" in str(e) and "colwise" in str(e) and "2 local query heads" in str(e), str(e)
        else:
            raise AssertionError(f"sinks DTensor {bad.placements} with {bad.to_local().numel()} local were accepted")
    elif case == "paged_config":  # a bare config cannot know the rank's share of the KV heads
        from transformers import LlamaConfig
        from hf_attn_plugin import PagedCache
        try:
            PagedCache(LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64), max_batch_size=1, num_pages=4)
        except ValueError as e:
            assert "torch.distributed" in str(e) and "PagedCache(model" in str(e), str(e)
        else:
            raise AssertionError("PagedCache(config) was accepted inside a torch.distributed job")
    else:  # q/k/v as DTensors: refused before the op, with a message that names DTensor and the fix
        qd, kd, vd = (DTensor.from_local(t, mesh, [Shard(1)], run_check=False) for t in (q, k, v))
        try:
            plugin_attention(Attn(), qd, kd, vd, None, scaling=0.25)
        except (TypeError, ValueError, NotImplementedError) as e:
            assert "DTensor" in str(e) and "local" in str(e), str(e)
        else:
            raise AssertionError("DTensor query/key/value were accepted")
    dist.barrier()  # both ranks done before the group goes away
    dist.destroy_process_group()
    print("WORKER OK", flush=True)
    os._exit(0)  # no interpreter teardown: gloo's shutdown once aborted a rank after "WORKER OK" (CI, SIGABRT)
""")


@pytest.mark.parametrize("case", ["sinks", "sinks_replicated", "sinks_wrong_heads", "qkv", "paged_config"])
def test_dtensor_inputs(tmp_path, case):
    """What a TP job can hand plugin directly: sinks as a Shard(0) DTensor (transformers 5.17's 'colwise' sinks
    without 'local_params') are used locally; other sinks DTensors, DTensor q/k/v (a custom plan with
    use_local_output=False) and PagedCache(config) are refused with a message that says what to do."""
    worker = tmp_path / "worker.py"
    worker.write_text(_DTENSOR_WORKER)
    proc = _torchrun([str(worker), case], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "WORKER OK" in proc.stdout, _errors(proc)
