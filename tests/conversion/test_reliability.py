"""Damaged checkpoints and bad invocations, one class of failure per case (issue #12): every case must end with a
non-zero exit, exactly one clean `dsv4-convert: ...` line that names the file / tensor / field (no traceback), no
destination, no temporary folder or lock left (except the documented `--resume` folder, which the message names),
and the source byte-for-byte unchanged."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4_cli import convert_main
from modeling_deepseek_v4.conversion.checkpoint import temp_dir_for
from tests.conftest import tiny_config, tiny_model
from tests.conversion.official_synth import (
    INDEX_NAME,
    corrupt_header,
    make_official_checkpoint,
    rename_tensor,
    truncate_file,
)

SHARD1 = "model-00001-of-00003.safetensors"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_official_checkpoint(tmp_path_factory.mktemp("pristine") / "official", tiny_config(), n_shards=3).folder


@pytest.fixture(scope="module")
def plugin_pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugin") / "model"
    tiny_model().save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (links as links) -> content hash: the source must come out of a failure unchanged."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "link:" + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def shard_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][name]


def rewrite_header(path: Path, mutate) -> None:
    """Apply `mutate(header_dict)` to a shard's JSON header, keeping the data bytes as they are."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    mutate(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def edit_tensor(folder: Path, name: str, change) -> None:
    """Replace tensor `name` in its shard by `change(tensor)` (same name; the index stays valid)."""
    path = shard_of(folder, name)
    tensors = load_file(path)
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(path), metadata={"format": "pt"})


def add_tensors(folder: Path, shard: str, new: dict[str, torch.Tensor]) -> None:
    tensors = load_file(folder / shard)
    tensors.update(new)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"].update(dict.fromkeys(new, shard))
    (folder / INDEX_NAME).write_text(json.dumps(index))


def set_bytes(tensor: torch.Tensor, value: int) -> torch.Tensor:
    tensor.view(torch.uint8).reshape(-1)[0] = value
    return tensor


def set_config(key: str, value):
    def damage(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))

    return damage


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = convert_main([*argv, *([] if argv[0] == "verify" else ["--no-progress"])])
    return code, capsys.readouterr().err


