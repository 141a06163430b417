"""Config tree: YAML + overrides, dotted-path errors with hints, documented fields."""

import re
from pathlib import Path

import pytest

from drift_ray.config import ConfigError, LossKind, WeightMode, field_docs, load_config, validate_config
from drift_ray.trajectories import _dotted

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg.episode.max_turns, cfg.weights.gamma, cfg.weights.beta, cfg.weights.rep_lambda) == (5, 0.9, 0.1, 0.5)
    assert cfg.episode.feedback == "Incorrect. Please think again."
    assert cfg.episode.format_penalty == -0.1
    assert cfg.train.loss is LossKind.sample_mean and cfg.weights.mode is WeightMode.drift


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weights:\n  beta: 0.5\ntrain:\n  lora:\n    r: 4\n")
    cfg = load_config(path, ["weights.beta=0.25", "weights.mode=uniform", 'episode.instruction="Q: {question}"'])
    assert cfg.weights.beta == 0.25 and cfg.train.lora.r == 4
    assert cfg.weights.mode is WeightMode.uniform
    assert cfg.episode.instruction == "Q: {question}"


def test_numbers_in_exponent_form_are_numbers_in_free_form_options_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task:\n  verifier_options:\n    rel_tol: 1e-3\n")
    overrides = ["task.verifier_options.abs_tol=5E-7", "task.options.size=2.5e3", "weights.beta=2e-1"]
    overrides.append('task.options.name="1e-3"')
    cfg = load_config(path, overrides)
    assert cfg.task.verifier_options == {"rel_tol": 0.001, "abs_tol": 5e-7}
    assert cfg.task.options["size"] == 2500.0  # with a dot but an unsigned exponent: a string to plain YAML 1.1
    assert cfg.weights.beta == 0.2 and cfg.task.options["name"] == "1e-3"  # quoted, it stays a string


