"""One typed config tree, loaded from YAML with `key.path=value` overrides.

The classes mirror the YAML 1:1. Every field is documented once, here, with its paper symbol, unit
and default. An unknown or ill-typed key fails with its dotted path (and a close-match hint), and
all errors are reported at once.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import urllib.parse
from collections.abc import Hashable, Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from drift_ray.verifiers import BOOLEAN_FOR_A_NUMBER, reads_a_boolean_as_a_number

DEMO_MODEL = "builtin:demo"  # the tiny reference drift-ray builds itself (demo_model.py)

# A path the shell would have expanded: `run_dir: ~/runs/a` would otherwise make a directory named "~".
LocalPath = Annotated[str, AfterValidator(os.path.expanduser)]


class _Section(BaseModel):
    # No inf or NaN: an infinite weights.beta would make every weight 1 without a word.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_enum_values=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        # Pydantic reads true as 1 where a number belongs: `seed: true` would run seed 1 without a word.
        if isinstance(value, bool) and reads_a_boolean_as_a_number(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("bool_for_number", BOOLEAN_FOR_A_NUMBER)
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section_holds_its_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        # `task:` left empty in a file, as an override reads it (an optional section, eval.task, is unset so)
        annotation = cls.model_fields[info.field_name].annotation
        return {} if value is None and _section(annotation) is annotation else value


_TASK_KEY_READERS = {
    "train_path": ("file", "hub"),
    "test_path": ("file", "hub"),
    "columns": ("file",),
    "options": ("builtin", "plugin", "hub", "reasoning_gym"),
}


class TaskConfig(_Section):
    kind: Literal["builtin", "file", "plugin", "hub", "reasoning_gym"] = Field(
        "builtin",
        description="Where problems come from: 'builtin' (offline tasks shipped with drift-ray), "
        "'file' (local JSONL/Parquet), 'plugin' (a `module:function` returning a Task), "
        "'hub' (a benchmark through Hugging Face datasets, task.name one of metamathqa, math, math500, gsm8k, "
        "theoremqa, gpqa_diamond, mmlu_redux, mmlu_pro; task.train_path/test_path read local files in the "
        "hub's columns instead; options: seed, subsets) or 'reasoning_gym' (task.name a reasoning-gym "
        "generator; options: size, seed and the generator's config fields).",
    )
    name: str = Field(
        "candidates",
        description="builtin: task name; hub: the dataset (see task.kind); reasoning_gym: the generator; "
        "plugin: 'module:function'; file: a label for messages and eval.md (left "
        "at 'candidates', the built-in's name, a file task is named by its train_path, else its test_path).",
    )
    train_path: Optional[LocalPath] = Field(
        None, description="file: JSONL or Parquet with the training problems; hub: a local copy in the hub's columns."
    )
    test_path: Optional[LocalPath] = Field(
        None, description="file: JSONL or Parquet with the held-out problems; hub: a local copy in the hub's columns."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="file: our column name → the file's column name, e.g. {question: problem, gold: answer}, one "
        "mapping for train_path and test_path alike. Unmapped columns are read under our own names (prompt_id, "
        "question, gold).",
    )
    verifier: Optional[str] = Field(
        None,
        description="Verifier name (exact, numeric, choice, math, reasoning_gym); default: the task's own (a file "
        "task's: exact).",
    )
    verifier_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the verifier, e.g. {rel_tol: 0.001} for numeric, {timeout_s: 10} for "
        "math, {threshold: 0.5} for reasoning_gym. Recorded with the rollouts: other options are other rewards.",
    )
    num_train: Optional[int] = Field(
        None, ge=1, description="Use at most this many training problems (default: all): a file task's first ones, in file order."
    )
    num_test: Optional[int] = Field(
        None,
        ge=1,
        description="Use at most this many test problems (default: all). A file task's are its first ones, in "
        "file order; a hub task's a random sample, the same for every seed.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments for the task builder (any kind but file)."
    )

    @field_validator("columns", "verifier_options", "options", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        # So that an override (task.options=null) can clear what a config file set, as it can a path.
        return {} if value is None else value

    @field_validator("train_path", "test_path", "columns", "options")
    @classmethod
    def _read_by_its_kind(cls, value: Any, info: ValidationInfo) -> Any:
        # Else the key is dropped without a word: a train_path with kind left at builtin trains on the built-in task.
        kind, readers = info.data.get("kind"), _TASK_KEY_READERS[info.field_name]
        if value and kind is not None and kind not in readers:
            only = ", ".join(map(repr, readers))
            raise ValueError(f"kind {kind!r} does not read it, only {only} do: change kind, or remove the key (or set it to null)")
        return value


class EpisodeConfig(_Section):
    max_turns: int = Field(5, ge=1, description="T: assistant turns per episode, at most. Default 5.")
    feedback: str = Field(
        "Incorrect. Please think again.", description="Unary feedback the user sends after a wrong answer."
    )
    format_penalty: float = Field(
        -0.1, le=0.0, description="Added to the return once per turn without a parsable answer. Default -0.1."
    )
    system_prompt: Optional[str] = Field(None, description="Optional system message opening every conversation.")
    instruction: str = Field(
        "{question}\n\nPut your final answer between <answer> and </answer>.",
        description="Template of the first user message; must contain '{question}'.",
    )
    think: bool = Field(
        False,
        description="Also ask for reasoning inside <think>…</think> before the answer (adds a sentence). A turn "
        "still ends at its first </answer>, one written inside the reasoning too.",
    )

    @field_validator("instruction")
    @classmethod
    def _has_question_slot(cls, value: str) -> str:
        # Checked as str.format will read it: '{{question}}' is literal text, and '{"a": 1}' a placeholder.
        literal_braces = "write a literal brace as {{ or }}"
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as err:
            raise ValueError(f"not a valid template ({err}); {literal_braces}") from None
        if "question" not in fields:
            raise ValueError("must contain the placeholder '{question}' ({{ and }} stand for literal braces)")
        if fields != {"question"}:
            others = ", ".join(repr(name) for name in sorted(fields - {"question"}))
            raise ValueError(f"has placeholders other than '{{question}}': {others}; {literal_braces}")
        try:  # a format spec or conversion of its own: {question:{x}}, {question!z}, {question:d}
            value.format(question="a question")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"fails in str.format ({type(err).__name__}: {err}); {literal_braces}") from None
        return value


# Upper case only: most API keys (gsk_..., hf_..., ghp_...) would pass as a name but for their lower-case
# letters, and the name is shown in errors, reprs and `drift-ray config`.
_ENV_VAR_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")
API_KEY_ENV_EXPECTED = (
    "expected the name of an environment variable (upper-case letters, digits and _, not starting with a digit, "
    "e.g. OPENAI_API_KEY), not the API key itself"
)


def is_env_var_name(value: str) -> bool:
    """Whether `value` may be shown as rollout.api_key_env: a variable's name as conventionally written."""
    return _ENV_VAR_NAME.fullmatch(value) is not None


