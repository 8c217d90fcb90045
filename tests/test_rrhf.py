"""RRHF: the loss and metrics against hand-worked values, the collator's masks, and short training runs."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from conftest import Killed, kill_after_checkpoint, steps_run

from helpers import models
from helpers.rrhf import (IGNORE_INDEX, RRHFCollator, RRHFConfig, RRHFTrainer, build_rrhf_dataset,
                          length_normalised_logps, ranking_accuracy, rrhf_loss)


# ----------------------------------------------------------------------------------------------- the loss

def test_rrhf_loss_hand_worked():
    # pairs (0<1): max(0, -1 - (-2)) = 1; (0<2): max(0, -1 + 0.5) = 0; (1<2): max(0, -2 + 0.5) = 0
    assert rrhf_loss(torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[1.0, 2.0, 3.0]])).item() == pytest.approx(1.0)


def test_rrhf_loss_ties_contribute_nothing():
    # candidates 0 and 1 tie: only (0<2): max(0, -1 + 3) = 2 and (1<2): max(0, -2 + 3) = 1 count
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    assert rrhf_loss(logps, torch.tensor([[1.0, 1.0, 2.0]])).item() == pytest.approx(3.0)
    assert rrhf_loss(logps, torch.tensor([[0.5, 0.5, 0.5]])).item() == 0.0


def test_rrhf_loss_averages_over_prompts():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -1.0, 0.0]])
    rewards = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    # prompt 2 ranks 2 < 1 < 0: (2<1): max(0, 0 + 1) = 1; (2<0): max(0, 0 + 0.5) = 0.5; (1<0): max(0, -0.5) = 0
    assert rrhf_loss(logps, rewards).item() == pytest.approx((1.0 + 1.5) / 2)


def test_rrhf_loss_mask_excludes_padded_candidates():
    logps = torch.tensor([[-1.0, -2.0, -0.5, 5.0], [-1.0, -2.0, float("nan"), float("nan")]], requires_grad=True)
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    loss = rrhf_loss(logps, rewards, mask)
    assert loss.item() == pytest.approx((1.0 + 1.0) / 2)
    loss.backward()
    assert torch.isfinite(logps.grad).all() and (logps.grad[:, 3] == 0).all()


def test_rrhf_loss_gradient_raises_the_better_candidate():
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    rrhf_loss(logps, torch.tensor([[0.0, 1.0]])).backward()
    # a descent step (−grad) lowers the worse candidate and raises the better one
    assert logps.grad.tolist() == [[1.0, -1.0]]


def test_rrhf_loss_matches_a_loop_over_pairs():
    generator = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 5, generator=generator)
    rewards = torch.randint(0, 3, (4, 5), generator=generator).float()  # many ties
    mask = torch.rand(4, 5, generator=generator) > 0.2
    expected = sum(max(0.0, float(logps[b, i] - logps[b, j]))
                   for b in range(4) for i, j in itertools.product(range(5), repeat=2)
                   if mask[b, i] and mask[b, j] and rewards[b, i] < rewards[b, j]) / 4
    assert rrhf_loss(logps, rewards, mask).item() == pytest.approx(expected, rel=1e-6)


def test_ranking_accuracy_hand_worked():
    # (0<1): -1 > -2 disagrees; (0<2) and (1<2) agree; the padded slot and the tie never count
    logps = torch.tensor([[-1.0, -2.0, -0.5, 9.0]])
    assert ranking_accuracy(logps, torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                            torch.tensor([[True, True, True, False]])) == pytest.approx(2 / 3)
    assert math.isnan(ranking_accuracy(logps, torch.ones(1, 4)))


def test_length_normalised_logps_hand_worked():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 1.0], [2.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0, IGNORE_INDEX]])
    # token 2 is predicted by position 0, token 0 by position 1; position 2 predicts an ignored label
    first = 3.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))
    second = 0.0 - math.log(2.0 + math.e)
    assert length_normalised_logps(logits, labels).tolist() == pytest.approx([(first + second) / 2])
    assert length_normalised_logps(logits, torch.full((1, 4), IGNORE_INDEX)).tolist() == [0.0]


# -------------------------------------------------------------------------------------- data and collator

@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rrhf") / "llm"
    models.build_tiny_llama(folder, seed=0)
    return folder


@pytest.fixture
def tokenizer(llm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llm_folder)


def api_call(model: str, steps: int = 25) -> str:
    return json.dumps({"model": model, "type": "Checkpoint", "base_model": "SD 1.5", "width": 512, "height": 512,
                       "sampling_method": "Euler a", "sampling_steps": steps, "cfg_scale": 7})


ROWS = [{"prompt": "a photo of a cat, soft lighting", "candidates": [api_call("CatMix v1"), api_call("DogMix v2"),
                                                                    api_call("CatMix v1", 30)],
         "rewards": [0.2, 0.9, 0.5]},
        {"prompt": "an oil painting of a castle", "candidates": [api_call("CastleMix v3"), api_call("CarMix v1")],
         "rewards": [1.0, 0.0]}]


def test_collator_labels_only_the_response(tokenizer):
    batch = RRHFCollator(tokenizer, max_length=512)(ROWS)
    assert batch["input_ids"].shape[0] == 6 and batch["rewards"].shape == (2, 3)
    for b, i in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
        r = b * 3 + i  # row b·n + i holds candidate i of prompt b
        labelled = batch["labels"][r][batch["labels"][r] != IGNORE_INDEX]
        assert tokenizer.decode(labelled) == ROWS[b]["candidates"][i] + tokenizer.eos_token
        assert batch["attention_mask"][r, 0] == 1  # right padding: the text starts at column 0
    # prompt 2 has two candidates: its third slot is a masked padding row
    assert batch["candidate_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert torch.allclose(batch["rewards"], torch.tensor([[0.2, 0.9, 0.5], [1.0, 0.0, 0.0]]))
    assert (batch["labels"][5] == IGNORE_INDEX).all() and (batch["attention_mask"][5] == 0).all()


def test_collator_without_generation_markers_finds_the_same_response(tokenizer):
    marked = RRHFCollator(tokenizer)(ROWS)
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    plain = RRHFCollator(tokenizer)
    assert not plain.uses_generation_blocks
    assert torch.equal(plain(ROWS)["labels"], marked["labels"])


def test_collator_fixed_num_candidates_and_truncation(tokenizer):
    assert RRHFCollator(tokenizer, num_candidates=4)(ROWS)["candidate_mask"].shape == (2, 4)
    with pytest.raises(ValueError, match="num_candidates=2"):
        RRHFCollator(tokenizer, num_candidates=2)(ROWS)
    full = RRHFCollator(tokenizer)(ROWS)["input_ids"].shape[1]
    assert RRHFCollator(tokenizer, max_length=full - 3)(ROWS)["input_ids"].shape[1] == full - 3
    with pytest.raises(ValueError, match="max_length=5"):
        RRHFCollator(tokenizer, max_length=5)(ROWS)


def test_build_rrhf_dataset_names_the_bad_row():
    dataset = build_rrhf_dataset(ROWS)
    assert len(dataset) == 2 and dataset[1]["rewards"] == [1.0, 0.0]
    bad = {"prompt": "p", "candidates": ["a", "b"], "rewards": [1.0]}
    with pytest.raises(ValueError, match="row 2: 2 candidates but 1 rewards"):
        build_rrhf_dataset([*ROWS, bad])
    with pytest.raises(ValueError, match="row 0: 1 candidate"):
        build_rrhf_dataset([{"prompt": "p", "candidates": ["a"], "rewards": [1.0]}])
    with pytest.raises(ValueError, match="row 1: rewards must be finite"):
        build_rrhf_dataset([ROWS[0], {"prompt": "p", "candidates": ["a", "b"], "rewards": [1.0, float("nan")]}])


def test_config_validates_weights(tmp_path):
    config = RRHFConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert config.remove_unused_columns is False and config.rank_loss_weight == config.ce_loss_weight == 1.0
    with pytest.raises(ValueError, match="rank_loss_weight=-1"):
        RRHFConfig(output_dir=str(tmp_path), rank_loss_weight=-1, use_cpu=True)
    with pytest.raises(ValueError, match="both 0"):
        RRHFConfig(output_dir=str(tmp_path), rank_loss_weight=0, ce_loss_weight=0, use_cpu=True)
    with pytest.raises(ValueError, match="num_candidates=1"):
        RRHFConfig(output_dir=str(tmp_path), num_candidates=1, use_cpu=True)


# ------------------------------------------------------------------------------------------------ training

def rrhf_args(tmp_path, **overrides) -> RRHFConfig:
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                    logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                    disable_tqdm=True)
    return RRHFConfig(**{**settings, **overrides})


THREE_CANDIDATE_ROWS = [
    {"prompt": f"a {style} of a {subject}", "candidates": [api_call(f"{subject.title()}Mix v{k}") for k in (1, 2, 3)],
     "rewards": [0.1 * k, 0.5, 1.0 - 0.2 * k]}
    for k, (style, subject) in enumerate([("photo", "cat"), ("sketch", "dog"), ("watercolor", "forest"),
                                          ("portrait", "robot")], start=1)]


def test_trainer_logs_rrhf_terms_and_updates_every_parameter(llm_folder, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_folder)
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    trainer = RRHFTrainer(model=model, args=rrhf_args(tmp_path), train_dataset=build_rrhf_dataset(THREE_CANDIDATE_ROWS),
                          processing_class=tokenizer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 4
    for entry in logged:
        assert math.isfinite(entry["loss"]) and {"rank_loss", "ce_loss", "ranking_accuracy"} <= set(entry)
        assert 0.0 <= entry["ranking_accuracy"] <= 1.0
    unchanged = [name for name, param in model.named_parameters() if torch.equal(param.detach(), before[name])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    metrics = trainer.evaluate(build_rrhf_dataset(ROWS))
    assert {"eval_loss", "eval_rank_loss", "eval_ce_loss", "eval_ranking_accuracy"} <= set(metrics)


def test_trainer_loss_is_weighted_sum_of_terms(llm_folder, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_folder)
    trainer = RRHFTrainer(model=model, args=rrhf_args(tmp_path, rank_loss_weight=2.0, ce_loss_weight=0.5),
                          processing_class=tokenizer)
    batch = RRHFCollator(tokenizer)(ROWS)
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        # independent check: a plain forward over all six rows, then the pure functions
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = length_normalised_logps(logits, batch["labels"]).view(2, 3)
    rank = rrhf_loss(logps, batch["rewards"], batch["candidate_mask"])
    # best candidates: reward 0.9 (row 1) and 1.0 (row 3); CE is each one's token mean, then the mean of the two
    ce = sum(torch.nn.functional.cross_entropy(logits[row, :-1], batch["labels"][row, 1:]) for row in (1, 3)) / 2
    assert loss.item() == pytest.approx((2.0 * rank + 0.5 * ce).item(), rel=1e-5)
    assert trainer._metric_sums["eval"]["ranking_accuracy"][1] == 3 + 1  # ordered pairs: 3 in prompt 1, 1 in 2


def test_loss_of_a_batch_is_the_mean_of_its_halves(llm_folder, tokenizer, tmp_path):
    # what data parallelism and gradient accumulation rely on: two processes (or two micro-batches) of one prompt
    # each, averaged, give the loss and gradients of the two-prompt batch, also when the responses differ in length
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_folder)
    trainer = RRHFTrainer(model=model, args=rrhf_args(tmp_path), processing_class=tokenizer)
    collator = RRHFCollator(tokenizer)
    rows = [ROWS[0], {**ROWS[1], "candidates": [api_call("CastleMix v3 ultra detailed edition"), api_call("CarMix")]}]
    both, first, second = collator(rows), collator(rows[:1]), collator(rows[1:])
    assert (both["labels"][1] != -100).sum() != (both["labels"][3] != -100).sum()  # best responses' lengths differ
    model.eval()

    def loss_and_grads(batch):
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    whole, whole_grads = loss_and_grads(both)
    (a, grads_a), (b, grads_b) = loss_and_grads(first), loss_and_grads(second)
    assert whole == pytest.approx((a + b) / 2, rel=1e-5)
    for g, ga, gb in zip(whole_grads, grads_a, grads_b):
        torch.testing.assert_close(g, (ga + gb) / 2, rtol=1e-4, atol=1e-7)


def test_toy_reward_run_prefers_the_rewarded_model(llm_folder, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = [f"a {style} of a {subject}" for style in ("photo", "watercolor")
               for subject in ("cat", "castle")]
    rows = [{"prompt": prompt, "candidates": [api_call("AlphaMix", steps), api_call("BetaMix", steps)],
             "rewards": [1.0, 0.0]} for steps, prompt in enumerate(prompts, start=20)]
    collator = RRHFCollator(tokenizer)
    batch = collator(rows)

    def alpha_minus_beta(model) -> float:
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = length_normalised_logps(logits, batch["labels"]).view(-1, 2)
        return (logps[:, 0] - logps[:, 1]).mean().item()

    model = AutoModelForCausalLM.from_pretrained(llm_folder)
    gap_before = alpha_minus_beta(model)
    trainer = RRHFTrainer(model=model, args=rrhf_args(tmp_path, per_device_train_batch_size=4, max_steps=30,
                                                      learning_rate=1e-3, logging_steps=10),
                          train_dataset=build_rrhf_dataset(rows), processing_class=tokenizer)
    trainer.train()
    gap_after = alpha_minus_beta(model)
    assert gap_after > gap_before + 0.05, (gap_before, gap_after)
    assert trainer.state.log_history[-2]["ranking_accuracy"] == 1.0


def test_trainer_with_lora_changes_only_the_adapter(llm_folder, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llm_folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    # two steps: lora_B starts at zero, so lora_A first gets a gradient on the second step
    trainer = RRHFTrainer(model=model, args=rrhf_args(tmp_path, max_steps=2),
                          train_dataset=build_rrhf_dataset(THREE_CANDIDATE_ROWS), processing_class=tokenizer)
    trainer.train()
    changed = {name for name, param in model.named_parameters() if not torch.equal(param.detach(), before[name])}
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert changed == trainable


def test_train_agent_with_lora_saves_a_merged_model_that_differs_only_where_adapters_were(llm_folder, tokenizer,
                                                                                           tmp_path):
    from transformers import AutoModelForCausalLM

    from helpers.rrhf import train_agent

    base = AutoModelForCausalLM.from_pretrained(llm_folder)
    before = {name: param.detach().clone() for name, param in base.named_parameters()}
    counts = train_agent(base, tokenizer, build_rrhf_dataset(THREE_CANDIDATE_ROWS), tmp_path / "model", max_steps=2,
                         per_device_train_batch_size=2, learning_rate=1e-2, report_to="none", save_strategy="no",
                         use_cpu=True, disable_tqdm=True, use_lora=True, lora_r=4, lora_alpha=8,
                         lora_target_modules=["q_proj", "v_proj"])
    assert counts["steps"] == 2 and 0 <= counts["ranking_accuracy_after"] <= 1
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # a plain model: the adapters were merged
    changed = {name for name, param in saved.named_parameters() if not torch.equal(param, before[name])}
    assert changed and all(("q_proj" in name or "v_proj" in name) for name in changed)
    assert (tmp_path / "model" / "log_history.json").is_file()


def test_train_agent_with_lora_gives_the_same_model_whatever_ran_before(llm_folder, tokenizer, tmp_path):
    """The adapters' initial weights come from the config's seed, not from the process's random state (which
    depends on, e.g., whether the candidates' images were drawn or found in a cache)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from helpers.rrhf import train_agent

    saved = []
    for run, earlier_draws in enumerate((0, 7)):
        torch.manual_seed(123)
        torch.rand(earlier_draws)
        train_agent(AutoModelForCausalLM.from_pretrained(llm_folder), tokenizer,
                    build_rrhf_dataset(THREE_CANDIDATE_ROWS), tmp_path / f"model{run}", max_steps=2,
                    per_device_train_batch_size=2, learning_rate=1e-2, report_to="none", save_strategy="no",
                    use_cpu=True, disable_tqdm=True, use_lora=True, lora_r=4, lora_alpha=8, seed=0,
                    lora_target_modules=["q_proj", "v_proj"])
        saved.append(load_file(tmp_path / f"model{run}" / "model.safetensors"))
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][name], saved[1][name]) for name in saved[0])