def test_numbers_and_booleans_are_read_as_yaml_1_2_reads_them(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 010\ntask:\n  options: {padded: 0777, octal: 0o17, hex: 0x1F, time: 1:30, words: [on, off, yes, no]}\n")
    cfg = load_config(path, ["train.lora.enabled=on", "task.options.flag=true", "task.options.day=2024-01-01"])
    assert cfg.seed == 10  # not octal 8
    assert cfg.task.options == {
        "padded": 777, "octal": 15, "hex": 31, "time": "1:30", "words": ["on", "off", "yes", "no"], "flag": True,
        "day": "2024-01-01",  # not a datetime.date, which `config` would print as this text
    }
    assert load_config(None, ["episode.feedback=2024-01-01"]).episode.feedback == "2024-01-01"
    assert cfg.train.lora.enabled is True  # a boolean field still takes "on"
    with pytest.raises(ConfigError, match=r"seed: .*\(found '1:30'\)"):  # not base-60 90
        load_config(None, ["seed=1:30"])
    with pytest.raises(ConfigError, match=r"'0b11' is not an integer"):
        load_config(None, ["task.options.n=!!int 0b11"])


def test_paths_from_the_home_directory_are_expanded(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = load_config(None, ["run_dir=~/runs/a", "rollout.output_dir=~/rollouts", "task={kind: file, test_path: ~/t.jsonl}"])
    assert (cfg.run_dir, cfg.rollout.output_dir, cfg.task.test_path) == ("/home/someone/runs/a", "/home/someone/rollouts", "/home/someone/t.jsonl")
    assert load_config(None, []).run_dir == "runs/demo"


def test_an_override_fills_a_section_left_empty_in_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task:\n")
    assert load_config(path, ["task.name=gsm8k", "task.kind=hub"]).task.name == "gsm8k"


def test_a_section_left_empty_in_the_file_holds_its_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task:\ntrain:\n  lora: null\neval:\n  task:\n")
    cfg = load_config(path)
    assert (cfg.task, cfg.train) == (load_config(None).task, load_config(None).train)
    assert cfg.eval.task is None  # an optional section: unset
    with pytest.raises(ConfigError, match=r"train\.lora: expected a section: a mapping of its keys \(found True\) \[set by"):
        load_config(None, ["train.lora=true"])


def test_an_override_clears_what_the_file_set_that_another_kind_does_not_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task:\n  kind: builtin\n  name: candidates\n  options: {num_train: 8}\n")
    as_file = ["task.kind=file", "task.test_path=t.jsonl"]
    with pytest.raises(ConfigError, match=re.escape("change kind, or remove the key (or set it to null)")):
        load_config(path, as_file)
    assert load_config(path, [*as_file, "task.options=null"]).task.options == {}
    assert load_config(None, ["task.columns=null", "task.verifier_options=null"]).task.columns == {}
    assert load_config(None, ["task.verifier_options=null"]).task.verifier_options == {}


def test_all_errors_at_once_with_dotted_paths_and_hints(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rollout:\n  modle: x\n  samples_per_prompt: zero\nweights:\n  beta: -1\ntrainn: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "rollout.modle: unknown key; did you mean 'rollout.model'?" in message
    assert "rollout.samples_per_prompt" in message and "'zero'" in message
    assert "weights.beta" in message
    assert "trainn: unknown key; did you mean 'train'?" in message


@pytest.mark.parametrize(
    "override, line",
    [
        # Too short for difflib beside the key it abbreviates: found by its words.
        ("rollout.samples=4", "  rollout.samples: unknown key; did you mean 'rollout.samples_per_prompt'?"),
        ("rollout.temp=0.7", "  rollout.temp: unknown key; did you mean 'rollout.temperature'?"),
        ("train.gpus=1", "  train.gpus: unknown key; did you mean 'train.use_gpu'?"),  # singular or plural
        ("train.batch_size=8", "  train.batch_size: unknown key; did you mean 'train.global_batch_size' or "
         "'train.micro_batch_size'?"),
        # The fewest-worded of the keys holding it, not cpus_per_actor and gpus_per_actor.
        ("rollout.actors=2", "  rollout.actors: unknown key; did you mean 'rollout.num_actors'?"),
        # Not all its words: the most of them but qualifiers (num, size), not tensor_parallel_size.
        ("rollout.num_samples=4", "  rollout.num_samples: unknown key; did you mean 'rollout.samples_per_prompt'?"),
        ("rollout.batch_size=8", "  rollout.batch_size: unknown key; did you mean 'rollout.prompts_per_batch'?"),
        ("train.lr_scheduler=cosine", "  train.lr_scheduler: unknown key; did you mean 'train.lr_schedule'?"),
        # The key of another section, before the nearest of its own.
        ("eval.max_turns=3", "  eval.max_turns: unknown key; did you mean 'episode.max_turns' or 'eval.max_new_tokens'?"),
        ("eval.num_workers=2", "  eval.num_workers: unknown key; did you mean 'train.num_workers' or 'eval.num_actors'?"),
        # A key whose description names it, where nothing else is found; not where one is (eval.num_actors's
        # description lists rollout.dtype among others).
        ("train.learning_rate=1e-5", "  train.learning_rate: unknown key; did you mean 'train.lr'?"),
        ("eval.dtype=float32", "  eval.dtype: unknown key; did you mean 'rollout.dtype'?"),
    ],
)
def test_an_unknown_key_suggests_the_keys_it_abbreviates(override, line):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    # Without a file too, the override is named as the source of its key.
    assert str(error.value).splitlines() == [
        "<defaults>: invalid config:",
        f"{line} [set by the override of {override.partition('=')[0]}]",
    ]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("episode.instruction=no slot", "episode.instruction"),
        ("weights.mode=rft", "weights.mode"),
        ("novalue", "<defaults>: an override has no '=' (not shown: it may be a value, such as a secret): expected key.path=value"),
        # A key of the config is no secret: named, as in `rollout.max_new_tokens 16`.
        ("rollout.max_new_tokens", "override 'rollout.max_new_tokens' has no '=': expected key.path=value, e.g. rollout.max_new_tokens=VALUE"),
        ("task.options.=1", "override of 'task.options.': expected key.path=value"),
        (".beta=1", "override of '.beta': expected key.path=value"),
        ("weights.beta.x=1", "override of weights.beta.x: weights.beta is not a section"),
        ("rollout.model.x=1", "override of rollout.model.x: rollout.model is not a section"),  # not in the file either
        ("task.options=[a", "override of task.options: not a valid YAML value (expected ',' or ']'"),
        ("rollout.dtype=fp16", "rollout.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
        ("task.kind=hf", "task.kind: Input should be 'builtin', 'file', 'plugin', 'hub' or 'reasoning_gym' (found 'hf')"),
        # Checked when the config loads, not when training starts after the rollouts.
        ("train.micro_batch_size=3", "train.global_batch_size=128 must be a multiple of train.micro_batch_size"),
        # An infinite β would make every weight 1 without a word.
        ("weights.beta=.inf", "weights.beta: Input should be a finite number (found inf)"),
        ("rollout.temperature=.nan", "rollout.temperature: Input should be a finite number (found nan)"),
        ("run_dir=''", "run_dir: String should have at least 1 character"),
        ("run_dir=~", "run_dir: Input should be a valid string (found null, as YAML reads an empty value, null and ~: quote it"),
        # Pydantic alone would read true as 1.
        ("seed=true", "seed: Input should be a number, not true or false (found True)"),
        ("seed=-1", "seed: Input should be greater than or equal to 0 (found -1)"),  # numpy's generators refuse it
        ("weights.beta=True", "weights.beta: Input should be a number, not true or false (found True)"),
        ("weights.beta=yes", "weights.beta: Input should be a valid number, unable to parse string as a number (found 'yes')"),
        ("task.num_test=false", "task.num_test: Input should be a number, not true or false (found False)"),
        ("rollout.resources={gpu: true}", "rollout.resources.gpu: Input should be a valid number (found True)"),
        ("train.resources=true", "train.resources: Input should be a valid dictionary (found True)"),
        # A key the task's kind does not read is an error, not a silently different task.
        ("task.train_path=problems.jsonl", "task.train_path: kind 'builtin' does not read it, only 'file', 'hub' do"),
        ("eval.task={kind: builtin, name: candidates, test_path: t.jsonl}", "eval.task.test_path: kind 'builtin' does not"),
        # Not "change kind": no kind of an evaluated task reads it.
        ("eval.task.train_path=t.jsonl", "eval.task.train_path: evaluation reads a task's test split only: remove the key"),
        ("task={kind: reasoning_gym, name: chain_sum, test_path: t.jsonl}", "task.test_path: kind 'reasoning_gym' does not"),
        ("task={kind: hub, name: math, columns: {question: q}}", "task.columns: kind 'hub' does not read it, only 'file' do"),
        ("task={kind: file, test_path: t.jsonl, options: {n: 1}}", "task.options: kind 'file' does not read it"),
        ("task={kind: file, test_path: t.jsonl, test_path: u.jsonl}", "task: not a valid YAML value (found the key 'test_path' a second time (first at line 1))"),
        ("rollout.api_base=localhost:8000/v1", "rollout.api_base: expected an http:// or https:// URL"),
        # YAML would read "Wrong" alone, in a mapping or list too.
        ("episode.feedback=Wrong #2, think again", "episode.feedback: YAML reads '#2, think again' as a comment, which "
         "an override has no use for: leave it out, or quote the value if it belongs to it, e.g. "
         "\"episode.feedback='Wrong #2, think again'\""),
        ("task.options=n: 3 #three", "task.options: YAML reads '#three' as a comment, which an override has no use for: leave it out"),
        ("episode.system_prompt=#hi", "episode.system_prompt: YAML reads '#hi' as a comment"),
        ("task.options=- a #1", "task.options: YAML reads '#1' as a comment"),
        ("task.options=a: 1 # one\nb: 2", "task.options: YAML reads '# one' as a comment"),
        ("episode.feedback=it's #2", "e.g. \"episode.feedback='it''s #2'\""),
    ],
)
def test_bad_overrides(override, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, [override])


def test_a_quoted_hash_is_part_of_the_value():
    cfg = load_config(None, ["episode.feedback='Wrong #2'", "task.options={a: '#', b: 1}"])
    assert (cfg.episode.feedback, cfg.task.options) == ("Wrong #2", {"a": "#", "b": 1})


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["episode.instruction=Q: {question}"],
            "  episode.instruction: Input should be a valid string (found the mapping {'Q': {'question': None}}; "
            "quote a value with ': ' or braces in it) [set by the override of episode.instruction]",
        ),
        (
            ["eval.task.num_test=50"],
            "  eval.task names no task (neither eval.task.kind nor eval.task.name is set): set "
            "them, or leave eval.task unset to evaluate on task's test split (task.num_test sets how many problems)",
        ),
        (
            ["train.offload=true", "train.zero_stage=0"],
            "  train.offload=true needs ZeRO: set train.zero_stage to 1, 2 or 3, or train.offload=false",
        ),
        (
            ["rollout.engine=vllm"],
            "  rollout.engine=vllm runs on GPUs: set rollout.gpus_per_actor (to "
            "rollout.tensor_parallel_size, now 1)",
        ),
        (
            ["rollout.engine=vllm", "rollout.tensor_parallel_size=2", "rollout.gpus_per_actor=1"],
            "  rollout.tensor_parallel_size=2 shards the model over that many GPUs of the actor: "
            "set rollout.gpus_per_actor to it (now 1)",
        ),
        (
            ["rollout.tensor_parallel_size=2"],
            "  rollout.tensor_parallel_size=2 shards the model over GPUs with rollout.engine=vllm "
            "only; the transformers engine would run it unsharded",
        ),
        (
            ["rollout.engine=vllm", "rollout.gpus_per_actor=3"],
            "  rollout.gpus_per_actor=3 reserves GPUs that vLLM, with "
            "rollout.tensor_parallel_size=1, leaves idle: set rollout.gpus_per_actor to 1 (or less, to share "
            "a GPU between actors), or rollout.tensor_parallel_size and rollout.gpus_per_actor both to the number "
            "of GPUs to shard the model over",
        ),
        (
            ["rollout.engine=vllm", "rollout.gpus_per_actor=0.5"],
            "  rollout.gpu_memory_utilization=0.85 is the share of the whole GPU's memory each "
            "vLLM actor takes, more than the rollout.gpus_per_actor=0.5 of the GPU it reserves: the actors sharing the "
            "GPU would ask for more memory than it has, and vLLM would refuse to start; set "
            "rollout.gpu_memory_utilization to at most 0.5",
        ),
        (
            ["rollout.temperature=0"],
            "  rollout.temperature=0 samples greedily, so the rollout.samples_per_prompt=16 "
            "episodes of a prompt would all be the same (and vLLM refuses greedy requests for more than one sample): "
            "set rollout.samples_per_prompt=1 or a temperature above 0",
        ),
        (
            ["rollout.engine=openai", "rollout.max_model_len=4096"],
            "  rollout.max_model_len=4096 sets the context of a local engine; with "
            "rollout.engine=openai the server holds the model: set its context there (vllm serve --max-model-len) "
            "and leave rollout.max_model_len out",
        ),
        (
            ["rounds=2", "train.lora.enabled=true", "train.lora.merge=false"],
            "  rounds > 1 trains each round's model further, which an adapter saved unmerged (train.lora.merge=false) "
            "cannot be: set train.lora.merge=true (or rounds=1)",
        ),
    ],
    ids=[
        "unquoted-mapping",
        "eval-task-naming-no-task",
        "offload-without-zero",
        "vllm-without-gpu",
        "tensor-parallel-gpus",
        "tensor-parallel-without-vllm",
        "idle-gpus",
        "vllm-memory-above-its-share",
        "greedy-copies",
        "server-context",
        "rounds-of-adapters",
    ],
)
def test_settings_that_would_fail_in_the_workers_fail_when_the_config_loads(overrides, line):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert line in str(error.value).splitlines()