class EngineKind(str, Enum):
    transformers = "transformers"
    vllm = "vllm"
    openai = "openai"


# The rollout keys that only the openai engine reads.
_SERVER_SETTINGS = ("api_base", "api_key_env", "max_concurrency", "request_timeout_s", "max_retries", "retry_backoff_s")


class RolloutConfig(_Section):
    engine: EngineKind = Field(
        EngineKind.transformers,
        description="Generation engine behind the rollout and evaluation actors: transformers (CPU default), vllm (GPU), or openai "
        "(any server that speaks /v1/chat/completions: vLLM serve, SGLang, TGI, transformers serve, hosted APIs).",
    )
    model: str = Field(
        DEMO_MODEL,
        description="Reference policy π_ref: a local path or hub id; 'builtin:demo' builds the tiny demo model. "
        "openai: the model name the server serves.",
    )
    samples_per_prompt: int = Field(16, ge=1, description="K: episodes per prompt. Default 16.")
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature. Default 1.0. 0 (greedy) needs samples_per_prompt 1."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass. Default 1.0.")
    max_new_tokens: int = Field(512, ge=1, description="New tokens per turn, at most. Default 512.")
    prompts_per_batch: int = Field(32, ge=1, description="Prompts per actor call (all K episodes each).")
    num_actors: int = Field(1, ge=1, description="Rollout actors (one engine each).")
    cpus_per_actor: float = Field(1.0, ge=0.0, description="CPUs reserved per rollout actor (and evaluation actor).")
    gpus_per_actor: float = Field(
        0.0,
        ge=0.0,
        description="GPUs per rollout actor, and evaluation actor (vLLM: = tensor_parallel_size; with tensor_parallel_size 1 a fraction "
        "packs several actors on one GPU, each with gpu_memory_utilization at most that fraction). The transformers "
        "engine runs on the CPU with 0, on its GPU otherwise.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor-parallel size per actor.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Model dtype for the engine (rollouts and evaluation). auto: the checkpoint's, except that vLLM runs a float32 checkpoint "
        "(such as a model trained without train.bf16) in 16 bits (bfloat16 on GPUs of compute capability 8.0 or more, "
        "else float16); set one to compare models at one precision.",
    )
    torch_threads: Optional[int] = Field(None, ge=1, description="CPU threads per transformers engine, rollouts' and evaluation's (default: its CPUs).")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0, description="vLLM: share of the whole GPU's memory the engine takes (at most gpus_per_actor)."
    )
    max_model_len: Optional[int] = Field(
        None,
        ge=2,
        description="Tokens of a conversation the engine holds, prompt and reply together (default: the model's "
        "max_position_embeddings, which the transformers engine takes as its most). vLLM sizes its KV cache for "
        "it: a model of a long context (say 128k tokens) may not fit a GPU's memory otherwise. A reply stops there, "
        "cut off, and a longer prompt is refused. Not for openai: set the server's (vllm serve --max-model-len).",
    )
    output_dir: Optional[LocalPath] = Field(
        None,
        description="Directory of the rollouts (default: run_dir/rollouts). Runs that differ only after the "
        "rollouts (weights.mode, β, training) can point at one directory to share them. Round 1's: a later round "
        "of iterated DRIFT (rounds) plays its own, under run_dir/round-r/rollouts.",
    )
    resources: dict[str, StrictFloat] = Field(  # strict: no true for 1
        default_factory=dict,
        description="Custom Ray resources per rollout and evaluation actor, e.g. {rollout_gpu: 1} to place actors on a node type "
        "that advertises them (see cluster/).",
    )
    api_base: str = Field(
        "http://localhost:8000/v1",
        description="openai: base URL of the server, up to and including /v1 (vLLM serve's default shown).",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="openai: name of the environment variable holding the API key, in upper case (the key itself "
        "never goes in a config); where that variable is unset or empty, requests carry no Authorization header, "
        "as local servers need none.",
    )
    max_concurrency: int = Field(32, ge=1, description="openai: requests in flight at once, per actor.")
    request_timeout_s: float = Field(
        600.0, gt=0.0, description="openai: seconds a request may take, queueing on the server included; not retried."
    )
    max_retries: int = Field(
        5, ge=0, description="openai: retries of a request after a connection error, HTTP 408, 429 or 5xx."
    )
    retry_backoff_s: float = Field(
        1.0, ge=0.0, description="openai: wait before the first retry; doubles with each retry (capped at 60 s)."
    )

    @field_validator("api_base")
    @classmethod
    def _url_without_secrets(cls, value: str) -> str:
        url = urllib.parse.urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("expected an http:// or https:// URL, up to and including /v1")
        if url.username is not None or url.password is not None:
            raise ValueError(
                "holds credentials, which every error would show: put the API key in the environment variable "
                "that rollout.api_key_env names"
            )
        if "?" in value or "#" in value:
            raise ValueError(
                "holds a query or fragment: /chat/completions is appended to it, so that would not be the path requested"
            )
        return value

    @property
    def transformers_device(self) -> str:
        """Where the transformers engine runs: "cpu" where the actor reserves no GPU (Ray leaves such an actor
        every GPU of its node in sight, and it would take one unreserved), else "gpu"."""
        return "cpu" if self.gpus_per_actor == 0 else "gpu"

    @field_validator("api_key_env")
    @classmethod
    def _names_a_variable(cls, value: str) -> str:
        if not is_env_var_name(value):
            raise ValueError(API_KEY_ENV_EXPECTED)  # not the value: _NEVER_SHOWN
        return value

    @model_validator(mode="after")
    def _vllm_actors_hold_their_gpus(self) -> "RolloutConfig":
        # At load time: else vLLM fails inside the actors, after the cluster scaled up for them.
        if self.engine is not EngineKind.vllm and self.tensor_parallel_size > 1:
            raise ValueError(
                f"rollout.tensor_parallel_size={self.tensor_parallel_size} shards the model over GPUs with "
                f"rollout.engine=vllm only; the {self.engine.value} engine would run it unsharded"
            )
        if self.engine is EngineKind.vllm and self.gpus_per_actor == 0:
            raise ValueError(
                "rollout.engine=vllm runs on GPUs: set rollout.gpus_per_actor (to rollout.tensor_parallel_size, "
                f"now {self.tensor_parallel_size})"
            )
        if self.engine is EngineKind.vllm and self.tensor_parallel_size == 1 and self.gpus_per_actor > 1:
            raise ValueError(
                f"rollout.gpus_per_actor={self.gpus_per_actor:g} reserves GPUs that vLLM, with "
                "rollout.tensor_parallel_size=1, leaves idle: set rollout.gpus_per_actor to 1 (or less, to share "
                "a GPU between actors), or rollout.tensor_parallel_size and rollout.gpus_per_actor both to the number of "
                "GPUs to shard the model over"
            )
        if self.engine is EngineKind.vllm and 1 < self.tensor_parallel_size != self.gpus_per_actor:
            raise ValueError(
                f"rollout.tensor_parallel_size={self.tensor_parallel_size} shards the model over that many GPUs of "
                f"the actor: set rollout.gpus_per_actor to it (now {self.gpus_per_actor:g})"
            )
        if self.engine is EngineKind.openai and self.max_model_len is not None:
            raise ValueError(
                f"rollout.max_model_len={self.max_model_len} sets the context of a local engine; with "
                "rollout.engine=openai the server holds the model: set its context there (vllm serve --max-model-len) "
                "and leave rollout.max_model_len out"
            )
        if self.engine is EngineKind.vllm and self.gpu_memory_utilization > self.gpus_per_actor:
            raise ValueError(
                f"rollout.gpu_memory_utilization={self.gpu_memory_utilization:g} is the share of the whole GPU's memory "
                f"each vLLM actor takes, more than the rollout.gpus_per_actor={self.gpus_per_actor:g} of the GPU it "
                "reserves: the actors sharing the GPU would ask for more memory than it has, and vLLM would refuse to "
                f"start; set rollout.gpu_memory_utilization to at most {self.gpus_per_actor:g}"
            )
        return self

    @model_validator(mode="after")
    def _server_settings_only_for_a_server(self) -> "RolloutConfig":
        # Else a config meant for a server (its engine key forgotten) plays the local default model instead.
        if self.engine is not EngineKind.openai:
            for name in _SERVER_SETTINGS:
                if getattr(self, name) != type(self).model_fields[name].default:  # a value is not shown: _NEVER_SHOWN
                    raise ValueError(
                        f"rollout.{name} is read with rollout.engine=openai only, and rollout.engine is "
                        f"{self.engine.value}: set rollout.engine=openai to play on a server, or remove rollout.{name}"
                    )
        return self

    @model_validator(mode="after")
    def _samples_can_differ(self) -> "RolloutConfig":
        if self.temperature == 0 and self.samples_per_prompt > 1:
            raise ValueError(
                f"rollout.temperature=0 samples greedily, so the rollout.samples_per_prompt={self.samples_per_prompt} "
                "episodes of a prompt would all be the same (and vLLM refuses greedy requests for more than one "
                "sample): set rollout.samples_per_prompt=1 or a temperature above 0"
            )
        return self


