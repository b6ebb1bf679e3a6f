"""Model cards render offline from folder metadata (config, conversion provenance, adapter config)."""

import json

import pytest
from huggingface_hub import ModelCard

from modeling_deepseek_v4.__main__ import main
from modeling_deepseek_v4.conversion import convert_official_to_plugin
from modeling_deepseek_v4.model_cards import render_model_card
from tests.conftest import tiny_config
from tests.conversion.official_synth import make_official_checkpoint


def test_card_for_a_converted_folder_has_metadata_and_provenance(tmp_path):
    snapshot = tmp_path / "models--deepseek-ai--DeepSeek-V4-Flash" / "snapshots" / "abc123"
    official = make_official_checkpoint(snapshot, tiny_config(), n_shards=2)
    convert_official_to_plugin(official.folder, tmp_path / "hf", progress=False)
    assert (
        main(["card", str(tmp_path / "hf"), "--license", "mit", "--base-model", "deepseek-ai/DeepSeek-V4-Flash"]) == 0
    )
    text = (tmp_path / "hf" / "README.md").read_text()
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["license"] == "mit" and data["pipeline_tag"] == "text-generation"
    assert data["library_name"] == "transformers" and data["base_model"] == "deepseek-ai/DeepSeek-V4-Flash"
    assert {"deepseek_v4", "custom_code"} <= set(data["tags"])
    # Provenance from dsv4_conversion.json: the Hub repo and snapshot revision, and no local path.
    assert "`deepseek-ai/DeepSeek-V4-Flash` (revision `abc123`)" in text and str(tmp_path) not in text
    assert "official->plugin" in text and "trust_remote_code=True" in text
    # Metadata survives a YAML round trip (what the Hub parses).
    assert ModelCard(str(card)).data.to_dict() == data


def test_adapter_card_names_the_base_model_and_how_to_load(tmp_path):
    adapter = {"peft_type": "LORA", "r": 8, "base_model_name_or_path": "org/dsv4-tiny", "target_modules": ["q_a_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter))
    card = render_model_card(tmp_path, training={"learning_rate": 1e-4, "epochs": 1})
    text = str(card)
    assert card.data.base_model == "org/dsv4-tiny" and card.data.library_name == "peft"
    assert "PeftModel.from_pretrained" in text and "learning_rate" in text


def test_card_errors_are_clear(tmp_path, capsys):
    with pytest.raises(ValueError, match="config.json"):
        render_model_card(tmp_path)
    assert main(["card", str(tmp_path)]) == 2
    assert "dsv4 card: error" in capsys.readouterr().err


def test_push_is_prepared_up_to_the_network_and_fails_clearly_offline(tmp_path, monkeypatch):
    from modeling_deepseek_v4.model_cards import push_folder
    from tests.conftest import tiny_model

    tiny_model().save_pretrained(tmp_path / "m")
    operations = push_folder(tmp_path / "m", "org/dsv4-tiny", dry_run=True, license="mit")
    paths = {op.path_in_repo for op in operations}
    assert {"config.json", "model.safetensors", "modeling_deepseek_v4.py", "README.md", "requirements.txt"} <= paths
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        push_folder(tmp_path / "m", "org/dsv4-tiny", create_pr=True)


def test_push_refuses_a_folder_without_custom_code(tmp_path):
    from modeling_deepseek_v4.model_cards import prepare_upload

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4_ext"}))
    with pytest.raises(ValueError, match="custom code"):
        prepare_upload(tmp_path)


def test_card_of_a_qat_converted_quantized_model(tmp_path):
    from modeling_deepseek_v4.quantization import convert_qat, prepare_fp4_qat
    from tests.conftest import tiny_model

    convert_qat(prepare_fp4_qat(tiny_model(), linears=True)).save_pretrained(tmp_path)
    card = render_model_card(tmp_path, license="mit")
    assert {"fp8", "fp4", "qat"} <= set(card.data.to_dict()["tags"])
    text = str(card)
    assert "linears fp8, routed experts fp4" in text and "quantization-aware training" in text


TRAINER_STATE = (
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "rng_state_1.pth",
    "training_args.bin",
    "trainer_state.json",
    "checkpoint-10/model.safetensors",
    "checkpoint-10/trainer_state.json",
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny model folder, as a Trainer `output_dir` holds it: weights, custom code and Trainer state."""
    from tests.conftest import tiny_model

    folder = tmp_path_factory.mktemp("trained")
    tiny_model().save_pretrained(folder)
    for name in TRAINER_STATE:
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(b"state")
    return folder


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_leaves_trainer_state_out_unless_asked(saved):
    from modeling_deepseek_v4.model_cards import push_folder

    before = snapshot(saved)
    paths = {op.path_in_repo for op in push_folder(saved, "org/dsv4-tiny", dry_run=True)}
    assert {"config.json", "model.safetensors", "modeling_deepseek_v4.py", "README.md"} <= paths
    assert not paths & set(TRAINER_STATE)
    paths = {op.path_in_repo for op in push_folder(saved, "org/dsv4-tiny", dry_run=True, include_training_state=True)}
    assert set(TRAINER_STATE) <= paths
    assert snapshot(saved) == before  # the card was rendered in memory


def test_card_loading_example_names_the_repo_id(saved):
    from modeling_deepseek_v4.model_cards import prepare_upload

    text = str(render_model_card(saved, repo_id="org/dsv4-tiny"))
    assert 'from_pretrained("org/dsv4-tiny", trust_remote_code=True)' in text and "# dsv4-tiny" in text
    assert f'from_pretrained("{saved.name}", trust_remote_code=True)' in str(render_model_card(saved))
    card = {op.path_in_repo: op for op in prepare_upload(saved, repo_id="org/other")}["README.md"]
    assert 'from_pretrained("org/other", trust_remote_code=True)' in card.path_or_fileobj.decode()


def test_push_without_network_fails_clearly(saved, monkeypatch):
    """The Hub endpoint is an unused local port: no host is contacted, and the error names the repo and the fix."""
    import socket

    import huggingface_hub.constants as constants

    from modeling_deepseek_v4.model_cards import push_folder

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    before = snapshot(saved)
    with pytest.raises(ConnectionError) as caught:
        push_folder(saved, "org/dsv4-tiny", token="hf_fake_token_for_tests")
    message = str(caught.value)
    assert "org/dsv4-tiny" in message and "could not be reached" in message and endpoint in message
    assert "HF_HUB_OFFLINE" in message and "network" in message
    # No HTTP-client traceback chained under it.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert snapshot(saved) == before
