"""Chat conversations -> token ids + a loss mask, with the model's own chat template.

Rendering is transformers' (`PreTrainedTokenizerFast.apply_chat_template`: its sandboxed
Jinja environment, the special tokens as template variables, tokenization of the
rendered text without added special tokens), so the ids are those of
`tokenizer.apply_chat_template(messages, tokenize=True)` by construction — this module
calls exactly that, asking only for character offsets on the side.

Which tokens are the assistant's: transformers' `return_assistant_tokens_mask` needs
`{% generation %}` tags, which the templates shipped with most models (Qwen, Llama,
Mistral) do not have. Instead, for every assistant message k, the conversation up to it
is rendered with the generation prompt (`messages[:k]`, add_generation_prompt=True) and
the conversation through it (`messages[:k+1]`): the characters between the two ends are
that message as the template writes it, for any template that renders a conversation's
prefix as a prefix of the whole (checked; a template that rewrites earlier turns is
refused). The span is cut after its last control token (an added token such as
<|im_end|> or <|eot_id|>: the end of turn the model must learn to emit), so the
separator a template prints after it ("\\n") is not trained.

`render(tokenizer, messages, train_on)` is the one entry point, shared by chat SFT's
preparation (chat_prepare.py) and, later, preference data.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from scaletrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass(frozen=True)
class Rendered:
    """A conversation as token ids and, per token, 1 = a target the loss covers."""

    ids: list[int]
    mask: list[int]


def load_chat_tokenizer(tokenizer: str, template: str = "") -> "PreTrainedTokenizerFast":
    """The transformers tokenizer chat data is rendered with: `tokenizer` is a
    tokenizer.json (data.tokenizer); its directory's tokenizer_config.json (special
    tokens, chat_template) is read when present; `template` (data.chat_template), a Jinja
    file, replaces the directory's template. ConfigError when there is no template."""
    if not tokenizer:
        raise ConfigError("data.format='chat' needs the model's tokenizer: set init.from "
                          "(a Hugging Face directory) or data.tokenizer")
    path = Path(tokenizer)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: '{path}' is not a file")
    # Imported here, as the optional trackers are: transformers takes seconds to import,
    # and text runs and the preparation worker processes (they import data/) never use it.
    from transformers import PreTrainedTokenizerFast

    try:
        if (path.parent / TOKENIZER_CONFIG).is_file():  # bos/eos names, chat_template
            tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent),
                                                          tokenizer_file=str(path))
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"data.tokenizer: '{path}' cannot be read by transformers "
                          f"({_first_line(e)})") from None
    if template:
        tpath = Path(template)
        if not tpath.is_file():
            raise ConfigError(f"data.chat_template: '{tpath}' is not a file")
        tok.chat_template = tpath.read_text(encoding="utf-8")
    if not tok.chat_template:
        raise ConfigError(f"data.format='chat': no chat template: '{path.parent}' has no "
                          f"chat_template in {TOKENIZER_CONFIG}; give a Jinja file as "
                          "data.chat_template")
    if not isinstance(tok.chat_template, str):  # a dict of named templates
        raise ConfigError(f"data.format='chat': '{path.parent}' has several named chat "
                          "templates; give the one to use as data.chat_template")
    try:
        jinja2.Environment().parse(tok.chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"data.chat_template: the template does not parse (line "
                          f"{e.lineno}: {e.message})") from None
    return tok


def tokenizer_fingerprint(tok: "PreTrainedTokenizerFast") -> dict:
    """What about the renderer changes prepared chat data (its cache-key part)."""
    import transformers  # loaded already by load_chat_tokenizer (see there)

    blob = tok.backend_tokenizer.to_str() + "\0" + tok.chat_template + "\0" + \
        repr(sorted(tok.special_tokens_map.items()))
    return {"chat_renderer_sha256": hashlib.sha256(blob.encode("utf-8")).hexdigest(),
            "transformers": transformers.__version__}


def save_chat_files(tokenizer: str, template: str, run_dir: Path) -> list[str]:
    """Write the renderer's tokenizer_config.json (special tokens, chat template) and
    template file beside the run's tokenizer.json, as transformers saves them, so that a
    resume, which reads the run's own tokenizer copy (finetune/init_from.py
    `resolve_init`), renders with the same template. Returns the names written."""
    tok = load_chat_tokenizer(tokenizer, template)
    with tempfile.TemporaryDirectory() as tmp:
        names = [Path(f).name for f in tok.save_pretrained(tmp)]
        names = [n for n in names if n != "tokenizer.json" and (Path(tmp) / n).is_file()]
        for n in names:  # tokenizer.json: the run's own copy (data/tokenizer.py) stays
            shutil.copyfile(Path(tmp) / n, Path(run_dir) / n)
    return names


def check_messages(record, key: str, where: str) -> list[dict]:
    """The messages of a decoded JSONL record; DataError naming `where` if it has none
    or one is not a {role: str, content: str} object."""
    msgs = record.get(key) if isinstance(record, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: the record has no non-empty '{key}' list "
                        "(data.messages_key)")
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} is not an object with string 'role' "
                            "and 'content'")
    return msgs


def render(tok: "PreTrainedTokenizerFast", messages: list[dict], train_on: str,
           where: str = "conversation") -> Rendered:
    """Token ids of `messages` (equal to `tok.apply_chat_template(messages)`) and the
    loss mask: the assistant messages' tokens up to their end of turn
    (train_on='assistant') or every token but the first (train_on='all': nothing in the
    conversation predicts its first token). DataError naming `where` when the template
    rejects the conversation or cannot render it."""
    enc = _apply(tok, messages, where, tokenize=True, return_dict=True,
                 tokenizer_kwargs={"return_offsets_mapping": True})
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if train_on == "all":
        return Rendered(ids, [0] + [1] * (len(ids) - 1))
    text = _apply(tok, messages, where, tokenize=False)
    control = set(tok.added_tokens_decoder)
    mask = [0] * len(ids)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if k == 0:
            raise DataError(f"{where}: the conversation starts with an assistant message; "
                            "data.train_on='assistant' needs the prompt before it")
        # A template that ignores add_generation_prompt leaves the assistant header in
        # the span: trained, but still inside this message's turn.
        prompt = _apply(tok, messages[:k], where, tokenize=False, add_generation_prompt=True)
        through = _apply(tok, messages[:k + 1], where, tokenize=False)
        start = len(prompt)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise DataError(f"{where}: the chat template renders the conversation before "
                            f"message {k} differently from its start (it rewrites earlier "
                            "turns), so the assistant tokens cannot be found; use "
                            "data.train_on='all'")
        span = [j for j, (a, b) in enumerate(offsets) if a < len(through) and b > start]
        ends = [j for j in span if ids[j] in control]
        for j in span[:span.index(ends[-1]) + 1] if ends else span:
            mask[j] = 1
    return Rendered(ids, mask)


def _apply(tok: "PreTrainedTokenizerFast", messages: list[dict], where: str, **kw):
    """`tok.apply_chat_template(messages, **kw)` with the template's failures as
    DataError: `raise_exception(...)` (a role or order it rejects) and any other
    rendering error."""
    try:
        return tok.apply_chat_template(messages, **kw)
    except jinja2.TemplateError as e:
        # raise_exception() in a template raises TemplateError with the template's text.
        kind = "rejects the conversation" if type(e) is jinja2.TemplateError \
            else "fails to render it"
        raise DataError(f"{where}: the chat template {kind}: {_first_line(e)}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise DataError(f"{where}: the chat template fails to render it: "
                        f"{_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
