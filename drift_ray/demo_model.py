"""The tiny demo reference model that drift-ray builds itself, offline: `rollout.model: builtin:demo`.

A small byte-level BPE tokenizer with a ChatML chat template and a ~1M-parameter Qwen2 model, pre-trained on
conversations of the scripted `CandidatesTeacher` on the built-in candidates task. The teacher repeats its
answer after "Incorrect" with probability `repeat_prob`, so the model learns the failure DRIFT targets:
under greedy decoding it keeps repeating a wrong answer. The result is an ordinary model directory that
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` (and every engine) load like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2Tokenizer

from drift_ray.builtin_tasks import CandidatesTeacher, candidates_task
from drift_ray.config import EpisodeConfig, ExampleKind, LossKind, LrSchedule
from drift_ray.episode import SamplingParams, play_episodes
from drift_ray.trajectories import exclusive_lock, publish_directory
from drift_ray.weighted_sft import fit_plain

log = logging.getLogger(__name__)

# Bump whenever the tokenizer, the architecture or the pre-training recipe changes meaning: it is part of
# the cache key, so an old cached model is never mistaken for a new one.
DEMO_VERSION = 4
METADATA_FILE = "drift_demo.json"

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Byte-level symbols (GPT-2's map of the 256 bytes to printable characters): every text is encodable,
# and an ASCII character is exactly one token.
BYTE_SYMBOLS = sorted(pre_tokenizers.ByteLevel.alphabet())

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=384),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=768),
}

# The demo asks the bare question: short prompts suit a tiny model.
DEMO_EPISODE = EpisodeConfig(instruction="{question}")


# Whole-word tokens for the words of the demo's conversations, and the answer tags as single tokens: a turn
# of the demo is then a handful of tokens instead of one per character, which makes pre-training, rollouts
# and training several times cheaper. Digits stay one token each (the Qwen2 pre-tokenizer splits them), so
# the arithmetic of the task is done on digits.
DEMO_WORDS = (
    "user", "assistant", "system", "Incorrect", " Please", " think", " again",
    " is", " between", " and", " ends", " in", " What", " x",
)
ANSWER_TAGS = ("<answer>", "</answer>")


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer: every byte, the demo's words, the answer tags and the ChatML special tokens.

    Its merges are learned (deterministically) from `DEMO_WORDS` alone, so any text round-trips and text
    other than the demo's falls back to about one token per byte. It is a Qwen2Tokenizer because
    `AutoTokenizer` rebuilds a Qwen2 checkpoint's tokenizer as one whatever tokenizer.json says: the
    tokenizer loaded from disk is then exactly the one the model was trained with.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.train_from_iterator(
        DEMO_WORDS,
        trainers.BpeTrainer(vocab_size=1024, min_frequency=1, initial_alphabet=BYTE_SYMBOLS, show_progress=False),
    )
    learned = json.loads(bpe.to_str())["model"]
    vocab = dict(learned["vocab"])
    for special in (END_OF_TEXT, IM_START, IM_END):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(merge) for merge in learned["merges"]],
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        extra_special_tokens=[IM_START],
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(list(ANSWER_TAGS))
    return tokenizer


def build_model_config(
    vocab_size: int, size: str | dict[str, int] = "tiny", *, tokenizer: Qwen2Tokenizer | None = None
) -> Qwen2Config:
    """A small Qwen2 config (`tiny`: hidden 128, 4 layers, ~1M parameters), or one of other dimensions given as
    a dict of MODEL_SIZES' keys; token ids from `tokenizer` when given."""
    if isinstance(size, str) and size not in MODEL_SIZES:
        raise ValueError(f"demo model size {size!r} is unknown; expected one of {sorted(MODEL_SIZES)}")
    if not isinstance(size, str) and set(size) != set(MODEL_SIZES["tiny"]):
        raise ValueError(f"demo model dimensions {sorted(size)}; expected exactly {sorted(MODEL_SIZES['tiny'])}")
    dimensions = MODEL_SIZES[size] if isinstance(size, str) else size
    # Else a model that builds, and fails at its first forward pass on mismatched tensor sizes.
    wrong = [f"{name}={value!r}" for name, value in dimensions.items() if type(value) is not int or value < 1]
    if wrong:
        raise ValueError(f"demo model dimensions must be positive integers; found {', '.join(wrong)}")
    heads, kv_heads = dimensions["num_attention_heads"], dimensions["num_key_value_heads"]
    # Rotary embeddings turn pairs of a head's dimensions: a head needs an even number of them.
    if dimensions["hidden_size"] % (2 * heads) or heads % kv_heads:
        raise ValueError(
            f"demo model dimensions: hidden_size ({dimensions['hidden_size']}) must be an even multiple of "
            f"num_attention_heads ({heads}), and that a multiple of num_key_value_heads ({kv_heads})"
        )
    tokenizer = tokenizer or build_tokenizer()
    return Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        # Untied: with tied embeddings this model took several times longer to learn even to copy a
        # digit from the question; untying costs vocab × hidden (33k) parameters.
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        **dimensions,
    )


