"""odpo_vllm and TRL's `OnlineDPOTrainer` compute the same thing: for one step on identical inputs
(same model, same prompts, the same two completions per prompt, the same rewards), the loss, the
gradients and the logged metrics agree to float tolerance.

The bench extra's test set (`pip install -e .[bench]`): `python -m pytest -q benchmarks/tests`.
Sampling is bypassed on both sides: TRL's `_generate` is replaced by one that returns the fixed
completions, and our learner gets the pairs directly.
"""

from __future__ import annotations

import odpo_vllm  # noqa: F401

import copy

import pytest
import torch

pytest.importorskip("trl", reason="the bench extra (trl) is not installed")

from odpo_vllm import OnlineDPOConfig, toy  # noqa: E402
from odpo_vllm.core.batches import PairBatch  # noqa: E402
from odpo_vllm.learning.learner import Learner  # noqa: E402

BETA = 0.1
# Two prompts of equal token length (TRL left-pads prompts without position ids, so unequal
# prompts would shift TRL's positions; equal ones make both layouts [prompt, completion, pad]).
PROMPTS = ["Review the film:", "Review the book:"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return toy.build_model(tmp_path_factory.mktemp("models") / "policy")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the trainers' output_dir ("trl_out", "ours_out") lands here


def completions(tokenizer):
    """Sample 0 and sample 1 of each prompt (block layout), different lengths, EOS on some."""
    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    return [
        words(" good great fun") + [eos],  # prompt 0, sample 0
        words(" sad and boring plot"),  # prompt 1, sample 0 (no EOS, longer)
        words(" awful"),  # prompt 0, sample 1
        words(" happy") + [eos],  # prompt 1, sample 1
    ]


SCORES = [1.0, -1.0, 0.0, 2.0]  # prompt 0: sample 0 chosen; prompt 1: sample 1 chosen


def trl_step(model_path, tokenizer, loss_type):
    from transformers import AutoModelForCausalLM
    from trl.experimental.online_dpo import OnlineDPOConfig as TRLConfig
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLTrainer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    args = TRLConfig(output_dir="trl_out", report_to="none", bf16=False, use_cpu=True,
                     per_device_train_batch_size=len(PROMPTS), gradient_checkpointing=False, beta=[BETA],
                     loss_type=loss_type, max_length=256, max_new_tokens=16, save_strategy="no")

    def scores(prompts, completions, completion_ids, **kwargs):
        return list(SCORES)

    trainer = TRLTrainer(model=model, reward_funcs=scores, args=args, processing_class=tokenizer,
                         train_dataset=toy.prompt_dataset(4))
    pad, width = tokenizer.pad_token_id, args.max_new_tokens
    prompt_ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] * 2)
    rows = completions(tokenizer)
    completion_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows])
    completion_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows])

    def fixed_generate(model, prompts, images=None):
        return prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask, None

    trainer._generate = fixed_generate
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, {"prompt": list(PROMPTS)})
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    stats = {k: v[-1] for k, v in trainer.stats.items() if v}
    return float(loss), grads, stats


def ours_step(model_path, tokenizer, loss_type):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    args = OnlineDPOConfig(output_dir="ours_out", report_to="none", gradient_checkpointing=False,
                           per_device_train_batch_size=len(PROMPTS), beta=BETA, loss_type=loss_type,
                           max_length=256, max_new_tokens=16)
    learner = Learner(model, reference, args, tokenizer.pad_token_id, 1)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    rows = completions(tokenizer)
    n = len(PROMPTS)
    chosen = [rows[i] if SCORES[i] >= SCORES[n + i] else rows[n + i] for i in range(n)]  # ties: sample 0
    rejected = [rows[n + i] if SCORES[i] >= SCORES[n + i] else rows[i] for i in range(n)]
    model.train()
    loss, sums, _ = learner._pair_pass(PairBatch(prompt_ids, chosen, rejected), BETA, n, train=True)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads, {key: float(value) / n for key, value in sums.items()}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_step_loss_gradients_and_metrics_match_trl(model_path, loss_type):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    assert len({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS}) == 1
    trl_loss, trl_grads, trl_stats = trl_step(model_path, tokenizer, loss_type)
    our_loss, our_grads, our_stats = ours_step(model_path, tokenizer, loss_type)

    assert our_loss == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    # the untrained policy equals its reference: the sigmoid loss is log 2 on both sides
    if loss_type == "sigmoid":
        assert trl_loss == pytest.approx(0.693147, abs=1e-5)
    assert set(our_grads) == set(trl_grads)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert max(g.abs().max().item() for g in trl_grads.values()) > 1e-4  # a real gradient was compared
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies"):
        assert our_stats[key] == pytest.approx(trl_stats[key], rel=1e-5, abs=1e-5), key
    # Not compared: TRL sums `objective/entropy` and `objective/kl` over padded positions too (its
    # logprobs of pad tokens count); ours are masked to completion tokens, so with completions of
    # unequal length they differ by design.
    assert our_stats["objective/entropy"] < trl_stats["objective/entropy"]


