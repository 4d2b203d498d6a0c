"""The tiny model, `load_model` for any HF directory, and the weights hand-over."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rlrun.config import ModelConfig
from rlrun.model import (
    WEIGHTS_FILE,
    build_tiny_model,
    encode_prompt,
    load_model,
    load_weights,
    resolve_model_path,
    save_weights,
)


def _logits(model, ids=(1, 69, 70, 71, 29)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_tokenizer_round_trips_text_exactly(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for text in ["ab c\nd", "  two  spaces  ", "x\n\ny\t!~", "dcba"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    # BOS exactly once, whichever way a prompt is encoded.
    assert encode_prompt(tok, "ab c") == [tok.bos_token_id, *tok.encode("ab c", add_special_tokens=False)]
    assert tok("ab c")["input_ids"] == encode_prompt(tok, "ab c")
    assert encode_prompt(tok, "ab")[1] != tok.bos_token_id
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.decode([tok.eos_token_id, *tok.encode("a", add_special_tokens=False)], skip_special_tokens=True) == "a"


def test_build_and_load(tiny_model):
    model, tok = load_model(tiny_model)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.tie_word_embeddings
    logits = _logits(model)
    assert logits.shape == (1, 5, len(tok)) and torch.isfinite(logits).all()


def test_same_seed_same_model_other_seed_differs(tmp_path, tiny_model):
    again = build_tiny_model(tmp_path / "again", ModelConfig(), seed=0)
    other = build_tiny_model(tmp_path / "other", ModelConfig(), seed=1)
    base = _logits(load_model(tiny_model)[0])
    assert torch.equal(_logits(load_model(again)[0]), base)
    assert not torch.allclose(_logits(load_model(other)[0]), base)


def test_save_and_load_weights_round_trip(tmp_path, tiny_model):
    trained, _ = load_model(tiny_model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.1 * torch.randn_like(p))
    out = save_weights(trained, tmp_path / "weights" / "step_1", metadata={"step": "1"})
    assert sorted(os.listdir(out)) == [WEIGHTS_FILE]
    assert not (tmp_path / "weights" / "step_1.tmp").exists()

    fresh, _ = load_model(tiny_model)
    assert not torch.allclose(_logits(fresh), _logits(trained))
    assert load_weights(fresh, out) == {"step": "1"}
    assert torch.equal(_logits(fresh), _logits(trained))
    # Tied embeddings stay tied after loading.
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()

    # Writing the same step again replaces the directory whole.
    save_weights(fresh, out)
    assert sorted(os.listdir(out.parent)) == ["step_1"]


def test_weights_of_another_shape_do_not_load(tmp_path, tiny_model):
    small_cfg = ModelConfig(hidden_size=32, intermediate_size=64)
    small, _ = load_model(build_tiny_model(tmp_path / "small", small_cfg, seed=0))
    save_weights(small, tmp_path / "small_weights")
    model, _ = load_model(tiny_model)
    before = _logits(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_weights(model, tmp_path / "small_weights")
    # Fewer layers: the tensors that do fit must not be copied in either.
    shallow, _ = load_model(build_tiny_model(tmp_path / "shallow", ModelConfig(num_layers=1), seed=5))
    save_weights(shallow, tmp_path / "shallow_weights")
    with pytest.raises(RuntimeError, match="missing model.layers.1"):
        load_weights(model, tmp_path / "shallow_weights")
    assert torch.equal(_logits(model), before)  # nothing was half-loaded
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "nowhere")


def test_load_model_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_model(str(missing))


def test_load_model_reads_any_hf_directory(tmp_path):
    """An ordinary HF directory (other tokenizer, no pad token) loads through the same code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "<bos>", "<eos>", "hello", "world"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]")
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    hf_dir = tmp_path / "some-hf-model"
    LlamaForCausalLM(config).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)

    path = resolve_model_path(ModelConfig(name="hf", path=str(hf_dir)), tmp_path / "run", seed=0)
    assert path == hf_dir
    model, loaded_tok = load_model(path)
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id == 2  # pad falls back to eos
    assert encode_prompt(loaded_tok, "hello world") == [1, 3, 4]
    assert _logits(model, [1, 3, 4]).shape == (1, 3, len(words))


def test_resolve_tiny_builds_once(tmp_path):
    path = resolve_model_path(ModelConfig(), tmp_path, seed=3)
    assert path == tmp_path / "model" and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(ModelConfig(), tmp_path, seed=3) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in os.listdir(tmp_path) if p != "model"]  # no temporary leftovers


def test_jobs_resolving_the_tiny_model_at_once_build_it_once(tmp_path):
    """Inference, trainer and SFT all resolve it as a run starts: one builds, the others wait."""
    code = ("import os, sys; from rlrun.config import ModelConfig; from rlrun.model import resolve_model_path; "
            "p = resolve_model_path(ModelConfig(), sys.argv[1], seed=3); print(os.stat(p / 'model.safetensors').st_ino)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    inodes = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(inodes) == 1, "a second build would have replaced the weights file"
    assert sorted(os.listdir(tmp_path)) == ["model"], "no lock or temporary folder left"


def test_chat_prompts_go_through_the_chat_template_when_the_tokenizer_has_one():
    """`encode_example`: messages + a chat template -> the template's text as ids (nothing added
    twice); without a template, or without messages, the plain prompt as `encode_prompt` makes it."""
    from rlrun.envs.base import Example
    from rlrun.model import build_tokenizer, encode_example

    tok = build_tokenizer()
    example = Example(prompt="abc=", answer="cba", messages=[{"role": "user", "content": "abc="}])
    assert encode_example(tok, example) == encode_prompt(tok, "abc="), "no template: plain prompt"
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")  # fmt: skip
    ids = encode_example(tok, example)
    assert tok.decode(ids) == "<s>[user] abc=\n[assistant] " and ids.count(tok.bos_token_id) == 1
    assert encode_example(tok, Example(prompt="abc=", answer="cba")) == encode_prompt(tok, "abc="), "no messages"
