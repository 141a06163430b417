"""Trajectory files: read ours (Parquet or JSONL) or the authors' JSONL into one Arrow table; write atomically.

Our JSONL holds one row per line with the same columns as our Parquet. The authors' scripts write one JSON
object per line with per-turn mappings keyed "t1".."tN" (`turn_rewards`, `verifier`, `reward_details`);
those become lists in turn order: `verifier` → CORRECT, `reward_details` → REWARD_DETAILS (verbatim, as a
JSON string) and FORMAT_FAILURES (a turn whose detail has a non-zero format penalty). The format is told
apart per line by the type of `turn_rewards`; the zeros their scripts pad it and `verifier` with, up to
their max_turns, are dropped. Every JSONL row keeps its 1-based line in SOURCE_LINE.
The authors' lines carry no trajectory id; the k-th line of a prompt (0-based, in file order) gets
TRAJECTORY_ID "<prompt_id>/<k>" and SAMPLE_INDEX k, as our rollouts name theirs, so that weighted SFT
can order them reproducibly. So does a line of ours without a trajectory_id (its own sample_index kept).

Whatever the format, the columns the weights stage needs (schema.WEIGHTS_INPUT) are checked: a bad value
raises a TrajectoryFileError naming the file, the line (JSONL) or row (Parquet) and the field.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import gzip
import hashlib
import json
import logging
import math
import os
import socket
import time
import uuid
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Collection, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from drift_ray import schema

log = logging.getLogger(__name__)


class TrajectoryFileError(ValueError):
    """A trajectory file is unreadable or malformed; the message names the file, the line or row, and the field."""


# The authors' keys equal our column names, except the per-turn verdicts and the penalty inside a turn's details.
AUTHORS_VERIFIER = "verifier"
AUTHORS_TURN_PENALTY = "format_penalty"

# Columns whose type the reader fixes; any other column of our JSONL gets the type Arrow infers for it.
_TYPES: dict[str, pa.DataType] = {
    **{f.name: f.type for f in schema.TRAJECTORY_SCHEMA},
    schema.SOURCE_LINE: pa.int64(),
    schema.REWARD_DETAILS: pa.string(),
}
_REWARDS_EXPECTED = "a mapping t1..tN of numbers or a list of numbers"
_PENALTY_EXPECTED = "a finite number <= 0 (the trajectory's summed format penalty, added to its return)"
_PER_TURN_EXPECTED = f"a list of one value per turn of {schema.TURN_REWARDS!r}"
# What bounds a return of finite rewards and penalty away from overflow (γ <= 1, λ finite).
_SUM_EXPECTED = f"rewards whose absolute sum, with that of {schema.FORMAT_PENALTY!r}, is a finite number"
_T_STAR_EXPECTED = f"null or a turn number from 1 to the turns of {schema.TURN_REWARDS!r}"
_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"
_UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")  # byte order marks


def read_trajectories(path: str | Path) -> pa.Table:
    """Trajectories from our Parquet (a file or a directory of files), our JSONL or the authors' JSONL.

    Raises TrajectoryFileError on a malformed file and schema.MissingColumnsError when a Parquet file
    lacks a column of schema.WEIGHTS_INPUT.
    """
    path = Path(path)
    if not path.exists():
        raise TrajectoryFileError(f"{path}: no such file")
    if path.is_dir() or _starts_with(path, _PARQUET_MAGIC):
        table, where = _read_parquet(path)
        if schema.TRAJECTORY_ID not in table.column_names:
            table = _with_trajectory_ids(table, path, where)
    else:
        table, where = _read_jsonl(path)
    if table.num_rows == 0:
        raise TrajectoryFileError(f"{path}: no trajectories in the file")
    _check_ids_and_conversations(table, where)
    return table


def _with_trajectory_ids(table: pa.Table, path: Path, where: Callable[[int], str]) -> pa.Table:
    """`table` with the trajectory ids that weighted SFT needs, made as for JSONL lines without: a prompt's rows,
    in the files' order, are its samples 0, 1, … (where the table has no sample_index of its own)."""
    prompt_ids = table.column(schema.PROMPT_ID).to_pylist()
    if schema.SAMPLE_INDEX in table.column_names:
        column = table.column(schema.SAMPLE_INDEX)
        samples = column.to_pylist()
        if not pa.types.is_integer(column.type):
            raise _field_error(str(path), schema.SAMPLE_INDEX, "a column of integers", f"type {column.type}")
        if column.null_count:
            raise _field_error(where(samples.index(None)), schema.SAMPLE_INDEX, "a value", "null")
    else:
        rows_of_prompt: collections.Counter[str] = collections.Counter()
        samples = []
        for prompt_id in prompt_ids:
            samples.append(rows_of_prompt[prompt_id])
            rows_of_prompt[prompt_id] += 1
        table = table.append_column(schema.SAMPLE_INDEX, pa.array(samples, pa.int64()))
    ids = [schema.trajectory_id(prompt_id, k) for prompt_id, k in zip(prompt_ids, samples)]
    return table.append_column(schema.TRAJECTORY_ID, pa.array(ids, pa.string()))


def _check_ids_and_conversations(table: pa.Table, where: Callable[[int], str]) -> None:
    """What the weights stage passes on to weighted SFT, checked now: one row per trajectory id, and
    conversations that can be trained on. `where(row)` names a row's file and line or row."""
    ids = table.column(schema.TRAJECTORY_ID) if schema.TRAJECTORY_ID in table.column_names else None
    if ids is not None and pa.types.is_dictionary(ids.type):
        ids = ids.cast(ids.type.value_type)
    if ids is not None and (ids.null_count or pc.count_distinct(ids).as_py() < len(ids)):  # then find where
        first_row: dict[str, int] = {}
        for row, trajectory_id in enumerate(ids.to_pylist()):
            if trajectory_id is None:
                raise _field_error(where(row), schema.TRAJECTORY_ID, "a value", "null")
            if trajectory_id in first_row:
                raise TrajectoryFileError(
                    f"{where(row)}: {schema.TRAJECTORY_ID} {trajectory_id!r} is also that of "
                    f"{where(first_row[trajectory_id])}; weighted SFT needs one row per trajectory"
                )
            first_row[trajectory_id] = row
    if schema.MESSAGES in table.column_names:
        # Without cut_off: the value checks refused flags not one per turn, and turns not one per reply.
        found = schema.invalid_conversation_rows(table.column(schema.MESSAGES))
        for row, problem in found[:1]:
            raise TrajectoryFileError(f"{where(row)}: field {schema.MESSAGES!r}: {problem}")