def test_an_error_under_an_overridden_key_names_the_override_not_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: -1\ntask:\n  num_train: 8\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["task.num_train=0", "rollout={engine: x}"])
    assert str(error.value).splitlines()[1:] == [
        "  seed: Input should be greater than or equal to 0 (found -1)",  # the file's own
        "  task.num_train: Input should be greater than or equal to 1 (found 0) [set by the override of task.num_train]",
        "  rollout.engine: Input should be 'transformers', 'vllm' or 'openai' (found 'x') [set by the override of rollout]",
    ]


@pytest.mark.parametrize(
    "override, line",
    [
        ("task.option.num_test=5", "  task.option: unknown key; did you mean 'task.options'? [set by the override of task.option.num_test]"),
        ("rollout.lora.merge=true", "  rollout.lora: unknown key; did you mean 'train.lora'? [set by the override of rollout.lora.merge]"),
    ],
)
def test_an_unknown_section_above_an_overridden_key_names_the_override(override, line):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).splitlines()[1:] == [line]


def test_settings_that_the_checks_across_keys_let_through():
    # Two actors share a GPU, each taking at most its half of the memory.
    load_config(None, ["rollout.engine=vllm", "rollout.gpus_per_actor=0.5", "rollout.gpu_memory_utilization=0.45"])
    load_config(None, ["rollout.temperature=0", "rollout.samples_per_prompt=1"])
    load_config(None, ["rollout.engine=vllm", "rollout.gpus_per_actor=1", "rollout.max_model_len=8192"])
    load_config(None, ["rollout.engine=vllm", "rollout.tensor_parallel_size=4", "rollout.gpus_per_actor=4"])
    load_config(None, ["rounds=2", "train.lora.enabled=true"])  # merged: round 2 trains the merged model
    load_config(None, ["train.offload=true", "train.zero_stage=1"])
    load_config(None, ["eval.task.name=candidates", "eval.task.num_test=50"])
    # Booleans where a field takes them, integers where it takes numbers, null where it takes none.
    cfg = load_config(None, ["train.lora.enabled=1", "train.resources={train_gpu: 1}", "task.num_test=null"])
    assert cfg.train.lora.enabled is True and cfg.train.resources == {"train_gpu": 1.0} and cfg.task.num_test is None