class WeightMode(str, Enum):
    drift = "drift"
    uniform = "uniform"
    success_only = "success_only"


class WeightsConfig(_Section):
    mode: WeightMode = Field(
        WeightMode.drift,
        description="drift: w = K·softmax(R/β) per prompt; uniform: w = 1 (SFT on all trajectories); "
        "success_only: w = 1 on trajectories that reached a correct answer, 0 elsewhere (RFT).",
    )
    beta: float = Field(0.1, gt=0.0, description="β: temperature of exp(R/β). Default 0.1.")
    gamma: float = Field(0.9, ge=0.0, le=1.0, description="γ: per-turn discount of r_t. Default 0.9.")
    rep_lambda: float = Field(0.5, ge=0.0, description="λ: repetition penalty on 1 − unique/answers. Default 0.5.")
    format_penalty: Optional[float] = Field(
        None,
        le=0.0,
        description="Re-price format failures at this value per turn (needs each trajectory's per-turn record of "
        "them, column format_failures, which drift-ray's rollouts write); "
        "default: use each trajectory's recorded format_penalty total.",
    )


class ExampleKind(str, Enum):
    last_turn = "last_turn"
    all_turns = "all_turns"


class LossKind(str, Enum):
    sample_mean = "sample_mean"
    weight_normalized = "weight_normalized"


class LrSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


ALL_LINEAR = "all-linear"  # PEFT's target_modules for every linear layer but the output layer


class LoraConfig(_Section):
    enabled: bool = Field(False, description="Train LoRA adapters (PEFT) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling α.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description=f"Modules to adapt: a list of module names (the last part of a module's dotted name), or "
        f"{ALL_LINEAR}, PEFT's every linear layer but the output layer.",
    )
    merge: bool = Field(True, description="Save merged full weights (else the adapter alone).")

    @field_validator("target_modules")
    @classmethod
    def _names_or_all_linear(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str) and value != ALL_LINEAR:
            raise ValueError(f"expected a list of module names, such as [{value}], or {ALL_LINEAR}")
        if not value:
            raise ValueError(f"expected one module name at least, or {ALL_LINEAR}")
        return value


def accumulation_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches per rank and optimizer step; the global batch must split evenly over ranks and micro-batches."""
    per_pass = micro_batch_size * world_size
    if global_batch_size % per_pass:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} must be a multiple of train.micro_batch_size × "
            f"train.num_workers = {micro_batch_size} × {world_size} = {per_pass}; set train.global_batch_size "
            f"to {max(per_pass, global_batch_size // per_pass * per_pass)} or change the other two"
        )
    return global_batch_size // per_pass


class TrainConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs per Ray Train worker.")
    zero_stage: int = Field(
        2,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage (paper: 3). At 3 each GPU holds a slice of every parameter, and the "
        "trained model is gathered one module at a time into rank 0's CPU memory to be saved. With transformers "
        ">= 5.24 each worker also loads only its slice (zero.Init; rank 0 reads the checkpoint); with older "
        "releases, which loaded some weights wrong that way, each worker loads the whole model into CPU memory "
        "first. drift_train.json says which (loaded_partitioned).",
    )
    offload: bool = Field(False, description="ZeRO CPU offload of optimizer states (and parameters at stage 3).")
    examples: ExampleKind = Field(
        ExampleKind.last_turn,
        description="last_turn: the last assistant message given all earlier ones (paper); "
        "all_turns: every assistant message, as one example with the trajectory's weight (its per-token mean "
        "NLL pools the tokens of all its replies).",
    )
    loss: LossKind = Field(
        LossKind.sample_mean,
        description="sample_mean: mean over the batch of w_i·L_i (authors' default); "
        "weight_normalized: Σ w_i·L_i / Σ w_i over the global batch, whose trajectories are drawn at random "
        "(sample_mean's are of similar length, to cut padding; a batch of long failures alone, divided by its "
        "own small Σ w_i, would train on them at full strength). Trajectories of weight 0 are left out of "
        "the batches (so weights.mode=success_only is SFT on the successes, RFT). Where an epoch's examples do not "
        "fill its global batches, one batch is smaller, and either loss is over its own examples: each weighs more "
        "in that step (a lone one's weight cancels out under weight_normalized).",
    )
    lr: float = Field(5e-6, gt=0.0, description="Peak learning rate. Paper: 5e-6.")
    lr_schedule: LrSchedule = Field(LrSchedule.constant, description="After warmup: constant or cosine to 0.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps with linear warmup. Paper: 0.1.")
    epochs: int = Field(1, ge=1, description="Passes over the weighted rollouts. Paper: 1.")
    global_batch_size: int = Field(128, ge=1, description="Sequences per optimizer step, all workers. Paper: 128.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per forward pass per worker.")
    weight_decay: float = Field(
        0.1,
        ge=0.0,
        description=(
            "AdamW weight decay, on every trainable parameter: norm scales and biases too, as verl and torchtune "
            "decay them (Hugging Face's Trainer exempts them). Paper: 0.1."
        ),
    )
    grad_clip: float = Field(1.0, ge=0.0, description="Gradient-norm clip (0 = off). Paper: 1.0.")
    bf16: bool = Field(False, description="bf16 mixed precision (paper: true on GPUs).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    max_length: int = Field(
        2048,
        ge=8,
        description="Tokens per example. A longer one loses its oldest turns after the question (an answer and "
        "its feedback at a time, down to the last pair), then its earliest tokens (a last reply that alone is "
        "longer is cut on the right); drift_train.json counts them (truncated_examples).",
    )
    checkpoint_every: Optional[int] = Field(
        None,
        ge=0,
        description="Save a checkpoint that a killed run resumes from every N steps (default: at the end of each "
        "epoch but the last; 0: none, so that a killed run starts again from step 0).",
    )
    log_every: int = Field(10, ge=0, description="Rank 0 logs the step's metrics every N steps (0 = never).")
    tensorboard: bool = Field(
        False,
        description="Rank 0 writes every step's metrics (loss, lr, grad_norm, tokens_per_s, truncated, peak_rss_mb) as "
        "TensorBoard scalars under <run_dir>/train/tensorboard while it trains (`tensorboard --logdir` on it). "
        "Observes the run only: turning it on or off neither restarts nor refuses a run.",
    )
    resources: dict[str, StrictFloat] = Field(  # strict: no true for 1
        default_factory=dict,
        description="Custom Ray resources per worker, e.g. {train_gpu: 1} to place workers on a node type "
        "that advertises them (see cluster/).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA through PEFT.")

    @model_validator(mode="after")
    def _global_batch_splits_evenly(self) -> "TrainConfig":
        # At load time: else a bad split would fail only when training starts, after the rollouts.
        accumulation_steps(self.global_batch_size, self.micro_batch_size, self.num_workers)
        return self

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> "TrainConfig":
        if self.offload and self.zero_stage == 0:
            # DeepSpeed offloads optimizer states through ZeRO only; without it CPU Adam meets GPU tensors.
            raise ValueError("train.offload=true needs ZeRO: set train.zero_stage to 1, 2 or 3, or train.offload=false")
        return self


# Keys of eval.task that evaluation does not read (accepted: eval.task may be a YAML alias of task).
EVAL_TASK_UNREAD = ("train_path", "num_train")


class EvalConfig(_Section):
    task: Optional[TaskConfig] = Field(
        None,
        description="Task whose test split is evaluated (default: `task`), e.g. train on MetaMathQA and "
        f"evaluate on MATH-500; the task keys but {' and '.join(EVAL_TASK_UNREAD)}, which are not read.",
    )
    max_new_tokens: Optional[int] = Field(None, ge=1, description="New tokens per turn (default: rollout.max_new_tokens).")
    prompts_per_batch: int = Field(64, ge=1, description="Problems per actor call.")
    num_actors: int = Field(
        1, ge=1, description="Evaluation actors, each an engine as the rollout.* keys set one (engine, cpus_per_actor, "
        "gpus_per_actor, resources, dtype).",
    )

    @model_validator(mode="after")
    def _eval_task_names_its_task(self) -> "EvalConfig":
        if self.task is not None and not {"kind", "name"} & self.task.model_fields_set:
            # Else `eval.task.num_test=50`, meant for the task evaluated by default, would evaluate the
            # built-in candidates task that TaskConfig's own defaults name.
            raise ValueError(
                "eval.task names no task (neither eval.task.kind nor eval.task.name is set): set them, or leave "
                "eval.task unset to evaluate on task's test split (task.num_test sets how many problems)"
            )
        return self


class RayConfig(_Section):
    address: Optional[str] = Field(
        None,
        description="Ray cluster to join ('auto': the one `ray start` runs on this machine); default: RAY_ADDRESS, "
        "else start a new local cluster.",
    )
    num_cpus: Optional[int] = Field(
        None, ge=1, description="CPUs of a local cluster (default: all); not used, and logged so, when joining one."
    )


class Config(_Section):
    run_dir: LocalPath = Field("runs/demo", min_length=1, description="Directory of every artifact of the run.")
    seed: int = Field(0, ge=0, description="Seed of problem sampling, generation and training.")
    rounds: int = Field(
        1,
        ge=1,
        description="Iterated DRIFT: rounds of (rollouts from the latest policy → weights → weighted SFT of it). "
        "Round r > 1 works under run_dir/round-r; every round's model is evaluated.",
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    episode: EpisodeConfig = Field(default_factory=EpisodeConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _later_rounds_train_full_models(self) -> "Config":
        if self.rounds > 1 and self.train.lora.enabled and not self.train.lora.merge:
            # Round r trains round r-1's model further; a saved adapter alone would be trained from fresh
            # adapter weights on the base model, losing the earlier rounds.
            raise ValueError(
                "rounds > 1 trains each round's model further, which an adapter saved unmerged "
                "(train.lora.merge=false) cannot be: set train.lora.merge=true (or rounds=1)"
            )
        return self


class _ConfigLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but
    - booleans and numbers as YAML 1.2 reads them, not YAML 1.1 (PyYAML's): "seed: 010" is 10, not octal
      8; "1:30" is text, not base-60 90; yes/no/on/off are words, not booleans (a boolean field still takes
      them); 1e-3, 5E4 and 2.5e3 are numbers, not strings. Typed fields would convert most of these; free-form
      options (task.options, task.verifier_options) would keep the wrong value;
    - a key written twice in one mapping is an error: PyYAML keeps the last, so a second `task:` section
      would silently drop the first one's keys."""

    def construct_document(self, node: yaml.Node) -> Any:
        # On the document as written: constructing it merges `<<` keys into the mappings in place, after which
        # an anchored mapping's merged keys and its own would look written twice.
        self._refuse_repeated_keys(node, set())
        return super().construct_document(node)

    def _refuse_repeated_keys(self, node: yaml.Node, checked: set[int]) -> None:
        if id(node) in checked:  # an alias of a node already checked
            return
        checked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written beside it override it
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    raise yaml.constructor.ConstructorError(
                        problem=f"found a {type(key).__name__} as a key, where a key is a name",
                        problem_mark=_without_text(key_node.start_mark),
                    )
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"found the key {key!r} a second time (first at line {seen[key].start_mark.line + 1})",
                        problem_mark=_without_text(key_node.start_mark),
                    )
                seen[key] = key_node
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            for child in node.value:
                for part in child if isinstance(child, tuple) else (child,):
                    self._refuse_repeated_keys(part, checked)


