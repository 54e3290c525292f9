"""How much GPU memory one worker needs, estimated from the model's config before any process starts.

Torch-free: the CLI's disk check reads it (through workers.disk_need) whatever the command, and `rl-swarm status`
must not wait ~1.2 s for a torch it never uses. Releasing memory between a round's phases is the round's
(workers.round_loop).
"""

from configs_env import SwarmConfig

MIB = 1024 * 1024
# Measured on an H100 (bench/RESULTS.md, bench/memory_probe.py): beyond what torch allocates, a worker holds
# the CUDA context, loaded kernels (cuBLAS and its workspaces, the sampler's CUDA graphs) and the allocator's slack:
# ~1.1 GiB by NVML that does not grow with the model.
FIXED_MIB = 1100
# fp32 weights (4) and gradients (4), two AdamW moments in bf16 (2 + 2): workers.learning.optim
BYTES_PER_PARAM = 12
# bytes per token, layer and hidden unit of one micro-batch's update under bf16 autocast, logits chunk
# included: 16 x 304 tokens of GPT-2 124M peaked at 0.33 GiB over weights, gradients and moments with
# activation checkpointing, 1.84 GiB without (bench/train_probe.json)
ACTIVATION_BYTES = {True: 8, False: 44}


def torch_path_mib(vocab: int) -> float:
    """What the update holds more where Triton is missing: the torch AdamW step's fp32 temporaries (five
    pieces of PIECE elements) and two fp32 copies of a chunk of logits."""
    # here, not at the top: these load torch and Triton, which this module's other readers never need
    from workers.learning import optim, softmax_kernels
    from workers.learning.grpo import LOGPROB_CHUNK

    missing = 0.0
    if optim.triton is None:
        missing += 5 * optim.PIECE * 4 / MIB
    if softmax_kernels.triton is None:
        missing += 2 * LOGPROB_CHUNK * vocab * 4 / MIB
    return missing


def width_and_depth(config) -> tuple[int, int]:
    """Hidden size and layer count of a GPT-2-style config (GPT-2's own names, or transformers' generic ones)."""
    return (getattr(config, "n_embd", None) or config.hidden_size,
            getattr(config, "n_layer", None) or config.num_hidden_layers)


def largest_micro_batch(cfg: SwarmConfig) -> int:
    """Rows of a round's largest update micro-batch: every local and external group, G rows each."""
    return min(cfg.train_micro_batch, (cfg.num_train_samples + cfg.num_transplant_trees) * cfg.num_generations)


def parameter_count(config) -> int:
    """GPT-2-style count from the config alone (no weights loaded): embeddings + 12 d^2 per layer."""
    d, layers = width_and_depth(config)
    vocab = config.vocab_size
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0)
    return vocab * d + positions * d + layers * 12 * d * d


def estimate_worker_mib(config, cfg: SwarmConfig, checkpointing: bool = True) -> float:
    """Worst case (every completion MAX_NEW_TOKENS long, prompts ~48 tokens): weights, gradients and
    optimizer, plus one micro-batch's activations, plus what the update's CUDA graphs hold when cfg uses them."""
    d, layers = width_and_depth(config)
    tokens = largest_micro_batch(cfg) * (cfg.max_new_tokens + 48)
    activations = tokens * d * layers * ACTIVATION_BYTES[checkpointing]
    model_state = parameter_count(config) * BYTES_PER_PARAM
    graphs = update_graphs_mib(config, cfg) if cfg.graphed_update else 0.0
    return FIXED_MIB + (model_state + activations) / MIB + torch_path_mib(config.vocab_size) + graphs


def update_graphs_mib(config, cfg: SwarmConfig) -> float:
    """What a worker holds more when its update replays from CUDA graphs (workers.learning.update_graph).

    The gradients and the graphs' pool stay allocated while the round generates, where an eager update hands
    its blocks back for generation to reuse. Measured by NVML on an H200 (bench/RESULTS.md, dabd3c9): +0.42 GiB
    for the default worker and +0.84 GiB for paper-4-4's; the fp32 gradients plus twice the sampler's bf16 KV
    cache for a round's rows (0.63 and 0.85 GiB) bounds both.
    """
    d, layers = width_and_depth(config)
    rows = cfg.num_train_samples * cfg.num_generations
    cache = layers * 2 * rows * (cfg.max_new_tokens + 48) * d * 2
    return (parameter_count(config) * 4 + 2 * cache) / MIB


# Host RAM of one worker, by PSS (the monitor's records; bench/NOTES.md): what does not grow with the model (torch's,
# CUDA's and the tasks' libraries, the tokenizer, Python) and bytes per parameter. On CUDA the host holds a
# checkpoint's copy of the fp32 weights and bf16 moments (8 bytes); on a CPU the model lives there too: fp32 weights,
# gradients and torch AdamW's two fp32 moments, and the copy of weights and moments (28 bytes). Measured: GPT-2 124M
# on an H200 peaked at 2.92-3.11 GiB a worker (2240 MiB + 124M x 8 B); the tiny model on 2-core CPUs at 0.35-0.36 GiB
# (330-343 MiB + 0.7M x 28 B), with Python 3.11 or 3.12. About a tenth more is counted: another Python, torch or
# kernel maps a little more.
HOST_FIXED_MIB = {True: 2450, False: 380}
HOST_BYTES_PER_PARAM = {True: 8, False: 28}


def estimate_worker_host_mib(config, on_cuda: bool) -> float:
    """One worker's peak host RAM (PSS, at a checkpoint) for a model of this config."""
    return HOST_FIXED_MIB[on_cuda] + parameter_count(config) * HOST_BYTES_PER_PARAM[on_cuda] / MIB