def save_untrained_demo_model(
    path: str | Path,
    *,
    seed: int = 0,
    size: str | dict[str, int] = "tiny",
    initializer_range: float = 0.02,
    prepare: Any = None,
) -> str:
    """Save the demo tokenizer and a randomly initialised demo-architecture model into `path`.

    For tests and benchmarks that exercise plumbing or speed, not quality; `prepare(model, tokenizer)`
    may edit the weights before saving.
    """
    tokenizer = build_tokenizer()
    config = build_model_config(len(tokenizer), size, tokenizer=tokenizer)
    config.initializer_range = initializer_range
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if prepare is not None:
        prepare(model, tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def ensure_demo_model(
    cache_dir: str | Path,
    *,
    seed: int = 0,
    repeat_prob: float = 0.6,
    size: str = "tiny",
    num_problems: int | None = None,
    samples_per_prompt: int = 2,
    epochs: int = 8,
    lr: float = 3e-3,
    warmup_ratio: float = 0.05,
    batch_size: int = 16,
    max_length: int = 1024,
    episode: EpisodeConfig = DEMO_EPISODE,
) -> str:
    """The directory of the demo model built with these settings, pre-training it on the first call.

    The directory name is a hash of the settings, so each recipe is built once and then reused. The
    model is built in a temporary directory and renamed into place only when complete, under a file lock:
    a crash never leaves a half-built model that looks whole, and concurrent callers wait for one build.
    The teacher plays `episode` (its instruction, feedback and number of turns): pass the pipeline's own
    so the reference is pre-trained on exactly the conversations it will later be asked to continue.
    """
    settings: dict[str, Any] = {
        "version": DEMO_VERSION,
        "seed": seed,
        "repeat_prob": repeat_prob,
        "size": size,
        "num_problems": num_problems,
        "samples_per_prompt": samples_per_prompt,
        "epochs": epochs,
        "lr": lr,
        "warmup_ratio": warmup_ratio,
        "batch_size": batch_size,
        "max_length": max_length,
        "episode": episode.model_dump(mode="json"),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    target = cache_dir / f"demo-{key}"
    with exclusive_lock(cache_dir / f".demo-{key}.lock"):
        if (target / METADATA_FILE).is_file():  # written last by a build, so a copy cut short lacks it
            return str(target)
        for leftover in [*cache_dir.glob(f".demo-{key}.building-*"), target]:
            shutil.rmtree(leftover, ignore_errors=True)  # a build that crashed, or that copy; we hold the lock
        building = Path(tempfile.mkdtemp(prefix=f".demo-{key}.building-", dir=cache_dir))
        # Minutes of silent pre-training otherwise; and a new seed or episode setting is a new recipe.
        log.info(
            "demo reference: building %s, once for this recipe (seed %d and the episode config; a few minutes "
            "on 2 CPU cores)",
            target,
            seed,
        )
        try:
            _build(building, settings, episode)
            publish_directory(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return str(target)


def _build(out_dir: Path, settings: dict[str, Any], episode: EpisodeConfig) -> None:
    started = time.perf_counter()
    seed = settings["seed"]
    # The default test split is set aside: a pipeline evaluating on the candidates test split with the
    # same seed and the default task options evaluates on no question the reference was pre-trained on.
    # (Other seeds or a larger task.options.num_test do, with golds drawn anew: see README.)
    task = candidates_task(seed=seed, num_train=settings["num_problems"])
    episodes = play_episodes(
        task.train,
        CandidatesTeacher(settings["repeat_prob"]),
        task.new_verifier(),
        SamplingParams(seed=seed),
        samples_per_prompt=settings["samples_per_prompt"],
        cfg=episode,
    )
    conversations = [e.messages for e in episodes]

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_model_config(len(tokenizer), settings["size"], tokenizer=tokenizer))
    stats = fit_plain(
        model,
        tokenizer,
        conversations,
        None,
        kind=ExampleKind.all_turns,
        loss=LossKind.sample_mean,
        lr=settings["lr"],
        warmup_ratio=settings["warmup_ratio"],
        schedule=LrSchedule.cosine,
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        max_length=settings["max_length"],
        seed=seed,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {
        "settings": settings,
        "parameters": sum(p.numel() for p in model.parameters()),
        "conversations": len(conversations),
        "teacher_turns": sum(len(e.correct) for e in episodes),
        "pretraining": stats,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