@pytest.mark.parametrize(
    "instruction, fragment",
    [
        ("{{question}}", "must contain the placeholder '{question}' ({{ and }} stand for literal braces)"),
        ('Reply as {"answer": 1}. {question}', """has placeholders other than '{question}': '"answer"'"""),
        ("{question} in {}", "has placeholders other than '{question}': ''"),
        ("Q: {question", "not a valid template (expected '}' before end of string)"),
        ("Q: {question:{x}}", "fails in str.format (KeyError: 'x')"),
        ("Q: {question!z}", "fails in str.format (ValueError: Unknown conversion specifier z)"),
        ("Q: {question:d}", "fails in str.format (ValueError: Unknown format code 'd'"),
    ],
)
def test_an_instruction_is_checked_as_str_format_reads_it(instruction, fragment):
    with pytest.raises(ConfigError, match="episode.instruction: " + re.escape(fragment)):
        validate_config({"episode": {"instruction": instruction}})
    assert validate_config({"episode": {"instruction": "{{Q}}: {question}"}}).episode.instruction == "{{Q}}: {question}"


@pytest.mark.parametrize(
    "override, line",
    [
        (
            "rollout.api_key_env=sk-proj-SECRET",
            "  rollout.api_key_env: expected the name of an environment variable (upper-case letters, "
            "digits and _, not starting with a digit, e.g. OPENAI_API_KEY), not the API key itself",
        ),
        # Keys without a '-' look like names but for their lower-case letters.
        *(
            (
                f"rollout.api_key_env={key}",
                "  rollout.api_key_env: expected the name of an environment variable (upper-case letters, "
                "digits and _, not starting with a digit, e.g. OPENAI_API_KEY), not the API key itself",
            )
            for key in ("gsk_live_abc123SECRET", "hf_SECRETxyz", "ghp_SECRET0123456789")
        ),
        (
            "rollout.api_base=https://me:SECRET@llm.example/v1",
            "  rollout.api_base: holds credentials, which every error would show: put the API key in the "
            "environment variable that rollout.api_key_env names",
        ),
        (
            "rollout.api_base=https://llm.example/v1?key=SECRET",
            "  rollout.api_base: holds a query or fragment: /chat/completions is appended to it, so that "
            "would not be the path requested",
        ),
    ],
    ids=["key-for-its-name", "groq-key", "hf-token", "github-token", "credentials-in-url", "key-in-query"],
)
def test_what_may_be_a_secret_is_refused_without_being_repeated(override, line):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["rollout.engine=openai", override])
    # The override's key alone names it.
    tagged = f"{line} [set by the override of {override.partition('=')[0]}]"
    assert tagged in str(error.value).splitlines() and "SECRET" not in str(error.value)
    load_config(None, ["rollout.engine=openai", "rollout.api_key_env=MY_KEY_2", "rollout.api_base=https://llm.example:8443/v1/"])


