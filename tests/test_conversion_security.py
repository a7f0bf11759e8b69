"""convert-to-gqa on hostile or careless inputs (issue 14, converter items) and its command line (issue 13).

Every test here failed before its fix: paths escaping the output through the index, symlinks followed,
stale weights copied, umask ignored, killed runs' temp directories never removed, tracebacks (exit 1) for
user errors, --verify errors after the output was written, a slow --help, and silent no-op conversions.
"""

from __future__ import annotations

import configparser
import errno
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from hf_attn_plugin.conversion import ConversionError, convert_to_gqa
from hf_attn_plugin.conversion import api as conversion_api
from hf_attn_plugin.conversion import io as conversion_io
from hf_attn_plugin_cli.convert_to_gqa import main as cli_main

REPO = Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
TOKENS = torch.tensor([[3, 17, 42, 5, 88, 1, 60, 23]])


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A tiny sharded MHA Llama (8 heads) with a generation config."""
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=96,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size="60KB")
    return path


def _copy(source: Path, tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(source, dst)
    return dst


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _run_cli(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process (so monkeypatches apply): exit status and stderr."""
    status = cli_main([*args, "--quiet"])
    return status, capsys.readouterr().err


# ---- 1. shard names from the index stay inside the source directory ----------------------------------------


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "subdir", "dot", "not a shard", "not a string"])
def test_index_shard_names_must_be_plain_file_names(kind, source, tmp_path, capsys):
    """A weight_map entry pointing outside the source used to be read, and written to, outside the output."""
    src = _copy(source, tmp_path)
    sibling = _copy(source, tmp_path, "sibling")  # another checkpoint that must not be touched
    victim = sibling / "model-00001-of-00007.safetensors"
    shard = {
        "absolute": str(victim),
        "dotdot": "../sibling/model-00001-of-00007.safetensors",
        "subdir": "sub/model-00001-of-00007.safetensors",
        "dot": "..",
        "not a shard": "config.json",
        "not a string": 5,
    }[kind]
    (src / "sub").mkdir()
    shutil.copy(victim, src / "sub")
    index = json.loads((src / INDEX).read_text())
    for name, file in index["weight_map"].items():
        if file == "model-00001-of-00007.safetensors":
            index["weight_map"][name] = shard
    (src / INDEX).write_text(json.dumps(index))
    before = _tree(sibling)

    status, err = _run_cli(capsys, str(src), str(tmp_path / "out"), "-g", "2")
    assert status == 2 and err.count("\n") == 1, err
    assert "convert-to-gqa: error:" in err and repr(shard) in err
    assert "plain file name" in err or "does not end in .safetensors" in err
    assert _tree(sibling) == before
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sibling", "src"]


# ---- 2./3. only the files a checkpoint needs are copied; links followed only to needed regular files ---------


def test_symlinks_and_stray_files_are_not_copied(source, tmp_path):
    src = _copy(source, tmp_path)
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.txt").write_text("password")
    (outside / "folder" / "data.txt").write_text("private")
    (outside / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (src / "secret.txt").symlink_to(outside / "secret.txt")  # a link to a file the checkpoint does not need
    (src / "folder").symlink_to(outside / "folder")  # a link to a directory
    (src / "tokenizer.json").symlink_to(outside / "folder")  # an allow-listed name that is a directory
    (src / "tokenizer_config.json").symlink_to(outside / "tokenizer_config.json")  # needed: followed, copied
    (src / "notes").mkdir()
    (src / "notes" / "todo.txt").write_text("x")
    (src / "broken.json").symlink_to(tmp_path / "nowhere")
    # stale weights of other formats next to the safetensors (issue 14: pytorch_model.bin was copied)
    for stale in ["pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack",
                  "model.gguf", "consolidated.00.pth"]:
        (src / stale).write_bytes(b"stale weights")

    report = convert_to_gqa(src, tmp_path / "out", num_kv_heads=2, progress=False)
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["config.json", "generation_config.json", "tokenizer_config.json", INDEX]
        + [f"model-0000{i}-of-00007.safetensors" for i in range(1, 8)]
    )
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert report.copied == ["generation_config.json", "tokenizer_config.json"]
    assert set(report.skipped) == {
        "secret.txt", "folder/", "tokenizer.json/", "notes/", "broken.json", "pytorch_model.bin",
        "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack", "model.gguf", "consolidated.00.pth",
    }
    assert "not copied (not part of a checkpoint): " in report.summary()


