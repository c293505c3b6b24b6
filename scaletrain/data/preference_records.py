"""Reading preference records (train.objective = "dpo") from JSONL: one (prompt, chosen,
rejected) triple per line, strings or (data.format = "chat") message lists, with a
one-line DataError naming file:line for a record that is not one.

Two shapes, TRL's (trl/data_utils.py, docs "Dataset formats": preference):
- an explicit prompt: `prompt`, `chosen`, `rejected` fields (dpo.*_key);
- an implicit prompt: only `chosen` and `rejected`, each the whole text or conversation;
  the prompt is their shared beginning, as TRL's `maybe_extract_prompt` /
  `extract_prompt` cut it (`implicit_prompt` below), so a dataset written for TRL's
  DPOTrainer (Anthropic HH-style `chosen` / `rejected` conversations) is read as TRL
  reads it.
"""

from __future__ import annotations

import json

from scaletrain.data.chat import check_messages
from scaletrain.data.records import _open_lines
from scaletrain.data.sources import JSONL, file_format
from scaletrain.errors import DataError

Record = tuple  # (prompt, chosen, rejected): strings, or message lists (format='chat')


def read_records(files, keys: tuple[str, str, str], chat: bool = False) -> list[Record]:
    """Every record of the JSONL `files`, in file order; DataError (file:line and the
    field) for a line that is not a JSON object or lacks one of `keys` as a string
    (`chat`: as a messages list, chosen / rejected of assistant messages only). A record
    without the prompt field has an implicit prompt (`implicit_prompt`)."""
    out = []
    for path in files:
        if file_format(path) != JSONL:
            raise DataError(f"{path}: preference data (train.objective='dpo') must be "
                            f"JSONL records (.jsonl, .jsonl.gz, .jsonl.zst)")
        with _open_lines(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    out.append(_record(line, keys, f"{path}:{n}", chat))
    if not out:
        raise DataError(f"{files[0]}: no preference records")
    return out


def implicit_prompt(chosen, rejected, where: str, keys: tuple[str, str, str]) -> Record:
    """(prompt, chosen, rejected) of a record whose prompt is the shared beginning of
    `chosen` and `rejected` (two strings, or two message lists), cut where TRL's
    `extract_prompt` cuts it: at the first index where they differ, one character
    earlier when that leaves a space to start the responses (text only: "The sky is" +
    " blue." / " green."); when one is a prefix of the other, before the shorter one's
    last element (TRL's loop ends there). Where TRL's prompt would be empty (the two
    differ from their first element, or are one element long) this is a DataError, as
    it is where TRL's space step would reach back to index -1 (text that differs from
    its first character and ends in a space: TRL keeps all of `chosen` but its last
    character as the prompt). Checked equal to trl 1.16's `maybe_extract_prompt`
    on 20,000 random text and conversation records, apart from those refusals."""
    _, ck, rk = keys
    shorter = min(len(chosen), len(rejected))
    idx = next((i for i in range(shorter) if chosen[i] != rejected[i]), shorter - 1)
    if idx > 0 and isinstance(chosen, str) and chosen[idx - 1] == " " \
            and chosen[idx] != rejected[idx]:
        idx -= 1
    if idx <= 0:
        what = "leading messages" if isinstance(chosen, list) else "beginning"
        raise DataError(f"{where}: no field '{keys[0]}', and '{ck}' and '{rk}' share no "
                        f"{what} to be the prompt (give '{keys[0]}', or the whole "
                        f"conversations in '{ck}' and '{rk}')")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _json_object(line: bytes, where: str) -> dict:
    try:
        rec = json.loads(line)
    except ValueError:
        raise DataError(f"{where}: not a JSON record") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: not a JSON object")
    return rec


# What a prompt / chosen / rejected field must be, per data.format: its type, the word
# for a value of another type, and what the one-line error says a record needs.
_FIELD_KINDS = {False: (str, "not a string", "a preference record needs string fields"),
                True: (list, "not a list of messages",
                       "a chat preference record needs message lists")}


def _record(line: bytes, keys: tuple[str, str, str], where: str, chat: bool) -> Record:
    """(prompt, chosen, rejected) of one JSONL line: strings, or (`chat`) message lists
    whose chosen / rejected responses are assistant messages only."""
    rec = _json_object(line, where)
    implicit = keys[0] not in rec
    kind, wrong, needs = _FIELD_KINDS[chat]
    for key in keys[1:] if implicit else keys:
        if not isinstance(rec.get(key), kind):
            what = "missing" if key not in rec else wrong
            raise DataError(f"{where}: field '{key}' is {what} ({needs} "
                            f"{', '.join(keys)}: data.source, dpo.*_key)")
        if chat:
            check_messages(rec, key, where)  # {role: str, content: str} objects
    fields = implicit_prompt(rec[keys[1]], rec[keys[2]], where, keys) if implicit \
        else tuple(rec[k] for k in keys)
    if chat:
        _check_responses(fields, keys, where, implicit)
    return fields


def _check_responses(fields: Record, keys: tuple[str, str, str], where: str,
                     implicit: bool) -> None:
    """A chat record's chosen and rejected are the assistant's turn(s) only."""
    for key, other, messages in zip(keys[1:], keys[:0:-1], fields[1:]):
        roles = {m["role"] for m in messages}
        if roles != {"assistant"}:
            after = f" after the messages it shares with '{other}'" if implicit else ""
            raise DataError(f"{where}: field '{key}' holds {sorted(roles - {'assistant'})} "
                            f"messages{after}; a response is the assistant's turn(s) only "
                            f"(the conversation before it goes in '{keys[0]}')")
