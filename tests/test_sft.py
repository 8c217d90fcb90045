import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import Killed, kill_after_checkpoint, said, steps_run

from helpers import models, sft

RECORDS = [{"split": "train", "instruction": {"prompt": f"a {animal} in the snow", "negative_prompt": ""},
            "api": {"model": "AlphaMix", "type": "Checkpoint", "base_model": "SD 1.5", "width": 512, "height": 768,
                    "sampling_method": "Euler a", "sampling_steps": 20 + i, "cfg_scale": 7.0,
                    "model_description": "long text the agent does not write"}}
           for i, animal in enumerate(["fox", "cat", "owl", "hare", "wolf", "deer", "lynx", "seal"])]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llm")
    models.build_tiny_llama(folder, seed=0)
    return str(folder)


ADAPTED = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")  # LoRA's default targets


def _config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=4,
                    learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1,
                    max_length=256, disable_tqdm=True, seed=0)
    return sft.AgentSFTConfig(**{**settings, **overrides})


def test_examples_hold_the_prompt_and_the_answer_without_the_description():
    example = sft.to_example(RECORDS[0])
    assert example["prompt"][-1] == {"role": "user", "content": "a fox in the snow"}
    answer = json.loads(example["completion"][0]["content"])
    assert list(answer) == list(sft.ANSWER_FIELDS) and answer["sampling_steps"] == 20
    with pytest.raises(ValueError, match="no 'align' records"):
        sft.sft_dataset(RECORDS, "align")


def test_sft_updates_every_parameter_and_saves_a_loadable_agent(llm, tmp_path):
    before = {k: v.clone() for k, v in models.load_causal_lm(llm)[0].state_dict().items()}
    result = sft.train(llm, sft.sft_dataset(RECORDS), _config(tmp_path), tmp_path / "agent")
    assert result["steps"] == 3 and math.isfinite(result["last_loss"])
    trained, tokenizer = models.load_causal_lm(str(tmp_path / "agent"))
    unchanged = [k for k, v in trained.state_dict().items() if torch.equal(v, before[k])]
    assert unchanged == []
    assert (tmp_path / "agent" / "README.md").read_text().startswith("---")
    assert tokenizer.chat_template == models.CHAT_TEMPLATE


def test_loss_is_on_the_answer_only(llm, tmp_path):
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(llm)
    trainer = SFTTrainer(model=llm, args=_config(tmp_path), train_dataset=sft.sft_dataset(RECORDS[:1]),
                         processing_class=tokenizer)
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    trained_on = batch["input_ids"][0][batch["labels"][0] != -100]
    # the answer, its end-of-turn token and the newline the chat template puts after every turn
    assert tokenizer.decode(trained_on) == sft.answer_text(RECORDS[0]["api"]) + "<|im_end|>\n"


