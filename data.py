"""All alignment data in one generative format (README.md, "The method"): loaders (`load("gsm8k")`
reads the hub, `load("gsm8k:FILE")` a local file in the same upstream schema: offline, samples/),
the task mixture, and the player/referee prompts. A record is a plain dict:

    id         str, stable and unique in its source (upstream id, else "<split or file>-<row>")
    task       "verifiable" | "preference" | "open"
    source     the registry key, e.g. "gsm8k"
    messages   [{"role", "content"}, ...], the conversation to answer; ends with a user turn
    answer     verifiable: the gold final answer (raw LaTeX or a number); else None
    responses  preference: the K >= 2 candidate responses; else None
    ranking    preference: gold order of `responses`, best first (pairs: [0, 1]); else None
    meta       subset, level, "reference" (a reference answer), ... for evaluation breakdowns
"""

import gzip
import json
import math
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from reward import (balanced_self_rewards, format_score, format_verdict, last_boxed, parse_score,
                    ranking_reward, read_verdict, scored_preference_rewards, scored_self_rewards)

TASKS = ("verifiable", "preference", "open")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Input that cannot be read in its source's schema; the message says where and what to fix."""


class _Skip(Exception):
    """A well-formed row that cannot serve as an example; counted under its reason."""


class _BadRow(Exception):
    """A row that breaks its schema; load_with_counts adds the loader, file and row."""


# --- Field access: every schema check goes through these, so every error reads the same way --
def _field(row: dict, name: str, kind=str, path: str = ""):
    if name not in row:
        raise _BadRow(f"missing field {path + name!r} (the row has {sorted(row)})")
    if not isinstance(row[name], kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise _BadRow(f"field {path + name!r} is {type(row[name]).__name__}, expected {expected}")
    return row[name]


def _messages(row: dict, name: str) -> list[dict]:
    messages = _field(row, name, list)
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ROLES
                and isinstance(message.get("content"), str)):
            raise _BadRow(f"field {name!r}[{i}] is not a message "
                          f"{{'role': system|user|assistant, 'content': str}}: {str(message)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]  # drop hub/parquet keys


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _ranked(responses: list[str], ranking: list[int]) -> dict:
    """Preference fields, once the candidates can be told apart (else the gold order is noise)."""
    if any(not response.strip() for response in responses):
        raise _Skip("empty response")
    if len({response.strip() for response in responses}) < len(responses):
        raise _Skip("identical candidates")
    return {"responses": responses, "ranking": ranking}


def _pair(chosen: list[dict], rejected: list[dict], differ: str) -> dict:
    """Two transcripts that share all but their last (assistant) turn: prompt plus ranked pair."""
    if not (chosen and rejected and chosen[-1]["role"] == rejected[-1]["role"] == "assistant"):
        raise _Skip("transcript does not end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise _Skip(differ)
    return {"messages": chosen[:-1],
            **_ranked([chosen[-1]["content"], rejected[-1]["content"]], [0, 1])}


# --- One converter per upstream schema: raw row -> record fields (id, messages, answer, ...) ---
def _gsm8k(row):
    solution = _field(row, "answer")
    gold = solution.split("####")[-1].strip().replace(",", "") if "####" in solution else ""
    if not gold:
        raise _Skip("no '####' final answer")
    return {"messages": _user(_field(row, "question")), "answer": gold,
            "meta": {"reference": solution}}


def _math500(row):
    return {"id": _field(row, "unique_id"), "messages": _user(_field(row, "problem")),
            "answer": _field(row, "answer"),
            "meta": {"subject": _field(row, "subject"), "level": _field(row, "level", int),
                     "reference": _field(row, "solution")}}


_DECIMAL = re.compile(r"[+-]?\d+(\.\d*)?")


def _gold_number(value) -> str:
    """A numeric gold answer as text: an integer-valued number as its integer (27.0, "27.0",
    "025" -> "27", "27", "25": AMC's JSON floats and AIME's zero-padded strings), any other
    number kept exactly as given (0.5 -> "0.5", "0.50" stays "0.50"), other text stripped."""
    if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise _BadRow(f"field 'answer' is {value!r}, expected a finite number or a str")
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(value)
    text = value.strip()
    match = _DECIMAL.fullmatch(text)
    if match and set(match.group(1) or "") <= {".", "0"}:  # no fraction, or only zeros
        return str(int(text.split(".")[0]))  # int("-025") == -25
    return text


def _competition(row):
    """AIME 2024 and AMC 2023 as Qwen2.5-Math's evaluation/data files (bundled in samples/):
    `id, problem, question, answer, url` (AIME adds a worked `solution`, not kept: it boxes no
    answer to imitate); the hub copies have `problem` or `question` alone, `id` optional."""
    fields = {"messages": _user(_field(row, "problem" if "problem" in row else "question")),
              "answer": _gold_number(_field(row, "answer", (int, float, str))),
              "meta": {"url": row.get("url")}}
    return fields | ({"id": str(_field(row, "id", (int, str)))} if "id" in row else {})


def _boxed_solution(row, meta):
    """MATH-style rows whose gold answer is the last brace-matched \\boxed{} of the solution."""
    solution = _field(row, "solution")
    gold = last_boxed(solution)
    if not gold or not gold.strip():
        raise _Skip("no \\boxed{} in solution")
    return {"messages": _user(_field(row, "problem")), "answer": gold,
            "meta": {**meta, "reference": solution}}


def _ultrafeedback_binarized(row):
    fields = _pair(_messages(row, "chosen"), _messages(row, "rejected"),
                   "chosen and rejected differ before the last turn")
    scores = [row.get("score_chosen"), row.get("score_rejected")]  # absent from the excerpt
    if scores[0] is not None and scores[0] == scores[1]:
        raise _Skip("tied scores")
    return {**fields, "meta": {"scores": scores} if scores[0] is not None else {}}


def _skywork(row):
    return {**_pair(_messages(row, "chosen"), _messages(row, "rejected"),
                    "chosen and rejected differ before the last turn"),
            "meta": {"subset": row.get("source")}}


def _ultrafeedback(row):
    """openbmb/UltraFeedback: rated, nonempty completions by fine-grained score, only the first
    (upstream order) of each score, so the gold order is strict (a verdict has no ties)."""
    kept = {}  # score -> (model, response)
    for i, completion in enumerate(_field(row, "completions", list)):
        if not isinstance(completion, dict):
            raise _BadRow(f"field 'completions'[{i}] is {type(completion).__name__}, expected dict")
        score = completion.get("fine-grained_score")
        if score is None or score != score:  # NaN != NaN: GPT-4 gave no rating
            continue
        score = _field(completion, "fine-grained_score", (int, float), f"completions[{i}].")
        response = _field(completion, "response", str, f"completions[{i}].")
        if score not in kept and response.strip():
            kept[score] = (completion.get("model"), response)
    if len(kept) < 2:
        raise _Skip("fewer than 2 distinctly scored candidates")
    scores = list(kept)
    return {"messages": _user(_field(row, "instruction")),
            **_ranked([response for _, response in kept.values()],
                      sorted(range(len(scores)), key=lambda j: -scores[j])),
            "meta": {"subset": row.get("source"), "scores": scores,
                     "models": [model for model, _ in kept.values()]}}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_transcript(text: str) -> list[dict]:
    parts = _HH_TURN.split(text)  # ["", "Human", "hi", "Assistant", "hello", ...]
    if parts[0].strip():
        raise _Skip("transcript does not start with a Human turn")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()}
            for i in range(1, len(parts), 2)]


