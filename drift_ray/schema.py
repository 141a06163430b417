"""Column names of every table that flows between stages, and the check each stage runs on its input.

prompts → rollouts (trajectories) → weights (+return, +weight) → weighted SFT → evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Problems (prompt rows).
PROMPT_ID = "prompt_id"
QUESTION = "question"
GOLD = "gold"
METADATA = "metadata"  # JSON string with task-specific fields

# Trajectories (one row per episode; the K episodes of one prompt share PROMPT_ID).
TRAJECTORY_ID = "trajectory_id"  # "<prompt_id>/<k>"
SAMPLE_INDEX = "sample_index"  # k in 0..K-1
MESSAGES = "messages"  # list<struct<role: string, content: string>>
ANSWERS = "answers"  # list<string>, one per turn, null where no answer could be parsed
ANSWER_NORMS = "answer_norms"  # list<string>, normalised parsable answers in turn order
CORRECT = "correct"  # list<bool>, one per turn
TURN_REWARDS = "turn_rewards"  # list<double>, r_t per turn
FORMAT_FAILURES = "format_failures"  # list<bool>, one per turn: no parsable answer
FORMAT_PENALTY = "format_penalty"  # double, the trajectory total (≤ 0)
# list<bool>, one per turn: the reply reached max_new_tokens (or the engine's context limit) before it ended.
# Null where not known (rollouts written before it was recorded, imported files without it): taken as ended.
CUT_OFF = "cut_off"
T_STAR = "t_star"  # int64, 1-based first correct turn, null when never correct
NUM_TURNS = "num_turns"
PROMPT_TOKENS = "prompt_tokens"  # tokens of every prompt the engine was given, summed over turns
COMPLETION_TOKENS = "completion_tokens"  # generated tokens summed over turns
MODEL = "model"  # name or path of the generating model
SOURCE_LINE = "source_line"  # 1-based line of an imported JSONL file
REWARD_DETAILS = "reward_details"  # JSON string, kept verbatim from imported files

# Added by the weights stage.
RETURN = "return"
WEIGHT = "weight"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

# Rows written by the rollout and evaluation stages (Episode.to_row).
TRAJECTORY_SCHEMA = pa.schema(
    [
        (PROMPT_ID, pa.string()),
        (TRAJECTORY_ID, pa.string()),
        (SAMPLE_INDEX, pa.int64()),
        (GOLD, pa.string()),
        (MESSAGES, pa.list_(MESSAGE_TYPE)),
        (ANSWERS, pa.list_(pa.string())),
        (ANSWER_NORMS, pa.list_(pa.string())),
        (CORRECT, pa.list_(pa.bool_())),
        (TURN_REWARDS, pa.list_(pa.float64())),
        (FORMAT_FAILURES, pa.list_(pa.bool_())),
        (FORMAT_PENALTY, pa.float64()),
        (CUT_OFF, pa.list_(pa.bool_())),
        (T_STAR, pa.int64()),
        (NUM_TURNS, pa.int64()),
        (PROMPT_TOKENS, pa.int64()),
        (COMPLETION_TOKENS, pa.int64()),
        (MODEL, pa.string()),
    ]
)

# Trajectory columns that rollouts of older versions lack: their readers take them as null (not known).
ADDED_LATER = frozenset({CUT_OFF})

# What the weights stage needs; FORMAT_FAILURES only when the penalty is re-priced.
WEIGHTS_INPUT = (PROMPT_ID, TURN_REWARDS, FORMAT_PENALTY, ANSWER_NORMS)
# What weighted SFT needs; it reads CUT_OFF too where present.
TRAIN_INPUT = (TRAJECTORY_ID, MESSAGES, WEIGHT)


def trajectory_id(prompt_id: str, sample_index: int) -> str:
    """The TRAJECTORY_ID of sample `sample_index` of prompt `prompt_id`."""
    return f"{prompt_id}/{sample_index}"


def invalid_conversation_rows(
    messages: pa.Array | pa.ChunkedArray, cut_off: pa.Array | pa.ChunkedArray | None = None
) -> list[tuple[int, str]]:
    """(row, conversation_problem) of every conversation of a MESSAGES column that weighted SFT cannot
    train on, in row order; with its CUT_OFF column, also those whose flags are not one per assistant
    message (a turn is one reply). A column of the type the rollouts write is checked with Arrow, which
    only the rows it finds wrong leave; another, row by row."""
    column = _combined(messages)
    if _holds_text_messages(column.type):
        replies, suspects = _replies_and_suspects(column)
        conversations = {int(row): column[int(row)].as_py() for row in suspects}
    else:
        conversations = dict(enumerate(column.to_pylist()))
        replies = np.array([count_replies(conversation) for conversation in conversations.values()], dtype=np.int64)
    found = {}
    for row, conversation in conversations.items():
        problem = conversation_problem(conversation)
        if problem:
            found[row] = problem
    for row, problem in per_reply_mismatches(CUT_OFF, cut_off, replies):
        found.setdefault(row, problem)
    return sorted(found.items())


def reply_counts(messages: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row of a MESSAGES column: its assistant messages (0 for a conversation that is not a list)."""
    column = _combined(messages)
    if _holds_text_messages(column.type):
        return _replies_and_suspects(column)[0]
    return np.array([count_replies(conversation) for conversation in column.to_pylist()], dtype=np.int64)