# YAML 1.2's core schema, which reads no dates: 2024-01-01 is text, as a field of text or a task option expects.
_BOOL_TAG, _INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YAML_11_ONLY = (_BOOL_TAG, _INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp")
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _YAML_11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+|\.[0-9]+[eE][-+]?[0-9]+)"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _construct_int(loader: _ConfigLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    try:
        return int(text if base == 10 else text[2:], base)
    except ValueError:  # an explicit !!int on text that is none
        raise yaml.constructor.ConstructorError(
            problem=f"{text!r} is not an integer", problem_mark=_without_text(node.start_mark)
        ) from None


_ConfigLoader.add_constructor(_INT_TAG, _construct_int)


def _without_text(mark: yaml.Mark) -> yaml.Mark:
    """The mark's place alone: the line it would quote may hold a secret (an api_base with credentials)."""
    return yaml.Mark(mark.name, mark.index, mark.line, mark.column, None, None)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message for `err`, its marks' places without the lines they would quote (see _without_text)."""
    if not isinstance(err, yaml.MarkedYAMLError):  # a ReaderError names the character, not its line
        return str(err)
    context_mark, problem_mark = (None if m is None else _without_text(m) for m in (err.context_mark, err.problem_mark))
    return str(yaml.MarkedYAMLError(err.context, context_mark, err.problem, problem_mark, err.note))