def moved_policy(model_path):
    """The tiny policy with every weight moved by seeded noise (policy != reference)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    moved = AutoModelForCausalLM.from_pretrained(model_path)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return moved


def test_parity_survives_a_trained_policy(model_path):
    """With policy != reference (the usual case after step 1) the loss is not log 2: perturb the
    policy identically on both sides and compare again (sigmoid)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    moved = moved_policy(model_path)
    # Both sides: the moved policy against the original model as an explicit reference.
    from trl.experimental.online_dpo import OnlineDPOConfig as TRLConfig
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLTrainer

    args = TRLConfig(output_dir="trl_out", report_to="none", bf16=False, use_cpu=True,
                     per_device_train_batch_size=len(PROMPTS), gradient_checkpointing=False, beta=[BETA],
                     max_length=256, max_new_tokens=16, save_strategy="no")
    reference = AutoModelForCausalLM.from_pretrained(model_path)
    trainer = TRLTrainer(model=copy.deepcopy(moved), ref_model=reference, reward_funcs=lambda **kw: list(SCORES),
                         args=args, processing_class=tokenizer, train_dataset=toy.prompt_dataset(4))
    pad, width = tokenizer.pad_token_id, args.max_new_tokens
    prompt_ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] * 2)
    rows = completions(tokenizer)
    completion_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in rows])
    completion_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in rows])
    trainer._generate = lambda model, prompts, images=None: (
        prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask, None)
    trl_loss = float(trainer.training_step(trainer.model, {"prompt": list(PROMPTS)}))

    our_args = OnlineDPOConfig(output_dir="ours_out", report_to="none",
                               gradient_checkpointing=False, beta=BETA, max_length=256, max_new_tokens=16)
    policy = copy.deepcopy(moved)
    learner = Learner(policy, AutoModelForCausalLM.from_pretrained(model_path).eval(), our_args,
                      tokenizer.pad_token_id, 1)
    n = len(PROMPTS)
    chosen = [rows[0], rows[n + 1]]
    rejected = [rows[n + 0], rows[1]]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    policy.train()
    loss, _, _ = learner._pair_pass(PairBatch(prompts, chosen, rejected), BETA, n, train=True)
    assert abs(trl_loss - 0.693147) > 1e-3
    assert float(loss) == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)


def equal_length_completions(tokenizer, length: int = 5):
    """Four completions of `length` tokens each (no padding anywhere, so TRL's unmasked KL and
    entropy sums equal our masked ones), two ending in EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [i for i in range(40, 40 + 6 * length) if i not in (eos, pad)]
    rows = [ids[k * length:(k + 1) * length] for k in range(4)]
    rows[0][-1], rows[3][-1] = eos, eos
    return rows


def test_every_metric_sign_and_scale_matches_trl(model_path):
    """All of TRL's logged metrics, including objective/kl, entropy, non_score_reward (-beta * KL),
    rlhf_reward (score + non_score_reward), scores, scores_margin, val/contain_eos_token and beta,
    with a policy that differs from its reference so that KL and the penalty are not zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig as TRLConfig
    from trl.experimental.online_dpo import OnlineDPOTrainer as TRLTrainer

    from odpo_vllm.core.objective import rlhf_reward, score_metrics, select_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    moved = moved_policy(model_path)
    rows = equal_length_completions(tokenizer)
    n, width = len(PROMPTS), len(rows[0])

    trl_args = TRLConfig(output_dir="trl_out", report_to="none", bf16=False, use_cpu=True,
                         per_device_train_batch_size=n, gradient_checkpointing=False, beta=BETA,
                         max_length=256, max_new_tokens=width, save_strategy="no")
    trainer = TRLTrainer(model=copy.deepcopy(moved), ref_model=AutoModelForCausalLM.from_pretrained(model_path),
                         reward_funcs=lambda **kw: list(SCORES), args=trl_args, processing_class=tokenizer,
                         train_dataset=toy.prompt_dataset(4))
    prompt_ids = torch.tensor([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS] * 2)
    trainer._generate = lambda model, prompts, images=None: (
        prompt_ids, torch.ones_like(prompt_ids), torch.tensor(rows), torch.ones(4, width, dtype=torch.long), None)
    trainer.training_step(trainer.model, {"prompt": list(PROMPTS)})
    trl_stats = {k: v[-1] for k, v in trainer.stats.items() if v}

    our_args = OnlineDPOConfig(output_dir="ours_out", report_to="none", gradient_checkpointing=False, beta=BETA,
                               max_length=256, max_new_tokens=width)
    assert isinstance(our_args.beta, float) and our_args.beta == trl_args.beta  # the same type and value
    policy = copy.deepcopy(moved)
    learner = Learner(policy, AutoModelForCausalLM.from_pretrained(model_path).eval(), our_args,
                      tokenizer.pad_token_id, 1)
    scores = torch.tensor(SCORES)
    chosen, rejected = select_pairs(scores, n, 2)
    batch = PairBatch([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS],
                      [rows[i] for i in chosen.tolist()], [rows[i] for i in rejected.tolist()])
    policy.train()
    _, sums, _ = learner._pair_pass(batch, BETA, n, train=True)
    ours = {key: float(value) / n for key, value in sums.items()}
    ours.update(score_metrics(scores, chosen, rejected, torch.tensor([r[-1] == tokenizer.eos_token_id for r in rows])))
    ours["objective/rlhf_reward"] = rlhf_reward(scores[torch.cat([chosen, rejected])], ours["objective/non_score_reward"])
    ours["beta"] = our_args.beta_at(0)

    assert set(trl_stats) <= set(ours), set(trl_stats) - set(ours)
    assert abs(trl_stats["objective/kl"]) > 1e-3  # a real KL, so the penalty's sign is tested
    assert trl_stats["objective/non_score_reward"] == pytest.approx(-BETA * trl_stats["objective/kl"], rel=1e-5)
    for key, value in trl_stats.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