def test_train_agent_resumes_from_its_last_checkpoint_and_ends_where_an_unbroken_run_ends(llm_folder, tokenizer,
                                                                                           tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from helpers.rrhf import RRHFTrainer, train_agent

    settings = dict(max_steps=4, per_device_train_batch_size=1, per_device_eval_batch_size=2, learning_rate=1e-2,
                    lr_scheduler_type="cosine", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                    logging_steps=1)
    dataset = build_rrhf_dataset(THREE_CANDIDATE_ROWS)
    whole = train_agent(AutoModelForCausalLM.from_pretrained(llm_folder), tokenizer, dataset, tmp_path / "whole",
                        save_strategy="no", **settings)

    stopped = dict(save_strategy="steps", save_steps=2, **settings)
    kill_after_checkpoint(monkeypatch, RRHFTrainer, 2)
    with pytest.raises(Killed):
        train_agent(AutoModelForCausalLM.from_pretrained(llm_folder), tokenizer, dataset, tmp_path / "model", **stopped)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "model" / "checkpoint-2").is_dir()
    trained_steps = steps_run(monkeypatch, RRHFTrainer)
    resumed = train_agent(AutoModelForCausalLM.from_pretrained(llm_folder), tokenizer, dataset, tmp_path / "model",
                          **stopped)
    assert trained_steps == [2, 3]  # only steps 3 and 4 ran: it went on from the checkpoint
    assert resumed["steps"] == whole["steps"] == 4
    assert resumed["last_loss"] == pytest.approx(whole["last_loss"], rel=1e-5)
    # the accuracy before training is the untrained model's (evaluated at step 0), carried over in the checkpoint's log
    for name in ("ranking_accuracy_before", "ranking_accuracy_after"):
        assert resumed[name] == pytest.approx(whole[name]), name
    for run in ("whole", "model"):
        history = json.loads((tmp_path / run / "log_history.json").read_text())
        assert next(row for row in history if "eval_ranking_accuracy" in row)["step"] == 0
    logged = [row["step"] for row in json.loads((tmp_path / "model" / "log_history.json").read_text()) if "loss" in row]
    assert logged == [1, 2, 3, 4]  # the resumed run carries the first two steps' log lines over
    ended, unbroken = load_file(tmp_path / "model" / "model.safetensors"), load_file(tmp_path / "whole" /
                                                                                      "model.safetensors")
    for name, tensor in unbroken.items():
        torch.testing.assert_close(ended[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_micro_batches_train_the_same_steps_as_the_whole_batch(llm_folder, tokenizer, tmp_path):
    """4 prompts a step as 2 passes of 2 (notebook 07's micro_batch_size): the same losses and weight updates as 4
    at once. Plain SGD without clipping, so the weights move by the gradient itself: a wrongly scaled one shows."""
    from transformers import AutoModelForCausalLM

    from helpers.sft import micro_batches

    before = AutoModelForCausalLM.from_pretrained(llm_folder).state_dict()
    losses, updates = [], []
    for micro in (0, 2):
        model = AutoModelForCausalLM.from_pretrained(llm_folder)
        args = rrhf_args(tmp_path / str(micro), max_steps=2, optim="sgd", max_grad_norm=0.0,
                         **micro_batches(4, micro))
        trainer = RRHFTrainer(model=model, args=args, train_dataset=build_rrhf_dataset(THREE_CANDIDATE_ROWS),
                              processing_class=tokenizer)
        trainer.train()
        losses.append([row["loss"] for row in trainer.state.log_history if "loss" in row])
        updates.append({name: tensor - before[name] for name, tensor in model.state_dict().items()})
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    for name, whole in updates[0].items():
        assert whole.norm() > 0 and (updates[1][name] - whole).norm() / whole.norm() < 1e-2, name
