"""The learning code of one node: the model and its loading, generation (the CUDA-graph sampler), tasks and
rewards, the GRPO loss, the optimizer and its kernels, the memory budget."""