def _hh_rlhf(row):
    return _pair(_hh_transcript(_field(row, "chosen")), _hh_transcript(_field(row, "rejected")),
                 "hh-rlhf prefixes differ")


# HelpSteer2 prompts: "user 1\n<extra_id_1>Assistant\nreply 1\n<extra_id_1>User\nuser 2"
_HS2_TURN = re.compile(r"\n?<extra_id_1>(User|Assistant)\n?")


def _helpsteer2(row):
    parts = _HS2_TURN.split(_field(row, "prompt"))
    turns = [(parts[i].lower(), parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    messages = _user(parts[0].strip()) + [{"role": r, "content": c} for r, c in turns]
    strength = _field(row, "preference_strength", int)  # -3..3; below 0: response_1 is better
    if strength == 0:
        raise _Skip("tie (preference_strength 0)")
    responses = [_field(row, "response_1"), _field(row, "response_2")]
    return {"messages": messages, **_ranked(responses, [0, 1] if strength < 0 else [1, 0]),
            "meta": {"strength": abs(strength)}}


def _rewardbench(row):
    return {"id": str(_field(row, "id", (int, str))), "messages": _user(_field(row, "prompt")),
            **_ranked([_field(row, "chosen"), _field(row, "rejected")], [0, 1]),
            "meta": {"subset": _field(row, "subset"),
                     "models": [row.get("chosen_model"), row.get("rejected_model")]}}


def _alpaca(row):
    instruction, extra = _field(row, "instruction"), _field(row, "input")
    if not instruction.strip():
        raise _Skip("empty prompt")
    content = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"messages": _user(content), "meta": {"reference": _field(row, "output")}}


def _alpaca_eval(row):
    return {"messages": _user(_field(row, "instruction")),
            "meta": {"reference": _field(row, "output"), "generator": _field(row, "generator"),
                     "subset": _field(row, "dataset")}}


def _chat(row, meta):
    messages = _messages(row, "messages")
    if messages and messages[-1]["role"] == "assistant":
        return {"messages": messages[:-1], "meta": {**meta, "reference": messages[-1]["content"]}}
    return {"messages": messages, "meta": meta}


def _ultrafeedback_prompts(row):
    if "prompt" in row:  # HuggingFaceH4/ultrafeedback_binarized
        return {"messages": _user(_field(row, "prompt"))}
    if "instruction" in row:  # openbmb/UltraFeedback
        return {"messages": _user(_field(row, "instruction"))}
    if "chosen" in row:  # the binarized excerpt, which kept chosen/rejected only
        return {"messages": _messages(row, "chosen")[:-1]}
    raise _BadRow("needs a 'prompt' (ultrafeedback_binarized), an 'instruction' "
                  "(openbmb/UltraFeedback) or a 'chosen' message list")


@dataclass(frozen=True)
class Source:
    task: str
    hub: dict  # keyword arguments of datasets.load_dataset
    split: str  # the natural split: train for training sets, test/eval for benchmarks
    convert: Callable[[dict], dict]
    split_column: str | None = None  # rows name their own split; the hub holds one "train"


REGISTRY = {
    "gsm8k": Source("verifiable", {"path": "openai/gsm8k", "name": "main"}, "train", _gsm8k),
    "math500": Source("verifiable", {"path": "HuggingFaceH4/MATH-500"}, "test", _math500),
    # AIME 2024 (30 problems) and AMC 2023 (40): bundled whole in samples/, the hub has copies
    "aime24": Source("verifiable", {"path": "HuggingFaceH4/aime_2024"}, "train", _competition),
    "amc23": Source("verifiable", {"path": "math-ai/amc23"}, "test", _competition),
    "math": Source("verifiable", {"path": "DigitalLearningGmbH/MATH-lighteval", "name": "default"},
                   "train", lambda row: _boxed_solution(
                       row, {"level": _field(row, "level"), "type": _field(row, "type")})),
    "numina": Source("verifiable", {"path": "AI-MO/NuminaMath-CoT"}, "train",
                     lambda row: _boxed_solution(row, {"subset": _field(row, "source")})),
    "ultrafeedback_binarized": Source("preference",
                                      {"path": "HuggingFaceH4/ultrafeedback_binarized"},
                                      "train_prefs", _ultrafeedback_binarized),
    "ultrafeedback": Source("preference", {"path": "openbmb/UltraFeedback"}, "train",
                            _ultrafeedback),
    "hh_rlhf": Source("preference", {"path": "Anthropic/hh-rlhf"}, "train", _hh_rlhf),
    "skywork": Source("preference", {"path": "Skywork/Skywork-Reward-Preference-80K-v0.2"},
                      "train", _skywork),
    "helpsteer2": Source("preference", {"path": "nvidia/HelpSteer2", "data_dir": "preference"},
                         "train", _helpsteer2, split_column="split"),
    "rewardbench": Source("preference", {"path": "allenai/reward-bench"}, "filtered", _rewardbench),
    "alpaca": Source("open", {"path": "tatsu-lab/alpaca"}, "train", _alpaca),
    # AlpacaEval 2.0 (gpt4_1106_preview baseline): recent datasets won't run its script, read JSON
    "alpaca_eval": Source("open", {"path": "json", "data_files": {
        "eval": "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json"}},
        "eval", _alpaca_eval),
    "ultrachat": Source("open", {"path": "HuggingFaceH4/ultrachat_200k"}, "train_sft",
                        lambda row: _chat(row, {})),
    "tulu3": Source("open", {"path": "allenai/tulu-3-sft-mixture"}, "train", lambda row: {
        **_chat(row, {"subset": _field(row, "source")}), "id": _field(row, "id")}),
    "ultrafeedback_prompts": Source("open", {"path": "HuggingFaceH4/ultrafeedback_binarized"},
                                    "train_prefs", _ultrafeedback_prompts),
}


# --- Reading: local files by a reader of our own (exact line numbers), the hub by datasets ---

def spec_problem(spec: str) -> str | None:
    """What makes `spec` no data spec (a registry key, or KEY:PATH), in one line; None if it is
    one. A bare path is answered with the KEY:PATH form."""
    key, _, path = spec.partition(":")
    if key in REGISTRY:
        return None
    keys = ", ".join(REGISTRY)
    if not path and ("/" in spec or Path(spec).suffix or Path(spec).exists()):
        return (f"a bare path is no data spec: write KEY:PATH, with KEY the source whose schema "
                f"the file has, e.g. gsm8k:{spec}; keys: {keys}")
    return (f"unknown data set {key!r}; known keys: {keys} (KEY reads the hub, KEY:PATH a local file "
            "in that source's schema)")

def _read_local(loader: str, path: str):
    """Yield (where, row) from a .jsonl, .jsonl.gz, .json (an array of rows) or .parquet file.
    Text is UTF-8, with or without a byte-order mark; any other encoding is named (DataError)."""
    file = Path(path)
    if file.is_symlink() and not file.exists():
        raise DataError(f"{loader} loader: {path} is a symlink to {file.readlink()}, which does "
                        "not exist")
    if not file.is_file():
        raise DataError(f"{loader} loader: no file at {path}")
    def not_utf8(error: UnicodeDecodeError, where: str) -> DataError:
        return DataError(f"{loader} loader: {path} {where}is not UTF-8 text ({error.reason} at "
                         f"byte {error.start}{' of that line' if where else ''}): save the file as "
                         "UTF-8")
    if file.name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rb") as f:  # bytes, decoded line by line: errors get their line
            for number, raw in enumerate(f, 1):
                try:  # -sig: a byte-order mark opening the file is dropped
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise not_utf8(error, f"line {number} ") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{loader} loader: {path} line {number}: malformed JSON "
                                    f"({error.msg} at column {error.colno}); fix or delete "
                                    "that line") from None
                yield f"line {number}", row
    elif file.name.endswith(".json"):
        try:
            rows = json.loads(file.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as error:
            raise not_utf8(error, "") from None
        except json.JSONDecodeError as error:
            raise DataError(f"{loader} loader: {path} line {error.lineno}: malformed JSON "
                            f"({error.msg} at column {error.colno})") from None
        if not isinstance(rows, list):
            raise DataError(f"{loader} loader: {path} holds a JSON {type(rows).__name__}, expected "
                            "an array of rows (one JSON object per line needs a .jsonl name)")
        yield from ((f"row {i}", row) for i, row in enumerate(rows))
    elif file.name.endswith(".parquet"):
        import pyarrow.parquet  # ships with datasets
        yield from ((f"row {i}", row)
                    for i, row in enumerate(pyarrow.parquet.read_table(file).to_pylist()))
    else:
        raise DataError(f"{loader} loader: cannot read {path}: "
                        "use .jsonl, .jsonl.gz, .json (an array of rows) or .parquet")


def _read_hub(loader: str, source: Source, split: str):
    import datasets  # imported here: a slow import that local files do not need
    try:
        rows = datasets.load_dataset(**source.hub, split=split)
    except Exception as error:  # any failure, re-raised with its context and the offline way out
        raise DataError(f"{loader} loader: cannot load {source.hub} split {split!r} from the hub "
                        f"({type(error).__name__}: {error}). Offline? Use '{loader}:PATH' with "
                        "a local file in the same schema.") from error
    yield from ((f"row {i}", row) for i, row in enumerate(rows))


def load_with_counts(spec: str, split: str | None = None,
                     limit: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """Records of `spec` (a registry key, or KEY:PATH for a local file) and skipped rows by reason.
    split=None: the natural split; a local file is one split already, so there `split` only selects
    rows that name their own (HelpSteer2). `limit` keeps the first N valid records."""
    key, _, path = spec.partition(":")
    if spec_problem(spec):
        raise DataError(f"{spec!r}: {spec_problem(spec)}")
    source = REGISTRY[key]
    split = split or source.split
    if path:
        rows, origin, tag = _read_local(key, path), path, Path(path).name
    else:
        hub_split = "train" if source.split_column else split
        rows, origin, tag = _read_hub(key, source, hub_split), source.hub["path"], hub_split
    records, skipped = [], Counter()
    for index, (where, row) in enumerate(rows):
        if limit is not None and len(records) >= limit:
            break
        try:
            if not isinstance(row, dict):
                raise _BadRow(f"is a {type(row).__name__}, expected an object of fields")
            wanted = {"validation": "val"}.get(split, split)  # HelpSteer2 writes "val"
            if source.split_column and _field(row, source.split_column) != wanted:
                raise _Skip(f"row of another split than {wanted!r}")
            fields = source.convert(row)
            messages = fields["messages"]
            if not messages or messages[-1]["role"] != "user":
                raise _Skip("conversation does not end with a user turn")
            if not messages[-1]["content"].strip():
                raise _Skip("empty prompt")
            if source.task == "verifiable" and not fields["answer"].strip():
                raise _Skip("empty gold answer")
        except _Skip as skip:
            skipped[str(skip)] += 1
            continue
        except _BadRow as error:
            raise DataError(f"{key} loader: {origin} {where}: {error}") from None
        records.append({"id": str(fields.get("id", f"{tag}-{index}")), "task": source.task,
                        "source": key, "messages": messages, "answer": fields.get("answer"),
                        "responses": fields.get("responses"), "ranking": fields.get("ranking"),
                        "meta": fields.get("meta", {})})
    return records, dict(skipped)


def question_key(record: dict) -> str:
    """A record's first user turn, case-folded and stripped: two records with the same key ask the
    same question (hh-rlhf repeats questions across its pairs), so a held-out pair with the key of
    a training pair is not unseen (train.py drops it)."""
    first = next((m["content"] for m in record["messages"] if m["role"] == "user"), "")
    return first.strip().casefold()


def load_sources(specs: dict[str, str], fits: Callable, limit: int | None = None,
                 budget: str = "the prompt budget", say: Callable = print) -> dict[str, list[dict]]:
    """Each task's records (specs: task -> spec, as train.py's --TASK_data flags), only those for
    which `fits(record)`: longer prompts are dropped and counted, never cut (a cut conversation
    or candidate would change what is judged). `say` reports each source's count and skips.
    DataError, naming the flag, on a bad source, records of another task, or none that fit."""
    sources = {}
    for task, spec in specs.items():
        try:
            records, skipped = load_with_counts(spec, limit=limit)
        except DataError as error:
            raise DataError(f"--{task}_data: {error}") from None
        wrong = {r["task"] for r in records} - {task}
        if wrong:
            raise DataError(f"--{task}_data {spec!r} holds {sorted(wrong)} records; pick a "
                            f"{task} source")
        fitting = [r for r in records if fits(r)]
        if len(fitting) < len(records):
            skipped[f"prompt over {budget}"] = len(records) - len(fitting)
        if not fitting:
            raise DataError(f"--{task}_data {spec!r}: no prompt fits in {budget}")
        say(f"data {task}: {len(fitting)} records from {spec}"
            + (f", skipped {dict(skipped)}" if skipped else ""))
        sources[task] = fitting
    return sources


def load(spec: str, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Records of `spec`; prints how many rows were skipped and why, so no drop is silent."""
    records, skipped = load_with_counts(spec, split, limit)
    reasons = "; ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
    print(f"[data] {spec}{f' ({split})' if split else ''}: {len(records)} records, "
          f"skipped {reasons or 'none'}", file=sys.stderr)
    return records


# --- Prompt templates (README.md, "The method"); the caller applies the chat template ---
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
REFEREE_TEMPLATE = """\
You are an impartial judge. Below is a conversation between a user and an AI assistant, then \
{k} candidate replies to the user's last message, labelled [1] to [{k}].

### Conversation
{conversation}

{candidates}

### Your task
Rank all {k} candidates from best to worst as the assistant's next reply: prefer the reply \
that is more helpful, correct, honest and harmless. Do not let the order in which they are \
shown, or their length, sway you.
{instruction} inside <answer></answer>: each of the labels {labels} exactly once, separated by \
">", with no ties and no other words.
The format for {k} candidates, each letter standing for the label you put in its place, the \
best candidate's first (write the labels, not the letters):
{example}"""
THINK_INSTRUCTION = ("First explain your judgement briefly inside <think></think>. Then write "
                     "the full ranking, best first,")  # the paper's generative referee
RANKING_INSTRUCTION = "Write the full ranking, best first,"  # ours: small budgets and models
EXAMPLE_THINKING = "A few sentences comparing the candidates."
_ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
SCORE_TEMPLATE = """\
You are an impartial judge. Below is a conversation between a user and an AI assistant, then \
one candidate reply to the user's last message.

### Conversation
{conversation}

### Candidate
{candidate}

### Your task
Rate the candidate as the assistant's next reply on a scale from 1 (worst) to 10 (best): prefer \
a reply that is more helpful, correct, honest and harmless. Do not let its length sway you.
{instruction} inside <answer></answer>: one whole number from 1 to 10, with no other words.
The format, N standing for the number you give (write the number, not the letter):
{example}"""
SCORE_THINK_INSTRUCTION = ("First explain your judgement briefly inside <think></think>. Then "
                           "write the score")
SCORE_INSTRUCTION = "Write the score"


def player_prompt(example: dict) -> list[dict]:
    """The player's input: a verifiable problem plus MATH_INSTRUCTION, or an open conversation."""
    if example["task"] == "verifiable":
        *history, question = example["messages"]
        content = f"{question['content']}\n\n{MATH_INSTRUCTION}"
        return [*history, {"role": "user", "content": content}]
    if example["task"] == "open":
        return [dict(message) for message in example["messages"]]
    raise ValueError(f"player_prompt takes verifiable or open records, got a {example['task']!r} "
                     f"record ({example['id']}); a preference record is judged: use "
                     "referee_prompt(example['messages'], example['responses'], order)")


def referee_prompt(messages: list[dict], responses: list[str], order: list[int],
                   think: bool = True) -> list[dict]:
    """One user turn asking to rank the candidates; label [j+1] shows responses[order[j]], so
    a parsed ranking [0, 1] (shown positions, best first) means responses [order[0], order[1]].
    With `think`, the verdict opens with brief reasoning in <think></think>."""
    k = len(responses)
    if k < 2 or sorted(order) != list(range(k)):
        raise ValueError(f"need K >= 2 responses and `order` a permutation of range(K); "
                         f"got K={k}, order={order}")
    conversation = "\n\n".join(f"{_ROLE_LABELS[m['role']]}: {m['content']}" for m in messages)
    candidates = "\n\n".join(f"### Candidate [{j + 1}]\n{responses[shown]}"
                             for j, shown in enumerate(order))
    text = REFEREE_TEMPLATE.format(
        k=k, conversation=conversation, candidates=candidates,
        instruction=THINK_INSTRUCTION if think else RANKING_INSTRUCTION,
        labels=", ".join(f"[{j}]" for j in range(1, k + 1)),
        example=format_example(_letters(k), think))
    return [{"role": "user", "content": text}]


def score_prompt(messages: list[dict], response: str, think: bool = True) -> list[dict]:
    """One user turn asking to score one candidate alone from 1 to 10 (the pointwise protocol);
    its format example names no number ("N"), so there is no score to copy."""
    conversation = "\n\n".join(f"{_ROLE_LABELS[m['role']]}: {m['content']}" for m in messages)
    example = "<answer>N</answer>"
    text = SCORE_TEMPLATE.format(
        conversation=conversation, candidate=response,
        instruction=SCORE_THINK_INSTRUCTION if think else SCORE_INSTRUCTION,
        example=f"<think>{EXAMPLE_THINKING}</think>\n{example}" if think else example)
    return [{"role": "user", "content": text}]


def gold_score(place: int, k: int) -> int:
    """The cold start's gold score of the candidate at `place` (0: best) of a gold ranking of k:
    8 for the best, 3 for the worst, linear between (pairs: chosen 8, rejected 3). A convention
    of ours: preference data rank, they do not score; it teaches the format and the direction
    and leaves both ends of the scale free."""
    return round(8 - 5 * place / (k - 1))


def format_example(placeholders: list[str], think: bool) -> str:
    """The template's format example: a verdict whose places hold letters, not labels, so it names
    no concrete ranking for the referee to copy. An example of real labels, which this template
    once showed (`[2] > [1]` for every pair), is a shown order: the untrained model's valid
    verdicts copied it. It does not parse (reward.parse_ranking), by design."""
    answer = "<answer>" + " > ".join(f"[{p}]" for p in placeholders) + "</answer>"
    return f"<think>{EXAMPLE_THINKING}</think>\n{answer}" if think else answer


def _letters(k: int) -> list[str]:
    """A, B, ..., Z, AA, AB, ...: k placeholder names for the format example."""
    names = []
    for i in range(k):
        name, i = "", i + 1
        while i:
            i, rest = divmod(i - 1, 26)
            name = chr(ord("A") + rest) + name
        names.append(name)
    return names


def shown_orders(k: int, count: int, rng: random.Random) -> list[list[int]]:
    """`count` orders in which to show k candidates (order[j] is the candidate labelled [j+1]):
    rotations of one random order `base` (rng), each followed by its reverse. So every candidate
    is shown first as evenly as `count` allows; in an even count every candidate's mean shown
    position is (k - 1) / 2, so a referee that ranks by position alone gives every candidate the
    same mean rank score (its advantages are 0); the orders are distinct up to 2k of them (k = 2:
    both). count = 1 gives `base` itself, the single random order of plain GRPO. E.g. k = 4,
    base [a, b, c, d], count 4: [a, b, c, d], [d, c, b, a], [c, d, a, b], [b, a, d, c]."""
    base = rng.sample(range(k), k)
    # rotate by 2: a rotation and its reverse show first two neighbours in base
    shifts = (list(range(0, k, 2)) + list(range(1, k, 2)) if k % 2 == 0
              else [2 * j % k for j in range(k)])
    design = []
    for shift in shifts:
        rotated = base[shift:] + base[:shift]
        design += [rotated, rotated[::-1]]
    orders = [design[i % len(design)] for i in range(count - count % 2)]
    if count % 2:  # the last one alone: unused if any, showing first a candidate shown least
        firsts = Counter(order[0] for order in orders)
        unused = [order for order in design if order not in orders] or design
        orders.append(min(unused, key=lambda order: firsts[order[0]]))
    return orders


# --- The self-reward protocol, whole: one Protocol per --self_reward (README.md, "Forking") ---

def listwise_jobs(answers: list[list[str]], num_orders: int,
                  rng: random.Random) -> list[tuple[int, list[int], int]]:
    """URPO's listwise protocol's verdicts, as (group, shown, set): the indices of the answers a
    verdict sees in the order shown, and the balanced set it belongs to. Per group, `num_orders`
    (even) verdicts on all G answers, in shown_orders: rotations of a random order, each followed
    by its reverse; an order and its reverse form one set (an answer shown at position p in one
    is at G - 1 - p in the other, so a referee that ranks by shown position alone pays every
    answer the same). ValueError on an odd num_orders."""
    if num_orders < 2 or num_orders % 2:
        raise ValueError(f"num_orders {num_orders}: the listwise self-reward needs an even number "
                         "of orders (each order with its reverse) to cancel shown position")
    return [(group, order, index // 2) for group, group_answers in enumerate(answers)
            for index, order in enumerate(shown_orders(len(group_answers), num_orders, rng))]


def pairwise_jobs(answers: list[list[str]], num_orders: int,
                  rng: random.Random) -> list[tuple[int, list[int], int]]:
    """SERL's pairwise protocol's verdicts: every pair of a group's G answers judged in both
    orders, the two verdicts one balanced set: G (G - 1) verdicts per group (G = 4: 12), each of
    two answers, at the referee's budget; `num_orders` does not apply (both orders of every pair
    are the balanced design). Pairs in a random order (rng), so the context a batch gives them
    says nothing about the answers."""
    jobs = []
    for group, group_answers in enumerate(answers):
        count = len(group_answers)
        pairs = [[i, j] for i in range(count) for j in range(i + 1, count)]
        rng.shuffle(pairs)
        for unit, pair in enumerate(pairs):
            jobs += [(group, pair, unit), (group, pair[::-1], unit)]
    return jobs


def pointwise_jobs(answers: list[list[str]], num_orders: int,
                   rng: random.Random) -> list[tuple[int, list[int], int]]:
    """The pointwise protocol's verdicts: `num_orders` rounds per group, each scoring every answer
    once, alone (G x M verdicts of one answer each); a round is the balanced set. Alone, an answer
    has no shown position; what a content-blind referee can still vary is the round (a score that
    drifts between calls), and only complete rounds count (reward.scored_self_rewards)."""
    return [(group, [answer], unit) for group, group_answers in enumerate(answers)
            for unit in range(num_orders) for answer in rng.sample(range(len(group_answers)),
                                                                   len(group_answers))]


def _ranked_render(messages: list[dict], shown: list[str], think: bool) -> list[dict]:
    return referee_prompt(messages, shown, list(range(len(shown))), think)


def _ranked_gold(ranking: list[int], shown: list[int], think: bool) -> str:
    return format_verdict([shown.index(c) for c in ranking if c in shown], "" if think else None)


def _scored_gold(ranking: list[int], shown: list[int], think: bool) -> str:
    return format_score(gold_score(ranking.index(shown[0]), len(ranking)), "" if think else None)


@dataclass(frozen=True)
class Protocol:
    """A self-reward protocol, whole: which verdicts the self-referee pass asks for, how each is
    rendered and read, how valid verdicts become rewards (balanced sets only: a content-blind
    referee earns zero advantages), and its gold verdicts. The self-referee pass
    (rollout.self_referee), the referee's preference groups (train.build_prompts, rule_rewards),
    the cold start and the held-out evaluation all take it, so the referee is trained, started
    and measured in the format it rewards in. A verdict is a rollout.Verdict: `order`, the
    candidates it was shown (indices into the call's candidates, in shown order), `ranking`
    (candidate indices, best first) or `score`, None where invalid or did not fit."""
    name: str
    shows: int  # candidates one self-referee verdict shows (0: the whole group)
    jobs: Callable  # (answers per group, num_orders, rng) -> [(group, shown, set)]
    presentations: Callable  # (k, count, rng) -> the shown candidates of each preference prompt
    render: Callable  # (messages, shown candidate texts, think) -> the referee's messages
    read: Callable  # (text, shown) -> (ranking in candidate indices or None, score or None)
    gold: Callable  # (gold ranking, shown, think) -> the gold verdict's text
    self_rewards: Callable  # (verdict sets, k) -> (rewards or None: dropped, valid ones left out)
    preference_rewards: Callable  # (verdicts, presentations, gold ranking, invalid) -> rewards

    def example(self, record: dict, shown: list[int], think: bool) -> tuple[list[dict], str]:
        """A preference record's gold verdict (the cold start's target) for candidates `shown`."""
        texts = [record["responses"][i] for i in shown]
        return self.render(record["messages"], texts, think), self.gold(record["ranking"], shown,
                                                                          think)


RANKED = dict(  # listwise and pairwise: a ranking of the shown candidates (a pair: a win)
    presentations=lambda k, count, rng: shown_orders(k, count, rng), render=_ranked_render,
    read=lambda text, shown: (read_verdict(text, shown), None), gold=_ranked_gold,
    self_rewards=lambda sets, k: balanced_self_rewards(
        [[v and v.ranking for v in verdicts] for verdicts in sets], k),
    preference_rewards=lambda verdicts, presentations, gold, invalid: [
        invalid if v.ranking is None else ranking_reward(v.ranking, gold) for v in verdicts])
PROTOCOLS = {
    # URPO: the group ranked in M balanced orders; position p of n scores (n - 1 - p) / (n - 1)
    "listwise": Protocol("listwise", 0, listwise_jobs, **RANKED),
    # SERL: every pair in both orders; an answer's reward is its win rate over the complete
    # pairs (Copeland's wins minus losses, scaled to [0, 1]): self_rewards of 2-rankings
    "pairwise": Protocol("pairwise", 2, pairwise_jobs, **RANKED),
    # each answer scored alone from 1 to 10 in M rounds, (score - 1) / 9 averaged over the
    # complete rounds; a preference pair is trained as its two candidates scored alone
    "pointwise": Protocol(
        "pointwise", 1, pointwise_jobs,
        presentations=lambda k, count, rng: [[c] for c in range(k)],
        render=lambda messages, shown, think: score_prompt(messages, shown[0], think),
        read=lambda text, shown: (None, parse_score(text)), gold=_scored_gold,
        self_rewards=lambda sets, k: scored_self_rewards(
            [[None if v is None or v.score is None else (v.order[0], v.score) for v in verdicts]
             for verdicts in sets], k),
        preference_rewards=lambda verdicts, presentations, gold, invalid: scored_preference_rewards(
            [v.score for v in verdicts], [shown[0] for shown in presentations], gold, invalid)),
}


_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: 48/2 = <<48/2=24>>24


def gold_target(record: dict, rng: random.Random, think: bool = True,
                order: list[int] | None = None,
                protocol: Protocol | None = None) -> tuple[list[dict], str] | None:
    """A cold-start example (train.py, --cold_start_steps) in the output format of the record's
    role, (prompt messages, target text), or None. preference: the `protocol`'s (None: listwise)
    referee prompt, candidates shown as `order` (None: its first presentation drawn from rng),
    its gold verdict (Protocol.example; with `think`, after an empty <think></think>: no gold
    reasoning exists to imitate). verifiable: the player prompt and
    the worked solution (meta["reference"]) if it has a "#### N" line (GSM8K: calculator
    annotations dropped, that line written "The answer is \\boxed{N}.") or boxes its answer (kept
    as is). open: None."""
    if record["task"] == "preference":
        protocol = protocol or PROTOCOLS["listwise"]
        k = len(record["responses"])
        order = protocol.presentations(k, 1, rng)[0] if order is None else order
        return protocol.example(record, order, think)
    solution = record["meta"].get("reference") if record["task"] == "verifiable" else None
    if not solution:
        return None
    if "####" in solution:
        steps = _CALCULATOR.sub("", solution.split("####")[0]).strip()
        solution = f"{steps}\nThe answer is \\boxed{{{record['answer']}}}."
    elif last_boxed(solution) is None:
        return None
    return player_prompt(record), solution


def group_gold_target(record: dict, others: list[dict], k: int, rng: random.Random,
                      think: bool = True) -> tuple[list[dict], str] | None:
    """gold_target of a preference record widened to k candidates (the group size self-judging
    shows) with replies to OTHER conversations: ours, not the paper's, as preference data holds
    pairs but the referee must also rank G answers of its own. Gold order: the record's own
    candidates on top, in gold order (any reply to this conversation beats one to another); then
    those of records drawn from `others` (rng), each record's in its own gold order (its label is
    the only evidence between two equally off-topic replies), records in draw order (a convention,
    not evidence). k = 4 and pairs: chosen > rejected > chosen' > rejected'. A record with k or
    more candidates is gold_target's; None if `others` cannot fill k distinct candidates."""
    if len(record["responses"]) >= k:
        return gold_target(record, rng, think)
    responses = [record["responses"][i] for i in record["ranking"]]
    candidates = [o for o in others if o["messages"] != record["messages"]]
    rng.shuffle(candidates)
    for other in candidates:
        if len(responses) >= k:
            break
        for reply in (other["responses"][i] for i in other["ranking"]):
            if len(responses) < k and reply.strip() not in {r.strip() for r in responses}:
                responses.append(reply)
    if len(responses) < k:
        return None
    return gold_target(dict(record, responses=responses, ranking=list(range(k))), rng, think)


def cold_start_examples(sources: dict[str, list[dict]], count: int, group_size: int,
                        group_every: int, orders: int, fits: Callable, rng: random.Random,
                        think: bool = True, protocol: Protocol | None = None
                        ) -> tuple[list[tuple[list[dict], str]], dict]:
    """The cold start's schedule (train.cold_start): `count` examples (prompt messages, target
    text) drawn from three pools, each shuffled by `rng`, then cycled: verdicts on a pair in the
    `protocol`'s format (None: listwise; gold_target, in the presentations GRPO shows it: a
    pair's `orders` orders, or for pointwise each candidate alone, kept together), verdicts on
    group_size candidates (group_gold_target: the K that listwise self-judging shows; only a
    protocol whose verdicts show the whole group), and worked solutions.
    Referee and solver examples alternate; every `group_every`-th referee example ranks
    group_size candidates (0: pairs only). Only examples for which `fits(example, role)` (the
    token budgets of the role, "referee" or "player") serve. Returns the examples ([] when no pool has one) and each pool's size."""
    protocol = protocol or PROTOCOLS["listwise"]
    pools = {"pairs": [], "groups": [], "verifiable": []}
    grouped = group_every > 0 and group_size > 2 and protocol.shows == 0
    for record in sources.get("preference", []):
        shown = protocol.presentations(len(record["responses"]), orders, rng)
        pools["pairs"].append([protocol.example(record, order, think) for order in shown])
        if grouped:
            pools["groups"].append(
                [group_gold_target(record, sources["preference"], group_size, rng, think)])
    for record in sources.get("verifiable", []):
        pools["verifiable"].append([gold_target(record, rng, think)])
    for name, pool in pools.items():
        role = "player" if name == "verifiable" else "referee"
        kept = [[e for e in together if e is not None and fits(e, role)] for together in pool]
        pool = [together for together in kept if together]
        rng.shuffle(pool)
        pools[name] = [example for together in pool for example in together]
    sizes = {name: len(pool) for name, pool in pools.items()}
    tasks = [task for task, ok in (("referee", pools["pairs"] or pools["groups"]),
                                   ("verifiable", pools["verifiable"])) if ok]
    examples, used = [], Counter()
    for i in range(count if tasks else 0):
        name = tasks[i % len(tasks)]
        if name == "referee":
            wants_group = grouped and i // len(tasks) % group_every == group_every - 1
            name = "groups" if (wants_group or not pools["pairs"]) and pools["groups"] else "pairs"
        examples.append(pools[name][used[name] % len(pools[name])])
        used[name] += 1
    return examples, sizes


class Mixture:
    """Each step's prompts, drawn from the three tasks by weight; deterministic, sharded, resumable.
    Per-task counts are quotas, not samples: each slot goes to the task furthest behind its share,
    (n + 1) * w_t / sum(w) - drawn_t (ties: TASKS order), so a task stays within one prompt of its
    share. A task cycles its records, reshuffled each epoch by (seed, task, epoch). Every rank
    builds the same global step, shuffles it by (seed, step), keeps every world_size-th prompt from
    `rank` on: a prompt (and its G samples) lives on one rank. Resume state: the step and each
    task's draw count. weights=None: 1:1:1; a task with weight 0, no weight or no records is out."""

    def __init__(self, sources: dict[str, list[dict]], weights: dict[str, float] | None,
                 prompts_per_step: int, seed: int, rank: int = 0, world_size: int = 1):
        weights = dict.fromkeys(TASKS, 1.0) if weights is None else weights
        unknown = (set(sources) | set(weights)) - set(TASKS)
        if unknown or any(weight < 0 for weight in weights.values()):
            raise ValueError(f"weights and sources are keyed by {TASKS} with weights >= 0; got "
                             f"weights {weights} and sources {sorted(sources)}")
        if not (0 <= rank < world_size and prompts_per_step > 0
                and prompts_per_step % world_size == 0):
            raise ValueError("need 0 <= rank < world_size and prompts_per_step a positive multiple "
                             f"of world_size (equal shares per rank); got rank={rank}, "
                             f"world_size={world_size}, prompts_per_step={prompts_per_step}")
        self.tasks = [t for t in TASKS if weights.get(t, 0) > 0 and sources.get(t)]
        if not self.tasks:
            raise ValueError(f"no task has both a weight > 0 and records: weights {weights}, "
                             f"records { {t: len(r) for t, r in sources.items()} }")
        for task in self.tasks:
            stray = next((r for r in sources[task] if r["task"] != task), None)
            if stray is not None:
                raise ValueError(f"record {stray['id']} in the {task!r} source has task "
                                 f"{stray['task']!r}")
        total = sum(weights[t] for t in self.tasks)
        self.shares = {t: weights[t] / total for t in self.tasks}
        self.sources = {t: sources[t] for t in self.tasks}
        self.prompts_per_step, self.seed = prompts_per_step, seed
        self.rank, self.world_size = rank, world_size
        self.step, self.drawn = 0, dict.fromkeys(self.tasks, 0)
        self._orders: dict[str, tuple[int, list[int]]] = {}  # task -> (epoch, shuffled indices)

    def _take(self, task: str) -> dict:
        records = self.sources[task]
        epoch, position = divmod(self.drawn[task], len(records))
        if self._orders.get(task, (None,))[0] != epoch:
            order = list(range(len(records)))
            random.Random(f"{self.seed}/{task}/{epoch}").shuffle(order)
            self._orders[task] = (epoch, order)
        self.drawn[task] += 1
        return records[self._orders[task][1][position]]

    def next_batch(self) -> list[dict]:
        """This rank's share of the next step's prompts: prompts_per_step / world_size records."""
        prompts = []
        for _ in range(self.prompts_per_step):
            n = sum(self.drawn.values())
            prompts.append(self._take(max(
                self.tasks, key=lambda t: (n + 1) * self.shares[t] - self.drawn[t])))
        random.Random(f"{self.seed}/step/{self.step}").shuffle(prompts)
        self.step += 1
        return prompts[self.rank::self.world_size]

    def state_dict(self) -> dict:
        return {"step": self.step, "drawn": dict(self.drawn),
                "sizes": {t: len(records) for t, records in self.sources.items()}}

    def load_state_dict(self, state: dict) -> None:
        sizes = {t: len(records) for t, records in self.sources.items()}
        if state["sizes"] != sizes:
            raise ValueError(f"cannot resume: the checkpoint's mixture drew from {state['sizes']} "
                             f"records per task, this one has {sizes}; load the same data with "
                             "the same nonzero weights, or start the mixture afresh")
        self.step, self.drawn, self._orders = state["step"], dict(state["drawn"]), {}