def per_reply_mismatches(
    column: str,
    per_turn: pa.Array | pa.ChunkedArray | None,
    replies: np.ndarray,
    messages: pa.Array | pa.ChunkedArray | None = None,
) -> list[tuple[int, str]]:
    """(row, per_reply_mismatch) of every row whose list in the per-turn column `column` (CUT_OFF,
    TURN_REWARDS) does not hold one value per reply; a null list, or a conversation without replies
    (which conversation_problem names), is not one. Given the MESSAGES column, each names its conversation's
    messages of other roles (see per_reply_mismatch)."""
    if per_turn is None or pa.types.is_null(per_turn.type):
        return []
    counts = pc.list_value_length(_combined(per_turn)).to_numpy(zero_copy_only=False)  # null: NaN
    rows = np.flatnonzero(~np.isnan(counts.astype(float)) & (replies > 0) & (counts != replies))
    found = []
    for row in map(int, rows):
        conversation = None if messages is None else messages[row].as_py()
        found.append((row, per_reply_mismatch(column, int(counts[row]), int(replies[row]), conversation)))
    return found


def per_reply_mismatch(column: str, count: int, replies: int, conversation: Any = None) -> str:
    """Why `count` values of a per-turn `column` (CUT_OFF, TURN_REWARDS) do not fit a conversation of
    `replies` assistant messages; given the `conversation`, its messages of other roles than system, user and
    assistant too (a misspelt "assistent" is not counted as a reply)."""
    values = ("flag" if column == CUT_OFF else "value") + ("" if count == 1 else "s")
    messages = "assistant message" + ("" if replies == 1 else "s")
    problem = f"{column} has {count} {values} for {replies} {messages}; expected one each"
    if isinstance(conversation, list):
        others = [
            f"message {number}'s {short_repr(message.get('role'))}"
            for number, message in enumerate(conversation, 1)
            if isinstance(message, dict) and message.get("role") not in ("system", "user", "assistant")
        ]
        if others:
            problem += f" (roles other than system, user and assistant: {', '.join(others[:3])}{', …' if len(others) > 3 else ''})"
    return problem


def cut_off_column(table: pa.Table) -> pa.ChunkedArray | None:
    """The CUT_OFF column, None where the table has none or it holds nulls only (as Arrow types those)."""
    column = table.column(CUT_OFF) if CUT_OFF in table.column_names else None
    return None if column is None or pa.types.is_null(column.type) else column


def holds_flags(column_type: pa.DataType) -> bool:
    """Whether a column of `column_type` can be a CUT_OFF column: lists of booleans, or all null."""
    if pa.types.is_null(column_type):
        return True
    lists = pa.types.is_list(column_type) or pa.types.is_large_list(column_type)
    return lists and (pa.types.is_boolean(column_type.value_type) or pa.types.is_null(column_type.value_type))


