"""Tiny configs of every decoder variant in the zoo, shared by the model tests."""

from llmlab.models import GPTConfig, LlamaConfig
from llmlab.models.layers import RopeScaling

V = 97  # a vocabulary size that is not a power of two catches transposed shapes

TINY = {
    "gpt2": GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_seq_len=64),
    "gpt-untied": GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, max_seq_len=64, tie_embeddings=False),
    "gpt-alibi": GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, position="alibi", embed_norm=True),
    "gpt-relative": GPTConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, position="relative", norm="rmsnorm",
                              bias=False),
    "llama": LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64),
    "llama-gqa-tied": LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                  max_seq_len=64, tie_embeddings=True),
    "llama-mqa-parallel": LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16,
                                      hidden_dim=64, parallel_block=True, attention_bias=True),
    "llama-window": LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                sliding_window=5),
    "llama-yarn": LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=64,
                              rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=16)),
    "llama-dynamic": LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=16,
                                 rope_scaling=RopeScaling("dynamic", 2.0)),
}
