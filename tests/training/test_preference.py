"""Preference tuning in this process: the losses against their papers, the fused log-probs against
full logits, the pair formats and encoding against supervised encoding, bad records, the flags."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from baichuan_finetune.options.arguments import UsageError, parse_args
from baichuan_finetune.data.encoding import encode_conversations
from baichuan_finetune.model.modeling_baichuan import IGNORE_INDEX
from baichuan_finetune.training.preference import PreferenceObjective
from baichuan_finetune.data.preference_data import PairCollator, encode_pair, prepare_pairs, read_pairs
from baichuan_finetune.data.records import ASSISTANT, USER, Conversation, DataError
from baichuan_finetune.model.tokenization_baichuan import PlainTextEncoder

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "data" / "preference_example.json"


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ----- the losses: each a direct restatement of its paper's formula, in plain floats -----


PC, PR, RC, RR = [-12.0, -30.5, -7.25], [-15.0, -29.0, -9.0], [-13.0, -31.0, -8.0], [-14.5, -30.0, -8.5]
COUNTS_C, COUNTS_R = [6, 12, 3], [5, 11, 4]


def _objective(loss: str, **kw) -> tuple[float, dict]:
    logps = torch.tensor(PC + PR, dtype=torch.float64)
    ref = torch.tensor(RC + RR, dtype=torch.float64)
    counts = torch.tensor(COUNTS_C + COUNTS_R)
    value, metrics = PreferenceObjective(loss=loss, **kw)(logps, counts, ref)
    return value.item(), {k: v.item() for k, v in metrics.items()}


def test_dpo_is_the_papers_formula_with_conservative_smoothing():
    beta, eps = 0.1, 0.2
    # Rafailov et al. eq. 7: -log sigma(beta log(pi(yw)/ref(yw)) - beta log(pi(yl)/ref(yl)));
    # Mitchell's cDPO: the label is flipped with probability eps.
    expected = []
    for pc, pr, rc, rr in zip(PC, PR, RC, RR):
        z = beta * (pc - rc) - beta * (pr - rr)
        expected.append(-(1 - eps) * math.log(_sigmoid(z)) - eps * math.log(_sigmoid(-z)))
    value, metrics = _objective("sigmoid", beta=beta, label_smoothing=eps)
    assert value == pytest.approx(sum(expected) / 3, rel=1e-12)
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR)]
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / 3)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected) / 3)
    assert metrics["rewards/accuracies"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert metrics["rewards/margins"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 3)
    assert metrics["logps/chosen"] == pytest.approx(sum(PC) / 3)
    assert metrics["logps/rejected"] == pytest.approx(sum(PR) / 3)
    # Without smoothing, and policy == reference: ln 2.
    assert _objective("sigmoid", beta=beta)[0] == pytest.approx(
        sum(-math.log(_sigmoid(beta * ((pc - rc) - (pr - rr))))for pc, pr, rc, rr in zip(PC, PR, RC, RR)) / 3)
    same = PreferenceObjective()(torch.tensor(PC + PR), torch.tensor(COUNTS_C + COUNTS_R), torch.tensor(PC + PR))
    assert same[0].item() == pytest.approx(math.log(2), abs=1e-7)


def test_ipo_is_the_papers_formula_on_average_logps():
    tau = 0.25
    # Azar et al. eq. 17: (h - 1/(2 tau))^2, h = log(pi(yw) ref(yl) / (pi(yl) ref(yw))), on per-token averages.
    expected = []
    for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, COUNTS_C, COUNTS_R):
        h = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        expected.append((h - 1 / (2 * tau)) ** 2)
    assert _objective("ipo", beta=tau)[0] == pytest.approx(sum(expected) / 3, rel=1e-12)


def test_orpo_is_the_papers_formula():
    lam = 0.3
    # Hong et al. eq. 6-7: L_SFT + lambda * -log sigma(log odds(yw) - log odds(yl)), odds = P/(1-P), P = exp(avg logp).
    expected = []
    for pc, pr, nc, nr in zip(PC, PR, COUNTS_C, COUNTS_R):
        p_w, p_l = math.exp(pc / nc), math.exp(pr / nr)
        ratio = math.log((p_w / (1 - p_w)) / (p_l / (1 - p_l)))
        expected.append(-pc / nc - lam * math.log(_sigmoid(ratio)))
    assert _objective("orpo", beta=lam)[0] == pytest.approx(sum(expected) / 3, rel=1e-12)


def test_simpo_is_the_papers_formula_and_ftx_adds_the_chosen_nll():
    beta, gamma, ftx = 2.0, 0.7, 0.5
    # Meng et al. eq. 6: -log sigma(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma).
    expected = [-math.log(_sigmoid(beta / nc * pc - beta / nr * pr - gamma)) + ftx * (-pc / nc)
                for pc, pr, nc, nr in zip(PC, PR, COUNTS_C, COUNTS_R)]
    assert _objective("simpo", beta=beta, simpo_gamma=gamma, ftx=ftx)[0] == pytest.approx(sum(expected) / 3, rel=1e-12)
    value, metrics = _objective("simpo", beta=beta, simpo_gamma=gamma)
    assert metrics["rewards/chosen"] == pytest.approx(sum(beta * pc / nc for pc, nc in zip(PC, COUNTS_C)) / 3)


# ----- the fused log-probs against a naive full-logits computation on the tiny model -----


def test_sequence_logps_equal_full_logits_with_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baichuan_finetune.objectives.losses import SequenceLogProbs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir, use_fast=False)
    data = prepare_pairs(SimpleNamespace(data_path=str(SHIPPED), eval_data_path=None, val_size=0,
                                         on_bad_record="error", padding="longest"), tok, 128)
    batch = data.data_collator([data.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 6 and batch["pair_index"].tolist() == [0, 1, 2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # a head whose rows have different norms, so the normalisation matters
        model.lm_head.weight.mul_(torch.rand(model.lm_head.weight.shape[0], 1) + 0.5)
    weights = torch.randn(6, dtype=torch.float64)

    def grads(fused: bool):
        model.zero_grad()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        if fused:
            logps = model(**inputs, labels=batch["labels"], head_loss=SequenceLogProbs(6, chunk_size=16)).loss
        else:
            logits = model(**inputs).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            logps = (token * (labels != IGNORE_INDEX)).sum(-1)
        (logps.double() * weights).sum().backward()
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fused, g_fused = grads(True)
    naive, g_naive = grads(False)
    assert (fused - naive).abs().max().item() < 1e-5, (fused, naive)
    assert fused.shape == (6,) and (fused < 0).all()
    for name in g_naive:
        scale = max(g_naive[name].abs().max().item(), 1e-3)
        assert (g_fused[name] - g_naive[name]).abs().max().item() / scale < 1e-5, name
    # Evaluation: no graph, same values.
    with torch.no_grad():
        again = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      head_loss=SequenceLogProbs(6)).loss
    assert (again - fused).abs().max().item() < 1e-5


# ----- formats and encoding -----


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    import sentencepiece as spm

    return PlainTextEncoder(spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model")))


def _write(path: Path, records: list) -> str:
    path.write_text(json.dumps(records, ensure_ascii=False))
    return str(path)


HISTORY = [("What is the color of Omblic?", "The color of Omblic is red."), ("And of Teskar?", None)]


def test_three_formats_read_alike_and_encode_as_supervised(tmp_path, encoder):
    sharegpt = {"system": "Answer briefly.", "conversations": [
        {"from": "human", "value": HISTORY[0][0]}, {"from": "gpt", "value": HISTORY[0][1]},
        {"from": "human", "value": HISTORY[1][0]}],
        "chosen": {"from": "gpt", "value": "Yellow."}, "rejected": {"from": "gpt", "value": "Blue."}}
    messages = {"prompt": [{"role": "system", "content": "Answer briefly."},
                           {"role": "user", "content": HISTORY[0][0]}, {"role": "assistant", "content": HISTORY[0][1]},
                           {"role": "user", "content": HISTORY[1][0]}],
                "chosen": [{"role": "assistant", "content": "Yellow."}],
                "rejected": [{"role": "assistant", "content": "Blue."}]}
    pairs = [read_pairs(_write(tmp_path / f"{n}.json", [r])) for n, r in (("s", sharegpt), ("m", messages))]
    assert [list(p.formats.values()) for p in pairs] == [["sharegpt_pair"], ["prompt_pair"]]
    a, b = (p.pairs[0] for p in pairs)
    assert (a.prompt.turns, a.prompt.system, a.chosen, a.rejected) == (b.prompt.turns, b.prompt.system, b.chosen,
                                                                        b.rejected)
    text = read_pairs(_write(tmp_path / "t.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}]))
    assert text.pairs[0].prompt.turns == [(USER, "Hi?")] and text.pairs[0].chosen == ["Hello."]

    # The chosen sequence is exactly the supervised encoding of prompt + chosen, with only the answer scored.
    enc = encode_pair(encoder, a, 128)
    conv = Conversation(turns=[*a.prompt.turns, (ASSISTANT, "Yellow.")], system=a.prompt.system)
    ids, labels = encode_conversations(encoder, [conv], 128).examples()[0]
    assert enc.chosen_input_ids == ids
    answer_start = len(ids) - len(encoder.encode(["Yellow."])[0]) - 1  # the answer's text, then eos
    assert enc.chosen_labels[answer_start:] == labels[answer_start:]
    assert set(enc.chosen_labels[:answer_start]) == {IGNORE_INDEX}
    assert enc.rejected_input_ids[:answer_start - 1] == ids[:answer_start - 1]  # the same prompt and role token


def test_collator_puts_chosen_rows_first_padded_together(tmp_path, encoder):
    data = prepare_pairs(SimpleNamespace(data_path=str(SHIPPED), eval_data_path=None, val_size=4,
                                         on_bad_record="error", padding="longest"), encoder.sp, 128)
    assert len(data.train_dataset) == 20 and len(data.eval_dataset) == 4
    rows = [data.train_dataset[i] for i in (0, 1)]
    batch = PairCollator(128)(rows)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] % 8 == 0
    for j, side in ((0, "chosen"), (1, "chosen"), (2, "rejected"), (3, "rejected")):
        n = len(rows[j % 2][f"{side}_input_ids"])
        assert batch["input_ids"][j, :n].tolist() == rows[j % 2][f"{side}_input_ids"]
        assert batch["attention_mask"][j].sum().item() == n


def test_long_prompt_loses_old_rounds_then_answers_are_cut(encoder):
    turns = [(USER, "word " * 30), (ASSISTANT, "answer " * 30), (USER, "Which?")]
    pair = SimpleNamespace(prompt=Conversation(turns=turns, source="f record 0"), chosen=["Red " * 20],
                           rejected=["Blue."], source="f record 0")
    enc = encode_pair(encoder, pair, 40)
    assert len(enc.chosen_input_ids) <= 40 and len(enc.rejected_input_ids) <= 40
    assert enc.rejected_input_ids[-1] == 2  # the short answer kept whole, with eos
    assert encode_pair(encoder, SimpleNamespace(prompt=Conversation(turns=[(USER, "word " * 60)]), chosen=["a"],
                                                rejected=["b"], source="x"), 40) is None


def test_truncation_keeps_the_newest_rounds_and_cuts_the_answers_tail(encoder):
    """The documented rule against ids built here from sentencepiece and the layout constants: whole
    oldest rounds go first (the system text and the newest rounds stay), then the answers lose their ends."""
    sp = encoder.sp

    def E(text: str) -> list[int]:
        return sp.encode(text)

    system, u1, a1 = "Answer briefly.", "word " * 12 + "one?", "answer " * 12 + "one."
    u2, a2, u3, chosen, rejected = "What about two?", "Two it is.", "And three?", "Three.", "Four."
    pair = SimpleNamespace(prompt=Conversation(turns=[(USER, u1), (ASSISTANT, a1), (USER, u2), (ASSISTANT, a2),
                                                      (USER, u3)], system=system), chosen=[chosen],
                           rejected=[rejected], source="f record 0")
    USER_ID, ASSISTANT_ID, EOS = 195, 196, 2
    newest = E(system) + [USER_ID] + E(u2) + [ASSISTANT_ID] + E(a2) + [USER_ID] + E(u3)
    answer = max(len(E(chosen)), len(E(rejected))) + 2  # role token, text, eos
    # Room for the two newest rounds, not for the oldest too: exactly the oldest round goes.
    enc = encode_pair(encoder, pair, len(newest) + answer)
    assert enc.chosen_input_ids == newest + [ASSISTANT_ID] + E(chosen) + [EOS]
    assert enc.rejected_input_ids == newest + [ASSISTANT_ID] + E(rejected) + [EOS]
    assert enc.chosen_labels == [IGNORE_INDEX] * (len(newest) + 1) + E(chosen) + [EOS]
    # A long chosen answer: the history goes (the system text and last question stay), then its tail.
    last = E(system) + [USER_ID] + E(u3)
    long_answer = "Red " * 40
    limit = 2 * len(last) + 4
    enc = encode_pair(encoder, SimpleNamespace(prompt=pair.prompt, chosen=[long_answer], rejected=[rejected],
                                               source="f record 1"), limit)
    room = limit - len(last)
    assert enc.chosen_input_ids == last + ([ASSISTANT_ID] + E(long_answer))[:room]  # no eos: cut
    assert enc.rejected_input_ids == last + [ASSISTANT_ID] + E(rejected) + [EOS]


def test_pairs_identical_after_truncation_are_dropped_and_counted(tmp_path, encoder):
    same = "The answer is " + "very " * 30
    cut = {"prompt": "Which?", "chosen": same + "yes.", "rejected": same + "no."}  # differ only past 32 tokens
    good = {"prompt": "Which?", "chosen": "Yes.", "rejected": "No."}
    assert len(encoder.encode([same])[0]) > 32
    args = dict(eval_data_path=None, val_size=0, on_bad_record="error", padding="longest")
    data = prepare_pairs(SimpleNamespace(data_path=_write(tmp_path / "p.json", [cut, good, cut]), **args),
                         encoder.sp, 32)
    assert len(data.train_dataset) == 1
    assert data.train_dataset[0]["chosen_input_ids"] != data.train_dataset[0]["rejected_input_ids"]
    assert "dropped: 2 chosen and rejected identical after truncation" in data.report.format()
    # Given room, the same pairs differ and are kept.
    assert len(prepare_pairs(SimpleNamespace(data_path=str(tmp_path / "p.json"), **args), encoder.sp, 128)
               .train_dataset) == 3
    # None left: one line saying why.
    with pytest.raises(DataError, match=r"no preference pair left to train on \(dropped: 1 chosen and rejected "
                                        r"identical after truncation at --model_max_length 32\)"):
        prepare_pairs(SimpleNamespace(data_path=_write(tmp_path / "only.json", [cut]), **args), encoder.sp, 32)
    with pytest.raises(DataError, match=r"e.json: no evaluation pair left \(dropped: 1 chosen and rejected"):
        prepare_pairs(SimpleNamespace(data_path=str(tmp_path / "p.json"), **{
            **args, "eval_data_path": _write(tmp_path / "e.json", [cut])}), encoder.sp, 32)


# ----- bad records: one-line errors naming file, record and field, or counted skips -----


BAD = [
    ({"conversations": [{"from": "human", "value": "Hi"}], "rejected": {"from": "gpt", "value": "No."}},
     "chosen: missing answer"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Same."},
      "rejected": {"from": "gpt", "value": "Same."}}, "rejected: identical to chosen"),
    ({"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "  "},
      "rejected": {"from": "gpt", "value": "No."}}, "chosen: empty answer"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
      "chosen": {"from": "gpt", "value": "Yes."}, "rejected": {"from": "gpt", "value": "No."}},
     "conversations[1]: the prompt ends with an assistant turn"),
]


@pytest.mark.parametrize("record,message", BAD, ids=["missing-chosen", "identical", "empty", "ends-with-assistant"])
def test_bad_pair_record_is_named(tmp_path, record, message):
    good = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello."},
            "rejected": {"from": "gpt", "value": "Go away."}}
    path = _write(tmp_path / "pairs.json", [good, record])
    with pytest.raises(DataError) as err:
        read_pairs(path)
    assert f"{path} record 1: {message}" in str(err.value)
    skipped = read_pairs(path, on_bad_record="skip")
    assert len(skipped.pairs) == 1 and len(skipped.bad_records) == 1


def test_supervised_file_is_refused_for_dpo(tmp_path):
    path = REPO_ROOT / "data" / "examples" / "official.json"
    with pytest.raises(DataError, match="no preference pairs.*'chosen' and 'rejected'"):
        read_pairs(str(path))


def test_skipped_records_are_counted_in_the_report(tmp_path, encoder):
    records = json.loads(SHIPPED.read_text())[:3] + [BAD[0][0], BAD[1][0]]
    path = _write(tmp_path / "mixed.json", records)
    data = prepare_pairs(SimpleNamespace(data_path=path, eval_data_path=None, val_size=0, on_bad_record="skip",
                                         padding="longest"), encoder.sp, 128)
    assert len(data.train_dataset) == 3
    assert "skipped bad records: 1 identical answers, 1 missing answer" in data.report.format()


# ----- flags -----


def _flags(tmp_path, *extra) -> list[str]:
    return ["--data_path", str(SHIPPED), "--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra]


def test_flags(tmp_path):
    t = parse_args(_flags(tmp_path, "--stage", "dpo", "--pref_loss", "simpo", "--simpo_gamma", "1")).training
    assert (t.stage, t.pref_loss, t.pref_beta, t.simpo_gamma, t.pref_ftx) == ("dpo", "simpo", 0.1, 1.0, 0.0)
    assert parse_args(_flags(tmp_path)).training.stage == "sft"  # today's behaviour by default
    for extra, message in [
        (("--stage", "ppo"), "--stage"),
        (("--stage", "dpo", "--pref_loss", "kto"), "--pref_loss"),
        (("--stage", "dpo", "--pref_beta", "0"), "--pref_beta 0.0: must be > 0"),
        (("--stage", "dpo", "--label_smoothing", "0.5"), "--label_smoothing 0.5: must be in [0, 0.5)"),
        (("--stage", "dpo", "--pref_loss", "ipo", "--label_smoothing", "0.1"), "applies to --pref_loss sigmoid"),
        (("--stage", "dpo", "--label_smoothing_factor", "0.1"), "use --label_smoothing"),
        (("--pref_beta", "0.5"), "--pref_beta: a preference flag; add --stage dpo"),
        (("--stage", "dpo", "--packing", "True"), "--packing True: not supported with --stage dpo"),
    ]:
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            parse_args(_flags(tmp_path, *extra))


def test_inspect_data_previews_pairs_with_scored_spans(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "inspect_data.py"), "--stage", "dpo",
                           "--data_path", str(SHIPPED), "--tokenizer_path", str(tiny_model_dir),
                           "--model_max_length", "128", "--preview", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "records read: 24; pairs: train 24, eval 0" in proc.stdout
    assert "<user>: Tell me the number of Wexhall.\nchosen:<assistant>: [[The number of Wexhall is 11.]][[</s>]]" \
        in proc.stdout
    assert "rejected:<assistant>: [[The number of Wexhall is 14.]][[</s>]]" in proc.stdout
