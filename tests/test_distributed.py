"""Two CPU processes (gloo, started by torchrun as `accelerate launch` would) give the one-process result:
an SFT step, a Diffusion-DPO step, sharded image drawing, scoring, API-call decoding and RRHF candidates."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import distributed, models

WORKER = Path(__file__).with_name("multiprocess_worker.py")


def test_shards_interleave_and_merge_back_in_order():
    items = list("abcdefg")
    shards = [[items[i] for i in distributed.shard_indices(len(items), rank, 3)] for rank in range(3)]
    assert shards == [["a", "d", "g"], ["b", "e"], ["c", "f"]]
    assert distributed.merge_shards(shards, len(items)) == items
    with pytest.raises(ValueError, match="returned 1 results for 2 items"):
        distributed.merge_shards([["a", "d", "g"], ["b"], ["c", "f"]], len(items))
    with pytest.raises(ValueError, match="rank=3"):
        distributed.shard_indices(5, 3, 3)


def test_one_process_map_sharded_is_a_plain_call(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world() == (0, 1)
    assert distributed.map_sharded(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]


def test_accelerate_recipes_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    recipes = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {path.stem: str(load_config_from_file(str(path)).distributed_type) for path in recipes.glob("*.yaml")}
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "fsdp": "DistributedType.FSDP"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], book_root: Path) -> None:
    env = {**os.environ, "T2IBOOK_ROOT": str(book_root), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_two_processes_match_one(book_root, tmp_path):
    llm = tmp_path / "llm"
    models.build_tiny_llama(llm, seed=0)
    out = tmp_path / "out"
    _run([sys.executable, str(WORKER), str(out), str(llm)], book_root)  # also builds the tiny models once
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(WORKER), str(out), str(llm)], book_root)

    one, two = (json.loads((out / f"world{n}" / "result.json").read_text()) for n in (1, 2))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # the SFT step: the same loss and the same weights, whether the batch of 8 ran on one process or on two
    assert two["sft"]["steps"] == one["sft"]["steps"] == 1
    assert two["sft"]["first_loss"] == pytest.approx(one["sft"]["first_loss"], rel=1e-5)
    alone, split = (load_file(out / f"world{n}" / "sft" / "model.safetensors") for n in (1, 2))
    before = load_file(llm / "model.safetensors")
    assert any(not torch.equal(before[name], alone[name]) for name in alone)  # the step did change the weights
    for name in alone:
        torch.testing.assert_close(split[name], alone[name], rtol=1e-5, atol=1e-6, msg=name)
    # Diffusion-DPO under DDP: each process takes half the pairs, the averaged gradient gives the same step
    # (log 2 up to rounding on both: β/2 = 2500 magnifies 1-ulp kernel differences into ~1e-4 of loss)
    assert two["dpo_log"][0]["loss"] == pytest.approx(one["dpo_log"][0]["loss"], abs=1e-3)
    dpo_alone, dpo_split = (load_file(out / f"world{n}" / "dpo_unet.safetensors") for n in (1, 2))
    unet_before = load_file(Path(one["dpo_base"]) / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((unet_before[name] - dpo_alone[name]).abs().max() for name in dpo_alone) > 1e-4  # it moved
    for name in dpo_alone:
        torch.testing.assert_close(dpo_split[name], dpo_alone[name], rtol=1e-5, atol=1e-6, msg=name)
    # sharded generation, scoring and decoding: the merged results equal the one-process ones
    assert two["keys"] == one["keys"]
    np.testing.assert_array_equal(np.load(out / "world2" / "images.npy"), np.load(out / "world1" / "images.npy"))
    assert two["clip"] == pytest.approx(one["clip"], abs=1e-5)
    assert two["texts"] == one["texts"]
    assert two["proposals"] == one["proposals"] and all(len(c) == 4 for c in one["proposals"])
    shares = [int((out / f"drawn_world2_rank{rank}.txt").read_text()) for rank in (0, 1)]
    assert shares == [3, 2] and one["drawn_here"] == 5  # each process drew its own share, nothing twice
