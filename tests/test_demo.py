"""The quick-start demo (hf_attn_plugin/demo.py, examples/quickstart.py, ``hf-attn-plugin-demo``).

It must pass on a healthy install, say which backend ran, and fail (exit status 1) when the plugin's outputs
differ from eager: checked by injecting faults into the attention the plugin runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_attn_plugin import demo, reference

ROOT = Path(__file__).resolve().parents[1]


def _fault(monkeypatch, decode_only: bool, how):
    """Wrap the reference attention (the plugin's CPU backend) so that it returns a wrong output."""
    original = reference.attention_reference

    def faulty(q, k, v, *args, **kw):
        out, lse = original(q, k, v, *args, **kw)
        if not decode_only or q.shape[1] == 1:
            out = how(out, v)
        return out, lse

    monkeypatch.setattr(reference, "attention_reference", faulty)


def test_quickstart_script_passes_on_cpu_and_says_no_kernel_ran():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no Triton kernel runs on CPU" in proc.stdout
    assert "head_dim 64" in proc.stdout and "9 query / 3 KV heads" in proc.stdout
    assert "3/3 sequences token-identical to eager" in proc.stdout  # float32: exact
    assert proc.stdout.rstrip().endswith("OK: plugin matches eager (reference backend).")


def test_help_names_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "hf_attn_plugin.demo", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: hf-attn-plugin-demo")


def test_bfloat16_demo_passes_without_faults(capsys):
    assert demo.main(["--device", "cpu", "--dtype", "bfloat16", "--layers", "2", "--new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "noise floor max |sdpa - eager|" in out


def test_wrong_logits_fail(monkeypatch, capsys):
    _fault(monkeypatch, decode_only=False, how=lambda out, v: out + 0.05)
    assert demo.main(["--device", "cpu", "--layers", "2", "--new-tokens", "4"]) == 1
    captured = capsys.readouterr()
    assert "[FAIL] padded batch" in captured.out
    assert "FAILED (logits" in captured.err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wrong_decode_steps_fail_generate(monkeypatch, capsys, dtype):
    # Only the cached decode steps are wrong (they attend to nothing but the newest token): the padded-batch
    # logits still match, generate() must not. Before the fix the bfloat16 generate check was forced true.
    def newest_only(out, v):
        group = out.shape[2] // v.shape[2]
        return v[:, -1:].repeat_interleave(group, dim=2).to(out.dtype)

    _fault(monkeypatch, decode_only=True, how=newest_only)
    assert demo.main(["--device", "cpu", "--dtype", dtype, "--layers", "2", "--new-tokens", "12"]) == 1
    captured = capsys.readouterr()
    assert "[ok] padded batch" in captured.out
    assert "[FAIL] greedy generate()" in captured.out
    assert "FAILED (generate)" in captured.err


class _FixedLogits(torch.nn.Module):
    """Stands in for the eager model: returns the same logits row for every position."""

    def __init__(self, row: torch.Tensor):
        super().__init__()
        self.row = row

    def forward(self, ids, attention_mask=None, position_ids=None):
        logits = self.row.expand(ids.shape[0], ids.shape[1], -1)
        return type("Out", (), {"logits": logits})()


def test_check_generation_accepts_only_near_ties():
    prompt = torch.tensor([[5, 6]])
    mask = torch.ones_like(prompt)
    eager_tokens = torch.tensor([[5, 6, 1, 1, 1]])
    plugin_tokens = torch.tensor([[5, 6, 1, 3, 3]])  # differs at new token 1
    near_tie = _FixedLogits(torch.tensor([0.0, 2.0, 0.0, 1.99]))
    clear = _FixedLogits(torch.tensor([0.0, 2.0, 0.0, 1.0]))
    [(first, ok, _)] = demo.check_generation(plugin_tokens, eager_tokens, near_tie, mask, 2, tol=0.05, exact=False)
    assert (first, ok) == (1, True)
    [(first, ok, msg)] = demo.check_generation(plugin_tokens, eager_tokens, clear, mask, 2, tol=0.05, exact=False)
    assert (first, ok) == (1, False) and "not a near-tie" in msg
    [(first, ok, _)] = demo.check_generation(plugin_tokens, eager_tokens, near_tie, mask, 2, tol=0.05, exact=True)
    assert (first, ok) == (1, False)
    [(first, ok, _)] = demo.check_generation(eager_tokens, eager_tokens, clear, mask, 2, tol=0.05, exact=True)
    assert (first, ok) == (3, True)


@pytest.mark.gpu
def test_demo_runs_triton_kernels_on_gpu_and_matches_eager(capsys):
    assert torch.cuda.is_available()
    rc = demo.main(["--device", "cuda"])
    out = capsys.readouterr().out
    assert "attention backend: triton: Triton flash kernels on the GPU" in out
    assert "[ok] Triton kernels launched in that forward" in out
    assert rc == 0, out
