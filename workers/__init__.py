"""One node of the swarm, in three layers: `shared_folder` (the transport, torch-free), `learning` (model,
generation, loss, optimizer, tasks), and a node's life on top: worker (the process), round_loop (one SAPO round),
warmup, checkpoint, evaluation."""
