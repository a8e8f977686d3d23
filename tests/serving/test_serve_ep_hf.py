"""Serving a Hugging Face folder expert-parallel: an engine over 2 InferenceShard actors (gloo, local Ray), each
reading only its experts from the folder, gives transformers' greedy tokens (and the whole-model engine's)."""

import pytest

transformers = pytest.importorskip("transformers")
ray = pytest.importorskip("ray")

import tokenizers  # noqa: E402
import torch  # noqa: E402

from raymoe.deployments.engine import Engine  # noqa: E402
from raymoe.deployments.engine_config import EngineConfig  # noqa: E402
from raymoe.deployments.protocol import SamplingParams  # noqa: E402

T = 60  # seconds: bound on every call
PROMPTS = ["hello", "Mixture of experts", "xyz"]


@pytest.fixture(scope="module")
def deepseek_folder(tmp_path_factory):
    """A tiny DeepSeek-V3 (MLA, sigmoid group-limited routing, a shared expert, a first dense layer) with a small
    byte-level BPE tokenizer.json made here."""
    cfg = transformers.DeepseekV3Config(
        vocab_size=300, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, n_shared_experts=1, q_lora_rank=16, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # every tensor matters: no all-ones norms, no zero correction bias
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    path = tmp_path_factory.mktemp("deepseek_v3")
    model.save_pretrained(path)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=290, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Mixture of experts route each token to a few experts. " * 20, "hello xyz"], trainer)
    tok.save(str(path / "tokenizer.json"))
    return path, model, tok


@pytest.mark.slow
def test_ep_serving_of_hf_folder_equals_transformers(ray_cluster, deepseek_folder):
    path, hf, tok = deepseek_folder
    greedy = SamplingParams(max_tokens=16, temperature=0.0)
    expected = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([tok.encode(p).ids])
            out = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
            expected.append(out[0, ids.shape[1]:].tolist())
    plain = Engine(str(path), config=EngineConfig(max_batch_size=2))
    ep = Engine(str(path), ep_size=2, config=EngineConfig(max_batch_size=2))
    plain.start()
    ep.start()
    try:
        assert [plain.generate_sync(p, greedy, T).token_ids for p in PROMPTS] == expected
        assert [ep.generate_sync(p, greedy, T).token_ids for p in PROMPTS] == expected
        experts = [s["experts"] for s in ep.info()["shards"]]
        assert experts == [{1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}, {1: [4, 5, 6, 7], 2: [4, 5, 6, 7]}]
    finally:
        plain.shutdown(5)
        ep.shutdown(5)
