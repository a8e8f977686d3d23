"""Helpers shared by the serving tests (a module name that cannot collide with another conftest)."""

import socket
import time

import torch

from raymoe.platform.checkpoint import save_checkpoint
from raymoe.platform.model import GPT, GPTConfig

BLOCK = 64


def spicy_model(seed: int = 0, block_size: int = BLOCK) -> GPT:
    """Tiny GPT-MoE (MoE on block 1, 4 experts, capacity dropping on) with large random weights, so greedy
    outputs change from token to token and argmax ties are unlikely."""
    torch.manual_seed(seed)
    cfg = GPTConfig.from_dict(dict(vocab_size=257, block_size=block_size, n_layer=2, n_head=2, d_model=32, expert_interval=2,
                    num_experts=4, k=1, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1))
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return m


def save_model(root, model: GPT, step: int = 1):
    return save_checkpoint(root, step, model, extra={"model_config": model.config.to_dict()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout_s: float = 30.0, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s}s")


CHATML = ("{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}"
          "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tokenizer_folder(folder, vocab_size: int = 300):
    """A model's tokenizer files as a Hugging Face folder ships them: a byte-level BPE with ChatML special tokens
    (<|im_start|> = vocab_size, <|im_end|> = vocab_size + 1), a chat template in chat_template.jinja, and the
    stop token <|im_end|> in generation_config.json. Returns the folder."""
    import json
    from pathlib import Path

    from tokenizers import AddedToken

    from raymoe.platform.bpe import train_bpe
    from raymoe.platform.data import default_corpus_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_bpe([default_corpus_text()[:40_000]], vocab_size)
    tok.tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<|endoftext|>"}))
    (folder / "chat_template.jinja").write_text(CHATML)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [vocab_size + 1, 0]}))
    return folder


def hf_model_folder(folder):
    """A tiny random Qwen2-MoE saved by transformers (config.json + safetensors) with the tokenizer files of
    `tokenizer_folder` (ChatML template, <|im_end|> stop token): a Hugging Face model folder as users serve one."""
    import torch
    import transformers

    cfg = transformers.Qwen2MoeConfig(vocab_size=302, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                      mlp_only_layers=[0], max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return tokenizer_folder(folder)