def assert_clean(code: int, err: str, match: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("dsv4-convert: "), lines
    assert __import__("re").search(match, lines[0]), (match, lines[0])
    return lines[0]


def assert_nothing_left(dst: Path) -> None:
    assert not os.path.lexists(dst)
    assert not temp_dir_for(dst).exists()
    assert not (dst.parent / f".{dst.name}.dsv4-lock").exists()


# (id, damage applied to a copy of the official folder, what the error line must name)
TO_HF_CASES = [
    ("missing-shard", lambda f: (f / SHARD1).unlink(), rf"{SHARD1}: shard listed .* is missing"),
    ("shard-is-a-folder", lambda f: ((f / SHARD1).unlink(), (f / SHARD1).mkdir()), r"is not a file"),
    ("truncated-shard", lambda f: truncate_file(f / SHARD1, 100), rf"{SHARD1}: .*(truncated|outside the file)"),
    ("header-length", lambda f: corrupt_header(f / SHARD1, "length"), rf"{SHARD1}: corrupt safetensors header"),
    ("header-json", lambda f: corrupt_header(f / SHARD1, "json"), rf"{SHARD1}: corrupt safetensors header"),
    (
        "negative-offset",
        lambda f: rewrite_header(f / SHARD1, lambda h: h["embed.weight"].update(data_offsets=[-8, 0])),
        r"'embed.weight' has data_offsets \[-8, 0\]",
    ),
    (
        "overlapping-offsets",
        lambda f: rewrite_header(
            f / SHARD1, lambda h: h["layers.0.attn_norm.weight"].update(data_offsets=h["embed.weight"]["data_offsets"])
        ),
        r"(overlaps|wrong byte size|spans)",
    ),
    (
        "gap-in-offsets",
        lambda f: rewrite_header(
            f / SHARD1,
            lambda h: [h.pop("layers.0.attn_norm.weight")],
        ),
        rf"{SHARD1}: tensor .* leaves a gap",
    ),
    (
        "entry-without-shape",
        lambda f: rewrite_header(f / SHARD1, lambda h: h["embed.weight"].pop("shape")),
        r"'embed.weight' has a malformed header entry",
    ),
    (
        "shape-not-a-list",
        lambda f: rewrite_header(f / SHARD1, lambda h: h["embed.weight"].update(shape="97x64")),
        r"'embed.weight' has shape '97x64'",
    ),
    (
        "unknown-dtype",
        lambda f: rewrite_header(f / SHARD1, lambda h: h["embed.weight"].update(dtype="F7")),
        r"'embed.weight' has dtype 'F7'",
    ),
    (
        "metadata-not-strings",
        lambda f: rewrite_header(f / SHARD1, lambda h: h.update(__metadata__={"format": 1})),
        r"__metadata__",
    ),
    ("index-not-json", lambda f: (f / INDEX_NAME).write_text("{not json"), rf"{INDEX_NAME}: unreadable index"),
    (
        "index-wrong-types",
        lambda f: (f / INDEX_NAME).write_text(json.dumps({"weight_map": ["embed.weight"]})),
        r"no `weight_map` object",
    ),
    (
        "index-path-escapes",
        lambda f: (f / INDEX_NAME).write_text(json.dumps({"weight_map": {"embed.weight": "../x.safetensors"}})),
        r"mapped to '../x.safetensors'",
    ),
    (
        "index-wrong-shard",
        lambda f: (f / INDEX_NAME).write_text(
            json.dumps(
                {
                    "weight_map": {
                        **json.loads((f / INDEX_NAME).read_text())["weight_map"],
                        "embed.weight": "model-00002-of-00003.safetensors",
                    }
                }
            )
        ),
        r"'embed.weight' is mapped to model-00002-of-00003.safetensors but that shard does not contain it",
    ),
    (
        "nan-in-bf16",
        lambda f: edit_tensor(f, "embed.weight", lambda t: t.index_fill_(0, torch.tensor([3]), float("nan"))),
        r"'embed.weight' \(BF16 \[97, 64\]\) holds 64 NaN or infinite",
    ),
    (
        "inf-in-f32",
        lambda f: edit_tensor(f, "layers.0.hc_attn_fn", lambda t: t.fill_(float("inf"))),
        r"'layers.0.hc_attn_fn' .* NaN or infinite",
    ),
    (
        "fp8-nan-code",
        lambda f: edit_tensor(f, "layers.0.attn.wq_a.weight", lambda t: set_bytes(t, 0x7F)),
        r"'layers.0.attn.wq_a.weight' \(F8_E4M3 .* holds 1 NaN",
    ),
    (
        "e8m0-nan-scale",
        lambda f: edit_tensor(f, "layers.0.attn.wq_a.scale", lambda t: set_bytes(t, 0xFF)),
        r"'layers.0.attn.wq_a.scale' \(F8_E8M0 .* holds 1 NaN",
    ),
    (
        "tid2eid-out-of-range",
        lambda f: edit_tensor(f, "layers.0.ffn.gate.tid2eid", lambda t: t.fill_(7)),
        r"'layers.0.ffn.gate.tid2eid' holds expert ids in \[7, 7\], outside \[0, 4\)",
    ),
    (
        "fp8-weight-without-scale",
        lambda f: rewrite_header_drop(f, "layers.0.attn.wq_a.scale"),
        r"FP8 weight 'layers.0.attn.wq_a.weight' has no scale",
    ),
    (
        "scale-wrong-shape",
        lambda f: edit_tensor(f, "layers.2.ffn.experts.0.w1.scale", lambda t: t[:, :1].contiguous()),
        r"scale 'layers.2.ffn.experts.0.w1.scale' is F8_E8M0 \[32, 1\]; .* needs F8_E8M0 or F32 \[32, 2\]",
    ),
    (
        "scale-wrong-dtype",
        lambda f: edit_tensor(f, "layers.0.attn.wq_a.scale", lambda t: t.to(torch.bfloat16)),
        r"scale 'layers.0.attn.wq_a.scale' is BF16",
    ),
    (
        "bf16-weight-with-scale",
        lambda f: edit_tensor(f, "layers.0.attn.wq_a.weight", lambda t: t.to(torch.bfloat16)),
        r"'layers.0.attn.wq_a.weight' is stored in BF16 but has a scale",
    ),
    (
        "extra-expert",
        lambda f: add_tensors(
            f,
            "model-00002-of-00003.safetensors",
            {
                "layers.2.ffn.experts.4.w2.weight": torch.zeros(64, 16, dtype=torch.int8),
                "layers.2.ffn.experts.4.w2.scale": torch.ones(64, 1).to(torch.float8_e8m0fnu),
            },
        ),
        r"'layers.2.ffn.experts.4.w2.weight' is routed expert 4, but config.json declares n_routed_experts=4",
    ),
    (
        "unknown-tensor",
        lambda f: rename_tensor(f, "layers.0.attn_norm.weight", "layers.0.attn_nrm.weight"),
        r"unknown tensor 'layers.0.attn_nrm.weight'",
    ),
    ("config-not-json", lambda f: (f / "config.json").write_text("{"), r"config.json: unreadable JSON"),
    ("config-bad-value", set_config("compress_ratios", [0, 0, 4, 7, 4, 0]), r"invalid `compress_ratios`"),
    ("config-string-for-int", set_config("hidden_size", "64"), r"invalid `hidden_size`='64'; expected an int"),
    (
        "config-quoted-mtp-count",
        set_config("num_nextn_predict_layers", "1"),
        r"invalid `num_nextn_predict_layers`='1'; expected an int",
    ),
    ("config-v41", set_config("model_type", "deepseek_v41"), r"DeepSeek-V4.1.*(not supported|out of scope)"),
    (
        "link-outside-source",
        lambda f: ((f / "tokenizer.json").unlink(), (f / "tokenizer.json").symlink_to("/etc/hostname")),
        r"tokenizer.json: a link to .* outside the source folder",
    ),
]


def rewrite_header_drop(folder: Path, name: str) -> None:
    """Remove a tensor from its shard (and the index) the way a half-written shard would lack it."""
    from tests.conversion.official_synth import drop_tensor

    drop_tensor(folder, name)


@pytest.mark.parametrize("damage,match", [c[1:] for c in TO_HF_CASES], ids=[c[0] for c in TO_HF_CASES])
def test_damaged_official_checkpoint(pristine, tmp_path, capsys, damage, match):
    src, dst = tmp_path / "src", tmp_path / "out" / "dst"
    shutil.copytree(pristine, src, symlinks=True)
    dst.parent.mkdir()
    damage(src)
    before = snapshot(src)
    code, err = run_cli(capsys, ["to-hf", str(src), str(dst), "--dtype", "keep"])
    assert_clean(code, err, match)
    assert_nothing_left(dst)
    assert snapshot(src) == before
    # The direct load refuses the same checkpoints, with the same message.
    from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM

    # Side files are not part of a load; an unreadable config.json is not recognisable as official (transformers'
    # own loader then reports it).
    if "link" not in match and "config.json: unreadable" not in match:
        with pytest.raises(ValueError, match=match):
            DeepseekV4ExtForCausalLM.from_pretrained(src)


def _plugin_copy(pristine: Path, tmp_path: Path) -> Path:
    src = tmp_path / "plugin"
    shutil.copytree(pristine, src)
    return src


def _edit_plugin(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


TO_OFFICIAL_CASES = [
    (
        "missing-tensor",
        lambda f: _edit_plugin(f, lambda t: t.pop("model.layers.1.input_layernorm.weight")),
        r"\['model.layers.1.input_layernorm.weight'\] are missing",
    ),
    (
        "missing-expert-bank",
        lambda f: _edit_plugin(f, lambda t: t.pop("model.layers.2.mlp.experts.gate_up_proj")),
        r"'model.layers.2.mlp.experts.gate_up_proj'\] are missing",
    ),
    (
        "wrong-shape",
        lambda f: _edit_plugin(f, lambda t: t.update({"model.norm.weight": torch.ones(65)})),
        r"'model.norm.weight' has shape \[65\], the config implies \[64\]",
    ),
    (
        "fp8-in-a-dense-folder",
        lambda f: _edit_plugin(
            f, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.float8_e4m3fn)})
        ),
        r"'model.norm.weight' is stored as F8_E4M3",
    ),
    (
        "non-finite-values",
        lambda f: _edit_plugin(f, lambda t: t["model.layers.3.self_attn.sinks"].fill_(float("nan"))),
        r"'model.layers.3.self_attn.sinks' .* NaN or infinite",
    ),
    (
        "unexplained-tensor",
        lambda f: _edit_plugin(f, lambda t: t.update({"model.layers.0.lora_A.weight": torch.zeros(2, 2)})),
        r"\['model.layers.0.lora_A.weight'\] are not parameters of this config",
    ),
    ("no-config", lambda f: (f / "config.json").unlink(), r"plugin: no config.json"),
]


