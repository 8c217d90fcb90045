"""One process of `accelerate launch --config_file configs/accelerate/fsdp.yaml`: the tiny agent's SFT as notebook 06
sets it up on a GPU (bf16, the recipe's gradient checkpointing), saved whole by the main process.

Usage: fsdp_worker.py OUT LLM_FOLDER lora|full. Writes OUT/agent/ and OUT/result.json (the SFT counts, and what the
Trainer ran with: FSDP or not, the model's own checkpointing, the weights' dtypes)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import Trainer

from helpers import distributed, sft

out, llm, lora = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "lora"
seen: dict = {}
train = Trainer.train


def record(trainer, *args, **kwargs):
    seen.update(fsdp=bool(trainer.is_fsdp_enabled), model_checkpointing=bool(trainer.args.activation_checkpointing),
                dtypes=sorted({str(p.dtype) for p in trainer.model.parameters()}))
    return train(trainer, *args, **kwargs)


Trainer.train = record
records = [{"split": "train", "instruction": {"prompt": f"a {animal} at dawn", "negative_prompt": ""},
            "api": {"model": "AlphaMix", "type": "Checkpoint", "base_model": "SD 1.5", "width": 512, "height": 512,
                    "sampling_method": "Euler a", "sampling_steps": 20 + i, "cfg_scale": 7.0}}
           for i, animal in enumerate(["fox", "owl", "hare", "wolf"])]
config = sft.AgentSFTConfig(output_dir=str(out / "trainer"), max_steps=2, per_device_train_batch_size=2,
                            learning_rate=1e-2, report_to="none", save_strategy="no", logging_steps=1,
                            disable_tqdm=True, seed=0, bf16=torch.cuda.is_available(), max_length=256,
                            gradient_checkpointing=True, use_lora=lora, lora_r=4,
                            lora_target_modules=["q_proj", "v_proj"])
dtype = sft.training_base_dtype(SimpleNamespace(dtype=torch.bfloat16), lora)
result = sft.train(llm, sft.sft_dataset(records), config, out / "agent", base_dtype=dtype)
if distributed.is_main_process():
    (out / "result.json").write_text(json.dumps({**result, **seen, "base_dtype": str(dtype)}))
