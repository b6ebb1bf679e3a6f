"""`dsv4-convert to-hf` output is a self-contained custom-code folder (issue 11): the same custom code as
`save_pretrained` writes, the source's tokenizer files, chat template and `encoding/` helpers; it loads with
`trust_remote_code=True` where the package cannot be imported (local folder and offline Hub cache, as
tests/test_hub_custom_code.py), and `push_folder` publishes it without touching it."""

import errno
import json
import textwrap

import pytest
import torch

from modeling_deepseek_v4 import DeepseekV4ExtForCausalLM
from modeling_deepseek_v4.conversion import convert_official_to_plugin, to_plugin
from modeling_deepseek_v4.conversion.checkpoint import ConversionError, temp_dir_for
from modeling_deepseek_v4.model_cards import push_folder
from tests.conftest import tiny_config, tiny_model
from tests.conversion.official_synth import BOS_TOKEN, make_official_checkpoint
from tests.test_hub_custom_code import fake_hub_cache, run_offline

COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "encoding/encoding_dsv4.py",
    "encoding/README.md",
)
REPO = "dsv4-tests/converted-v4"

CHILD = textwrap.dedent(
    """
    import sys
    for name in ("modeling_deepseek_v4", "triton"):
        sys.modules[name] = None  # importing either now fails
    import torch
    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder, repo, ids_path, out_path = sys.argv[1:5]
    ids = torch.load(ids_path)
    logits = {}
    for where in (folder, repo):
        model = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(AutoConfig.from_pretrained(where, trust_remote_code=True)).__name__ == "DeepseekV4ExtConfig"
        assert type(AutoModel.from_pretrained(where, trust_remote_code=True)).__name__ == "DeepseekV4ExtModel"
        with torch.no_grad():
            logits[where] = model(ids, use_cache=False).logits
    torch.save([logits[folder], logits[repo]], out_path)
    """
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(official checkpoint, converted folder); fp32 so that logits compare tightly across processes."""
    root = tmp_path_factory.mktemp("converted")
    official = make_official_checkpoint(root / "official", tiny_config("flash"), n_shards=2)
    convert_official_to_plugin(official.folder, root / "hf", dtype="fp32", progress=False)
    return official, root / "hf"


def snapshot(folder):
    """Every file under `folder` with its bytes (what a dry run must leave unchanged)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_converted_folder_has_the_custom_code_of_save_pretrained(tmp_path, converted):
    _, folder = converted
    tiny_model().save_pretrained(tmp_path / "saved")
    saved = snapshot(tmp_path / "saved")
    files = snapshot(folder)
    config, saved_config = json.loads(files["config.json"]), json.loads(saved["config.json"])
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert config["auto_map"] == saved_config["auto_map"]
    code = {name for name in saved if name.endswith(".py")}
    assert {"modeling_deepseek_v4.py", "configuration_deepseek_v4.py", "ops.py"} <= code
    # The same flat modeling files (and no pip-only ones such as __init__.py), byte for byte, and requirements.
    assert {name for name in files if name.endswith(".py") and "/" not in name} == code
    for name in [*code, "requirements.txt"]:
        assert files[name] == saved[name], name
    assert not temp_dir_for(folder).exists()


def test_converted_folder_carries_the_source_tokenizer_template_and_encoding(converted):
    official, folder = converted
    for name in COPIED:
        assert (folder / name).read_bytes() == (official.folder / name).read_bytes(), name
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "t5 t7"}], tokenize=False, add_generation_prompt=True
    )
    assert text == f"{BOS_TOKEN}<user>t5 t7<assistant>"


def test_converted_folder_loads_without_the_package(tmp_path, converted):
    """Local folder and offline Hub snapshot, in a process where the package and Triton cannot be imported, give
    the logits of loading the folder with the package."""
    _, folder = converted
    fake_hub_cache(folder, tmp_path / "hub", repo=REPO)
    model = DeepseekV4ExtForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    torch.save(ids, tmp_path / "ids.pt")
    run = run_offline(CHILD, [str(folder), REPO, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    local, hub = torch.load(tmp_path / "out.pt")
    # Same weights and code; another process may pick other BLAS kernels (last-ulp differences).
    torch.testing.assert_close(local, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hub, expected, atol=1e-5, rtol=0)


def test_push_dry_run_accepts_the_folder_and_leaves_it_untouched(converted):
    _, folder = converted
    before = snapshot(folder)
    operations = push_folder(folder, "org/name", dry_run=True, license="mit")
    assert snapshot(folder) == before and not (folder / "README.md").exists()
    by_path = {op.path_in_repo: op for op in operations}
    assert set(by_path) == set(before) | {"README.md"}
    card = by_path["README.md"].path_or_fileobj.decode()
    assert 'from_pretrained("org/name", trust_remote_code=True)' in card


def test_a_failed_conversion_leaves_no_destination_and_resumes(tmp_path, converted, monkeypatch):
    """The custom code and copied files go through the temporary folder: an error while writing the side files
    leaves no destination, and `resume` finishes the same folder."""
    official, folder = converted

    def fail(src):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(to_plugin, "_revision", fail)
    # A full disk keeps what was written for --resume and says so.
    with pytest.raises(ConversionError, match=r"disk full: free space\); the finished shards are kept .* --resume"):
        convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="fp32", progress=False)
    assert not (tmp_path / "hf").exists()
    assert (temp_dir_for(tmp_path / "hf") / "modeling_deepseek_v4.py").exists()
    monkeypatch.undo()
    convert_official_to_plugin(official.folder, tmp_path / "hf", dtype="fp32", resume=True, progress=False)
    resumed, first = snapshot(tmp_path / "hf"), snapshot(folder)
    assert set(resumed) == set(first)
    # Weights, configs and copied files are the same (the provenance has a new date; code files are checked above).
    same = [name for name in first if name != "dsv4_conversion.json" and not name.endswith(".py")]
    assert all(resumed[name] == first[name] for name in same)