@pytest.mark.parametrize("setting", ["api_base=https://llm.example/v1", "max_concurrency=8", "api_key_env=MY_KEY"])
def test_a_server_setting_under_a_local_engine_is_refused(setting):
    """Else a config whose engine key was forgotten plays the local default model, not the server's."""
    key = setting.partition("=")[0]
    with pytest.raises(ConfigError, match=(
        rf"rollout.{key} is read with rollout.engine=openai only, and rollout.engine is transformers: set "
        rf"rollout.engine=openai to play on a server, or remove rollout.{key}"
    )) as error:
        load_config(None, [f"rollout.{setting}"])
    assert "llm.example" not in str(error.value)
    # A config written out whole (`drift-ray config`) names every key with its default: those are no settings.
    load_config(None, ["rollout.api_base=http://localhost:8000/v1", "rollout.max_retries=5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ('rollout.api_base="https://me:s3cr3t@llm.example/v1', "override of rollout.api_base: not a valid YAML value"),
        ("rollout.api_base https://me:s3cr3t@llm.example/v1", "an override has no '=' (not shown: it may be a value"),
        ("rollout.api_base.=https://me:s3cr3t@llm.example/v1", "override of 'rollout.api_base.': expected key.path=value"),
        ("rollout.api_base.x=https://me:s3cr3t@llm.example/v1", "override of rollout.api_base.x: rollout.api_base is not a section"),
        ("rollout.api_key_env=s3cr3t #x", "override of rollout.api_key_env: YAML reads part of it as a comment"),
        ("rollout.api_base=https://me:s3cr3t@llm.example/v1 #x", "override of rollout.api_base: YAML reads part of it"),
    ],
    ids=["unclosed-quote", "no-equals", "empty-key-part", "not-a-section", "comment-in-key", "comment-in-url"],
)
def test_a_malformed_override_is_refused_without_repeating_its_value(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["rollout.api_base=http://localhost:8000/v1", override])
    assert message in str(error.value) and "s3cr3t" not in str(error.value)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            'rollout:\n  engine: openai\n  api_base: "https://me:SECRET@llm.example/v1\n  model: m\n',
            "not valid YAML: while scanning a quoted scalar\n"
            '  in "{path}", line 3, column 13\n'
            "found unexpected end of stream\n"
            '  in "{path}", line 5, column 1',
        ),
        (
            "rollout:\n  api_base: https://me:SECRET@llm.example/v1\n  api_base: https://me:SECRET@llm.example/v1\n",
            "not valid YAML: found the key 'api_base' a second time (first at line 2)\n"
            '  in "{path}", line 3, column 3',
        ),
        ("? [a]\n: b\n", 'not valid YAML: found a list as a key, where a key is a name\n  in "{path}", line 1, column 3'),
    ],
    ids=["unclosed-quote", "key-written-twice", "list-as-key"],
)
def test_a_yaml_error_names_the_file_and_line_without_quoting_it(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path}: " + message.format(path=path)


