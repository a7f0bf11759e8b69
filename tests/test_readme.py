"""Every Python and shell snippet of README.md and docs/ runs (CPU, a tiny checkpoint) or is marked.

A fenced ```python / ```bash block runs unless the line before it is a marker comment:

* ``<!-- test: gpu (why) -->``: needs a GPU or a long run; never run by this test.
* ``<!-- test: skip (why) -->``: cannot run in a test (e.g. installs packages); not run here.
* ``<!-- test: needs MODULE -->``: runs when MODULE is installed (skipped otherwise).

Snippets run in a scratch directory holding ``ckpt/mha`` (a tiny random MHA Llama with a tokenizer) and a link
to ``examples/``; the Hub id ``HuggingFaceTB/SmolLM2-135M`` is replaced by that checkpoint. The Python
snippets of one file run in order in one process (later ones continue earlier ones, as the text says); each
shell snippet runs with ``bash -euo pipefail``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import load_file

ROOT = Path(__file__).resolve().parents[1]
FILES = ["README.md", "docs/paged.md", "docs/uptraining.md"]
HUB_ID = "HuggingFaceTB/SmolLM2-135M"
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^<!--\s*test:\s*(gpu|skip|needs)\b\s*(.*?)\s*-->\s*$")
RUNNABLE = {"python", "bash", "sh", "shell"}


def snippets(path: Path) -> list[dict]:
    """Fenced code blocks with their language, first line number and marker (kind, argument) or None."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.match(prev.strip())
        blocks.append({"lang": lang, "line": start + 1, "code": "\n".join(lines[start + 1:j]),
                       "marker": (marker.group(1), marker.group(2)) if marker else None})
        i = j + 1
    return blocks


def test_parser_reads_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n<!-- test: gpu (needs CUDA) -->\n```bash\necho a\n```\n\n```python\nx = 1\n```\n"
                   "```\nplain\n```\n")
    blocks = snippets(doc)
    assert [(b["lang"], b["marker"]) for b in blocks] == [("bash", ("gpu", "(needs CUDA)")), ("python", None),
                                                           ("", None)]
    assert blocks[1]["code"] == "x = 1"


@pytest.mark.parametrize("name", FILES)
def test_every_snippet_has_a_language_and_marks_are_explained(name):
    for block in snippets(ROOT / name):
        where = f"{name}:{block['line']}"
        if block["marker"] is None and block["lang"] == "":
            code = block["code"]
            # Plain blocks are for trees and output only, never for commands.
            assert not re.search(r"^\s*(pip|python|import |from |convert-to-gqa|accelerate)", code, re.M), where
        if block["marker"] and block["marker"][0] in ("gpu", "skip"):
            assert block["marker"][1].startswith("(") and len(block["marker"][1]) > 4, f"{where}: say why"


def _tiny_checkpoint(dst: Path) -> None:
    import torch
    import transformers

    ug = load_file("examples/uptrain_gqa.py")
    texts = [Path(f).read_text(errors="ignore") for f in ug.stdlib_files(40)]
    tokenizer = ug.train_tokenizer(texts, vocab_size=512, max_chars=200_000)
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(dst)
    tokenizer.save_pretrained(dst)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mha"
    _tiny_checkpoint(path)
    return path


def _workdir(tmp_path: Path, checkpoint: Path) -> Path:
    (tmp_path / "ckpt").mkdir()
    shutil.copytree(checkpoint, tmp_path / "ckpt" / "mha")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return tmp_path


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # `python` and the console scripts (convert-to-gqa, hf-attn-plugin-demo) of the interpreter running the tests.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    # The checkout under test first (an older editable install may map only some of its packages).
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TRITON_INTERPRET", None)  # the snippets run as a user runs them: reference backend on CPU
    return env


def _runnable(block) -> bool:
    if block["lang"] not in RUNNABLE:
        return False
    if block["marker"] is None:
        return True
    kind, arg = block["marker"]
    return kind == "needs" and importlib.util.find_spec(arg.split()[0]) is not None


def run_snippets(doc: Path, work: Path) -> int:
    """Run the runnable snippets of ``doc`` in ``work``; AssertionError on the first failure. Returns how many ran."""
    blocks = [b for b in snippets(doc) if _runnable(b)]
    ran = 0
    python = [b for b in blocks if b["lang"] == "python"]
    if python:
        script = "\n\n".join(f"# --- {doc.name}:{b['line']}\n{b['code']}" for b in python)
        script = script.replace(HUB_ID, str(work / "ckpt" / "mha"))
        proc = subprocess.run([sys.executable, "-c", script], cwd=work, env=_env(), capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"{doc}: python snippets failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        ran += len(python)
    for b in blocks:
        if b["lang"] == "python":
            continue
        code = b["code"].replace(HUB_ID, str(work / "ckpt" / "mha"))
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=_env(), capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, f"{doc}:{b['line']} failed:\n{code}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        ran += 1
    return ran


@pytest.mark.parametrize("name", FILES)
def test_snippets_run(name, tmp_path, checkpoint):
    blocks = [b for b in snippets(ROOT / name) if b["lang"] in RUNNABLE]
    assert blocks, f"{name} has no snippets"
    ran = run_snippets(ROOT / name, _workdir(tmp_path, checkpoint))
    if not ran and name == "docs/uptraining.md" and importlib.util.find_spec("datasets") is None:
        pytest.skip("docs/uptraining.md's smoke run needs datasets (pip install -e \".[train]\")")
    assert ran, f"{name}: no snippet ran"


@pytest.mark.parametrize("code", [
    "```python\nimport torch\nout = model.generate(**batch)\n```\n",  # undefined names, as the old paged snippet had
    "```bash\nconvert-to-gqa ckpt/missing ckpt/out --num-kv-heads 2\n```\n",
])
def test_runner_catches_a_broken_snippet(tmp_path, checkpoint, code):
    doc = tmp_path / "bad.md"
    doc.write_text(code)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(AssertionError, match="failed"):
        run_snippets(doc, _workdir(work, checkpoint))


def test_readme_tables_match_benchmark_results():
    """The README's tables are what benchmarks/report.py makes of benchmarks/results/*.csv (no typed numbers)."""
    report = load_file("benchmarks/report.py")
    text = (ROOT / "README.md").read_text()
    assert f"{report.GUIDE_START}\n{report.guide_section()}\n{report.GUIDE_END}" in text, \
        "run `python benchmarks/report.py` to regenerate the README's tables"
    assert f"{report.START}\n{report.render()}\n{report.END}" in text, \
        "run `python benchmarks/report.py` to regenerate the README's tables"