@pytest.mark.parametrize("damage,match", [c[1:] for c in TO_OFFICIAL_CASES], ids=[c[0] for c in TO_OFFICIAL_CASES])
def test_damaged_plugin_folder_is_not_exported(plugin_pristine, tmp_path, capsys, damage, match):
    src, dst = _plugin_copy(plugin_pristine, tmp_path), tmp_path / "official"
    damage(src)
    before = snapshot(src)
    code, err = run_cli(capsys, ["to-official", str(src), str(dst)])
    assert_clean(code, err, match)
    assert_nothing_left(dst)
    assert snapshot(src) == before
    if "config" not in match:  # verify reports the same problem
        code, err = run_cli(capsys, ["verify", str(src)])
        assert_clean(code, err, match)


def test_verify_never_sends_a_missing_local_path_to_the_hub(capsys):
    started = time.monotonic()
    code, err = run_cli(capsys, ["verify", "no-such-org/no-such-model"])
    assert_clean(code, err, r"no-such-org/no-such-model: does not exist")
    assert time.monotonic() - started < 5


DESTINATION_CASES = ["exists", "dangling-link", "missing-parent", "read-only", "locked", "missing-source"]


@pytest.mark.parametrize("case", DESTINATION_CASES)
def test_bad_destination_or_source(pristine, tmp_path, capsys, monkeypatch, case):
    src, dst = pristine, tmp_path / "dst"
    before = snapshot(src)
    match = {
        "exists": r"dst: already exists",
        "dangling-link": r"dst: is a link to a missing target",
        "missing-parent": r"missing: the destination's parent folder does not exist",
        "read-only": r"cannot write here \(no permission or a read-only file system\)",
        "locked": r"another conversion \(process \d+\) is writing this destination",
        "missing-source": r"nowhere: does not exist",
    }[case]
    if case == "exists":
        dst.mkdir()
    elif case == "dangling-link":
        dst.symlink_to(tmp_path / "gone")
    elif case == "missing-parent":
        dst = tmp_path / "missing" / "dst"
    elif case == "read-only":
        # Also as root (CI), where permission bits do not bind: the check asks the OS the way a non-root user would.
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    elif case == "locked":
        (tmp_path / ".dst.dsv4-lock").write_text(str(os.getppid()))
    elif case == "missing-source":
        src = tmp_path / "nowhere"
    code, err = run_cli(capsys, ["to-hf", str(src), str(dst)])
    assert_clean(code, err, match)
    if case == "exists":
        assert dst.is_dir() and not any(dst.iterdir())
    elif case == "dangling-link":
        assert dst.is_symlink()
    elif case == "locked":
        assert (tmp_path / ".dst.dsv4-lock").exists()  # someone else's lock is left alone
    else:
        assert_nothing_left(dst)
    if src.exists():
        assert snapshot(src) == before


