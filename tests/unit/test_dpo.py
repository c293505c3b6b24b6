"""DPO (train/dpo.py) against a direct implementation of the formula of Rafailov et al.
2023 (eq. 7) on a tiny GPT in fp64: the loss and every gradient of a step split into
unequal micro-batches, the preference batches' layout (prompt kept, response cut), and
the LoRA reference (the base with the adapters off)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from scaletrain.data.preference import PreferencePairs, split_records
from scaletrain.data.preference_records import implicit_prompt
from scaletrain.errors import DataError
from scaletrain.finetune.lora import apply_lora
from scaletrain.models.gpt import GPT, GPTConfig
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.dpo import DPOLoss, reference_of
from scaletrain.train.step import accumulate_gradients

T, V = 12, 50


def tiny_gpt(seed: int) -> GPT:
    m = GPT(GPTConfig(vocab_size=V, seq_len=T, n_layer=2, n_head=2, d_model=16))
    m.init_weights(seed)
    return m.double().eval()


def write_pairs(path, records: list[tuple[list[int], list[int], list[int]]]) -> None:
    """A prepared 'train' split of (prompt, chosen, rejected) id lists (responses with
    their end-of-text already), in data/preference.py's layout."""
    ids = np.array([t for r in records for s in r for t in s], dtype=np.int64)
    lengths = np.array([[len(s) for s in r] for r in records], dtype=np.int64)
    np.save(path / "train-ids.npy", ids)
    np.save(path / "train-lengths.npy", lengths)


def random_records(n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = g.integers(1, V, g.integers(1, 6)).tolist()
        # Some responses are longer than seq_len + 1 - prompt: they are cut.
        out.append((p, g.integers(1, V, g.integers(1, 14)).tolist(),
                    g.integers(1, V, g.integers(1, 14)).tolist()))
    return out


def direct_loss(policy, ref, records, beta):
    """The DPO formula written out: each sequence unpadded (prompt + its response cut to
    seq_len + 1 tokens), log p of each response token read off its own forward."""
    def logp(model, prompt, response):
        response = response[:T + 1 - len(prompt)]
        seq = torch.tensor(prompt + response)
        logits = model(seq[None, :-1])[0]  # (L-1, V)
        lp = torch.log_softmax(logits, -1)
        return sum(lp[len(prompt) - 1 + k, tok] for k, tok in enumerate(response))

    losses = []
    for p, c, r in records:
        with torch.no_grad():
            ref_c, ref_r = logp(ref, p, c), logp(ref, p, r)
        margin = beta * ((logp(policy, p, c) - ref_c) - (logp(policy, p, r) - ref_r))
        losses.append(-torch.log(torch.sigmoid(margin)))
    return torch.stack(losses).mean()


def test_loss_and_grads_equal_the_formula_in_fp64(tmp_path):
    records = random_records(5)
    write_pairs(tmp_path, records)
    pairs = PreferencePairs(tmp_path, "train", T, pad_id=0)
    policy, ref = tiny_gpt(1), tiny_gpt(2)  # a reference unlike the policy: ratios != 0
    beta = 0.3
    fp64 = PrecisionPolicy("fp64", torch.device("cpu"))

    want = direct_loss(policy, ref, records, beta)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    loss = DPOLoss(beta, ref)
    x, y = pairs.batch(np.arange(5))
    micro = [(x[:3], y[:3]), (x[3:], y[3:])]  # unequal micro-batches: 3 + 2 pairs
    loss.start_step()
    denom = sum(loss.count(b) for _, b in micro).to(torch.float64)
    got = accumulate_gradients(policy, micro, fp64, loss, denom)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=0)
    for n, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-10, atol=1e-12, msg=n)
    # The record's rewards: means over the step's 5 pairs.
    rec = loss.record(lambda t: t)
    assert set(rec) == {"dpo_reward_margin", "dpo_chosen_reward", "dpo_rejected_reward",
                        "dpo_accuracy"}
    assert rec["dpo_reward_margin"] == pytest.approx(
        rec["dpo_chosen_reward"] - rec["dpo_rejected_reward"], rel=1e-12)