def require_parquet(path: str | Path, hint: str) -> list[Path]:
    """The Parquet files of `path` (a file, or a directory holding some); fails early, naming the file,
    when there are none or one is not Parquet. `hint` says where such files come from."""
    path = Path(path)
    if not path.exists():
        raise TrajectoryFileError(f"{path}: no such file or directory; {hint}")
    files = _parquet_files(path)
    if not files:
        raise TrajectoryFileError(f"{path}: no *.parquet file in the directory; {hint}")
    for file in files:
        if not _starts_with(file, _PARQUET_MAGIC):
            raise TrajectoryFileError(f"{file}: not a Parquet file; {hint}")
    return files


def write_table_atomic(table: pa.Table, path: str | Path) -> None:
    """Write Parquet so that `path` holds either the whole table or what it held before, even after a crash."""
    write_atomic(path, lambda f: pq.write_table(table, f))


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """Write `obj` as indented JSON, atomically like write_table_atomic."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def read_json_object(path: str | Path, remedy: str) -> dict[str, Any]:
    """The JSON object in the file `path`. Where it holds none (cut short by a full disk or a killed copy,
    edited by hand) a ValueError names the file, what is wrong and `remedy`: json's own error names no file,
    and a list where an object belongs would fail later as an AttributeError."""
    path = Path(path)
    data = path.read_bytes()
    try:
        value = json.loads(data)  # bytes, not read_text: JSON is UTF-8 whatever the locale's encoding
    except UnicodeDecodeError as err:
        problem = f"not UTF-8 text ({err.reason} at byte {err.start})"
    except ValueError as err:
        problem = "empty" if not data.strip() else f"not valid JSON ({err})"
    else:
        if isinstance(value, dict):
            return value
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
        problem = f"holds a JSON {kind}, not an object"
    raise ValueError(f"{path}: {problem}; {remedy}")


TRAIN_SETTINGS_FILE = "drift_train_settings.json"  # in a model directory weighted SFT wrote: what made it

# A file up to this size is read whole; a larger one through this many evenly spaced samples of this size.
FINGERPRINT_SAMPLES, FINGERPRINT_SAMPLE_BYTES = 1024, 4096


def files_fingerprint(path: str) -> str | None:
    """A digest of the local directory `path`, None when there is none (a hub id): the relative paths and
    sizes of its files, subdirectories included, and their content, each file read whole up to 4 MiB,
    else in 1,024 evenly spaced 4 KiB samples. Hidden files and directories are left out (locks,
    staging files).

    A model retrained or replaced at the same path changes it: training changes whole weight matrices
    (LoRA's merged ones included), each far larger than 1/1,024 of its file, and a sample falls in every
    such stretch. Reading 4 MiB per file keeps the check quick on models of any size.
    """
    root = Path(path)
    if not root.is_dir():
        return None
    files = {
        file.relative_to(root).as_posix(): file
        for file in root.rglob("*")
        if file.is_file() and not any(part.startswith(".") for part in file.relative_to(root).parts)
    }
    return digest_files(files)


def digest_files(files: Mapping[str, Path]) -> str:
    """files_fingerprint's digest of `files` by the names given: each name, size and content (read whole
    up to 4 MiB, else sampled)."""
    digest = hashlib.sha256()
    for name, file in sorted(files.items()):
        size = file.stat().st_size
        digest.update(f"{name}\0{size}\0".encode())
        with file.open("rb") as f:
            if size <= FINGERPRINT_SAMPLES * FINGERPRINT_SAMPLE_BYTES:
                digest.update(f.read())
                continue
            stride = (size - FINGERPRINT_SAMPLE_BYTES) // (FINGERPRINT_SAMPLES - 1)
            for k in range(FINGERPRINT_SAMPLES):
                f.seek(k * stride)
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def weighted_fingerprint(path: str) -> str | None:
    """A digest of the (trajectory id, weight) pairs in the weighted Parquet file or directory `path`;
    None for a URI, or where there is no readable Parquet with those columns and numeric weights (reading it
    reports that).

    By content, not by file: Ray Data writes the same weights under new file names each time, and that is
    the same training input; other weights (another β, other rollouts) are not. Weights count to 12
    significant digits, so a last-bit change from summing in another order is the same input.
    """
    table = _by_trajectory(path, schema.WEIGHT)
    if table is None or not _is_number(table.schema.field(schema.WEIGHT).type):
        return None
    digest = hashlib.sha256()
    for trajectory_id, weight in zip(table[schema.TRAJECTORY_ID].to_pylist(), table[schema.WEIGHT].to_pylist()):
        # A null weight still fingerprints: the training input check then names its trajectory.
        digest.update(f"{trajectory_id}\0{'null' if weight is None else format(weight, '.12g')}\n".encode())
    return digest.hexdigest()


def conversations_fingerprint(path: str) -> str | None:
    """A digest of the (trajectory id, messages, cut-off replies) of the weighted Parquet file or directory
    `path`: what weighted SFT fits, which weighted_fingerprint leaves out (other rollouts can have the same
    ids and weights: uniform weights always do). A row without a cut-off reply digests as its messages
    alone, as rows did before CUT_OFF was recorded. None where there is no readable Parquet with those columns."""
    table = _by_trajectory(path, schema.MESSAGES, optional=schema.CUT_OFF)
    if table is None:
        return None
    digest = hashlib.sha256()
    for batch in table.to_batches(max_chunksize=4096):
        ids, conversations = batch[schema.TRAJECTORY_ID].to_pylist(), batch[schema.MESSAGES].to_pylist()
        cut_offs = batch[schema.CUT_OFF].to_pylist() if schema.CUT_OFF in batch.schema.names else [None] * len(ids)
        for trajectory_id, messages, cut_off in zip(ids, conversations, cut_offs):
            line = f"{trajectory_id}\0{json.dumps(messages, ensure_ascii=False, sort_keys=True)}"
            if cut_off and any(cut_off):  # as training reads them: a flag not known is not cut off
                line += f"\0{json.dumps([bool(flag) for flag in cut_off])}"
            digest.update(f"{line}\n".encode())
    return digest.hexdigest()


def _by_trajectory(path: str, column: str, optional: str | None = None) -> pa.Table | None:
    """The trajectory ids, `column` and, from the files that hold it, `optional` of the Parquet at `path`,
    sorted by id (so by content, not by file: Ray Data writes the same rows under new file names and in
    other blocks); None for a URI, or where there is no readable Parquet with those columns (reading it
    reports that)."""
    if "://" in path or not Path(path).exists():
        return None
    try:
        tables = []
        for file in _parquet_files(Path(path)):
            with pq.ParquetFile(file) as parquet:  # one open, one footer read
                columns = [schema.TRAJECTORY_ID, column]
                if optional is not None and optional in parquet.schema_arrow.names:
                    columns.append(optional)
                tables.append(parquet.read(columns=columns))
        return pa.concat_tables(tables, promote_options="permissive").sort_by(schema.TRAJECTORY_ID)
    except (pa.ArrowException, OSError, ValueError):
        return None


RERUN_REMEDY = "Rerun with the same config, or use a new run_dir."


def require_same_settings(
    record: str | Path,
    settings: dict[str, Any],
    output: str,
    only: Collection[str] | None = None,
    ignore: Collection[str] = (),
    known_by: Mapping[str, str] | None = None,
    inputs: Collection[str] = (),
    absent_means: Mapping[str, Any] | None = None,
    meanings: Mapping[str, str] | None = None,
    remedy: str = RERUN_REMEDY,
    follows: Mapping[str, str] | None = None,
) -> None:
    """Refuse to reuse `output` when the JSON file `record` says that other settings made it.

    Stages skip an output that is already complete; without this check a rerun with, say, another β in
    the same run_dir would report the old output as the new run's. An output without a record, and a
    setting its record lacks, come from a version of drift-ray that did not record them, and are accepted.
    `only`: compare only these settings (dotted paths) and those under them; `ignore`: not these, which
    older records may hold. `known_by` maps a setting to one that identifies what it names: the setting is
    compared only where the record and `settings` do not both hold that identity (a local model's path,
    where both hold its files' fingerprint: the same files at another path are the same model). The
    message names every differing setting by its dotted path. `inputs`: the settings that identify what
    `output` was made from rather than how (fingerprints of files): where only those differ, the same
    config cannot make it again, and the message says to remove `output` instead. `absent_means`: the value
    that a setting a record lacks had when it was made (a setting added since, whose every earlier value was
    that one), so that it is compared after all. `meanings`: what a recorded setting (and those under it)
    is, in the config's words, said where it differs. `remedy`: what to do where a setting differs. `follows`:
    a setting → the one it follows from (verifier_options → verifier, whose defaults they hold): not named
    where that one differs too, as the user changed only that one.
    """
    for name, paths in (("only", only), ("ignore", ignore), ("inputs", inputs)):
        if isinstance(paths, str):  # a bare string would be read as its characters, and match nothing
            raise TypeError(f"require_same_settings: {name} takes a collection of dotted paths, not {paths!r}")
    record = Path(record)
    if not record.exists():
        return
    damaged = f"it records what made {output}: remove {output} to make it again, or use a new run_dir"
    current = _dotted(json.loads(json.dumps(settings)))
    assumed = {key: value for key, value in (absent_means or {}).items() if key in current}
    whole_record = {**assumed, **_dotted(read_json_object(record, damaged))}
    identified = [
        path for path, identity in (known_by or {}).items()
        if whole_record.get(identity) is not None and current.get(identity) is not None
    ]
    recorded = {
        key: value
        for key, value in whole_record.items()
        if (only is None or _under(key, only)) and not _under(key, [*ignore, *identified])
    }
    changed = [key for key, value in sorted(recorded.items()) if key not in current or current[key] != value]
    if changed:
        # Where the files differ, a path known by them that differs too is named: the config changed.
        changed = sorted(changed + [path for path in identified if whole_record.get(path) != current.get(path)])
        followed = [setting for setting, source in (follows or {}).items() if any(_under(key, [source]) for key in changed)]
        changed = [key for key in changed if not _under(key, followed)]
        listed = _described_changes(whole_record, current, changed)
        listed += "".join(f"; {path}: {meaning}" for path, meaning in (meanings or {}).items() if any(_under(key, [path]) for key in changed))
        if all(_under(key, inputs) for key in changed):
            remedy = f"What it was made from changed since: remove {output} to make it again, or use a new run_dir."
        raise RuntimeError(f"{output}: made with other settings (differ in: {listed}), recorded in {record}. {remedy}")


def settings_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """Every setting (dotted path) that differs between two settings mappings, with both values."""
    before, now = (_dotted(json.loads(json.dumps(settings))) for settings in (recorded, current))
    return _described_changes(before, now, sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key)))


def _described_changes(before: Mapping[str, Any], now: Mapping[str, Any], keys: Sequence[str]) -> str:
    """'key (value then, value now); …' of the dotted `keys`, five at most."""
    described = [
        f"{key} ({schema.short_repr(before[key]) if key in before else 'unset'} then, "
        f"{schema.short_repr(now[key]) if key in now else 'unset'} now)"
        for key in keys
    ]
    return "; ".join(described[:5]) + (f"; and {len(described) - 5} more" if len(described) > 5 else "")


def _under(key: str, paths: Collection[str]) -> bool:
    return any(key == path or key.startswith(f"{path}.") for path in paths)


def _dotted(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> str:
    """Call `write` on a new file that then replaces `path`: `path` holds the whole file or its old
    content, even after a crash or a power cut. Returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name in the same directory: os.replace is atomic only within one file system.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)
    return str(path)


