"""Shared fixtures: tiny random Llama checkpoints written as real HF directories (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_hf_dir(path, tie: bool = True, rope_scaling: dict | None = None, seed: int = 0, **overrides):
    """Save a random tiny LlamaForCausalLM (safetensors) to ``path`` and return the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
              rope_theta=10000.0, tie_word_embeddings=tie, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kw.update(overrides)
    if rope_scaling is not None:
        kw["rope_scaling"] = rope_scaling
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model



BPE_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # ids 0..4; </s> = 2 = the tiny model's EOS
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_bpe_tokenizer_dir(path, texts, vocab_size: int) -> None:
    """Train a byte-level BPE on ``texts``; save tokenizer.json + tokenizer_config.json (chat template)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.get_vocab_size() <= vocab_size and tok.token_to_id("</s>") == 2
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE}))

@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny tied-embedding Llama (3 layers, 6 query heads, 2 KV heads, head dim 8)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_hf_dir(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from dsla.model.loading import load_teacher

    return load_teacher(tiny_dir)
