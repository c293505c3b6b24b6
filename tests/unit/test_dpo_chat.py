"""DPO on chat-shaped preference records (TRL's conversational format: `prompt` a list of
messages, `chosen` / `rejected` the assistant turn(s)), data/preference.py's chat branch:
the ids are transformers' `apply_chat_template(prompt + chosen)`, the trained tokens are
the response's assistant tokens only (found here independently, from the generation
prompt's rendering), and the DPO loss and gradients over them equal the formula in fp64."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scaletrain.config.schema import DataConfig
from scaletrain.data.preference import PreferencePairs, prepare_preference
from scaletrain.errors import DataError
from scaletrain.models.gpt import GPT, GPTConfig
from scaletrain.models.losses import IGNORE_INDEX
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.dpo import DPOLoss
from scaletrain.train.step import accumulate_gradients
from tests.chat_dirs import chat_tokenizer

pytest.importorskip("transformers")

KEYS = ("prompt", "chosen", "rejected")
T = 96
RECORDS = [
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
     "chosen": [{"role": "assistant", "content": "4."}],
     "rejected": [{"role": "assistant", "content": "Five, I think."}]},
    # A multi-turn prompt: its assistant turn is context, not a response token.
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a prime."},
                {"role": "assistant", "content": "Seven."},
                {"role": "user", "content": "Another one?"}],
     "chosen": [{"role": "assistant", "content": "Eleven."}],
     "rejected": [{"role": "assistant", "content": "Nine is prime."}]},
    {"prompt": [{"role": "user", "content": "Say hello in French"}],
     "chosen": [{"role": "assistant", "content": "Bonjour"}],
     "rejected": [{"role": "assistant", "content": "Hola"}]},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_tok")
    return d, chat_tokenizer(d)


def prepare(tmp_path, tok_dir, records) -> PreferencePairs:
    (src := tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dcfg = DataConfig(source=str(src), prepared_dir=str(tmp_path / "p"), format="chat",
                      tokenizer=str(tok_dir[0] / "tokenizer.json"), val_fraction=0.0,
                      test_fraction=0.0)
    path = prepare_preference(dcfg, KEYS, progress=False)
    assert prepare_preference(dcfg, KEYS, progress=False) == path  # cached
    return PreferencePairs(path, "train", T, pad_id=0)


def response_tokens(hf, prompt, response) -> tuple[list[int], int, int]:
    """(ids of prompt + response, first, end) with ids[first:end] the response's trained
    tokens: after the generation prompt, through the response's last <|im_end|>."""
    ids = hf.apply_chat_template(prompt + response, tokenize=True, return_dict=False)
    head = hf.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert ids[:len(head)] == head
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    end = max(j for j, t in enumerate(ids) if t == im_end) + 1
    return ids, len(head), end


def test_ids_are_apply_chat_template_and_only_the_response_is_trained(tmp_path, tok_dir):
    pairs = prepare(tmp_path, tok_dir, RECORDS)
    x, y = pairs.batch(np.arange(len(RECORDS)))
    hf = tok_dir[1]
    for i, rec in enumerate(RECORDS):
        for j, field in enumerate(("chosen", "rejected")):
            ids, first, end = response_tokens(hf, rec["prompt"], rec[field])
            assert x[i, j, :len(ids) - 1].tolist() == ids[:-1]  # the rendering, unchanged
            want = torch.full((T,), IGNORE_INDEX)
            want[first - 1:end - 1] = torch.tensor(ids[first:end])
            assert torch.equal(y[i, j], want), (i, field)


def test_loss_and_grads_equal_the_formula_in_fp64(tmp_path, tok_dir):
    pairs = prepare(tmp_path, tok_dir, RECORDS)
    hf, beta = tok_dir[1], 0.2

    def gpt(seed):
        m = GPT(GPTConfig(vocab_size=len(hf), seq_len=T, n_layer=2, n_head=2, d_model=16))
        m.init_weights(seed)
        return m.double().eval()
    policy, ref = gpt(1), gpt(2)

    def logp(model, prompt, response):
        ids, first, end = response_tokens(hf, prompt, response)
        lp = torch.log_softmax(model(torch.tensor(ids)[None, :-1])[0], -1)
        return sum(lp[k - 1, ids[k]] for k in range(first, end))

    losses = []
    for r in RECORDS:
        with torch.no_grad():
            ref_c, ref_r = logp(ref, r["prompt"], r["chosen"]), logp(ref, r["prompt"], r["rejected"])
        margin = beta * ((logp(policy, r["prompt"], r["chosen"]) - ref_c)
                         - (logp(policy, r["prompt"], r["rejected"]) - ref_r))
        losses.append(-torch.nn.functional.logsigmoid(margin))
    want = torch.stack(losses).mean()
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    loss = DPOLoss(beta, ref)
    x, y = pairs.batch(np.arange(len(RECORDS)))
    micro = [(x[:2], y[:2]), (x[2:], y[2:])]
    loss.start_step()
    denom = sum(loss.count(b) for _, b in micro).to(torch.float64)
    got = accumulate_gradients(policy, micro, PrecisionPolicy("fp64", torch.device("cpu")),
                               loss, denom)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=0)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-10, atol=1e-12, msg=n)


def test_records_without_a_prompt_are_the_explicit_ones(tmp_path, tok_dir):
    """TRL's implicit-prompt form: `chosen` / `rejected` whole conversations, the prompt
    their shared leading messages (a multi-turn one's assistant turn included): the
    same ids and trained tokens as the explicit records."""
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in RECORDS]
    (tmp_path / "explicit").mkdir(), (tmp_path / "implicit").mkdir()
    xe, ye = prepare(tmp_path / "explicit", tok_dir, RECORDS).batch(np.arange(len(RECORDS)))
    xi, yi = prepare(tmp_path / "implicit", tok_dir, implicit).batch(np.arange(len(RECORDS)))
    assert torch.equal(xe, xi) and torch.equal(ye, yi)


@pytest.mark.parametrize("change, fragment", [
    (lambda r: r.pop("rejected"), "field 'rejected' is missing"),
    (lambda r: r.update(chosen="4."), "field 'chosen' is not a list of messages"),
    (lambda r: r.update(chosen=[{"role": "user", "content": "4."}]),
     "a response is the assistant's turn(s) only"),
    (lambda r: r.update(prompt=[{"role": "tool", "content": "x"}]),
     "the chat template rejects the conversation: Unknown role: tool"),
    # Implicit prompts: the shared leading messages are the prompt.
    (lambda r: r.update(chosen=r.pop("prompt") + r["chosen"]),  # rejected alone: no prompt
     "no field 'prompt', and 'chosen' and 'rejected' share no leading messages"),
    (lambda r: r.update(chosen=r["prompt"] + r["chosen"] + r["prompt"],
                        rejected=r.pop("prompt") + r["chosen"]),
     "field 'chosen' holds ['user'] messages after the messages it shares with 'rejected'"),
])
def test_bad_chat_records_are_one_line_data_errors(tmp_path, tok_dir, change, fragment):
    bad = json.loads(json.dumps(RECORDS[0]))
    change(bad)
    with pytest.raises(DataError) as e:
        prepare(tmp_path, tok_dir, [RECORDS[1], bad])
    assert fragment in str(e.value) and "\n" not in str(e.value)