def test_a_stopped_run_resumes_from_its_checkpoint_and_a_changed_one_starts_over(llm, tmp_path, monkeypatch,
                                                                                  capsys):
    from safetensors.torch import load_file
    from transformers import Trainer

    dataset = sft.sft_dataset(RECORDS)
    sft.train(llm, dataset, _config(tmp_path / "whole", max_steps=4, per_device_train_batch_size=2),
              tmp_path / "whole" / "agent")

    saving = _config(tmp_path, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
    kill_after_checkpoint(monkeypatch, Trainer, 2)
    with pytest.raises(Killed):
        sft.train(llm, dataset, saving, tmp_path / "agent")
    monkeypatch.undo()
    ran = steps_run(monkeypatch, Trainer)
    assert sft.train(llm, dataset, saving, tmp_path / "agent")["steps"] == 4
    assert ran == [2, 3]  # went on from the step-2 checkpoint
    ended, unbroken = (load_file(folder / "agent" / "model.safetensors") for folder in (tmp_path, tmp_path / "whole"))
    for name, tensor in unbroken.items():
        torch.testing.assert_close(ended[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # another learning rate: the old checkpoints are not continued
    ran.clear()
    changed = _config(tmp_path, max_steps=4, per_device_train_batch_size=2, save_strategy="steps", save_steps=2,
                      learning_rate=5e-3)
    sft.train(llm, dataset, changed, tmp_path / "agent")
    assert ran == [0, 1, 2, 3] and "resume points of other training" in said(capsys.readouterr().out)


def test_lora_trains_adapters_and_merges_them(llm, tmp_path):
    base = models.load_causal_lm(llm)[0].state_dict()
    sft.train(llm, sft.sft_dataset(RECORDS), _config(tmp_path, use_lora=True, lora_r=4), tmp_path / "agent")
    merged = models.load_causal_lm(str(tmp_path / "agent"))[0].state_dict()
    assert not any("lora" in k for k in merged)
    changed = {k for k, v in merged.items() if not torch.equal(v, base[k])}
    assert changed and all(k.endswith(ADAPTED) for k in changed)


def test_lora_under_fsdp_starts_over_rather_than_resume_from_checkpoints_without_adapters(tmp_path, monkeypatch,
                                                                                          capsys):
    """Under FSDP the Trainer's checkpoints of a LoRA run hold no adapter weights (peft 0.21): resuming would restart
    the adapters at zero under the later step's optimizer, so the run starts over and says why; the checkpoints
    are left for the user."""
    config = _config(tmp_path, use_lora=True, lora_r=4, save_strategy="steps", save_steps=1)
    left = Path(config.output_dir) / "checkpoint-1"
    left.mkdir(parents=True)
    (left / "pytorch_model_fsdp.bin").write_bytes(b"")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sft.trainer_resume_point(config, sft.sft_dataset(RECORDS)) is None
    assert left.is_dir() and "LoRA under an FSDP launch does not resume" in said(capsys.readouterr().out)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")  # the same run outside FSDP treats it as another run's checkpoint
    assert sft.trainer_resume_point(config, sft.sft_dataset(RECORDS)) is None and not left.exists()


def test_bad_lora_rank_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lora_r=0"):
        _config(tmp_path, use_lora=True, lora_r=0)


@pytest.mark.parametrize("use_lora", [False, True])
def test_the_gathered_weights_save_the_same_agent_as_the_in_memory_one(llm, tmp_path, use_lora):
    """The FSDP branch of `save_trained`: the whole weights the main process gathers (`Accelerator.get_state_dict`,
    keyed as the PEFT model names them) merge and save to the same weights as the one-process path writes from
    memory, and LoRA's trained adapters reach them (an adapter left at its zero start would save the base)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    config = _config(tmp_path, max_steps=1, use_lora=use_lora, lora_r=4)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(llm), args=config,
                         train_dataset=sft.sft_dataset(RECORDS), processing_class=tokenizer,
                         peft_config=config.peft_config())
    trainer.train()
    state = trainer.accelerator.get_state_dict(trainer.model)
    assert any(".lora_B." in name for name in state) == use_lora
    sft.save_full_state_dict(state, trainer.accelerator.unwrap_model(trainer.model), tmp_path / "from_gathered",
                             tokenizer, use_lora)
    sft.save_trained(trainer, tokenizer, tmp_path / "from_memory", use_lora)
    one, other = (load_file(tmp_path / name / "model.safetensors") for name in ("from_gathered", "from_memory"))
    assert sorted(one) == sorted(other) and not any("lora" in name for name in one)
    for name in one:
        assert torch.equal(one[name], other[name]), name
    base = load_file(Path(llm) / "model.safetensors")
    changed = [name for name in one if not torch.equal(one[name], base[name].float())]
    assert changed and (all(name.endswith(ADAPTED) for name in changed) if use_lora else len(changed) > 2)
    assert AutoTokenizer.from_pretrained(tmp_path / "from_gathered").chat_template == models.CHAT_TEMPLATE


def test_gathered_lora_weights_under_other_names_stop_the_save(llm, tmp_path):
    """A gathered adapter under a name the fresh PEFT model does not use (an FSDP wrapper's prefix left in) stops the
    save, where a lenient load would leave that adapter at zero and write the untrained base as the agent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import get_peft_model

    config = _config(tmp_path, use_lora=True, lora_r=4)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llm), config.peft_config())
    state = {name.replace("layers.0.", "layers.0._fsdp_wrapped_module."): value
             for name, value in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="_fsdp_wrapped_module"):
        sft.save_full_state_dict(state, model, tmp_path / "agent", AutoTokenizer.from_pretrained(llm), True)
    assert not (tmp_path / "agent" / "model.safetensors").exists()


def test_a_cpu_launch_of_several_processes_trains_data_parallel(monkeypatch):
    from types import SimpleNamespace

    from helpers import distributed

    args = SimpleNamespace(use_cpu=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    sft.launch_device_default(args)
    assert args.use_cpu is False  # one process: nothing to decide
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    sft.launch_device_default(args)
    assert args.use_cpu is False and not distributed.cpu_launch()  # GPUs: accelerate picks DDP over NCCL itself
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    sft.launch_device_default(args)
    assert args.use_cpu is True and distributed.cpu_launch()


def test_under_the_fsdp_recipe_fsdp_checkpoints_the_layers_and_the_model_does_not(monkeypatch, tmp_path):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` (its environment made here by accelerate's own
    launch code) turns on FSDP's activation checkpointing; the paper recipe's SFT and RRHF ask for the model's
    gradient checkpointing too, which the Trainer refuses beside FSDP's. The configs leave it to FSDP, the memory
    hint still counts the layers as checkpointed, and the trained model is loaded in one dtype (fp32)."""
    from types import SimpleNamespace

    import yaml
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from helpers import distributed, speed
    from helpers.rrhf import RRHFConfig

    root = Path(__file__).resolve().parents[1]
    parsed = launch_command_parser().parse_args(["--config_file", str(root / "configs/accelerate/fsdp.yaml"),
                                                 "-m", "helpers.cli", "run"])
    for name, value in prepare_multi_gpu_env(_validate_launch_command(parsed)[0]).items():
        if name.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(name, value)
    assert distributed.fsdp_launch() and distributed.fsdp_checkpoints_activations()
    # what accelerate's FSDP plugin reads (it needs a GPU to be built)
    fsdp_checkpoints = os.environ["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    assert fsdp_checkpoints
    recipe = yaml.safe_load((root / "configs/paper.yaml").read_text())["notebooks"]
    assert recipe["06_sft"]["gradient_checkpointing"] and recipe["07_rrhf"]["gradient_checkpointing"]
    hints = []
    monkeypatch.setattr(speed, "training_memory_hint", lambda *args: hints.append(args[-1]))
    for config in (_config(tmp_path, gradient_checkpointing=True),
                   RRHFConfig(output_dir=str(tmp_path / "rrhf"), gradient_checkpointing=True, report_to="none"),
                   sft.ProjectTrainingArguments(output_dir=str(tmp_path / "vlm"), gradient_checkpointing=True,
                                                report_to="none")):  # ChatGen's image-text SFT
        # transformers' Trainer.__init__ raises when both are on
        assert not (fsdp_checkpoints and config.activation_checkpointing)
        assert not config.gradient_checkpointing
        sft.memory_hint_for("SFT", config)
    assert hints == [True, True, True]
    assert sft.training_base_dtype(SimpleNamespace(dtype=torch.bfloat16), use_lora=True) == torch.float32
    monkeypatch.delenv("FSDP_ACTIVATION_CHECKPOINTING")  # a config without it: the model checkpoints, as asked
    assert _config(tmp_path, gradient_checkpointing=True).activation_checkpointing


def test_micro_batches_split_the_step_into_accumulated_passes_or_name_a_divisor():
    assert sft.micro_batches(16) == {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1}
    assert sft.micro_batches(16, 4) == {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 4}
    with pytest.raises(ValueError,
                       match=r"sft_micro_batch_size=3 must divide sft_batch_size=8 \(one of \[1, 2, 4, 8\]"):
        sft.micro_batches(8, 3, names=("sft_batch_size", "sft_micro_batch_size"))


def test_micro_batches_train_the_same_steps_as_the_whole_batch(llm, tmp_path):
    """Batch 4 as 2 passes of 2: the same losses and weights as 4 at once, so a smaller GPU runs the recipe's
    optimizer steps unchanged (TRL normalises the token loss over the whole step). Plain SGD without clipping, so
    the weights move by the gradient itself: a wrongly scaled one (2x) would show."""
    losses, weights = [], []
    for micro in (0, 2):
        config = _config(tmp_path / str(micro), max_steps=2, optim="sgd", max_grad_norm=0.0,
                         **sft.micro_batches(4, micro))
        sft.train(llm, sft.sft_dataset(RECORDS), config, tmp_path / f"agent{micro}")
        losses.append([row["loss"] for row in json.loads((tmp_path / f"agent{micro}" / "log_history.json").read_text())
                       if "loss" in row])
        weights.append(models.load_causal_lm(str(tmp_path / f"agent{micro}"))[0].state_dict())
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    before = models.load_causal_lm(llm)[0].state_dict()
    for name, tensor in weights[0].items():  # each tensor's update, the same within float summation order
        whole, split = tensor - before[name], weights[1][name] - before[name]
        assert whole.norm() > 0 and (split - whole).norm() / whole.norm() < 1e-2, name


def test_sft_that_runs_out_of_gpu_memory_names_the_recipe_setting_to_change(llm, tmp_path, monkeypatch):
    from transformers import Trainer

    def out_of_memory(self, model, inputs, num_items_in_batch=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(Trainer, "training_step", out_of_memory)
    config = _config(tmp_path, **sft.micro_batches(4, 2))
    with pytest.raises(torch.OutOfMemoryError, match=r"SFT ran out of GPU memory with 2 examples per forward pass "
                                                     r"\(2 passes per optimizer step\): give the notebook 1 "
                                                     r"example per pass"):
        sft.train(llm, sft.sft_dataset(RECORDS), config, tmp_path / "agent")
