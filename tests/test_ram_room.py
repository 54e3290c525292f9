"""Before a swarm starts, a host whose RAM will not hold its workers at their peak is told so in one line."""

from transformers import GPT2Config

from swarm_supervisor.ram_room import ram_warning
from workers.learning.memory import estimate_worker_host_mib

GPT2_124M = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
GIB = 1024 ** 3


def test_four_gpt2_workers_on_a_12_gib_colab_runtime_are_warned_with_how_many_fit():
    line = ram_warning(4, GPT2_124M, on_cuda=True, model_name="gpt2", available=int(10 * GIB))
    assert line == ("warning: 4 workers of gpt2 need ~13.6 GiB of host RAM at their peak (~3.3 GiB each, from peaks "
                    "measured by PSS) and this machine has 10.0 GiB available; 2 fit: lower NUM_WORKERS, or use a "
                    "machine (a Colab runtime) with more RAM")
    assert ram_warning(4, GPT2_124M, on_cuda=True, model_name="gpt2", available=int(80 * GIB)) is None


def test_a_worker_on_the_cpu_holds_the_model_itself_so_it_is_counted_higher():
    # on a CPU the weights, gradients and fp32 moments live in host RAM too, not only a checkpoint's copy
    assert estimate_worker_host_mib(GPT2_124M, on_cuda=False) > estimate_worker_host_mib(GPT2_124M, on_cuda=True)
    assert ram_warning(1, GPT2_124M, on_cuda=False, model_name="gpt2", available=int(2 * GIB)).endswith(
        "2.0 GiB available; 0 fit: lower NUM_WORKERS, or use a machine (a Colab runtime) with more RAM")
