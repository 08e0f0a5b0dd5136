"""The tiny demo models: written locally, distinct per lane, reproducible, reused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from vllm_launcher.demo_models import (
    ARCHITECTURE,
    DEFAULT_LANES,
    MARKER_FILE,
    demo_models_command,
    model_seed,
    read_marker,
    write_demo_models,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", MARKER_FILE}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digests(model_dir: Path) -> dict[str, str]:
    return {p.name: digest(p) for p in sorted(model_dir.iterdir())}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return write_demo_models(tmp_path_factory.mktemp("demo") / "models", ["alpha", "beta"])


def test_one_complete_model_directory_per_name(models):
    assert list(models) == ["alpha", "beta"]
    for name, path in models.items():
        assert path.name == name and path.is_absolute()
        assert {p.name for p in path.iterdir()} == MODEL_FILES
        assert read_marker(path)["model_seed"] == model_seed(0, name)
    # nothing half-written is left beside them
    assert sorted(p.name for p in models["alpha"].parent.iterdir()) == ["alpha", "beta"]


def test_config_is_the_tiny_llama(models):
    config = json.loads((models["alpha"] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    for key, value in ARCHITECTURE.items():
        assert config[key] == value, key
    assert config["head_dim"] * config["num_attention_heads"] == config["hidden_size"]
    assert 256 < config["vocab_size"] <= 1024


def test_weights_differ_per_lane_and_tokenizers_agree(models):
    alpha, beta = file_digests(models["alpha"]), file_digests(models["beta"])
    assert alpha["model.safetensors"] != beta["model.safetensors"]
    assert alpha["tokenizer.json"] == beta["tokenizer.json"]


def test_reproducible_from_the_seed(models, tmp_path):
    again = write_demo_models(tmp_path, ["beta"])
    other_seed = write_demo_models(tmp_path / "seed1", ["beta"], seed=1)
    assert file_digests(again["beta"]) == file_digests(models["beta"])
    assert digest(other_seed["beta"] / "model.safetensors") != \
        digest(models["beta"] / "model.safetensors")


def test_existing_models_are_reused_unless_forced(tmp_path):
    path = write_demo_models(tmp_path, ["alpha"])["alpha"]
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert write_demo_models(tmp_path, ["alpha"]) == {"alpha": path}
    assert weights.stat().st_mtime_ns == before
    write_demo_models(tmp_path, ["alpha"], force=True)
    assert weights.stat().st_mtime_ns != before


def test_incomplete_directory_is_rewritten_only_when_marked_or_forced(tmp_path):
    foreign = tmp_path / "alpha"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo model"):
        write_demo_models(tmp_path, ["alpha"])
    assert (foreign / "notes.txt").exists()
    write_demo_models(tmp_path, ["alpha"], force=True)
    assert not (foreign / "notes.txt").exists() and read_marker(foreign)


def test_another_seed_rewrites_a_demo_model(tmp_path):
    path = write_demo_models(tmp_path, ["alpha"], seed=0)["alpha"]
    first = digest(path / "model.safetensors")
    write_demo_models(tmp_path, ["alpha"], seed=7)
    assert read_marker(path)["seed"] == 7
    assert digest(path / "model.safetensors") != first


@pytest.mark.parametrize("names", [[], ["a/b"], ["..."], ["x", "X"], ["has-dash"]])
def test_bad_names_are_refused(tmp_path, names):
    with pytest.raises(ValueError):
        write_demo_models(tmp_path, names)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_and_chat_template_load_with_transformers(models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["alpha"])
    text = "Hello! How are you today? Ünïcode works too 🙂"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == \
        ("<s>", "</s>", "<pad>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    config = json.loads((models["alpha"] / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    assert (config["bos_token_id"], config["eos_token_id"]) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id)


def test_model_loads_and_generates_with_transformers(models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["beta"])
    model = AutoModelForCausalLM.from_pretrained(models["beta"])
    assert model.config.num_key_value_heads == 2 and model.dtype == torch.float32
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5,
                         pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 5


def test_command_writes_models_and_prints_the_lane_environment(tmp_path):
    runner = CliRunner()
    result = runner.invoke(demo_models_command, [str(tmp_path / "m"), "--lanes", "one,two"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines == ["VLLM_LANES=one,two",
                     f"VLLM_LANE_ONE_MODEL={tmp_path / 'm' / 'one'}",
                     f"VLLM_LANE_TWO_MODEL={tmp_path / 'm' / 'two'}"]
    assert "one: " in result.stderr and "(created)" in result.stderr
    again = runner.invoke(demo_models_command, [str(tmp_path / "m"), "--lanes", "one,two"])
    assert again.exit_code == 0 and "(created)" not in again.stderr
    assert again.stderr.count("(reused)") == 2


def test_command_defaults_help_and_errors(tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(demo_models_command, ["--help"]).output
    assert "DIR" in help_text and "--lanes" in help_text and "--seed" in help_text
    assert "--force" in help_text and ",".join(DEFAULT_LANES) in help_text
    bad = runner.invoke(demo_models_command, [str(tmp_path), "--lanes", "a/b"])
    assert bad.exit_code == 2 and "a/b" in bad.output
