"""Chat SFT data (issue #18): rendering equals transformers' apply_chat_template, the loss
mask covers exactly the assistant messages and their end of turn, the prepared windows
target only those tokens, and bad records / templates are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.chat_dirs import CONVERSATIONS, TEMPLATE, chat_tokenizer, random_conversations
from tests.chat_dirs import write_jsonl
from tests.conftest import make_cfg
from scaletrain.data.build import check_chat_masking
from scaletrain.data.chat import check_messages, load_chat_tokenizer, render
from scaletrain.data.chat_prepare import prepare_chat
from scaletrain.data.chat_windows import ChatWindows, pack_rows
from scaletrain.errors import ConfigError, DataError
from scaletrain.models.losses import IGNORE_INDEX

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tok")
    return d, chat_tokenizer(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_chat_tokenizer(str(tok_dir[0] / "tokenizer.json"))


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of 1s."""
    runs, start = [], None
    for j, m in enumerate([*mask, 0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            runs.append((start, j))
            start = None
    return runs


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_ids_equal_transformers_apply_chat_template(tok_dir, tok, train_on):
    """System, user, assistant, multi-turn, and a conversation without a system message
    (the template adds one): the ids are transformers' own."""
    _, fast = tok_dir
    for msgs in CONVERSATIONS + random_conversations(10):
        expect = fast.apply_chat_template(msgs, tokenize=True, return_dict=False)
        r = render(tok, msgs, train_on)
        assert r.ids == list(expect) and len(r.mask) == len(r.ids)
    # the template really is the directory's (tokenizer_config / chat_template.jinja)
    assert tok.chat_template == TEMPLATE


def test_mask_covers_exactly_assistant_content_and_end_of_turn(tok):
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for msgs in CONVERSATIONS + random_conversations(10, seed=1):
        r = render(tok, msgs, "assistant")
        runs = _runs(r.mask)
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert [tok.decode(r.ids[a:b]) for a, b in runs] == \
            [a + "<|im_end|>" for a in answers]
        assert all(r.ids[b - 1] == end for _, b in runs)  # the end of turn is trained
        assert r.ids[runs[-1][1]:] and r.mask[runs[-1][1]:] == [0]  # not the "\n" after
    r = render(tok, CONVERSATIONS[1], "all")
    assert r.mask == [0] + [1] * (len(r.ids) - 1)


def test_check_messages_refuses_records_without_messages():
    assert check_messages({"messages": CONVERSATIONS[0]}, "messages", "f:1") == CONVERSATIONS[0]
    for rec in [{"text": "hi"}, {"messages": []}, {"messages": "hi"}, [1, 2],
                {"messages": [{"role": "user"}]}]:
        with pytest.raises(DataError, match="f:3"):
            check_messages(rec, "messages", "f:3")


def test_template_rejections_and_failures_are_data_errors(tok_dir, tmp_path):
    d, _ = tok_dir
    tok = load_chat_tokenizer(str(d / "tokenizer.json"))
    with pytest.raises(DataError, match="rejects the conversation: Unknown role: tool"):
        render(tok, [{"role": "tool", "content": "x"}], "assistant", "a.jsonl:4")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages[0]['content'] + 1 }}")  # str + int: fails to render
    tok = load_chat_tokenizer(str(d / "tokenizer.json"), str(bad))
    with pytest.raises(DataError, match="a.jsonl:4: the chat template fails to render"):
        render(tok, CONVERSATIONS[0], "all", "a.jsonl:4")
    bad.write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match="data.chat_template: the template does not parse"):
        load_chat_tokenizer(str(d / "tokenizer.json"), str(bad))


def test_no_template_is_a_config_error(tmp_path):
    chat_tokenizer(tmp_path, template=None)
    with pytest.raises(ConfigError, match="no chat template.*data.chat_template"):
        load_chat_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="init.from"):
        load_chat_tokenizer("")
    good = tmp_path / "t.jinja"
    good.write_text(TEMPLATE)
    assert load_chat_tokenizer(str(tmp_path / "tokenizer.json"), str(good)).chat_template \
        == TEMPLATE


def _prepared(tok_dir, tmp_path, convs, *extra):
    d, _ = tok_dir
    src = write_jsonl(tmp_path / "src" / "chat.jsonl", convs)
    cfg = make_cfg([f"--data.source={src}", "--data.format=chat",
                    f"--data.tokenizer={d / 'tokenizer.json'}", "--data.val_fraction=0.1",
                    "--data.test_fraction=0", f"--data.prepared_dir={tmp_path / 'prep'}",
                    *extra])
    return prepare_chat(cfg.data, progress=False), cfg


