"""The shared-folder transport: paths (folder), records (protocol), the exchange between nodes, and a simulated
slow Drive for tests. Torch-free: the supervisor, `status` and `experiments` read a swarm through it alone."""
