"""How much GPU memory one worker needs, estimated before any process starts."""

from configs_env import SwarmConfig

MIB = 1024 * 1024
# Measured on an H100 (bench/RESULTS.md): a GPT-2 124M worker peaks at 3.56 GiB by NVML, of which
# weights + gradients + AdamW states are 16 bytes a parameter (~1.9 GiB); the rest is the CUDA context,
# compiled generation graphs and the allocator's cache, which do not grow with the model.
FIXED_MIB = 1400
BYTES_PER_PARAM = 16            # fp32 weights, fp32 gradients, two fp32 AdamW moments


def parameter_count(config) -> int:
    """GPT-2-style count from the config alone (no weights loaded): embeddings + 12 d^2 per layer."""
    d = getattr(config, "n_embd", None) or getattr(config, "hidden_size")
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers")
    vocab = config.vocab_size
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
    return vocab * d + positions * d + layers * 12 * d * d


def estimate_worker_mib(config, cfg: SwarmConfig) -> float:
    """Worst case (every completion MAX_NEW_TOKENS long): weights and optimizer, the update's activations
    for one micro-batch, and the logits chunks.

    ~128 bytes per token, layer and hidden unit was measured for a GPT-2 124M step under bf16 autocast
    (16 rows x 304 tokens peaked at 8.2 GiB, bench/RESULTS.md).
    """
    d = getattr(config, "n_embd", None) or getattr(config, "hidden_size")
    layers = getattr(config, "n_layer", None) or getattr(config, "num_hidden_layers")
    rows = min(cfg.train_micro_batch, (cfg.num_train_samples + cfg.num_transplant_trees) * cfg.num_generations)
    tokens = rows * (cfg.max_new_tokens + 64)
    activations = tokens * d * layers * 128
    logits = 2 * 1024 * config.vocab_size * 4         # one 1024-row fp32 chunk and its log-softmax
    return FIXED_MIB + (parameter_count(config) * BYTES_PER_PARAM + activations + logits) / MIB