def test_stale_lock_of_a_dead_process_is_taken_over(pristine, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".dst.dsv4-lock").write_text(str(dead.pid))
    code, err = run_cli(capsys, ["to-hf", str(pristine), str(tmp_path / "dst")])
    assert code == 0, err
    assert not (tmp_path / ".dst.dsv4-lock").exists()


def _interrupt_after(monkeypatch, n: int, exc: BaseException) -> None:
    from modeling_deepseek_v4.conversion.checkpoint import ShardedWriter

    original, calls = ShardedWriter.add, {"n": 0}

    def add(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedWriter, "add", add)


def test_resume_refuses_other_options_or_a_changed_source(pristine, tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(pristine, src)
    argv = ["to-hf", str(src), str(dst), "--dtype", "bf16", "--shard-size", "20KB"]
    _interrupt_after(monkeypatch, 60, KeyboardInterrupt())
    code, err = run_cli(capsys, argv)
    assert code == 130 and "rerun the same command with --resume" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    tmp = temp_dir_for(dst)
    kept = snapshot(tmp)
    code, err = run_cli(capsys, ["to-hf", str(src), str(dst), "--dtype", "fp32", "--shard-size", "20KB", "--resume"])
    assert_clean(code, err, r"cannot --resume: dtype was 'bf16', now 'fp32'")
    code, err = run_cli(capsys, [*argv[:-1], "30KB", "--resume"])
    assert_clean(code, err, r"cannot --resume: shard_size was 20000, now 30000")
    edit_tensor(src, "embed.weight", lambda t: t.reshape(-1)[:64].reshape(1, 64).repeat(97, 1))
    code, err = run_cli(capsys, [*argv, "--resume"])
    assert_clean(code, err, r"the source shards changed since \(model-00001-of-00003.safetensors\)")
    assert snapshot(tmp) == kept  # refusals never touch earlier progress
    assert not os.path.lexists(dst)


def test_disk_full_keeps_the_finished_shards_and_says_so(pristine, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "dst"
    _interrupt_after(monkeypatch, 40, OSError(errno.ENOSPC, "No space left on device"))
    code, err = run_cli(capsys, ["to-hf", str(pristine), str(dst), "--shard-size", "20KB"])
    line = assert_clean(code, err, r"No space left on device \(disk full: free space\); the finished shards are kept")
    assert str(temp_dir_for(dst)) in line and not dst.exists()
    monkeypatch.undo()
    code, err = run_cli(capsys, ["to-hf", str(pristine), str(dst), "--shard-size", "20KB", "--resume"])
    assert code == 0, err
    assert not temp_dir_for(dst).exists() and (dst / "config.json").exists()


def test_a_failure_under_resume_never_deletes_earlier_progress(pristine, tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "src", tmp_path / "dst"
    shutil.copytree(pristine, src)
    _interrupt_after(monkeypatch, 40, KeyboardInterrupt())
    argv = ["to-hf", str(src), str(dst), "--shard-size", "20KB"]
    assert run_cli(capsys, argv)[0] == 130
    monkeypatch.undo()
    kept = snapshot(temp_dir_for(dst))
    # The damage sits in the last shard, which the interrupted run never reached.
    edit_tensor(src, "head.weight", lambda t: t.fill_(float("nan")))
    code, err = run_cli(capsys, [*argv, "--resume"])
    assert code != 0 and "Traceback" not in err
    for name, digest in kept.items():
        if name.endswith(".safetensors"):
            assert snapshot(temp_dir_for(dst)).get(name) == digest, name


SIGTERM_CHILD = textwrap.dedent(
    """
    import sys, time
    from modeling_deepseek_v4.conversion.checkpoint import ShardedWriter
    original = ShardedWriter.add
    def slow(self, name, tensor):
        print("writing", flush=True)
        time.sleep(0.05)
        return original(self, name, tensor)
    ShardedWriter.add = slow
    from dsv4_cli import convert_main
    sys.exit(convert_main(sys.argv[1:]))
    """
)


def test_sigterm_stops_cleanly_and_keeps_the_resume_folder(pristine, tmp_path):
    dst = tmp_path / "dst"
    argv = ["to-hf", str(pristine), str(dst), "--shard-size", "20KB", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(20):
        assert proc.stdout.readline().startswith("writing")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert_clean(proc.returncode, err, r"dsv4-convert: interrupted; the finished shards are kept in .* --resume")
    assert temp_dir_for(dst).exists() and not dst.exists()
    assert not (tmp_path / ".dst.dsv4-lock").exists()


def test_provenance_names_no_private_path(pristine, tmp_path, capsys):
    code, err = run_cli(capsys, ["to-hf", str(pristine), str(tmp_path / "dst")])
    assert code == 0, err
    info = json.loads((tmp_path / "dst" / "dsv4_conversion.json").read_text())
    assert info["source"] == pristine.name and str(pristine.parent) not in json.dumps(info)