def test_hugging_face_cache_snapshot_converts(source, tmp_path):
    """The hub cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>, sub-folders included."""
    repo = tmp_path / "hub" / "models--tiny--llama"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    files["tokenizer_config.json"] = b'{"model_max_length": 64}'
    files["additional_chat_templates/tool_use.jinja"] = b"{{ messages }}"
    for i, (rel, data) in enumerate(sorted(files.items())):
        (blobs / f"blob{i:04d}").write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / f"blob{i:04d}", link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")

    out = tmp_path / "out"
    report = convert_to_gqa(snapshot, out, num_kv_heads=4, progress=False)
    assert report.skipped == []
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert (out / "tokenizer_config.json").read_bytes() == files["tokenizer_config.json"]
    assert (out / "additional_chat_templates" / "tool_use.jinja").read_bytes() == b"{{ messages }}"
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 4
    assert _logits(out).isfinite().all()
    assert sorted(p.name for p in blobs.iterdir()) == [f"blob{i:04d}" for i in range(len(files))]  # untouched


# ---- 4. umask, and temp directories of killed runs -------------------------------------------------------------


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_output_modes_follow_the_umask(umask, dir_mode, file_mode, source, tmp_path):
    old = os.umask(umask)
    try:
        convert_to_gqa(source, tmp_path / "out", num_kv_heads=2, progress=False)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode  # was 0700 whatever the umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {file_mode}  # shards were 0600


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_directory_of_a_killed_run_is_removed(source, tmp_path, caplog):
    host = socket.gethostname()
    dead = tmp_path / f".out.convert-to-gqa-tmp.{_dead_pid()}@{host}"
    dead_old = tmp_path / f".out.convert-to-gqa-old.{_dead_pid()}@{host}"
    live_child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".out.convert-to-gqa-tmp.{live_child.pid}@{host}"
    elsewhere = tmp_path / ".out.convert-to-gqa-tmp.1@another-host"
    other_dst = tmp_path / f".out2.convert-to-gqa-tmp.{_dead_pid()}@{host}"
    try:
        for d in (dead, dead_old, live, elsewhere, other_dst):
            (d / "partial").mkdir(parents=True)
        with caplog.at_level(logging.WARNING, logger="hf_attn_plugin.conversion"):
            convert_to_gqa(source, tmp_path / "out", num_kv_heads=2, progress=False)
    finally:
        live_child.kill()
        live_child.wait()
    assert not dead.exists() and not dead_old.exists()
    assert live.exists() and elsewhere.exists() and other_dst.exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"removed {dead}, left behind by an interrupted run") for m in messages)
    assert any(m.startswith(f"left {live} alone") for m in messages)