def test_identical_reference_gives_log_2_and_no_margin(tmp_path):
    write_pairs(tmp_path, random_records(4, seed=3))
    x, y = PreferencePairs(tmp_path, "train", T, pad_id=0).batch(np.arange(4))
    policy = tiny_gpt(1)
    loss = DPOLoss(0.1, copy.deepcopy(policy))
    fp64 = PrecisionPolicy("fp64", torch.device("cpu"))
    assert (loss(policy, x, y, fp64, torch.float64) / 4).item() == pytest.approx(
        np.log(2), rel=1e-12)
    assert loss.record(lambda t: t)["dpo_reward_margin"] == 0.0


def test_batches_keep_the_prompt_and_cut_the_response(tmp_path):
    prompt, chosen, rejected = [5, 6, 7], list(range(10, 30)), [40, 41]
    write_pairs(tmp_path, [(prompt, chosen, rejected)])
    x, y = PreferencePairs(tmp_path, "train", 8, pad_id=0).batch(np.array([0]))
    assert x.shape == y.shape == (1, 2, 8)
    assert x[0, 0].tolist() == [5, 6, 7, 10, 11, 12, 13, 14]  # prompt + 6 of 20 kept
    assert y[0, 0].tolist() == [-100, -100, 10, 11, 12, 13, 14, 15]
    assert x[0, 1].tolist() == [5, 6, 7, 40, 0, 0, 0, 0]  # padded with pad_id
    assert y[0, 1].tolist() == [-100, -100, 40, 41, -100, -100, -100, -100]


def test_a_prompt_without_room_for_a_response_is_a_data_error(tmp_path):
    write_pairs(tmp_path, [([1, 2], [3], [4]), (list(range(1, 10)), [3], [4])])
    with pytest.raises(DataError, match="pair 1 .*prompt is 9 tokens.*model.seq_len=8"):
        PreferencePairs(tmp_path, "train", 8, pad_id=0)


def test_splits_do_not_depend_on_the_file_order():
    recs = [(f"p{i}", f"c{i}", f"r{i}") for i in range(20)]
    a, b = split_records(recs, 0.1, 0.1), split_records(recs[::-1], 0.1, 0.1)
    assert len(a["val"]) == len(a["test"]) == 2 and len(a["train"]) == 16
    assert set(a["val"]) == set(b["val"]) and set(a["test"]) == set(b["test"])


def test_lora_reference_is_the_base_with_adapters_off():
    base = tiny_gpt(4)
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, alpha=4.0, targets=["c_attn", "c_fc"])
    with torch.no_grad():  # trained adapters: the policy is no longer the base
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.5)

    def no_copy():
        raise AssertionError("a LoRA run needs no second copy")
    reference = reference_of(model, no_copy)
    x = torch.randint(0, V, (3, T))
    with torch.no_grad():
        torch.testing.assert_close(reference(x), base(x), rtol=0, atol=1e-12)
        assert not torch.allclose(model(x), base(x))  # adapters back on afterwards