def _load_yaml(text: str, source: str = "<override>") -> Any:
    loader = _ConfigLoader(text)  # a SafeLoader: data is never executed
    loader.name = source  # errors point to "line L, column C" of it
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every problem with its dotted path."""


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), given_as: Mapping[str, str] | None = None
) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply `key.path=value` overrides.
    `given_as`: how the user gave the override of a key, where not as one (a flag such as --beta), for errors."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = Path(path).read_bytes()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config: {err.strerror}") from err
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise ConfigError(f"{source}:{line}: not UTF-8 text ({err.reason}); save the config as UTF-8") from None
        try:
            data = _load_yaml(text, source)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err)}") from None
        if data is None:  # an empty file (or only comments): the defaults; `0` or `[]` is no config
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, found {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item, source)
    keys = [override_key(item) for item in overrides]
    return validate_config(data, source, {key: (given_as or {}).get(key, f"the override of {key}") for key in keys})


def validate_config(data: dict[str, Any], source: str = "<config>", overridden: Mapping[str, str] | None = None) -> Config:
    """`overridden`: the dotted keys that overrides set on top of the file named by `source`, each with how it
    was given ("the override of KEY"), so that an error under one of them blames that, not the file."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        problems = [_describe(e) + _set_by_override(e, overridden or {}) for e in err.errors()]
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems)) from None


def _set_by_override(error: Mapping[str, Any], overridden: Mapping[str, str]) -> str:
    dotted = ".".join(str(part) for part in error["loc"])

    def blamed(key: str) -> bool:
        if dotted == key or dotted.startswith(key + "."):
            return True
        # An override below the key at fault made it: `task.option.num_test=5` an unknown task.option. Not for a
        # check across a section's keys, which any override in the section would seem to have failed.
        return error["type"] != "value_error" and key.startswith(dotted + ".")

    # The key alone: the override's value may be a secret (see _NEVER_SHOWN).
    key = next((k for k in overridden if blamed(k)), None)
    return "" if key is None else f" [set by {overridden[key]}]"