def publish_directory(staging: str | Path, target: str | Path) -> None:
    """Rename the finished directory `staging` to `target`, so that `target` appears whole or not at all.

    Everything under `staging` reaches the disk before the rename: else a power cut soon after could
    leave `target` in place with files that are empty or cut short.

    The published tree gets at least the permissions that mkdir and open give under the process umask,
    whatever `staging` had: mkdtemp makes a directory private and safetensors 0.8 writes its files 0600,
    which left a trained model unreadable to any other user, such as a serving container's. Symbolic
    links, and what they point to, are left as they are.
    """
    staging, target = Path(staging), Path(target)
    umask = _umask()
    for directory, _, files in os.walk(staging):
        _grant(directory, 0o777 & ~umask)
        for name in files:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            _grant(path, 0o666 & ~umask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(directory)
    os.replace(staging, target)
    fsync_directory(target.parent)


class DirectoryInUseError(RuntimeError):
    """Another process holds the lock of a directory this one was to write."""


@contextlib.contextmanager
def exclusive_lock(path: str | Path, *, wait: bool = True) -> Iterator[float]:
    """Hold an flock on `path`, which names its holder (pid and host) meanwhile; yields the seconds it
    waited for it. The kernel drops the lock when its holder dies, so a killed process leaves none behind.
    A lock held elsewhere is waited for, with a line in the log naming its holder, or with `wait` off
    raises DirectoryInUseError at once. On a file system that takes no locks (NFSv3 without its lock
    service, some FUSE mounts) it warns and goes on without one. Makes the directory of `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        waited = _lock(handle, Path(path), wait)
        if waited is None:
            yield 0.0
            return
        try:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield waited
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _lock(handle: IO[str], path: Path, wait: bool) -> float | None:
    """Take the lock on the open lock file `handle` as exclusive_lock says; returns the seconds it waited
    (0 when it was free), or None where there is no lock to take."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        if not wait:
            raise DirectoryInUseError(
                f"{path.parent} is in use by {holder} (lock file {path}): wait for it to finish or stop it"
            ) from None
        log.info("waiting for %s, which holds %s", holder, path)
        asked = time.perf_counter()
        fcntl.flock(handle, fcntl.LOCK_EX)
        return time.perf_counter() - asked
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("%s: %s; nothing keeps another process from writing %s meanwhile", path, err.strerror, path.parent)
        return None


def _grant(path: str | Path, bits: int) -> None:
    """Add the permission `bits` that `path` lacks; chmod only then, as it needs the file's owner."""
    mode = os.stat(path).st_mode & 0o7777
    if mode & bits != bits:
        os.chmod(path, mode | bits)


def _umask(status_file: str | Path = "/proc/self/status") -> int:
    try:
        with open(status_file) as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        # Where the kernel does not report it, os.umask is the only reader, and it also sets the mask:
        # briefly the strictest one, so that a file another thread makes meanwhile is never too open.
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def fsync_directory(path: str | Path) -> None:
    """A new or renamed directory entry is durable only once its directory is on disk."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _starts_with(path: Path, magic: bytes) -> bool:
    with path.open("rb") as f:
        return f.read(len(magic)) == magic


def _field_error(where: str, field: str, expected: str, found: Any) -> TrajectoryFileError:
    return TrajectoryFileError(f"{where}: field {field!r}: expected {expected}, found {found}")


# --- Parquet ------------------------------------------------------------------------------------------


def _parquet_files(path: Path) -> list[Path]:
    """`path`, or the Parquet files of the directory `path`: a rollouts directory also holds its manifest."""
    return sorted(path.rglob("*.parquet")) if path.is_dir() else [path]


def _read_parquet(path: Path) -> tuple[pa.Table, Callable[[int], str]]:
    """The table of `path`'s files, and where a row of it is: its file and 1-based row there. A JSONL file
    among them is refused by name: read beside them, it would be left out without a word."""
    if path.is_dir() and (jsonl := next(iter(sorted([*path.rglob("*.jsonl"), *path.rglob("*.jsonl.gz")])), None)):
        raise TrajectoryFileError(
            f"{jsonl}: a directory of trajectories is read as Parquet files alone; give a JSONL file as the input by "
            "its own path"
        )
    files = _parquet_files(path)
    if not files:
        raise TrajectoryFileError(f"{path}: no *.parquet file in the directory")
    tables = []
    for file in files:
        try:
            tables.append(pq.read_table(file))
        except (pa.ArrowException, OSError) as err:
            raise TrajectoryFileError(f"{file}: not a readable Parquet file: {err}") from err
        schema.require_utf8(tables[-1], str(file), TrajectoryFileError)
    # Read together, files would all take the first one's columns: another file's extra ones would be lost.
    # Rollouts of older versions lack the columns added later, and resumed ones have them: null where not known.
    for file, other in zip(files[1:], tables[1:]):
        differ = sorted((set(other.column_names) ^ set(tables[0].column_names)) - schema.ADDED_LATER)
        if differ:
            raise TrajectoryFileError(
                f"{file}: its columns differ from those of {files[0]} in the same directory (in: {', '.join(differ)})"
            )
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowException, TypeError) as err:
        odd = _first_odd(files, tables)
        raise TrajectoryFileError(f"{odd}: its column types differ from those of {files[0]}: {err}") from err
    schema.require_columns(table.column_names, schema.WEIGHTS_INPUT, stage="weights", source=str(path))
    for name, accepts, expected in (
        (schema.PROMPT_ID, _is_prompt_id, "text or integers"),
        (schema.TURN_REWARDS, _is_list_of(_is_number), f"type {_TYPES[schema.TURN_REWARDS]}"),
        (schema.FORMAT_PENALTY, _is_number, f"type {_TYPES[schema.FORMAT_PENALTY]}"),
        # list<null>: what Arrow infers when no trajectory had a parsable answer
        (schema.ANSWER_NORMS, _is_list_of(lambda t: _is_string(t) or pa.types.is_null(t)), f"type {_TYPES[schema.ANSWER_NORMS]}"),
    ):
        column = table.column(name)
        if not accepts(column.type):
            raise _field_error(str(path), name, f"a column of {expected}", f"type {column.type}")
        table = table.set_column(table.schema.get_field_index(name), name, column.cast(_TYPES[name]))
    # Optional columns the weights read as they are: a t_star column with nulls, written by pandas, holds floats.
    for name, accepts, expected in (
        (schema.CORRECT, schema.holds_flags, "lists of booleans"),
        (schema.FORMAT_FAILURES, schema.holds_flags, "lists of booleans"),
        (schema.CUT_OFF, schema.holds_flags, "lists of booleans"),
        (schema.T_STAR, lambda t: _is_number(t) or pa.types.is_null(t), "numbers"),
        (schema.TRAJECTORY_ID, _is_id, "text or integers"),
    ):
        if name not in table.column_names:
            continue
        column = table.column(name)
        if not accepts(column.type):
            raise _field_error(str(path), name, f"a column of {expected}", f"type {column.type}")
        if pa.types.is_null(column.type):  # every value null: typed, so that the weights can read it as such
            table = table.set_column(table.schema.get_field_index(name), name, column.cast(_TYPES[name]))
    file_starts = np.cumsum([0, *(len(t) for t in tables)])

    def where(row: int) -> str:
        file = int(np.searchsorted(file_starts, row, side="right")) - 1
        return f"{files[file]}: row {row - file_starts[file] + 1}"

    _check_parquet_values(table, where)
    return table, where


def _first_odd(files: list[Path], tables: list[pa.Table]) -> Path:
    """The first of `files` whose columns' types do not join those of the files before it."""
    joined = tables[0].schema
    for file, table in zip(files[1:], tables[1:]):
        try:
            joined = pa.unify_schemas([joined, table.schema], promote_options="permissive")
        except (pa.ArrowException, TypeError):
            return file
    return files[-1]


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _is_prompt_id(t: pa.DataType) -> bool:
    """Text or integers (as a task file's ids may be, and pandas writes them), or a dictionary of them: not
    bytes, which need not be text."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return _is_id(t) and not (pa.types.is_binary(t) or pa.types.is_large_binary(t))


def _is_id(t: pa.DataType) -> bool:
    """Text, bytes or integers, or a dictionary of them (a pandas category column)."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return _is_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_integer(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _is_list_of(accepts: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    return lambda t: _is_list(t) and accepts(t.value_type)


def _check_parquet_values(table: pa.Table, where: Callable[[int], str]) -> None:
    """The checks _check_row makes of a JSONL row, made of every row of the weights input at once."""

    def fail(rows: np.ndarray, field: str, expected: str) -> None:
        if rows.size:
            row = int(rows[0])
            raise _field_error(where(row), field, expected, schema.short_repr(table.column(field)[row].as_py()))

    for field in schema.WEIGHTS_INPUT:
        fail(np.flatnonzero(table.column(field).is_null().to_numpy(zero_copy_only=False)), field, "a value")
    rewards = table.column(schema.TURN_REWARDS)
    turns = pc.list_value_length(rewards).to_numpy()
    fail(np.flatnonzero(turns == 0), schema.TURN_REWARDS, "at least one turn")
    values, value_rows = pc.list_flatten(rewards).to_numpy(), schema.list_element_rows(rewards)  # nulls become NaN
    bad = value_rows[~np.isfinite(values)]
    fail(bad, schema.TURN_REWARDS, "finite numbers")
    penalty = table.column(schema.FORMAT_PENALTY).to_numpy()
    fail(np.flatnonzero(~(np.isfinite(penalty) & (penalty <= 0))), schema.FORMAT_PENALTY, _PENALTY_EXPECTED)
    with np.errstate(over="ignore"):
        sums = np.bincount(value_rows, weights=np.abs(values), minlength=len(turns)) - penalty
    fail(np.flatnonzero(~np.isfinite(sums)), schema.TURN_REWARDS, _SUM_EXPECTED)
    if schema.MESSAGES in table.column_names:  # the turns: first, so that a reward too many is named as such
        replies = schema.reply_counts(table.column(schema.MESSAGES))
        messages = table.column(schema.MESSAGES)  # its roles may show why
        for row, problem in schema.per_reply_mismatches(schema.TURN_REWARDS, rewards, replies, messages)[:1]:
            raise TrajectoryFileError(f"{where(row)}: field {schema.MESSAGES!r}: {problem}")
    for field in (schema.CORRECT, schema.FORMAT_FAILURES, schema.CUT_OFF):
        if field in table.column_names:
            lengths = pc.list_value_length(table.column(field)).to_numpy(zero_copy_only=False).astype(float)  # null: NaN
            fail(np.flatnonzero(~np.isnan(lengths) & (lengths != turns)), field, _PER_TURN_EXPECTED)
    if schema.T_STAR in table.column_names:
        column = table.column(schema.T_STAR)
        t_star = column.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False)  # null: NaN
        # A NaN that is not a null (pyarrow and polars keep the two apart) is no turn either.
        outside = np.isnan(t_star) | (t_star < 1) | (t_star > turns) | (t_star != np.floor(t_star))
        given = column.is_valid().to_numpy(zero_copy_only=False)
        fail(np.flatnonzero(given & outside), schema.T_STAR, _T_STAR_EXPECTED)
        if schema.CORRECT in table.column_names:
            verdicts = table.column(schema.CORRECT)
            first = schema.first_true_turns(verdicts)
            differs = verdicts.is_valid().to_numpy(zero_copy_only=False) & np.where(given, t_star != first, first != 0)
            for row in np.flatnonzero(differs)[:1]:
                found = schema.short_repr(column[int(row)].as_py())
                raise _field_error(where(int(row)), schema.T_STAR, _first_correct_expected(int(first[row]), schema.CORRECT), found)
        for row in np.flatnonzero(given & (t_star < turns))[:1]:
            found = schema.short_repr(column[int(row)].as_py())
            raise _field_error(where(int(row)), schema.T_STAR, _last_turn_expected(int(turns[row])), found)


