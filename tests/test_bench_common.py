"""The house rules of benchmarks/ and the helpers the scripts and the tests share (benchmarks/common.py,
tests/helpers.py): CSV tables that refuse to mix columns, run metadata, the FA2 error rule, scripts that import the
installed package (no ``sys.path`` edits) and logs kept out of benchmarks/results/."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys

import pytest
import torch

from .helpers import ROOT, assert_fa2_rule, kernels_run_on, load_file

common = load_file("benchmarks/common.py", "benchmarks_common")


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_append_rows_writes_the_header_once_and_refuses_other_columns(tmp_path):
    path = tmp_path / "t.csv"
    common.append_rows(path, [{"a": 1, "b": 2}])
    common.append_rows(path, [{"a": 3}], ["a", "b"])  # a missing value is written empty
    assert _read(path) == [["a", "b"], ["1", "2"], ["3", ""]]
    with pytest.raises(ValueError, match=r"has the columns \['a', 'b'\], but this run writes \['a', 'c'\]"):
        common.append_rows(path, [{"a": 4, "c": 5}])
    with pytest.raises(ValueError, match="but this run writes"):  # the same names in another order: refused too
        common.append_rows(path, [{"b": 4, "a": 5}])
    with pytest.raises(ValueError):  # a column the header does not have
        common.append_rows(path, [{"a": 4, "b": 5, "c": 6}], ["a", "b"])
    assert _read(path) == [["a", "b"], ["1", "2"], ["3", ""]]  # nothing written by the refused calls
    common.append_rows(path, [])  # nothing to write: no change
    assert len(_read(path)) == 3


def test_write_rows_takes_every_rows_columns(tmp_path):
    path = tmp_path / "t.csv"
    common.write_rows(path, [{"a": 1}, {"a": 2, "b": 3}])
    assert _read(path) == [["a", "b"], ["1", ""], ["2", "3"]]
    common.write_rows(path, [{"x": 1}])  # rewritten, not appended
    assert _read(path) == [["x"], ["1"]]


def test_run_meta_gives_the_columns_asked_in_order():
    meta = common.run_meta("torch", "date", "device", date_format="%Y")
    assert list(meta) == ["torch", "date", "device"]
    assert meta["torch"] == torch.__version__ and re.fullmatch(r"\d{4}", meta["date"])
    assert common.run_meta("gpu", device="cpu") == {"gpu": "cpu"}
    with pytest.raises(ValueError, match="unknown field.*'gpus'.*known: gpu, device"):
        common.run_meta("gpus")


def test_timed_returns_seconds_and_result():
    seconds, result = common.timed(lambda: 7, "cpu")
    assert result == 7 and 0 <= seconds < 1


def test_llama_1b_shapes_on_cpu():
    model = common.llama_1b(1, device="cpu", dtype=torch.float32, hidden_size=64, intermediate_size=64,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (1, 4, 2)
    assert config.max_position_embeddings == 4096 and next(model.parameters()).device.type == "cpu"


def test_fa2_rule():
    ref = torch.zeros(4, dtype=torch.float64)
    low = torch.tensor([0.0, 1e-3, 0.0, 0.0])  # PyTorch at the kernel's dtype: 1e-3 off
    assert_fa2_rule(torch.tensor([0.0, 0.0, -2e-3, 0.0]), ref, low)  # within 2 * 1e-3 + 1e-5
    with pytest.raises(AssertionError, match=r"dq: err 2\.1\d*e-03 > 2 \* 1\.000e-03 \+ 1e-05"):
        assert_fa2_rule(torch.tensor([0.0, 0.0, 0.0, 2.1e-3]), ref, low, "dq")
    exact = torch.zeros(4)  # PyTorch exact: only the absolute slack is left
    assert_fa2_rule(torch.tensor([0.0, 0.0, 2e-4, 0.0]), ref, exact, "dk", atol=3e-4)
    with pytest.raises(AssertionError, match=r"dk: err 2\.0+e-04 > 2 \* 0\.000e\+00 \+ 1e-05"):
        assert_fa2_rule(torch.tensor([0.0, 0.0, 2e-4, 0.0]), ref, exact, "dk")


def test_kernels_run_on():
    assert kernels_run_on("cuda") == torch.cuda.is_available()
    assert kernels_run_on("cpu") == (os.environ.get("TRITON_INTERPRET") == "1")


SYS_PATH_EDIT = re.compile(r"sys\.path\s*(\.\s*(insert|append|extend|remove|pop)\s*\(|\[[^\]]*\]\s*=|\+?=)")


def test_no_sys_path_edits_in_scripts_and_tests():
    """Scripts import the installed package (`pip install -e .`) and load examples/benchmarks files by path."""
    offenders = []
    for folder in ("benchmarks", "tests", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if SYS_PATH_EDIT.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "sys.path edits:\n" + "\n".join(offenders)
    for edit in (".insert(0, str(ROOT))", ".append(folder)", " = [folder]", "[:0] = [folder]", " += [folder]"):
        assert SYS_PATH_EDIT.search("sys.path" + edit), edit  # the pattern catches what it is for


def test_results_hold_tables_and_plots_only():
    """Logs of benchmark runs live in benchmarks/logs/, beside the results, not among them."""
    others = [p.name for p in (ROOT / "benchmarks" / "results").iterdir() if p.suffix not in (".csv", ".png")]
    assert not others, f"move these to benchmarks/logs/: {others}"


def test_every_benchmark_script_imports_as_its_command_line_does(tmp_path):
    """`python benchmarks/x.py` sees benchmarks/ (common, sibling scripts) and the installed package: importing
    every script that way (PYTHONPATH stands in for the script's folder) resolves all their imports."""
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