def override_key(item: str) -> str:
    """The dotted key that the override `key.path=value` sets."""
    return item.partition("=")[0]


def override_keys(item: str) -> list[str]:
    """The dotted keys that the override `key.path=value` sets: its key, and those inside a mapping value
    (`train={lora: {r: 8}}` sets train.lora.r too). A value that is not valid YAML sets its key alone here;
    applying the override refuses it."""
    key, _, raw = item.partition("=")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = None

    def inside(prefix: str, node: Any) -> list[str]:
        if not isinstance(node, dict):
            return []
        return [k for name, child in node.items() for k in (f"{prefix}.{name}", *inside(f"{prefix}.{name}", child))]

    return [key, *inside(key, value)]


_DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


def _apply_override(data: dict[str, Any], item: str, source: str) -> None:
    # Errors name the key alone: the value may be a secret (see _NEVER_SHOWN), and so may an override
    # without '=', unless it reads as a key of the config (`rollout.max_new_tokens 16`).
    key, sep, raw = item.partition("=")
    if not sep:
        if _DOTTED_KEY.fullmatch(item) and item.split(".")[0] in Config.model_fields:
            raise ConfigError(f"{source}: override {item!r} has no '=': expected key.path=value, e.g. {item}=VALUE")
        raise ConfigError(
            f"{source}: an override has no '=' (not shown: it may be a value, such as a secret): expected key.path=value"
        )
    if not all(key.split(".")):  # `task.options.=1` would set a key named ""
        raise ConfigError(f"{source}: override of {key!r}: expected key.path=value, with no empty part in key.path")
    try:
        value = _load_yaml(raw) if raw.strip() else None
        comment = _comment(raw)
    except yaml.YAMLError as err:
        reason = getattr(err, "problem", None) or _yaml_problem(err)  # the parser's one-line reason
        raise ConfigError(f"{source}: override of {key}: not a valid YAML value ({reason})") from None
    if comment and key.split(".")[-1] in _NEVER_SHOWN:
        raise ConfigError(f"{source}: override of {key}: YAML reads part of it as a comment (from a '#'): leave it out")
    if comment:  # `episode.feedback=Wrong #2` would set "Wrong"
        message = f"{source}: override of {key}: YAML reads {comment!r} as a comment, which an override has no use for"
        if isinstance(value, (dict, list)) or "\n" in raw:
            raise ConfigError(f"{message}: leave it out")
        quoted = raw.replace("'", "''")
        raise ConfigError(f"{message}: leave it out, or quote the value if it belongs to it, e.g. \"{key}='{quoted}'\"")
    node = data
    parts = key.split(".")
    model: type[BaseModel] | None = Config  # the section `node` holds, while the key is one of the config's
    for i, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part) if model is not None else None
        model = _section(field.annotation) if field is not None else None
        # A key that holds a value in the config, not one in the file alone: `rollout.model.x=1` without --config.
        no_section = field is not None and model is None and not _holds_mapping(field.annotation)
        if node.get(part) is None and not no_section:  # absent, or a section left empty in the file ("task:")
            node[part] = {}
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: override of {key}: {'.'.join(parts[: i + 1])} is not a section")
        # A copy: a YAML alias or merge key shares one mapping between sections, which would all change.
        node[part] = node = dict(child)
    node[parts[-1]] = value


def _comment(text: str) -> str | None:
    """The first comment in the YAML `text` (from its '#' to the end of its line), or None: what lies
    before, between or after its tokens. (A block's end token ends after a comment that follows its last
    value, so it is not one of them.)"""
    ends = (yaml.StreamStartToken, yaml.StreamEndToken, yaml.BlockEndToken)
    tokens = [t for t in yaml.scan(text, Loader=_ConfigLoader) if not isinstance(t, ends)]
    gap_starts = [0] + [t.end_mark.index for t in tokens]
    gap_ends = [t.start_mark.index for t in tokens] + [len(text)]
    for start, end in zip(gap_starts, gap_ends):
        gap = text[start:end]
        if "#" in gap:
            return gap[gap.index("#") :].split("\n")[0].strip()
    return None


# Keys whose bad value is not repeated in errors: what a user mistakes for them is often a secret (the API key
# itself for api_key_env, a URL with credentials for api_base).
_NEVER_SHOWN = frozenset({"api_key_env", "api_base"})


# Words that qualify a key's subject: shared by too many keys to point to one.
_QUALIFIERS = frozenset({"max", "min", "num", "per", "use", "size"})
_MOST_SUGGESTED = 3


