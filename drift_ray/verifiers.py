"""Verifiers: decide whether a parsed answer matches the gold answer, and normalise answers.

Pluggable by name through `get_verifier(name, **options)`. Every verifier has the same two methods;
`normalize` gives the canonical form used to count distinct answers (the repetition term of the return).

- exact:   normalised strings are equal (lowercase, whitespace removed).
- numeric: both sides read as numbers ("1,234", "-3.5", "1/2", "$12", "50%", "3.0e2", "12 cm", "1.5 million")
           and equal: exactly for a gold written as an integer, else within a tolerance. "2π" and
           "2 sqrt 3" are not numbers.
- choice:  the multiple-choice letter (A–J) of the answer equals the gold letter.
- math:    symbolic equivalence through math-verify, in killable helper processes (HelperProcesses, on
           pebble) with a per-answer timeout.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import logging
import math
import multiprocessing
import re
import signal
import threading
import types
import weakref
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import Any, Callable, Mapping, Protocol, Union, get_args, get_origin

import pebble

logger = logging.getLogger(__name__)


class Verifier(Protocol):
    name: str

    def normalize(self, answer: str) -> str:
        """Canonical form of an answer (for counting distinct answers)."""
        ...

    def check(self, answer: str, gold: str) -> bool:
        """True when `answer` is correct for `gold`. Never hangs, and an answer it cannot read is False; a
        gold it cannot read may raise (ValueError), since every answer to it would otherwise be wrong."""
        ...


def basic_normalize(text: str) -> str:
    """Lowercase with all whitespace removed (the authors' normalisation)."""
    return "".join(text.lower().split())


class ExactVerifier:
    """Correct when the normalised answer equals the normalised gold."""

    name = "exact"

    def normalize(self, answer: str) -> str:
        return basic_normalize(answer)

    def check(self, answer: str, gold: str) -> bool:
        return basic_normalize(answer) == basic_normalize(gold)


# ---------------------------------------------------------------------------------------------- numeric

_UNIT_WORD = r"[^\W\d_]+\.?(?:\^?\d)?"  # cm, cm^2, m2, ft.
_NUMBER = re.compile(
    rf"""
    (?P<sign>[-+]?)\s*
    (?:\\?\$\s*)?                                   # currency: $12, \$12
    (?P<number>[-+]?(?:
        \d{{1,3}}(?:,\d{{3}})+(?:\.\d*)?            # 1,234,567.5, 1,000.
      | \d+(?:\.\d*)?(?:[eE][-+]?\d{{1,3}})?        # 12, 12., 3.0e2 (exponent bounded: 1e99999999 would hang)
      | \.\d+(?:[eE][-+]?\d{{1,3}})?                # .5
    ))
    (?:\s*/\s*(?P<denominator>\d+))?                # 1/2
    (?P<scales>(?:\s*(?i:hundred|thousand|million|billion|trillion)s?\b){{0,3}})  # 1.5 million, 5 hundred thousand
    \s*(?P<unit>\\?%|°|{_UNIT_WORD}(?:(?:\s*/\s*|\s+){_UNIT_WORD})*)?   # 50%, 90°, 12 cm, 5 km/h (one split per word)
    \.?                                              # the sentence's end: 2.5 million.
    """,
    re.VERBOSE,
)
_SCALES = {"hundred": 10**2, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
# Words after a number that make it another number, not a unit: 2π, 2 pi, 2sqrt3. (Not a letter such as x:
# "3x" is three times as often as it is a term.)
_NOT_A_UNIT = re.compile(r"π|(?i:pi|sqrt)(?![^\W\d_])")  # not pints


# Math mode or a box around the whole answer: $18$, \(18\), \[18\], \boxed{18}.
_MATH_WRAPPER = re.compile(r"\s*(?:\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\]|\\boxed\s*\{(.*)\})\s*", re.DOTALL)


def parse_number(text: str) -> Fraction | None:
    """The number `text` states, exactly; None when it is not one number (with optional currency/unit, in
    math mode or a box or not).

    A percent sign is read as a unit ("50%" is 50): questions that ask for a percentage give the gold in
    percent, so "50%" must match a gold of "50".
    """
    parsed = _parse_number(text)
    return None if parsed is None else parsed[0]


def _parse_number(text: str) -> tuple[Fraction, bool] | None:
    """parse_number's value, and whether `text` writes it as an integer ("1,234", not "1234.0" or "2/1")."""
    while (wrapped := _MATH_WRAPPER.fullmatch(text)) is not None:
        text = next(inner for inner in wrapped.groups() if inner is not None)
    match = _NUMBER.fullmatch(text.strip().replace("−", "-"))
    if (
        match is None
        or (match["sign"] and match["number"][0] in "+-")
        or (match["unit"] and _NOT_A_UNIT.match(match["unit"]))
    ):
        return None
    try:
        value = Fraction(match["number"].replace(",", ""))
        if match["denominator"] is not None:
            value /= int(match["denominator"])
        for scale in match["scales"].split():
            value *= _SCALES[scale.lower().removesuffix("s")]
        float(value)  # rejects values no float can hold, so tolerance checks and formatting stay finite
    except (ZeroDivisionError, OverflowError, ValueError):
        return None
    # 1.5 million and 3e2 are written as the integers 1500000 and 300 are.
    scaled = match["scales"] != "" or "e" in match["number"].lower()
    written_as_integer = match["denominator"] is None and (
        re.fullmatch(r"[-+]?[\d,]+", match["number"]) is not None or (scaled and value.denominator == 1)
    )
    return (-value if match["sign"] == "-" else value), written_as_integer


def canonical_number(value: Fraction) -> str:
    """All the digits of an integer ('1234'; the numeric verifier tells apart integers of any size), else 12
    significant digits ('0.5' for 1/2)."""
    if value.denominator == 1:
        return str(value.numerator)
    return format(float(value), ".12g")


class NumericVerifier:
    """Correct when |answer − gold| <= abs_tol + rel_tol·|gold|; an answer that is not a number is wrong.

    With neither tolerance set, a gold written as an integer needs its exact value, and any other gold (a
    rounded decimal: 0.33333 for 1/3) is within rel_tol 1e-4 and abs_tol 1e-6: a tolerance relative to a
    large integer would accept its neighbours (100010 for a GSM8K gold of 100000). A tolerance that is
    set applies to every gold. A gold that is not a number makes every answer wrong (a sign that the
    task needs another verifier).
    """

    name = "numeric"

    def __init__(self, rel_tol: float | None = None, abs_tol: float | None = None):
        if not all(tol is None or 0 <= tol < math.inf for tol in (rel_tol, abs_tol)):  # NaN fails too
            raise ValueError(
                f"numeric verifier: tolerances must be finite and >= 0, found rel_tol={rel_tol}, abs_tol={abs_tol}"
            )
        self.integers_exact = rel_tol is None and abs_tol is None
        self.rel_tol = 1e-4 if rel_tol is None else rel_tol
        self.abs_tol = 1e-6 if abs_tol is None else abs_tol

    def normalize(self, answer: str) -> str:
        value = parse_number(answer)
        return basic_normalize(answer) if value is None else canonical_number(value)

    def check(self, answer: str, gold: str) -> bool:
        value, parsed_gold = parse_number(answer), _parse_number(gold)
        if value is None or parsed_gold is None:
            return False
        gold_value, gold_is_integer = parsed_gold
        if gold_is_integer and self.integers_exact:
            return value == gold_value
        return abs(float(value) - float(gold_value)) <= self.abs_tol + self.rel_tol * abs(float(gold_value))


# ----------------------------------------------------------------------------------------------- choice

# A letter named in a phrase: upper-case ("the answer is a cat" names nothing), or either case in brackets.
_NAMED_LETTER = r"(?:[(\[](?=[A-Ja-j][)\]])|(?=[A-J]\b))([A-Ja-j])"
_CHOICE_PATTERNS = (
    re.compile(r"\s*[(\[]?([A-Ja-j])[)\].:]?\s*"),  # whole answer: B, (B), b), B.
    # leading letter: B. text, (B) text, B: text; not one the text rejects ((A) is wrong; the answer is B)
    re.compile(
        r"\s*[(\[]?([A-Ja-j])[)\].:]"
        r"(?!\s+(?i:(?:is\s+not|isn't|not)\s+(?:correct|right|the\s+answer)|is\s+(?:wrong|incorrect|false))\b)\s.*",
        re.DOTALL,
    ),
    re.compile(  # the whole answer: C is correct, B is the right one
        r"\s*[(\[]?([A-J])[)\]]?\s+(?i:is\s+(?:the\s+)?(?:correct|right)(?:\s+(?:answer|option|choice|one))?)\s*[.!]?\s*"
    ),
    # A phrase naming it, "answer is"/"answer:" before "option"/"choice", which may name a rejected one
    # (Option A is wrong; the answer is B). "answer" needs its "is" or colon: "Answer A is wrong" names
    # the rejected one. The answer is B, answer: (C), Option B: text, the correct choice is option D.
    re.compile(
        rf".*?\b(?i:answer)\b(?:\s+(?i:is)\s*:?|\s*:)\s*(?:(?i:option|choice)\s+)?{_NAMED_LETTER}\W*(?:\s.*)?",
        re.DOTALL,
    ),
    re.compile(rf".*?\b(?i:option|choice)\b(?:\s+(?i:is))?\s*:?\s*(?:(?i:option)\s+)?{_NAMED_LETTER}\b.*", re.DOTALL),
)
# A hedge beside the named letter: "B or C", "B/C", "option B or option C". It names no one answer.
# "I" only where it ends a clause: "B or I am wrong" names one answer.
_OTHER_LETTER = r"(?:[(\[][A-Ja-j][)\]]|[A-HJ]\b|I(?=\s*(?:$|[.,;:!?)\]])))"
_HEDGE_AFTER = re.compile(rf"[)\]]?\s*,?\s*(?i:or|/)\s*(?:(?i:option|choice)\s+)?{_OTHER_LETTER}")
_HEDGE_BEFORE = re.compile(rf"{_OTHER_LETTER}\s*,?\s*(?i:or|/)\s*(?:(?i:option|choice)\s+)?[(\[]?$")
# Markup around a letter: **B**, $B$, \boxed{B}, \text{(B)}.
_CHOICE_MARKUP = re.compile(r"\\(?:boxed|text|textbf|mathrm)\s*\{([^{}]*)\}")


def parse_choice(text: str) -> str | None:
    """The upper-case choice letter (A–J) that `text` states, or None. After a hedge ("A or B"), a later
    phrase may still state one ("A or B. Checking again, the answer is B")."""
    for _ in range(2):  # \boxed{\text{B}}
        text = _CHOICE_MARKUP.sub(r"\1", text)
    text = text.replace("*", "").replace("$", "")
    for pattern in _CHOICE_PATTERNS:
        match = pattern.fullmatch(text)
        if match is not None:
            if hedge := _HEDGE_AFTER.match(text, match.end(1)):
                return parse_choice(text[hedge.end() :])
            if _HEDGE_BEFORE.search(text[: match.start(1)]):
                return parse_choice(text[match.end(1) :])
            return match[1].upper()
    return None


class ChoiceVerifier:
    """Correct when the answer states the gold's choice letter (A–J); a hedge ("B or C") states none."""

    name = "choice"

    def normalize(self, answer: str) -> str:
        return parse_choice(answer) or basic_normalize(answer)

    def check(self, answer: str, gold: str) -> bool:
        letter = parse_choice(answer)
        return letter is not None and letter == parse_choice(gold)


# ------------------------------------------------------------------------------------- helper processes
# Why helper processes: math-verify's own timeouts use signal.alarm, which works only in the main thread,
# and rollouts verify from Ray actor threads; reasoning-gym's sympy-based scorers have no timeout at all. A
# thread cannot be killed, so a runaway sympy computation (e.g. "(10^{7})!", minutes of big-integer
# arithmetic) would keep a core busy long after its caller gave up. A process can be killed. pebble's
# ProcessPool kills just the worker whose task ran out of time and starts a new one, so a timeout cannot
# touch another answer's computation; the standard library cannot do this (ProcessPoolExecutor cannot stop
# one running task, multiprocessing.Pool.terminate() kills every caller's work). "spawn" because forking a
# multi-threaded process (Ray, torch) can copy locks held by other threads; as with any spawned process, a
# script that uses these verifiers needs an `if __name__ == "__main__":` guard.

_START_TIMEOUT_S = 120.0  # start-up (importing sympy) is not an answer's fault: it gets its own, generous limit


def kill_on_sigterm() -> None:
    """For a helper's initializer: SIGTERM kills at once. pebble's own handler runs only when the
    computation next checks for signals, which C code such as GMP (sympy's arithmetic when gmpy2 is
    installed) may not do for long, and pebble waits 3 s for it before it sends SIGKILL."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stop_soon(pool: pebble.ProcessPool) -> None:
    """Stop `pool` and its helper processes without waiting: callable from any thread, even one of the
    pool's own (a garbage collection can run there), which could not join itself."""
    pool.stop()
    threading.Thread(target=pool.join, name="stop-verifier-helpers", daemon=True).start()


class HelperProcesses:
    """Runs a verifier's checks in `max_processes` killable helper processes, `timeout_s` seconds each (see
    the note above `_START_TIMEOUT_S`). `initializer` runs in each helper before its first check, untimed:
    it should call kill_on_sigterm and do the imports and warm-up that `start_up` describes. Helpers that
    cannot start at all raise RuntimeError: a broken environment must not pass for wrong answers. pebble
    looks at the clock every 0.1 s, so a timeout_s below that is not kept precisely."""

    def __init__(self, owner: str, timeout_s: float, max_processes: int, initializer: Callable[[], None], start_up: str):
        if not timeout_s > 0:  # NaN too
            raise ValueError(f"{owner}: timeout_s must be > 0, found {timeout_s}")
        if max_processes < 1:
            raise ValueError(f"{owner}: max_processes must be >= 1, found {max_processes}")
        self.owner, self.timeout_s, self.max_processes = owner, timeout_s, max_processes
        self._initializer, self._start_up = initializer, start_up
        # At most one call per helper: a call then finds its helper idle or starting, so it waits at most
        # one start-up plus its own timeout, and waiting for a free helper never counts against an answer.
        self._slots = threading.BoundedSemaphore(max_processes)
        self._pool: pebble.ProcessPool | None = None
        self._pool_lock = threading.Lock()

    def run(self, function: Callable[..., Any], answer: str, *args: Any) -> Any:
        """function(answer, *args) in a helper process; None when it timed out or failed."""
        # pebble calls its pool broken when a worker exits while no task runs: while starting (a broken
        # environment) or while idle (say, the OOM killer; not this answer's fault). A fresh pool (started
        # by _schedule) tells which.
        for _ in range(2):
            with self._slots:
                pool, future = self._schedule(function, (answer, *args))
                finished = concurrent.futures.wait([future], timeout=_START_TIMEOUT_S + self.timeout_s).done
            if not finished:
                self._discard(pool)
                raise RuntimeError(
                    f"{self.owner}: no helper process started within {_START_TIMEOUT_S:g} s ({self._start_up})"
                )
            error = future.exception()
            if not isinstance(error, BrokenProcessPool):
                break
        else:
            raise RuntimeError(
                f"{self.owner}: its helper processes exited while starting (their errors are on stderr). A "
                "script that uses this verifier needs an `if __name__ == '__main__':` guard (helpers are spawned)"
            ) from error
        if error is not None:  # timed out, the helper died, or the check failed
            logger.warning("%s: gave up on answer %r (it counts as wrong): %r", self.owner, answer[:200], error)
            return None
        return future.result()

    def close(self) -> None:
        """Stop the helper processes once the calls in flight end (they also stop with this process); a
        later call starts new ones."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            pool.join()

    def _schedule(self, function: Callable[..., Any], args: tuple[Any, ...]) -> tuple[pebble.ProcessPool, pebble.ProcessFuture]:
        pool = self._pool
        if pool is not None and not pool.active:  # broken (see run)
            self._discard(pool)
        with self._pool_lock:
            if self._pool is None:
                self._pool = pebble.ProcessPool(
                    max_workers=self.max_processes,
                    initializer=self._initializer,
                    context=multiprocessing.get_context("spawn"),
                )
                # Not at exit: pebble stops its workers itself then, when new threads may be refused.
                weakref.finalize(self, _stop_soon, self._pool).atexit = False
            return self._pool, self._pool.submit(function, self.timeout_s, *args)

    def _discard(self, pool: pebble.ProcessPool) -> None:
        """Stop a broken or hung pool; the next call starts a fresh one."""
        with self._pool_lock:
            if self._pool is not pool:  # another call discarded it already
                return
            self._pool = None
        _stop_soon(pool)


# ------------------------------------------------------------------------------------------------- math

def _init_math_helper() -> None:
    """A math helper's start: math-verify's warning that its own timeout is off is silenced (we time it out
    from outside), and one check runs so that lazy imports never eat an answer's timeout."""
    kill_on_sigterm()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _math_equivalent("1", "1")


@functools.lru_cache(maxsize=4096)  # in the helper: a gold is parsed once for all the answers checked against it
def _parse_math(text: str) -> list[Any]:
    from math_verify import parse

    # Bare LaTeX ("\frac12", "x^2+1", "\sqrt{2}") parses only between math delimiters. Text that has its
    # own keeps them: $…$ around \[5\] would hide the 5.
    has_delimiters = re.search(r"(?<!\\)\$|\\\[|\\\(", text) is not None  # \$ is a dollar sign, not one
    return parse(text if has_delimiters else f"${text}$", parsing_timeout=None)


def _math_equivalent(answer: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed, answer_parsed = _parse_math(gold), _parse_math(answer)
    return bool(gold_parsed and answer_parsed) and verify(gold_parsed, answer_parsed, timeout_seconds=None)


def _math_canonical(answer: str) -> str | None:
    """One form for the answers check finds equal, as far as it is cheap: every way of writing a rational
    number ("3", "3.0", "\\frac{1}{2}", "0.5") gets canonical_number's, so that repeating an answer in
    another notation still counts as a repeat. An equation naming a variable ("x = 3") gets its value's, as
    check finds it equal to its value (so "y = 3" counts as a repeat of it too)."""
    from sympy import Eq

    parsed = _parse_math(answer)
    if not parsed or isinstance(parsed[0], str):
        return None
    value = parsed[0].doit() if hasattr(parsed[0], "doit") else parsed[0]  # 50\% is 50*(1/100) unevaluated
    if isinstance(value, Eq) and value.lhs.is_Symbol:
        value = value.rhs
    if getattr(value, "is_Rational", False) or getattr(value, "is_Float", False):
        return canonical_number(Fraction(str(value)))
    return str(value)


class MathVerifier:
    """Correct when math-verify finds the answer equivalent to the gold ("\\frac{1}{2}", "0.5", "1/2").

    Each answer gets `timeout_s` seconds in one of `max_processes` helper processes (HelperProcesses); one
    that takes longer, or makes math-verify fail, counts as wrong and normalises with basic_normalize.
    Results are cached per (answer, gold) since the K samples of a prompt repeat answers; a timeout is
    cached too, so a pathological answer costs its timeout once.
    """

    name = "math"

    def __init__(self, timeout_s: float = 5.0, max_processes: int = 2, cache_size: int = 65536):
        self._helpers = HelperProcesses(
            "math verifier", timeout_s, max_processes, _init_math_helper,
            "each imports math-verify and checks one answer before it takes the first",
        )
        self.timeout_s, self.max_processes, self.cache_size = timeout_s, max_processes, cache_size
        self._cached_check = functools.lru_cache(maxsize=cache_size)(self._check_uncached)
        self._cached_normalize = functools.lru_cache(maxsize=cache_size)(self._normalize_uncached)

    def __reduce__(self) -> tuple[type[MathVerifier], tuple[float, int, int]]:
        # Ray ships objects between processes: send the settings, not the helper processes or the caches.
        return (type(self), (self.timeout_s, self.max_processes, self.cache_size))

    def normalize(self, answer: str) -> str:
        return self._cached_normalize(answer)

    def check(self, answer: str, gold: str) -> bool:
        return self._cached_check(answer, gold)

    def close(self) -> None:
        """Stop the helper processes (see HelperProcesses.close)."""
        self._helpers.close()

    def _normalize_uncached(self, answer: str) -> str:
        return self._helpers.run(_math_canonical, answer) or basic_normalize(answer)

    def _check_uncached(self, answer: str, gold: str) -> bool:
        return self._helpers.run(_math_equivalent, answer, gold) is True


# --------------------------------------------------------------------------------------------- registry

def _reasoning_gym_verifier(
    threshold: float = 1.0, timeout_s: float = 10.0, max_processes: int = 2, cache_size: int = 8192
) -> Verifier:
    # Imported on use: reasoning-gym is optional and heavy, and rollout actors build verifiers by name.
    from drift_ray.gym_tasks import ReasoningGymVerifier

    return ReasoningGymVerifier(threshold, timeout_s, max_processes, cache_size)


_REGISTRY: dict[str, Callable[..., Verifier]] = {
    "exact": ExactVerifier,
    "numeric": NumericVerifier,
    "choice": ChoiceVerifier,
    "math": MathVerifier,
    "reasoning_gym": _reasoning_gym_verifier,
}


def register_verifier(name: str, factory: Callable[..., Verifier]) -> None:
    _REGISTRY[name] = factory


def require_known_verifier(name: str) -> None:
    """Fail unless a verifier is registered under `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown verifier {name!r}; known: {', '.join(sorted(_REGISTRY))}")


def verifier_settings(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` with the defaults of the options they leave out: every setting the verifier is built
    with, so that a record of them changes when an option is added, not only when one changes."""
    defaults = {
        parameter.name: parameter.default
        for parameter in inspect.signature(_REGISTRY[name]).parameters.values()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **options}


BOOLEAN_FOR_A_NUMBER = "Input should be a number, not true or false"


def _kinds(annotation: Any) -> set[Any]:
    """The types a value typed `annotation` may have: the members of a Union or Optional, else itself."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*map(_kinds, get_args(annotation)))
    return {annotation}


def reads_a_boolean_as_a_number(annotation: Any) -> bool:
    """Whether a value typed `annotation` takes numbers but not booleans, which Python reads as 0 and 1."""
    kinds = _kinds(annotation)
    return bool not in kinds and bool(kinds & {int, float})


def _wanted_instead_of_text(annotation: Any) -> str | None:
    """What a value typed `annotation` takes where that is only booleans and numbers, else None."""
    kinds = _kinds(annotation) - {type(None)}
    if not kinds or not kinds <= {bool, int, float}:
        return None
    return "true or false" if kinds == {bool} else "a number"


def options_mismatch(fn: Callable[..., Any], options: Mapping[str, Any], **fixed: Any) -> str | None:
    """What is wrong with calling `fn(**fixed, **options)`, for an error that names the config key, or None:
    an option that drift-ray passes itself (`fixed`), or options that do not bind (both with the options
    `fn` accepts), or a boolean given where `fn`'s annotation takes a number, or text where it takes only
    booleans or numbers (unchecked where the annotations cannot be evaluated). Text: YAML 1.2 reads
    `allow_negation: no` as the word "no", which an unchecked dataclass would take as true. Checked before
    the call, so a TypeError raised inside `fn` is not mistaken for a wrong option. (Here, not in config.py: the math verifier's helper processes import this
    module, and need not import pydantic.)"""
    signature = inspect.signature(fn)
    accepted = ", ".join(name for name in signature.parameters if name not in fixed) or "none"
    passed_by_drift_ray = sorted(set(options) & set(fixed))
    if passed_by_drift_ray:
        return f"{', '.join(passed_by_drift_ray)}: drift-ray sets it from the config, not from these options; accepted options: {accepted}"
    try:
        signature.bind(**fixed, **options)
    except TypeError as error:
        return f"{error}; accepted options: {accepted}"
    suspects = {name: value for name, value in options.items() if isinstance(value, (bool, str))}
    if not suspects:
        return None
    try:
        typed = inspect.signature(fn, eval_str=True).parameters
    except Exception:  # a plugin annotation that only a type checker resolves (NameError, TypeError, …): unchecked
        return None
    for name, value in suspects.items():
        if name not in typed:
            continue
        annotation = typed[name].annotation
        # `timeout_s: true` would run with 1 second: YAML's true is a Python bool, which is an int.
        if isinstance(value, bool) and reads_a_boolean_as_a_number(annotation):
            return f"{name}: {BOOLEAN_FOR_A_NUMBER} (found {value})"
        if isinstance(value, str) and (wanted := _wanted_instead_of_text(annotation)):
            return f"{name}: expected {wanted}, found the text {value!r}"
    return None


def get_verifier(name: str, **options: Any) -> Verifier:
    """A new verifier `name` built with `options`, e.g. get_verifier("numeric", rel_tol=1e-3)."""
    require_known_verifier(name)
    factory = _REGISTRY[name]
    mismatch = options_mismatch(factory, options)
    if mismatch:
        raise ValueError(f"verifier {name!r}: {mismatch}")
    return factory(**options)