def test_prepare_tokenizes_each_field_with_the_given_tokenizer(tmp_path):
    from scaletrain.config.schema import DataConfig
    from scaletrain.data.preference import prepare_preference
    from scaletrain.data.tokenizer import train_bpe

    recs = [{"prompt": f"Question {i}: why?", "chosen": f" because {i}", "rejected": " no"}
            for i in range(6)]
    (src := tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tok = train_bpe([r[k] for r in recs for k in r], 300)
    tok.save(tmp_path / "tok.json")
    dcfg = DataConfig(source=str(src), prepared_dir=str(tmp_path / "p"),
                      tokenizer=str(tmp_path / "tok.json"), val_fraction=0.0,
                      test_fraction=0.0)
    keys = ("prompt", "chosen", "rejected")
    path = prepare_preference(dcfg, keys, progress=False)
    assert prepare_preference(dcfg, keys, progress=False) == path  # cached
    pairs = PreferencePairs(path, "train", 64, pad_id=tok.eot_id)
    x, y = pairs.batch(np.arange(6))
    for i, r in enumerate(recs):
        p = tok.encode(r["prompt"])
        for j, field in ((0, "chosen"), (1, "rejected")):
            seq = p + tok.encode(r[field]) + [tok.eot_id]  # fields apart, then joined
            assert x[i, j, :len(seq) - 1].tolist() == seq[:-1]
            assert y[i, j][y[i, j] != -100].tolist() == seq[len(p):]


U = [{"role": "user", "content": "What color is the sky?"}]
BLUE, GREEN = {"role": "assistant", "content": "It is blue."}, \
    {"role": "assistant", "content": "It is green."}


@pytest.mark.parametrize("chosen, rejected, want", [
    # TRL's own examples (trl/data_utils.py `extract_prompt`, docs "Dataset formats").
    ("The sky is blue.", "The sky is green.", ("The sky is", " blue.", " green.")),
    (U + [BLUE], U + [GREEN], (U, [BLUE], [GREEN])),
    # No space before the first difference: the cut stays there.
    ("2+2=4", "2+2=5", ("2+2=", "4", "5")),
    # One a prefix of the other: TRL's loop ends before the shorter one's last element.
    ("abc", "abcd", ("ab", "c", "cd")),
    (U + [BLUE], U + [BLUE, U[0], GREEN], (U, [BLUE], [BLUE, U[0], GREEN])),
])
def test_implicit_prompt_cuts_where_trl_does(chosen, rejected, want):
    """Cross-checked against trl 1.16's `maybe_extract_prompt` on these and on random
    records (not a test dependency: trl is not installed with scaletrain)."""
    assert implicit_prompt(chosen, rejected, "f:1", ("prompt", "chosen", "rejected")) == want


@pytest.mark.parametrize("chosen, rejected", [("Yes.", "No."), ([BLUE], [GREEN]), ("", "x")])
def test_an_implicit_prompt_that_is_empty_is_one_line(chosen, rejected):
    with pytest.raises(DataError, match=r"^f:3: no field 'q', and 'c' and 'r' share no "
                                        r"(beginning|leading messages) to be the prompt"):
        implicit_prompt(chosen, rejected, "f:3", ("q", "c", "r"))


def test_text_records_without_a_prompt_prepare_as_the_explicit_ones(tmp_path):
    """TRL's implicit-prompt records ({"chosen": whole text, "rejected": whole text})
    give the same prepared pairs as the records with the prompt cut out by hand."""
    from scaletrain.config.schema import DataConfig
    from scaletrain.data.preference import prepare_preference
    from scaletrain.data.tokenizer import train_bpe

    explicit = [{"prompt": f"Question {i}: why is it so?", "chosen": f" because {i}",
                 "rejected": " no idea"} for i in range(6)]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
                for r in explicit]
    tok = train_bpe([r[k] for r in explicit for k in r], 300)
    tok.save(tmp_path / "tok.json")
    batches = []
    for name, recs in (("explicit", explicit), ("implicit", implicit)):
        (src := tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in recs))
        dcfg = DataConfig(source=str(src), prepared_dir=str(tmp_path / "p"),
                          tokenizer=str(tmp_path / "tok.json"), val_fraction=0.0,
                          test_fraction=0.0)
        path = prepare_preference(dcfg, ("prompt", "chosen", "rejected"), progress=False)
        batches.append(PreferencePairs(path, "train", 64, pad_id=tok.eot_id).batch(np.arange(6)))
    (xe, ye), (xi, yi) = batches
    assert torch.equal(xe, xi) and torch.equal(ye, yi)
    assert (ye != -100).sum() > 0