# --- JSONL --------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> tuple[pa.Table, Callable[[int], str]]:
    """Our JSONL or the authors', gzip-compressed or not (exports are often .jsonl.gz)."""
    rows: list[dict[str, Any]] = []
    lines_of_prompt: collections.Counter[str] = collections.Counter()
    spellings: dict[str, tuple[int, Any]] = {}  # the first line giving each prompt id, and how it gave it
    for line_no, line in _numbered_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            record = schema.loads_json(line)
        except schema.RepeatedKeyError as err:
            raise TrajectoryFileError(f"{where}: {err}") from None
        except ValueError as err:  # JSONDecodeError, or UnicodeDecodeError on bytes that are not text
            raise TrajectoryFileError(f"{where}: not valid JSON: {err}") from None
        if not isinstance(record, dict):
            raise TrajectoryFileError(f"{where}: expected a JSON object, found {type(record).__name__}")
        authors = isinstance(record.get(schema.TURN_REWARDS), dict)
        row = _from_authors(record, where) if authors else record
        given = row.get(schema.PROMPT_ID)
        _check_row(row, where, verdicts=AUTHORS_VERIFIER if authors else schema.CORRECT)
        first_line, first = spellings.setdefault(row[schema.PROMPT_ID], (line_no, given))
        if type(first) is not type(given):  # 7 and "7" are read as one prompt: which did the file mean?
            raise TrajectoryFileError(
                f"{where}: field {schema.PROMPT_ID!r}: {given!r} is read as the same prompt {row[schema.PROMPT_ID]!r} "
                f"as line {first_line}'s {first!r}: give each prompt's id one way, as text or as a number"
            )
        k = lines_of_prompt[row[schema.PROMPT_ID]]
        lines_of_prompt[row[schema.PROMPT_ID]] += 1
        if authors or schema.TRAJECTORY_ID not in row:  # weighted SFT needs ids: made as the authors' are
            row.setdefault(schema.SAMPLE_INDEX, k)
            row.setdefault(schema.TRAJECTORY_ID, schema.trajectory_id(row[schema.PROMPT_ID], row[schema.SAMPLE_INDEX]))
        row[schema.SOURCE_LINE] = line_no
        rows.append(row)
    names = dict.fromkeys(name for row in rows for name in row)
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as err:  # no column can be named so
            line = next(row[schema.SOURCE_LINE] for row in rows if name in row)
            half = err.object[err.start : err.end]
            raise TrajectoryFileError(f"{path}:{line}: a field named with half a surrogate pair, {half!r}") from None
    lines = [row[schema.SOURCE_LINE] for row in rows]
    table = pa.table({name: _column(path, name, [row.get(name) for row in rows], lines) for name in names})
    # A row's first correct turn is read from t_star where the file has the column, else from the verdicts
    # where it has those: a line without the field read would count as unsolved, whatever it says otherwise.
    field = schema.T_STAR if schema.T_STAR in names else schema.CORRECT
    lacking = next((row for row in rows if field not in row), None)
    if field in names and lacking is not None:
        giving = next(row for row in rows if field in row)
        named = f"{field!r}" + (f" (nor {AUTHORS_VERIFIER!r}, the authors' name for it)" if field == schema.CORRECT else "")
        raise TrajectoryFileError(
            f"{path}:{lacking[schema.SOURCE_LINE]}: no field {named}, which line {giving[schema.SOURCE_LINE]} "
            "gives: give it on every line or on none"
        )
    return table, lambda row: f"{path}:{lines[row]}"


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The lines of `path`, gzip-compressed or not, numbered from 1."""
    with path.open("rb") as f:
        head = f.read(2)
    if head in _UTF16_MARKS:
        raise TrajectoryFileError(f"{path}: UTF-16 text; save it as UTF-8 (JSON Lines are UTF-8)")
    with gzip.open(path, "rb") if head == _GZIP_MAGIC else path.open("rb") as f:
        line_no = 0
        try:
            for line_no, line in enumerate(f, 1):
                yield line_no, line
        except (EOFError, zlib.error, gzip.BadGzipFile) as err:
            raise TrajectoryFileError(f"{path}: a damaged gzip file, read up to line {line_no} ({err})") from None


def _from_authors(record: dict[str, Any], where: str) -> dict[str, Any]:
    """Our row from one line of the authors' format: per-turn mappings become lists in turn order.

    Their scripts pad `turn_rewards` and `verifier` with zeros to every turn up to their max_turns, while
    `reward_details` and `messages` hold the turns played: the padding is dropped (it must be zeros). A line
    without `format_penalty` (their math script writes none) has none, as their weighting reads it; one
    whose details lack the format penalty of any turn has no FORMAT_FAILURES to re-price.
    """
    row = dict(record)
    rewards = _by_turn(record[schema.TURN_REWARDS], where, schema.TURN_REWARDS, _REWARDS_EXPECTED)
    verdicts = row.pop(AUTHORS_VERIFIER, None)
    correct = None
    if verdicts is not None:
        correct = _by_turn(verdicts, where, AUTHORS_VERIFIER, "a mapping t1..tN of 0 or 1", len(rewards))
        for turn, verdict in enumerate(correct, 1):
            if type(verdict) not in (int, bool) or verdict not in (0, 1):
                raise _field_error(where, f"{AUTHORS_VERIFIER}.t{turn}", "0 or 1", schema.short_repr(verdict))
    details = record.get(schema.REWARD_DETAILS)
    messages = record.get(schema.MESSAGES)
    if isinstance(details, dict) and details:
        played = len(details)
    elif isinstance(messages, list):
        played = sum(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
    else:
        played = len(rewards)
    for turn in range(played + 1, len(rewards) + 1):
        for field, values in ((schema.TURN_REWARDS, rewards), (AUTHORS_VERIFIER, correct)):
            if values is not None and values[turn - 1] != 0:
                expected = f"0, as turn {turn} was not played ({played} turn(s) in the line)"
                raise _field_error(where, f"{field}.t{turn}", expected, schema.short_repr(values[turn - 1]))
    rewards = rewards[: max(played, 1)]
    row[schema.TURN_REWARDS] = rewards
    if correct is not None:
        row[schema.CORRECT] = [bool(v) for v in correct[: len(rewards)]]
    row.setdefault(schema.FORMAT_PENALTY, 0.0)
    if details is not None:
        per_turn = _by_turn(details, where, schema.REWARD_DETAILS, "a mapping t1..tN of objects", len(rewards))
        told = [isinstance(detail, dict) and AUTHORS_TURN_PENALTY in detail for detail in per_turn]
        for turn, detail in enumerate(per_turn, 1):
            if told[turn - 1] and not _is_finite_number(detail[AUTHORS_TURN_PENALTY]):
                field = f"{schema.REWARD_DETAILS}.t{turn}.{AUTHORS_TURN_PENALTY}"
                raise _field_error(where, field, "a finite number", schema.short_repr(detail[AUTHORS_TURN_PENALTY]))
        if all(told):  # a turn told nothing of leaves the line's format failures unknown
            row[schema.FORMAT_FAILURES] = [detail[AUTHORS_TURN_PENALTY] != 0 for detail in per_turn]
        row[schema.REWARD_DETAILS] = json.dumps(details, ensure_ascii=False)
    return row


def _by_turn(value: Any, where: str, field: str, expected: str, turns: int | None = None) -> list[Any]:
    """The values of a mapping keyed t1..tN in turn order; N must equal `turns` when given."""
    if not isinstance(value, dict) or not value:
        raise _field_error(where, field, expected, schema.short_repr(value))
    keys, key_set = _turn_keys(len(value))
    if value.keys() != key_set:
        raise _field_error(where, field, "keys t1..tN numbered without gaps", schema.short_repr(sorted(value)))
    if turns is not None and len(keys) != turns:
        raise _field_error(where, field, f"the {turns} turn(s) of {schema.TURN_REWARDS!r}", f"{len(keys)}")
    return [value[k] for k in keys]


@functools.lru_cache(maxsize=None)
def _turn_keys(turns: int) -> tuple[tuple[str, ...], frozenset[str]]:
    keys = tuple(f"t{i}" for i in range(1, turns + 1))
    return keys, frozenset(keys)


def _is_finite_number(value: Any) -> bool:
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # an integer beyond what a float holds
        return False


def _first_correct_expected(first_correct: int | None, verdicts: str) -> str:
    """What t_star must be where `verdicts` (the field that gave CORRECT) first mark turn `first_correct`
    correct (None or 0: no turn)."""
    if first_correct:
        return f"{first_correct}, the first turn {verdicts!r} marks correct"
    return f"null, as {verdicts!r} marks no turn correct"


def _last_turn_expected(turns: int) -> str:
    """What a t_star before the last of `turns` turns must be: its later rewards would count in the return."""
    return f"the last of its {turns} turns: an episode stops at its first correct answer"


def _found(row: dict[str, Any], field: str) -> str:
    """A required field of `row` as an error quotes it: its value, or that the line has none."""
    return schema.short_repr(row[field]) if field in row else "no such field on the line"


def _check_row(row: dict[str, Any], where: str, verdicts: str) -> None:
    """Check the weights input of one JSONL row; drop non-answers (null or blank) from its answer_norms, and
    write an integer prompt id as text. `verdicts`: the field the line gave CORRECT in, to name."""
    prompt_id = row.get(schema.PROMPT_ID)
    if type(prompt_id) is int:  # text, as a task file's integer ids are read
        row[schema.PROMPT_ID] = str(prompt_id)
    elif not isinstance(prompt_id, str):
        raise _field_error(where, schema.PROMPT_ID, "a string or an integer", _found(row, schema.PROMPT_ID))
    if type(row.get(schema.GOLD)) is int:  # as a task file's integer golds are read (GSM8K's, written by pandas)
        row[schema.GOLD] = str(row[schema.GOLD])
    rewards = row.get(schema.TURN_REWARDS)
    if not isinstance(rewards, list) or not rewards:
        raise _field_error(where, schema.TURN_REWARDS, _REWARDS_EXPECTED, _found(row, schema.TURN_REWARDS))
    for turn, reward in enumerate(rewards, 1):
        if not _is_finite_number(reward):
            raise _field_error(where, schema.TURN_REWARDS, "finite numbers", f"{schema.short_repr(reward)} at turn {turn}")
    penalty = row.get(schema.FORMAT_PENALTY)
    if not _is_finite_number(penalty) or penalty > 0:
        raise _field_error(where, schema.FORMAT_PENALTY, _PENALTY_EXPECTED, _found(row, schema.FORMAT_PENALTY))
    if not math.isfinite(sum(abs(float(reward)) for reward in rewards) - penalty):
        raise _field_error(where, schema.TURN_REWARDS, _SUM_EXPECTED, _found(row, schema.TURN_REWARDS))
    replies = schema.count_replies(row.get(schema.MESSAGES))
    if replies and replies != len(rewards):  # the turns: first, so that a reward too many is named as such
        problem = schema.per_reply_mismatch(schema.TURN_REWARDS, len(rewards), replies, row.get(schema.MESSAGES))
        raise TrajectoryFileError(f"{where}: field {schema.MESSAGES!r}: {problem}")
    for field in (schema.CORRECT, schema.FORMAT_FAILURES, schema.CUT_OFF):
        value = row.get(field)
        if isinstance(value, list) and len(value) != len(rewards):
            raise _field_error(where, field, _PER_TURN_EXPECTED, f"{schema.short_repr(value)} for {len(rewards)} turn(s)")
        if isinstance(value, list) and not all(flag is None or isinstance(flag, bool) for flag in value):
            # Read as its truth value below, "no" would mark a turn correct.
            raise _field_error(where, field, "true or false for each turn", schema.short_repr(value))
    t_star = row.get(schema.T_STAR)
    whole = type(t_star) is int or (type(t_star) is float and t_star.is_integer())  # pandas writes 2.0 beside nulls
    if t_star is not None and (not whole or not 1 <= t_star <= len(rewards)):
        raise _field_error(where, schema.T_STAR, _T_STAR_EXPECTED, f"{schema.short_repr(t_star)} for {len(rewards)} turn(s)")
    correct = row.get(schema.CORRECT)
    if schema.T_STAR in row and isinstance(correct, list):
        # The diagnostics count a trajectory under its t_star: it must be the verdicts' first correct turn.
        first_correct = next((turn for turn, verdict in enumerate(correct, 1) if verdict), None)
        if t_star != first_correct:
            raise _field_error(where, schema.T_STAR, _first_correct_expected(first_correct, verdicts), schema.short_repr(t_star))
    if t_star is not None and t_star < len(rewards):
        raise _field_error(where, schema.T_STAR, _last_turn_expected(len(rewards)), schema.short_repr(t_star))
    norms = row.get(schema.ANSWER_NORMS)
    if not isinstance(norms, list) or not all(a is None or isinstance(a, str) for a in norms):
        raise _field_error(where, schema.ANSWER_NORMS, "a list of strings", _found(row, schema.ANSWER_NORMS))
    row[schema.ANSWER_NORMS] = [a for a in norms if a and a.strip()]


def _column(path: Path, name: str, values: list[Any], lines: list[int]) -> pa.Array:
    """One column of a JSONL file; a value that does not fit is reported with its line."""
    expected = _TYPES.get(name)
    if expected is not None and pa.types.is_integer(expected):
        # Arrow would truncate 1.7 to 1; an integral 2.0 (pandas writes integers beside nulls so) is fine.
        for value, line in zip(values, lines):
            if isinstance(value, float) and not value.is_integer():
                raise _field_error(f"{path}:{line}", name, f"a value of type {expected}", schema.short_repr(value))
    if expected is not None and pa.types.is_list(expected):
        for value, line in zip(values, lines):
            if isinstance(value, str):  # Arrow would read the text as a list of its characters
                raise _field_error(f"{path}:{line}", name, f"a list (a value of type {expected})", schema.short_repr(value))
    if name == schema.MESSAGES:
        _warn_of_dropped_message_keys(path, values, lines)
    try:
        array = pa.array(values, type=expected)
    except UnicodeEncodeError:
        raise _unpaired_surrogate(path, name, values, lines) from None
    except (pa.ArrowException, OverflowError):
        array = None
    if array is not None and (expected is not None or _parquet_holds(array.type)):
        return array
    if expected is None:
        # A field drift-ray does not read, whose values Arrow cannot hold in one column of a Parquet file: kept as
        # JSON text, for the weights file to carry, rather than refuse the file over it.
        texts = [None if value is None else json.dumps(value, ensure_ascii=False) for value in values]
        try:
            kept = pa.array(texts, pa.string())
        except UnicodeEncodeError:
            raise _unpaired_surrogate(path, name, values, lines) from None
        log.warning(
            "%s: field %r holds values of more than one type, integers beyond 64 bits or empty objects; drift-ray "
            "does not read it, and keeps it as JSON text",
            path, name,
        )
        return kept
    for value, line in zip(values, lines):
        try:
            pa.array([value], type=expected)
        except (pa.ArrowException, OverflowError):
            # A conversation's type reads badly, and its repr is cut before the message at fault: name that one.
            if name == schema.MESSAGES and (problem := schema.conversation_problem(value)):
                raise TrajectoryFileError(f"{path}:{line}: field {name!r}: {problem}") from None
            raise _field_error(f"{path}:{line}", name, f"a value of type {expected}", schema.short_repr(value)) from None
    raise TrajectoryFileError(f"{path}: field {name!r}: values do not form one column of type {expected}")


def _parquet_holds(data_type: pa.DataType) -> bool:
    """Whether a Parquet file can hold a column of `data_type`: not where it nests an object without fields."""
    if pa.types.is_struct(data_type):
        return data_type.num_fields > 0 and all(_parquet_holds(field.type) for field in data_type)
    if pa.types.is_list(data_type) or pa.types.is_large_list(data_type):
        return _parquet_holds(data_type.value_type)
    return True


def _unpaired_surrogate(path: Path, name: str, values: list[Any], lines: list[int]) -> TrajectoryFileError:
    """The line whose value holds half of a surrogate pair (JSON's "\\ud83d", an emoji cut in two), which is no
    Unicode character and cannot be written as UTF-8."""
    for value, line in zip(values, lines):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            half = err.object[err.start : err.end]
            return _field_error(f"{path}:{line}", name, "text of Unicode characters", f"half a surrogate pair, {half!r}")
    return TrajectoryFileError(f"{path}: field {name!r}: text that is not Unicode")


def _warn_of_dropped_message_keys(path: Path, conversations: list[Any], lines: list[int]) -> None:
    for conversation, line in zip(conversations, lines):
        for number, message in enumerate(conversation if isinstance(conversation, list) else [], 1):
            extra = sorted(set(message) - {"role", "content"}) if isinstance(message, dict) else []
            if extra:
                log.warning(
                    "%s:%d: message %d has keys %s besides role and content: drift-ray keeps a message's role and "
                    "content only (the first such message named)",
                    path, line, number, extra,
                )
                return