def test_a_url_with_a_fragment_is_refused():
    with pytest.raises(ConfigError, match="rollout.api_base: holds a query or fragment"):
        load_config(None, ["rollout.api_base=http://localhost:8000/v1#"])  # would request /v1 itself


def test_an_override_changes_the_key_it_names_only(tmp_path):
    path = tmp_path / "shared.yaml"
    # eval.task takes the training task's keys through a YAML alias: PyYAML gives both one mapping.
    path.write_text("task: &train\n  kind: builtin\n  name: candidates\n  options: {num_test: 5}\neval:\n  task:\n    <<: *train\n")
    cfg = load_config(path, ["eval.task.options.num_test=7", "eval.task.num_test=3"])
    assert (cfg.task.options, cfg.task.num_test) == ({"num_test": 5}, None)
    assert (cfg.eval.task.options, cfg.eval.task.num_test) == ({"num_test": 7}, 3)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    for text in ("- a list\n", "0\n", "[]\n", "''\n"):  # no mapping, even where it is falsy
        path.write_text(text)
        with pytest.raises(ConfigError, match="expected a mapping"):
            load_config(path)
    path.write_text("# nothing set yet\n")
    assert load_config(path) == load_config(None)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    # PyYAML keeps the last of two `task:` sections: the first one's file task would become the built-in one.
    path.write_text("task:\n  kind: file\n  train_path: p.jsonl\nseed: 1\ntask:\n  num_train: 10\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "found the key 'task' a second time (first at line 1)" in message and f'in "{path}", line 5, column 1' in message
    merged = tmp_path / "merged.yaml"
    merged.write_text("task:\n  <<: {kind: builtin, num_train: 5}\n  num_train: 7\n")
    assert load_config(merged).task.num_train == 7  # a key beside a merge overrides it: not a repeat
    # Also in an anchored mapping that a mapping before it merges: PyYAML merges the anchored one in place first.
    merged.write_text(
        "eval:\n  task:\n    name: candidates\n    options: &o\n      <<: {num_test: 1}\n      num_test: 2\n"
        "task:\n  options:\n    <<: *o\n"
    )
    assert load_config(merged).task.options == load_config(merged).eval.task.options == {"num_test": 2}
    path.write_bytes("run_dir: runs/caf\u00e9\n".encode() + "seed: 1 # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: not UTF-8 text")):
        load_config(path)