@pytest.mark.parametrize("packing", ["pack", "pad"])
def test_windows_target_exactly_the_masked_tokens(tok_dir, tok, tmp_path, packing):
    convs = random_conversations(40)
    path, cfg = _prepared(tok_dir, tmp_path, convs)
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "chat" and not m["splits"]["train"]["eot_inside"]
    ids = np.fromfile(path / "train.bin", dtype=m["dtype"])
    mask = np.fromfile(path / "train.mask.bin", dtype=np.uint8)
    starts = np.fromfile(path / "train.docs.bin", dtype="<i8")
    # Every conversation of the stream is its rendering, then the end-of-text separator.
    by_ids = {tuple(render(tok, c, "assistant").ids): c for c in convs}
    for a, b in zip(starts[:-1], starts[1:]):
        assert tuple(ids[a:b - 1].tolist()) in by_ids and ids[b - 1] == m["eot_id"]
        assert mask[b - 1] == 0
    lengths = np.diff(starts)
    T = int(lengths.max()) + 8  # no conversation is cut: every target is in a window
    w = ChatWindows(path / "train.bin", m["dtype"], T, m["eot_id"], packing)
    x, y = w.batch(np.arange(len(w)))
    assert x.shape == y.shape == (len(w), T)
    # Each row is a contiguous slice of the stream: its targets are the stream's masked
    # tokens (shifted by one), padding is end-of-text and never a target.
    total = 0
    for r in range(len(w)):
        s, n = int(w.starts[r]), int(w.lengths[r])
        seg, segm = ids[s:s + n].astype(np.int64), mask[s:s + n]
        assert x[r, :n - 1].tolist() == seg[:-1].tolist()
        assert (x[r, n - 1:] == m["eot_id"]).all()
        want = np.where(segm[1:] == 1, seg[1:], IGNORE_INDEX)
        assert y[r, :n - 1].tolist() == want.tolist() and (y[r, n - 1:] == IGNORE_INDEX).all()
        total += int((y[r] != IGNORE_INDEX).sum())
    assert total == m["splits"]["train"]["targets"] == int(mask.sum())
    if packing == "pad":
        assert len(w) == len(starts) - 1
    else:
        assert len(w) < len(starts) - 1 and (w.lengths <= T + 1).all()


def test_pack_rows_cuts_long_conversations_and_drops_targetless_rows():
    # conversations of 5, 3, 9 (longer than a row of 6) and 2 tokens
    starts = np.array([0, 5, 8, 17, 19])
    mask = np.ones(19, dtype=np.uint8)
    s, n = pack_rows(starts, mask, 6, "pack")
    assert s.tolist() == [0, 5, 8, 17] and n.tolist() == [5, 3, 6, 2]
    s, n = pack_rows(np.array([0, 2, 4, 6]), np.ones(6, dtype=np.uint8), 6, "pack")
    assert s.tolist() == [0] and n.tolist() == [6]
    mask[5:8] = 0  # the second conversation has no target
    s, _ = pack_rows(starts, mask, 6, "pad")
    assert s.tolist() == [0, 8, 17]


def test_prepare_errors_name_the_record(tok_dir, tmp_path):
    recs = random_conversations(5)
    with pytest.raises(DataError, match=r"chat.jsonl:6: the record has no non-empty "
                                        r"'messages' list \(data.messages_key\)"):
        _prepared(tok_dir, tmp_path, recs + [{"x": 1}])
    bad = recs + [[{"role": "tool", "content": "x"}]]
    with pytest.raises(DataError, match="chat.jsonl:6: the chat template rejects"):
        _prepared(tok_dir, tmp_path, bad)
    path, _ = _prepared(tok_dir, tmp_path / "k", random_conversations(6), "--data.train_on=all")
    assert json.loads((path / "manifest.json").read_text())["settings"]["train_on"] == "all"


def test_document_masking_refuses_a_template_that_writes_end_of_text(tmp_path):
    """Llama 2-style templates end a turn with the tokenizer's end-of-text (</s>): the
    documents of a packed window would be cut inside conversations, so document masking
    is refused with one line (padding without it works)."""
    eot_turns = TEMPLATE.replace("'<|im_end|>'", "'<|endoftext|>'").replace(
        "<|im_end|>\\n' }}{%- endif %}", "<|endoftext|>\\n' }}{%- endif %}")
    d = tmp_path / "tok"
    chat_tokenizer(d, eot_turns)
    path, cfg = _prepared((d, None), tmp_path, random_conversations(8))
    m = json.loads((path / "manifest.json").read_text())
    assert m["splits"]["train"]["eot_inside"]
    check_chat_masking(cfg.data, m)  # masking off: fine
    cfg.data.document_masking = True
    with pytest.raises(DataError, match="data.document_masking.*data.chat_packing='pad'"):
        check_chat_masking(cfg.data, m)


def test_messages_key_names_the_field(tok_dir, tmp_path):
    d, _ = tok_dir
    src = write_jsonl(tmp_path / "src" / "c.jsonl", random_conversations(6), key="conversation")
    args = [f"--data.source={src}", "--data.format=chat", "--data.test_fraction=0",
            f"--data.tokenizer={d / 'tokenizer.json'}", "--data.val_fraction=0.2",
            f"--data.prepared_dir={tmp_path / 'prep'}"]
    with pytest.raises(DataError, match="c.jsonl:1: the record has no non-empty 'messages'"):
        prepare_chat(make_cfg(args).data, progress=False)
    path = prepare_chat(make_cfg([*args, "--data.messages_key=conversation"]).data,
                        progress=False)
    assert json.loads((path / "manifest.json").read_text())["stages"]["conversations"] == 6


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """Prefix diffs need the conversation so far to render as a prefix of the whole; a
    template that marks the last message (as reasoning templates drop earlier thoughts)
    breaks that, and is refused rather than mis-masked; train_on='all' still works."""
    marks_last = TEMPLATE.replace("'<|im_end|>' + '\\n' }}",
                                  "'<|im_end|>' + '\\n' }}{%- if loop.last %}END{% endif %}")
    assert marks_last != TEMPLATE
    chat_tokenizer(tmp_path, marks_last)
    tok = load_chat_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="x:2: the chat template renders the conversation "
                                        "before message 1 differently.*train_on='all'"):
        render(tok, CONVERSATIONS[1], "assistant", "x:2")
    assert sum(render(tok, CONVERSATIONS[1], "all").mask) > 0
