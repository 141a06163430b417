"""Generation engines behind the `Engine` protocol: transformers (CPU default) and vLLM (GPU).

Both take conversations, apply the model's chat template, and return n sampled assistant replies per
conversation. A reply ends at the end-of-turn token (excluded from the text) or just after the first
stop string (included, like vLLM's `include_stop_str_in_output`), else it is cut off at max_new_tokens
(and marked so). Engines know nothing of DRIFT.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.logits_process import TopPLogitsWarper

from drift_ray.config import DEMO_MODEL, EngineKind, RolloutConfig
from drift_ray.episode import Conversation, Engine, Generation, Message, SamplingParams, sample_seed
from drift_ray.trajectories import read_json_object

# Chat models whose config names only the end-of-text eos still end a turn with one of these.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>")
# Finished rows stay in the batch (their tokens ignored) until they are this share of it: dropping them
# copies the whole cache, which cost more than their wasted compute when done at every step.
_COMPACT_AT_FINISHED_SHARE = 0.25


class TransformersEngine:
    """Batched sampling with the KV cache on any causal LM that `from_pretrained` loads.

    share_prefill: prefill each prompt once and repeat its KV cache for the n samples (else encode the
    prompt n times; kept to measure the difference).
    carry_cache: keep the keys and values each reply leaves until the next call, so the next turn of a
    conversation (its messages, that reply, then new messages) prefills only the new tokens instead of
    the whole history. Only the previous call's replies are kept (the episode loop sends every active
    conversation once per turn), at most `max_carried_bytes` of them (a token costs layers × 2 × kv_heads ×
    head_dim values: 2 KiB for the demo model in float32, 36 KiB for Qwen2.5-3B in bfloat16), the rest
    re-prefill. Reuse stops
    at the first token that differs from what was cached, so a reply that tokenizes differently when
    rendered back costs speed, never correctness. Models whose cache is not plain full attention
    (sliding windows, linear attention) always prefill everything.
    Rows that finish leave the batch (once they are a quarter of it), so a long reply does not keep the
    finished ones computing. The cache is allocated once per batch for its whole length. Prompts are
    sorted by length and decoded in chunks of at most `max_batch_tokens` (rows × (longest reused prefix +
    longest fed prompt part + new tokens)) to bound memory and padding. `torch_threads` sets torch's (process-wide) CPU thread count.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dtype: str = "auto",
        device: str | None = None,
        torch_threads: int | None = None,
        max_model_len: int | None = None,
        max_batch_tokens: int = 1 << 16,
        share_prefill: bool = True,
        carry_cache: bool = True,
        max_carried_bytes: int = 1 << 31,
    ):
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.max_batch_tokens = max_batch_tokens
        self.share_prefill = share_prefill
        self.max_carried_bytes = max_carried_bytes
        self._replies: dict[tuple[tuple[str, str], ...], _CachedPrefix] = {}
        if isinstance(model, str):
            self.name = model
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(self.device).eval()
        else:
            # A model in memory (e.g. the policy of an online RL loop, updated between calls): the caller
            # keeps it in eval mode while generating and calls drop_carried_cache after each update.
            if tokenizer is None:
                raise ValueError("TransformersEngine: a model object needs its tokenizer (tokenizer=...)")
            self.name = model.config.name_or_path or type(model).__name__
            self.device, self.tokenizer, self.model = model.device, tokenizer, model
        # transformers 5 renamed forward's past_key_values to cache (the old name goes in 5.40).
        self._cache_argument = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        layers = DynamicCache(config=self.model.config).layers
        # Our own layers (preallocated, carried between calls) assume every layer keeps all positions.
        self._num_plain_layers = len(layers) if layers and all(type(layer) is DynamicLayer for layer in layers) else 0
        self.carry_cache = carry_cache and self._num_plain_layers > 0
        self.end_of_turn_ids = _end_of_turn_ids(self.tokenizer, self.model.generation_config)
        if not self.end_of_turn_ids:
            raise ValueError(f"{self.name}: found no end-of-turn token (eos_token_id, {', '.join(_END_OF_TURN_TOKENS)})")
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else min(self.end_of_turn_ids)
        # As vLLM's max_model_len (by default the model's): a reply stops there, cut off, and a longer prompt
        # is refused, so that both engines play the same episodes.
        positions = getattr(self.model.config, "max_position_embeddings", None)
        if max_model_len is not None and positions is not None and max_model_len > positions:
            raise ValueError(
                f"{self.name}: rollout.max_model_len={max_model_len} is above the model's context of {positions} "
                "tokens (max_position_embeddings), past which the transformers engine has no positions; set it to at "
                "most that"
            )
        self.context_length: int | None = max_model_len or positions
        self.context_key = "rollout.max_model_len" if max_model_len else "max_position_embeddings"

    def drop_carried_cache(self) -> None:
        """Forget the keys and values the last call's replies left: they hold the weights the model had
        then, so a caller that changes the weights in place calls this before the next call."""
        self._replies = {}

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, n: int) -> list[list[Generation]]:
        if n < 1:
            raise ValueError(f"{self.name}: asked for n={n} replies per conversation; expected n >= 1")
        if not conversations:
            return []
        prompts = chat_prompt_ids(self.tokenizer, conversations)
        limit = self.context_length
        too_long = next((i for i, prompt in enumerate(prompts) if limit and len(prompt) >= limit), None)
        if too_long is not None:
            raise ValueError(
                f"{self.name}: conversation {too_long} is a prompt of {len(prompts[too_long])} tokens, which leaves no "
                f"room for a reply in the context of {limit} tokens ({self.context_key}); "
                "lower episode.max_turns or rollout.max_new_tokens"
            )
        prefixes = [self._replies.get(_history_key(c)) for c in conversations]
        reused = [prefix.usable_length(prompt) if prefix else 0 for prefix, prompt in zip(prefixes, prompts)]
        self._replies = {}
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        results: list[list[Generation]] = [[] for _ in prompts]
        carried = 0
        for chunk in self._chunks(prompts, reused, n, params.max_new_tokens):
            samples, held = self._sample(
                [prompts[i] for i in chunk], [prefixes[i] for i in chunk], [reused[i] for i in chunk], params, n, generator
            )
            for row, completion in enumerate(samples):
                index = chunk[row // n]
                generation = self._to_generation(completion, prompts[index], params.stop)
                results[index].append(generation)
                if held[row] is not None and carried + held[row].nbytes <= self.max_carried_bytes:
                    carried += held[row].nbytes
                    reply = {"role": "assistant", "content": generation.text}
                    self._replies[_history_key([*conversations[index], reply])] = held[row]
            for i in chunk:
                prefixes[i] = None  # the next chunk's memory may reuse what this one held
        return results

    def _chunks(self, prompts: list[list[int]], reused: list[int], n: int, max_new_tokens: int) -> list[list[int]]:
        """Prompt indices, shortest first, in groups whose batch holds at most max_batch_tokens; a prompt
        over it goes alone. `reused[i]`: the leading tokens of prompt i already in its cached prefix.

        A batch has n rows per prompt, each as wide as the longest reused prefix, plus the longest run of
        fed tokens, plus max_new_tokens (see _sample): two prompts of one length, one of them cached and
        one not, make rows nearly twice that length.
        """
        chunks: list[list[int]] = []
        widths: tuple[int, int] = (0, 0)  # the longest reused prefix and fed run of the last chunk
        for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
            own = (reused[i], len(prompts[i]) - reused[i])
            joined = (max(widths[0], own[0]), max(widths[1], own[1]))
            if chunks and (len(chunks[-1]) + 1) * n * (sum(joined) + max_new_tokens) <= self.max_batch_tokens:
                chunks[-1].append(i)
                widths = joined
            else:
                chunks.append([i])
                widths = own
        return chunks

    @torch.inference_mode()
    def _sample(
        self,
        prompts: list[list[int]],
        prefixes: list[_CachedPrefix | None],
        reused: list[int],
        params: SamplingParams,
        n: int,
        generator: torch.Generator | None,
    ) -> tuple[list[list[int]], list[_CachedPrefix | None]]:
        """n completions (token ids) of every prompt, in order: prompt 0's n samples, then prompt 1's, …;
        and, with carry_cache, the keys and values each completion leaves behind (else Nones).

        A prompt whose first `reused` tokens are in its prefix feeds only the rest. Batch columns: the reused
        prefixes, right-aligned, then the fed tokens, right-aligned; the attention mask hides the gaps.
        """
        if not self.share_prefill:
            prompts, prefixes, reused = ([x for x in xs for _ in range(n)] for xs in (prompts, prefixes, reused))
        copies = n if self.share_prefill else 1
        fed = [prompt[r:] for prompt, r in zip(prompts, reused)]
        cache_width, fed_width = max(reused), max(map(len, fed))
        input_ids = torch.tensor([[self.pad_id] * (fed_width - len(f)) + f for f in fed], device=self.device)
        attention_mask = torch.tensor(
            [
                [0] * (cache_width - r) + [1] * r + [0] * (fed_width - len(f)) + [1] * len(f)
                for r, f in zip(reused, fed)
            ],
            device=self.device,
        )
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, cache_width:]
        cache = self._new_cache(cache_width + fed_width + params.max_new_tokens)
        if cache_width:
            _fill_cache(cache, prefixes, reused, cache_width)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            **{self._cache_argument: cache},
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        if copies > 1:
            cache.batch_repeat_interleave(copies)
            logits = logits.repeat_interleave(copies, dim=0)
            attention_mask = attention_mask.repeat_interleave(copies, dim=0)
        next_position = positions[:, -1:].repeat_interleave(copies, dim=0) + 1

        stopper = _StopStrings(self.tokenizer, params.stop)
        room = [self.context_length - len(prompt) if self.context_length else params.max_new_tokens for prompt in prompts]
        top_p = TopPLogitsWarper(params.top_p) if 0 < params.top_p < 1 else None
        completions: list[list[int]] = [[] for _ in range(len(prompts) * copies)]
        held: list[_CachedPrefix | None] = [None] * len(completions)
        live = list(range(len(completions)))  # the completion each batch row is writing
        writing = [True] * len(live)  # finished rows stay in the batch (ignored) until compaction
        for step in range(params.max_new_tokens):
            tokens = _pick(logits, params.temperature, top_p, generator)
            last_step = step + 1 == params.max_new_tokens
            for row, token in enumerate(tokens.tolist()):
                if not writing[row]:
                    continue
                completion = completions[live[row]]
                completion.append(token)
                full = len(completion) >= room[live[row] // copies]
                if token in self.end_of_turn_ids or stopper.hit(completion) or last_step or full:
                    writing[row] = False
                    if self.carry_cache:
                        # The cache holds every token fed so far: the prompt and all but the last sampled one.
                        c = live[row]
                        held[c] = _CachedPrefix.take(cache, row, attention_mask, prompts[c // copies] + completion[:-1])
            still = [row for row, w in enumerate(writing) if w]
            if not still:
                break
            if len(live) - len(still) >= _COMPACT_AT_FINISHED_SHARE * len(live):
                index = torch.tensor(still, device=self.device)
                cache.batch_select_indices(index)
                tokens, attention_mask, next_position = tokens[index], attention_mask[index], next_position[index]
                live, writing = [live[row] for row in still], [True] * len(still)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
            logits = self.model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                **{self._cache_argument: cache},
                use_cache=True,
            ).logits[:, -1]
            next_position = next_position + 1
            if self.context_length:
                # A row that filled the context stays until compaction; its outputs are ignored, but a model
                # of learned positions has none past its last to embed it at.
                next_position = next_position.clamp(max=self.context_length - 1)
        return completions, held

    def _new_cache(self, columns: int) -> Cache:
        if self._num_plain_layers:
            return Cache(layers=[_PreallocatedLayer(columns) for _ in range(self._num_plain_layers)])
        return DynamicCache(config=self.model.config)

    def _to_generation(self, completion: list[int], prompt: list[int], stop: Sequence[str]) -> Generation:
        ended = bool(completion) and completion[-1] in self.end_of_turn_ids
        text = cut_at_stop(reply_text(self.tokenizer, prompt, completion[:-1] if ended else completion), stop)
        # Generation stops only at an end of turn, a stop string, max_new_tokens or the context's end.
        cut_off = not ended and not ends_on_stop(text, stop)
        return Generation(text, len(prompt), len(completion), cut_off, completion)


@dataclass
class _CachedPrefix:
    """The keys and values a token sequence left in the cache: one (heads, tokens, head_dim) tensor per layer."""

    tokens: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def take(cls, cache: Cache, row: int, attention_mask: torch.Tensor, tokens: list[int]) -> _CachedPrefix:
        """A copy of batch row `row` of the cache without its padding columns (those `attention_mask` zeroes)."""
        filled = attention_mask[row].bool()
        return cls(
            tokens,
            [layer.keys[row][:, filled] for layer in cache.layers],
            [layer.values[row][:, filled] for layer in cache.layers],
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def usable_length(self, prompt: list[int]) -> int:
        """How many leading tokens of `prompt` this holds; the last prompt token is always fed, for its logits."""
        n = min(len(self.tokens), len(prompt) - 1)
        differ = np.flatnonzero(np.asarray(self.tokens[:n]) != np.asarray(prompt[:n]))
        return int(differ[0]) if differ.size else n


def _fill_cache(cache: Cache, prefixes: list[_CachedPrefix | None], reused: list[int], width: int) -> None:
    """Put each row's first reused[row] prefix tokens into the cache's first `width` columns, right-aligned."""
    template = next(p for p, r in zip(prefixes, reused) if r)
    for layer, (keys, values) in enumerate(zip(template.keys, template.values)):
        batch_keys = keys.new_zeros(len(prefixes), keys.shape[0], width, keys.shape[-1])
        batch_values = values.new_zeros(len(prefixes), values.shape[0], width, values.shape[-1])
        for row, (prefix, r) in enumerate(zip(prefixes, reused)):
            if r:
                batch_keys[row, :, width - r :] = prefix.keys[layer][:, :r]
                batch_values[row, :, width - r :] = prefix.values[layer][:, :r]
        cache.update(batch_keys, batch_values, layer)


def _history_key(conversation: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    """The conversation up to its last assistant message: what a carried reply cache is filed under."""
    last = max((i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=-1)
    return tuple((m["role"], m["content"]) for m in conversation[: last + 1])


class _PreallocatedLayer(DynamicLayer):
    """A DynamicLayer writing into buffers of a fixed number of columns allocated at the first update.

    DynamicLayer concatenates at every decoding step, copying the whole cache each time; here a step
    writes one column. `keys`/`values` are views of the filled columns, as the attention expects.
    """

    def __init__(self, columns: int):
        super().__init__()
        self.columns = columns
        self.filled = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads, _, _ = key_states.shape
        self.key_buffer = key_states.new_zeros(rows, heads, self.columns, key_states.shape[-1])
        self.value_buffer = value_states.new_zeros(rows, heads, self.columns, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self.columns:
            raise RuntimeError(f"KV cache layer holds {self.columns} columns; asked to fill up to {end}")
        self.key_buffer[:, :, self.filled : end] = key_states
        self.value_buffer[:, :, self.filled : end] = value_states
        self.filled = end
        self._expose()
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._expose()

    def _expose(self) -> None:
        self.keys = self.key_buffer[:, :, : self.filled]
        self.values = self.value_buffer[:, :, : self.filled]


def _pick(logits: torch.Tensor, temperature: float, top_p: TopPLogitsWarper | None, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of every row: argmax at temperature 0, else a sample (after top-p filtering)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_p is not None:
        scores = top_p(None, scores)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


class _StopStrings:
    """Tells whether a growing completion has just produced one of the stop strings."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # A token holds at least one byte of text, so this many trailing tokens cover the longest stop
        # string, even one whose characters take several tokens each (byte-level BPE splits non-ASCII
        # characters); a stop found earlier would already have ended the completion.
        self.tail = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 1

    def hit(self, completion: list[int]) -> bool:
        if not self.stop:
            return False
        text = self.tokenizer.decode(completion[-self.tail :], skip_special_tokens=True)
        return any(s in text for s in self.stop)


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Conversation]) -> list[list[int]]:
    """The tokens the transformers engine feeds the model for each conversation: its text as the chat template
    renders it, with the generation prompt, tokenized whole."""
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


# Enough prompt tokens to hold a word for a decoder to join the reply's first token to.
_DECODE_CONTEXT_TOKENS = 8


def reply_text(tokenizer: PreTrainedTokenizerBase, prompt: list[int], reply: list[int]) -> str:
    """The text of the `reply` tokens as they continue `prompt`, as vLLM decodes a reply. Decoded alone, a
    SentencePiece reply loses its first token's word-start space (Llama 2, Mistral: "▁5" reads "5"), and
    weighted SFT, which tokenizes the prompt's text and the reply's, would train a token never sampled."""
    head = prompt[-_DECODE_CONTEXT_TOKENS:]
    head_text = tokenizer.decode(head, skip_special_tokens=True)
    text = tokenizer.decode(head + reply, skip_special_tokens=True)
    if head_text and text.startswith(head_text):
        return text[len(head_text) :]
    return tokenizer.decode(reply, skip_special_tokens=True)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to and including the earliest-ending stop string; unchanged when none occurs."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


def ends_on_stop(text: str, stop: Sequence[str]) -> bool:
    """Whether `text` (cut_at_stop's) ends on one of the stop strings."""
    return any(s and text.endswith(s) for s in stop)


def _end_of_turn_ids(tokenizer, generation_config: GenerationConfig | None) -> set[int]:
    ids = set(_chat_turn_end_ids(tokenizer))
    for source in (generation_config and generation_config.eos_token_id, tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def _chat_turn_end_ids(tokenizer) -> list[int]:
    """The ids of the tokens of _END_OF_TURN_TOKENS that `tokenizer` has."""
    added = tokenizer.get_added_vocab()
    return sorted(added[token] for token in _END_OF_TURN_TOKENS if token in added)


class VLLMEngine:
    """vLLM's offline `LLM.chat`; `n` samples per conversation share the prompt's prefill."""

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        seed: int = 0,
    ):
        try:
            import vllm
        except ImportError as err:
            raise ImportError(
                "rollout.engine: 'vllm' needs the vllm package (pip install 'drift-ray[vllm]' on a GPU machine)"
            ) from err
        self._vllm = vllm
        self.name = model
        # A LoRA adapter saved unmerged (train.lora.merge: false) runs on its base model as a LoRA request.
        base, adapter, lora_options = lora_adapter_base(model), None, {}
        if base is not None:
            from vllm.lora.request import LoRARequest

            adapter = LoRARequest("drift-adapter", 1, model)
            # vLLM refuses an adapter above max_lora_rank, 16 unless told.
            lora_options = {"enable_lora": True, "max_lora_rank": vllm_max_lora_rank(model)}
        self.lora_request = adapter
        self.llm = vllm.LLM(
            model=base or model,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,  # None: the model's
            seed=seed,
            **lora_options,
        )
        # vLLM stops at the eos of the model's configs only; a turn ends at the same tokens as with
        # TransformersEngine, so both engines play the same episodes.
        tokenizer = self.llm.get_tokenizer()
        self.stop_token_ids = _chat_turn_end_ids(tokenizer)
        try:
            generation_config = GenerationConfig.from_pretrained(base or model)
        except OSError:  # the model has none
            generation_config = None
        self.end_of_turn_ids = _end_of_turn_ids(tokenizer, generation_config)

    def generate(self, conversations: Sequence[Conversation], params: SamplingParams, n: int) -> list[list[Generation]]:
        # One SamplingParams per conversation: vLLM seeds every request with its own seed, so one shared
        # seed would make conversations with the same history reply alike.
        sampling = [
            self._vllm.SamplingParams(
                n=n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop=list(params.stop),
                stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=True,
                seed=sample_seed(params.seed, i, 0, n),
            )
            for i in range(len(conversations))
        ]
        outputs = self.llm.chat(list(conversations), sampling, use_tqdm=False, lora_request=self.lora_request)
        return [[self._to_generation(o, len(request.prompt_token_ids)) for o in request.outputs] for request in outputs]

    def _to_generation(self, output, prompt_tokens: int) -> Generation:
        # vLLM releases that test the length before the end of turn say "length" for a reply whose last
        # allowed token ended it.
        ended = len(output.token_ids) > 0 and output.token_ids[-1] in self.end_of_turn_ids
        cut_off = output.finish_reason == "length" and not ended
        return Generation(output.text, prompt_tokens, len(output.token_ids), cut_off, list(output.token_ids))


_ADAPTER_REMEDY = "give a PEFT adapter's directory as save_pretrained writes it, or a full model's (without that file)"


def lora_adapter_base(model: str) -> str | None:
    """The base model of a PEFT adapter directory (adapter_config.json), or None for a full model."""
    config = Path(model) / "adapter_config.json"
    if not config.is_file():
        return None
    base = read_json_object(config, _ADAPTER_REMEDY).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config}: no base_model_name_or_path; cannot tell which model the adapter extends")
    return base


# The values vLLM's LoRAConfig accepts for max_lora_rank.
_VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(adapter: str) -> int:
    """The smallest max_lora_rank vLLM accepts that serves the PEFT adapter in `adapter`: its rank `r`, or
    a larger one its `rank_pattern` gives some modules."""
    config_path = Path(adapter) / "adapter_config.json"
    config = read_json_object(config_path, _ADAPTER_REMEDY)
    rank = max([int(config.get("r", 8)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    fitting = [limit for limit in _VLLM_MAX_LORA_RANKS if limit >= rank]
    if not fitting:
        raise ValueError(
            f"{config_path}: LoRA rank {rank} is above the largest vLLM serves ({_VLLM_MAX_LORA_RANKS[-1]}); "
            "train with train.lora.merge=true or a smaller train.lora.r"
        )
    return fitting[0]


def build_engine(cfg: RolloutConfig, model: str | None = None) -> Engine:
    """The engine `cfg.engine` names, loading `model` (default: cfg.model)."""
    model = model or cfg.model
    if model == DEMO_MODEL:
        raise ValueError(
            f"rollout.model: {DEMO_MODEL!r} is not a model path; resolve it first with "
            "drift_ray.demo_model.ensure_demo_model(cache_dir) and pass the returned directory"
        )
    if cfg.engine is EngineKind.transformers:
        device = "cpu" if cfg.transformers_device == "cpu" else None  # a GPU: the one Ray assigned
        return TransformersEngine(
            model, dtype=cfg.dtype, device=device, torch_threads=cfg.torch_threads, max_model_len=cfg.max_model_len
        )
    if cfg.engine is EngineKind.vllm:
        return VLLMEngine(
            model,
            tensor_parallel_size=cfg.tensor_parallel_size,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
        )
    if cfg.engine is EngineKind.openai:
        from drift_ray.openai_engine import OpenAIEngine

        return OpenAIEngine(
            model,
            api_base=cfg.api_base,
            api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency,
            request_timeout_s=cfg.request_timeout_s,
            max_retries=cfg.max_retries,
            retry_backoff_s=cfg.retry_backoff_s,
        )
    raise ValueError(f"rollout.engine: unknown engine {cfg.engine!r}; expected one of {[k.value for k in EngineKind]}")