def _combined(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _replies_and_suspects(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """For a column of the type the rollouts write: how many assistant messages each conversation holds,
    and the rows conversation_problem must look at (no assistant message, an empty or null list, or a
    message that is null or lacks its role or content)."""
    flat, rows = pc.list_flatten(column), list_element_rows(column)
    role, content = pc.struct_field(flat, "role"), pc.struct_field(flat, "content")
    broken = pc.or_(pc.or_(flat.is_null(), role.is_null()), content.is_null()).to_numpy(zero_copy_only=False)
    assistant = pc.fill_null(pc.equal(role, "assistant"), False).to_numpy(zero_copy_only=False)
    replies = np.bincount(rows[assistant], minlength=len(column))
    suspect = replies == 0
    suspect[rows[broken]] = True
    return replies, np.flatnonzero(suspect)


def count_replies(messages: Any) -> int:
    """The assistant messages of one conversation (0 for what is not a list)."""
    if not isinstance(messages, list):
        return 0
    return sum(isinstance(message, dict) and message.get("role") == "assistant" for message in messages)


def message_codes(messages: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray] | None:
    """For a MESSAGES column of the type the rollouts write: a code for every message in row order, the
    same for messages of the same role and content, and the messages per row; None for another type."""
    column = _combined(messages)
    if not _holds_text_messages(column.type):
        return None
    flat = pc.list_flatten(column)
    role, content = (pc.fill_null(pc.struct_field(flat, key), "").dictionary_encode() for key in ("role", "content"))
    codes = role.indices.to_numpy().astype(np.int64) * len(content.dictionary) + content.indices.to_numpy()
    return codes, pc.list_value_length(column).fill_null(0).to_numpy().astype(np.int64)


def first_true_turns(flags: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Per row of a per-turn list column of flags (booleans, or nulls only, as Arrow types a column of
    them): the 1-based turn of its first true flag, 0 where it has none (a null is not true)."""
    values = pc.fill_null(pc.list_flatten(flags).cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
    return first_true_positions(values, pc.list_value_length(flags).fill_null(0).to_numpy())


def first_true_positions(flags: np.ndarray, turns: np.ndarray) -> np.ndarray:
    """first_true_turns of flags already flattened: every row's per-turn flags in row order, as
    pc.list_flatten gives them (nulls as False), and how many each row has."""
    rows = np.repeat(np.arange(len(turns)), turns)
    turn = np.arange(rows.size) - (np.cumsum(turns) - turns)[rows] + 1
    first = np.full(len(turns), np.iinfo(np.int64).max)
    np.minimum.at(first, rows[flags], turn[flags])
    return np.where(first == np.iinfo(np.int64).max, 0, first)


def list_element_rows(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The row of every element that pc.list_flatten(column) returns, in order. From the lengths, not
    list_parent_indices: that one also counts the values an Arrow array may keep behind a null list,
    which list_flatten leaves out."""
    return np.repeat(np.arange(len(column)), pc.list_value_length(column).fill_null(0).to_numpy())


def _holds_text_messages(column_type: pa.DataType) -> bool:
    if not (pa.types.is_list(column_type) or pa.types.is_large_list(column_type)):
        return False
    message = column_type.value_type
    return pa.types.is_struct(message) and all(
        message.get_field_index(key) >= 0 and pa.types.is_string(message.field(key).type) for key in ("role", "content")
    )


def conversation_problem(messages: Any) -> str | None:
    """Why weighted SFT cannot train on `messages` (a MESSAGES value), or None: it needs a list of
    messages with text role and content, an assistant message among them."""
    if not isinstance(messages, list) or not messages:
        return f"expected a non-empty list of messages, found {short_repr(messages)}"
    for index, message in enumerate(messages, 1):  # counted from 1, as the lines and rows of the files
        texts = isinstance(message, dict) and all(isinstance(message.get(key), str) for key in ("role", "content"))
        if not texts:
            if isinstance(message, dict):  # role and content first, whatever order a reader gave the keys
                message = {**{key: message[key] for key in ("role", "content") if key in message}, **message}
            return f"message {index}: expected text 'role' and 'content', found {short_repr(message)}"
    if not any(message["role"] == "assistant" for message in messages):
        return f"no assistant message to train on (roles {[message['role'] for message in messages]})"
    return None


def short_repr(value: Any) -> str:
    """repr(value), cut to 80 characters: for errors that quote a value of the input."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class RepeatedKeyError(ValueError):
    """A JSON object of the input names one key twice."""


def _refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise RepeatedKeyError(f"key {short_repr(key)} is written twice in one object; only one value can be meant")
            seen.add(key)
    return record


# One decoder for every line: json.loads with a hook would build one per call, which costs more than the hook.
_DECODER = json.JSONDecoder(object_pairs_hook=_refuse_repeated_keys)


def loads_json(text: str | bytes) -> Any:
    """json.loads of UTF-8 text, except that an object naming a key twice is refused: json keeps its last
    value silently. Raises UnicodeDecodeError on bytes that are not UTF-8 (a leading BOM is dropped)."""
    return _DECODER.decode(text.decode("utf-8-sig") if isinstance(text, bytes) else text)


def require_utf8(table: pa.Table, source: str, error: type[Exception] = ValueError) -> None:
    """Arrow readers take string columns as they are: bytes that are not UTF-8 would fail later, when a row
    is read. Raises `error` naming `source`."""
    try:
        table.validate(full=True)
    except pa.ArrowInvalid as err:
        raise error(f"{source}: not UTF-8 text ({err})") from None


class MissingColumnsError(ValueError):
    """A stage was given a table without the columns its contract requires."""


def require_columns(
    present: Iterable[str],
    required: Iterable[str],
    *,
    stage: str,
    source: str,
    remedy: str = "Produce the input with `drift-ray rollouts` or import the authors' JSONL format.",
) -> None:
    """Raise a MissingColumnsError naming the stage, the source, every missing column and `remedy`."""
    present = list(present)
    missing = [c for c in required if c not in present]
    if missing:
        raise MissingColumnsError(f"{source}: the {stage} stage needs column(s) {missing}; found {sorted(present)}. {remedy}")