def test_work_directory_is_named_after_destination_and_process(source, tmp_path, monkeypatch):
    seen = []
    write = conversion_api.write_shard

    def spy(path, tensors, metadata):
        seen.append(path.parent.name)
        write(path, tensors, metadata)

    monkeypatch.setattr(conversion_api, "write_shard", spy)
    convert_to_gqa(source, tmp_path / "out", num_kv_heads=2, progress=False)
    assert set(seen) == {f".out.convert-to-gqa-tmp.{os.getpid()}@{socket.gethostname()}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- 5. user errors: exit 2 and one line, never a traceback ----------------------------------------------------


def _break(src: Path, how: str) -> None:
    index = src / INDEX
    if how == "index not json":
        index.write_text('{"weight_map": ')
    elif how == "index a list":
        index.write_text("[1, 2]")
    elif how == "weight_map a list":
        index.write_text('{"weight_map": ["model-00001-of-00007.safetensors"]}')
    elif how == "config not json":
        (src / "config.json").write_text("{not json")
    elif how == "config binary":
        (src / "config.json").write_bytes(b"\xff\xfe\x00binary")
    elif how == "config a list":
        (src / "config.json").write_text("[]")
    elif how in ("heads a string", "heads zero"):
        config = json.loads((src / "config.json").read_text())
        config["num_attention_heads"] = "8" if how == "heads a string" else 0
        (src / "config.json").write_text(json.dumps(config))
    elif how == "config a directory":
        (src / "config.json").unlink()
        (src / "config.json").mkdir()


@pytest.mark.parametrize(
    "how, message",
    [
        ("index not json", "model.safetensors.index.json is not valid JSON"),
        ("index a list", "model.safetensors.index.json must hold a JSON object, not a list"),
        ("weight_map a list", "has no weight_map"),
        ("config not json", "config.json is not valid JSON"),
        ("config binary", "config.json is not UTF-8 text"),
        ("config a list", "config.json must hold a JSON object (the model configuration), not a list"),
        ("heads a string", "'num_attention_heads' must be a positive integer, got '8'"),
        ("heads zero", "'num_attention_heads' must be a positive integer, got 0"),
        ("config a directory", "has no config.json"),
    ],
)
def test_malformed_json_is_a_clear_error(how, message, source, tmp_path, capsys):
    src = _copy(source, tmp_path)
    _break(src, how)
    status, err = _run_cli(capsys, str(src), str(tmp_path / "out"), "-g", "2")
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err
    assert not (tmp_path / "out").exists()


def test_destination_problems_are_clear_errors(source, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    status, err = _run_cli(capsys, str(source), str(tmp_path / "a_file" / "out"), "-g", "2")
    assert status == 2 and err.strip() == f"convert-to-gqa: error: cannot create {tmp_path}/a_file/out: " \
                                          f"{tmp_path}/a_file is not a directory"

    for target in (tmp_path / "missing", tmp_path / "missing" / "deeper"):  # dangling links as DST
        link = tmp_path / "link"
        link.symlink_to(target)
        status, err = _run_cli(capsys, str(source), str(link), "-g", "2")
        assert status == 2 and err.count("\n") == 1 and "is a symbolic link" in err, err
        assert link.is_symlink() and not target.exists()
        link.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_unwritable_parent_is_a_clear_error(source, tmp_path, capsys, monkeypatch):
    """As root the permission check passes, so the failing mkdir is simulated."""

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(conversion_io.os, "mkdir", refuse)
    status, err = _run_cli(capsys, str(source), str(tmp_path / "out"), "-g", "2")
    assert status == 2 and err.count("\n") == 1, err
    assert err.startswith(f"convert-to-gqa: error: cannot write {tmp_path}/out: ") and "Permission denied" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["safetensors", "copy"])
def test_disk_full_is_a_clear_error_and_leaves_nothing(how, source, tmp_path, capsys, monkeypatch):
    src = _copy(source, tmp_path)
    (src / "tokenizer_config.json").write_text("{}")
    if how == "safetensors":  # what safetensors 0.8 raises on a full tmpfs
        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(conversion_io, "save_file", full)
    else:
        def full(src_path, dst_path, *args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst_path))

        monkeypatch.setattr(conversion_io.shutil, "copyfile", full)
    status, err = _run_cli(capsys, str(src), str(tmp_path / "out"), "-g", "2")
    assert status == 2 and err.count("\n") == 1, err
    assert f"no space left on the device of {tmp_path} while writing the output (it needs about" in err
    assert "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---- 6. --verify problems are found before anything is written ------------------------------------------------