def _suggested_keys(loc: list[str]) -> list[str]:
    """The dotted keys to suggest for the unknown key at `loc`, best first: the same name in another section
    (episode.max_turns for eval.max_turns); the keys of its section that hold all its words (samples:
    samples_per_prompt; temp: temperature), the fewest-worded first, else those holding the most of its
    words but qualifiers such as max or num (num_samples: samples_per_prompt); else difflib's nearest key of
    the section, which finds a short key too far from a longer one that holds it (eval.num_actors for
    eval.num_workers, after train.num_workers). Where none of these is found, the keys of the section whose
    description names it (train.lr for train.learning_rate): descriptions name many keys in passing."""
    name, section = loc[-1], loc[:-1]
    model = _model_at(section)
    known = list(model.model_fields)
    words = _words(name)
    holding = [key for key in known if _held(words, key) == len(words)]
    if not holding:
        held = {key: _held(words - _QUALIFIERS, key) for key in known}
        most = max(held.values(), default=0)
        holding = [key for key in known if most and held[key] == most]
    fewest = min((len(_words(key)) for key in holding), default=0)
    in_section = [key for key in holding if len(_words(key)) == fewest] or difflib.get_close_matches(name, known, n=1)
    elsewhere = [key for key, _ in _fields() if key.split(".")[-1] == name and key.split(".")[:-1] != section]
    if not in_section and not elsewhere:
        named = re.compile(rf"\b{re.escape(name.replace('_', ' '))}\b", re.IGNORECASE)
        in_section = [key for key in known if named.search(model.model_fields[key].description or "")]
    return [*elsewhere, *(".".join([*section, key]) for key in in_section)][:_MOST_SUGGESTED]


def _words(key: str) -> set[str]:
    """The words of a key, singular or plural alike."""
    return {word[:-1] if word.endswith("s") and len(word) > 3 else word for word in key.lower().split("_") if word}


def _held(words: set[str], key: str) -> int:
    """How many of `words` the key `key` holds: a word of its, or from three letters on, one that begins
    the other (temp: temperature; scheduler: schedule)."""
    own = _words(key)
    return sum(any(_same_word(word, mine) for mine in own) for word in words)


def _same_word(a: str, b: str) -> bool:
    return a == b or (min(len(a), len(b)) >= 3 and (a.startswith(b) or b.startswith(a)))


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden":
        suggested = " or ".join(f"'{key}'" for key in _suggested_keys(loc))
        known = ", ".join(_model_at(loc[:-1]).model_fields)
        hint = f"; did you mean {suggested}?" if suggested else f"; known keys: {known}"
        return f"{dotted}: unknown key{hint}"
    found = error.get("input")
    # A check of ours raised it: its own words, without pydantic's "Value error, " before them.
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" and "error" in error.get("ctx", {}) else error["msg"]
    if error["type"] == "model_type":  # pydantic's words name the class, not the config's terms
        message = "expected a section: a mapping of its keys"
    if loc[:2] == ["eval", "task"] and loc[-1] in EVAL_TASK_UNREAD and error["type"] == "value_error":
        # TaskConfig's check of the keys its kind reads: no kind of an evaluated task reads this one.
        message = "evaluation reads a task's test split only: remove the key (or set it to null)"
    if not loc or (error["type"] == "value_error" and _names_a_section(loc)):
        return message  # a check across sections, or across a section's keys: its message names the keys
    if loc[-1] in _NEVER_SHOWN:
        shown = ""
    elif found is None and error["type"] == "string_type":  # `run_dir=~` meant the home directory
        shown = " (found null, as YAML reads an empty value, null and ~: quote it for text, e.g. '~')"
    elif not isinstance(found, dict):
        shown = f" (found {found!r})"
    elif error["type"].endswith("_type"):
        # YAML reads an unquoted `a: {b}` as a mapping.
        shown = f" (found the mapping {found!r}; quote a value with ': ' or braces in it)"
    else:  # a check across the keys of this section: the input is the whole section
        shown = ""
    return f"{dotted}: {message}{shown}"


def _holds_mapping(annotation: Any) -> bool:
    """Whether a field of this type holds a free mapping (task.options), whose keys an override may set one by one."""
    return any(a is dict or get_origin(a) is dict for a in (annotation, *get_args(annotation)))


def _section(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds: its model, also inside Optional[Model] (e.g. eval.task)."""
    return next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _names_a_section(loc: list[str]) -> bool:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        section = _section(field.annotation) if field is not None else None
        if section is None:
            return False
        model = section
    return True


def _model_at(loc: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = Config
    for part in loc:
        section = _section(model.model_fields[part].annotation)
        if section is None:
            break
        model = section
    return model


def _fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, pydantic FieldInfo) of every field of the config tree, a section before its fields."""
    fields = []
    for name, info in model.model_fields.items():
        fields.append((prefix + name, info))
        section = _section(info.annotation)
        if section is not None:
            fields.extend(_fields(section, f"{prefix}{name}."))
    return fields


def field_docs() -> list[tuple[str, Any, str]]:
    """(dotted key, default, description) for every leaf field, and for an optional section (unset by
    default) before its fields, for `drift-ray config --doc`."""
    rows = []
    unread = {f"eval.task.{name}" for name in EVAL_TASK_UNREAD}
    for key, info in _fields():
        if _section(info.annotation) is not info.annotation and key not in unread:
            default = info.get_default(call_default_factory=True)
            rows.append((key, getattr(default, "value", default), info.description or ""))
    return rows