def test_every_field_is_documented():
    docs = field_docs()
    assert len(docs) > 50
    undocumented = [key for key, _, doc in docs if not doc]
    assert not undocumented
    keys = [key for key, _, _ in docs]
    # An optional section: its own line (unset), then its keys, those of the section it stands in for but
    # the ones evaluation does not read.
    eval_task_keys = {key for key in keys if key.startswith("eval.task.")}
    task_keys = {f"eval.task.{key[len('task.'):]}" for key in keys if key.startswith("task.")}
    assert "eval.task" in keys and eval_task_keys == task_keys - {"eval.task.train_path", "eval.task.num_train"}
    assert "task" not in keys and "eval" not in keys


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.yaml")))
def test_shipped_job_configs_load(job):
    load_config(JOBS / job)


def test_the_gpu_demo_differs_from_the_cpu_demo_only_in_its_gpu_settings():
    """jobs/demo_gpu.yaml says its task, episodes, weights and training schedule are demo_cpu.yaml's; what
    differs is where it runs and how it trains there (ZeRO-3, bf16, one worker)."""
    gpu_settings = {
        "run_dir",
        "rollout.gpus_per_actor",
        "train.num_workers",
        "train.use_gpu",
        "train.zero_stage",
        "train.bf16",
        "train.micro_batch_size",  # the whole global batch on the one worker
        "ray.num_cpus",
    }
    # By dotted key, as a refused rerun names the settings that changed.
    cpu = _dotted(load_config(JOBS / "demo_cpu.yaml").model_dump(mode="json"))
    gpu = _dotted(load_config(JOBS / "demo_gpu.yaml").model_dump(mode="json"))
    assert cpu.keys() == gpu.keys()
    assert {key for key in cpu if cpu[key] != gpu[key]} == gpu_settings
    assert gpu["train.use_gpu"] and gpu["rollout.gpus_per_actor"] > 0


@pytest.mark.parametrize(
    "value, problem",
    [
        ("[]", "train.lora.target_modules: expected one module name at least, or all-linear (found [])"),
        ("q_proj", "train.lora.target_modules: expected a list of module names, such as [q_proj], or all-linear"),
    ],
)
def test_lora_targets_are_module_names_or_all_linear(value, problem):
    assert load_config(None, ["train.lora.target_modules=all-linear"]).train.lora.target_modules == "all-linear"
    assert load_config(None, ["train.lora.target_modules=[gate_proj]"]).train.lora.target_modules == ["gate_proj"]
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(None, [f"train.lora.target_modules={value}"])