def test_bad_verify_text_is_refused_before_writing(source, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ConversionError, match=r"verify text \(--verify-text\) is shorter than two tokens"):
        convert_to_gqa(source, tmp_path / "out", num_kv_heads=2, verify=True, verify_text="", progress=False)
    assert not (tmp_path / "out").exists()
    status, err = _run_cli(capsys, str(source), str(tmp_path / "out"), "-g", "2", "--verify",
                           "--verify-text", str(tmp_path / "empty.txt"))
    assert status == 2 and "shorter than two tokens" in err and not (tmp_path / "out").exists()
    status, err = _run_cli(capsys, str(source), str(tmp_path / "out"), "-g", "2", "--verify",
                           "--verify-text", str(tmp_path / "missing.txt"))
    assert status == 2 and err.strip().startswith("convert-to-gqa: error: cannot read --verify-text")
    with pytest.raises(SystemExit) as exit_:
        cli_main([str(source), str(tmp_path / "out"), "-g", "2", "--verify-text", str(tmp_path / "empty.txt")])
    assert exit_.value.code == 2 and "--verify-text is only used with --verify" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_failing_verification_leaves_nothing(source, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ConversionError("verification failed")

    monkeypatch.setattr(conversion_api, "verify_conversion", broken)
    with pytest.raises(ConversionError, match="verification failed"):
        convert_to_gqa(source, tmp_path / "out", num_kv_heads=2, verify=True, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_verify_checks_the_output_before_it_is_renamed_into_place(source, tmp_path, monkeypatch):
    checked = []
    real = conversion_api.verify_conversion

    def spy(src, dst, ids, progress=False):
        checked.append((dst.name, (tmp_path / "out").exists()))
        return real(src, dst, ids, progress)

    monkeypatch.setattr(conversion_api, "verify_conversion", spy)
    report = convert_to_gqa(source, tmp_path / "out", num_kv_heads=2, verify=True, progress=False)
    assert checked == [(f".out.convert-to-gqa-tmp.{os.getpid()}@{socket.gethostname()}", False)]
    assert report.verify.max_abs_logit_diff > 0 and (tmp_path / "out" / "config.json").is_file()


# ---- 7.-9. the command line: instant --help, no silent no-op, progress, teaching help ---------------------------


def _console_script_target() -> tuple[str, str]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(
        line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines()
    )
    module, func = scripts["convert-to-gqa"].split(":")
    return module, func


@pytest.mark.parametrize("args", [["--help"], ["src-only"], ["a", "b", "-g", "zero"], ["a", "b", "-g", "0"]])
def test_help_and_usage_errors_import_neither_torch_nor_transformers(args):
    """`convert-to-gqa --help` took 6 s: torch and transformers loaded before the arguments were read."""
    module, func = _console_script_target()
    code = (
        f"import sys\nfrom {module} import {func} as main\n"
        f"try:\n    main({args!r})\nexcept SystemExit as e:\n    status = e.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors', 'hf_attn_plugin') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'STATUS', status)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert run.stdout.strip().splitlines()[-1] == f"HEAVY [] STATUS {0 if args == ['--help'] else 2}", run
    if args == ["--help"]:
        assert "examples:" in run.stdout and "--dry-run" in run.stdout and "exit status" in run.stdout


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    text = capsys.readouterr().out
    for needle in ["convert-to-gqa ./llama-mha ./llama-gqa8 --num-kv-heads 8 --dry-run", "--verify-text",
                   "--grouping similarity", "Hugging Face cache snapshot", "pytorch_model.bin", "uptrain"]:
        assert needle in text


def test_no_op_conversion_is_refused_by_the_cli(source, tmp_path, capsys):
    status, err = _run_cli(capsys, str(source), str(tmp_path / "out"), "-g", "8")
    assert status == 2 and err.strip() == (
        "convert-to-gqa: error: the checkpoint already has 8 KV heads, so --num-kv-heads 8 would change "
        "nothing; choose one of 1, 2, 4"
    )
    assert not (tmp_path / "out").exists()


def test_progress_bars_for_shards_and_verification(source, tmp_path, capsys):
    convert_to_gqa(source, tmp_path / "out", num_kv_heads=2, verify=True, progress=True)
    err = capsys.readouterr().err
    assert "converting shards: 100%" in err and "7/7" in err
    assert "verifying: 100%" in err and "2/2" in err
