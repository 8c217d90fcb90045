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

from chat_servers import echo_server  # noqa: F401  (a fixture)

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
    # in runs of a batch: process 0 gets batches 0 and 2, process 1 batch 1, each as one process would batch it
    assert [distributed.shard_indices(7, rank, 2, chunk=3) for rank in (0, 1)] == [[0, 1, 2, 6], [3, 4, 5]]
    assert distributed.merge_shards([["a", "b", "c", "g"], ["d", "e", "f"]], 7, chunk=3) == items


def test_balanced_runs_split_consecutive_items_so_the_costliest_run_is_as_cheap_as_it_can_be():
    # by hand: costs 4 1 1 1 1 4 on 2 processes; 4+1+1 | 1+1+4 (6 each) beats any other cut (4+1+1+1 = 7 ...)
    assert distributed.balanced_runs([4, 1, 1, 1, 1, 4], 2) == [[0, 1, 2], [3, 4, 5]]
    # 3 processes: 4 | 1 1 1 1 | 4 (the middle run costs 4 too); a fourth process gets nothing
    assert distributed.balanced_runs([4, 1, 1, 1, 1, 4], 3) == [[0], [1, 2, 3, 4], [5]]
    assert distributed.balanced_runs([4, 1, 1, 1, 1, 4], 4)[3] == []
    # equal costs, as many items as processes: one each; no items: nothing for anyone
    assert distributed.balanced_runs([2.5, 2.5], 2) == [[0], [1]]
    assert distributed.balanced_runs([], 2) == [[], []]
    # every position exactly once, in order, and no run above the best possible largest run
    costs = [7, 3, 9, 1, 1, 6, 2, 8, 5, 4]
    runs = distributed.balanced_runs(costs, 3)
    assert [p for run in runs for p in run] == list(range(len(costs)))
    every_cut = [max(sum(costs[:i]), sum(costs[i:j]), sum(costs[j:])) for i in range(11) for j in range(i, 11)]
    assert max(sum(costs[p] for p in run) for run in runs) == min(every_cut) == 19
    with pytest.raises(ValueError, match="must not be negative"):
        distributed.balanced_runs([1, -1], 2)


def test_one_process_map_sharded_is_a_plain_call(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world() == (0, 1)
    assert distributed.map_sharded(lambda xs: [x * 2 for x in xs], [1, 2, 3]) == [2, 4, 6]


def test_the_process_group_is_started_with_the_trainers_timeout_not_nccls(monkeypatch):
    import accelerate
    import torch.distributed as dist
    from transformers import TrainingArguments

    started = []

    class Recording:  # accelerate's PartialState, as far as world() uses it
        def __init__(self, **kwargs):
            started.append(kwargs)
            self.process_index, self.num_processes = 1, 2

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(accelerate, "PartialState", Recording)
    assert distributed.world() == (1, 2)
    trainers = TrainingArguments(output_dir="unused").ddp_timeout_delta
    assert started == [{"cpu": not torch.cuda.is_available(), "timeout": trainers}] and trainers.total_seconds() == 1800


def test_the_main_process_computing_alone_takes_the_cores_the_waiting_processes_leave(monkeypatch):
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as `accelerate launch` starts each process: OMP_NUM_THREADS=1
        blas = blas_threads()
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        with distributed.main_alone_threads() as threads:  # run plainly: the threads it was given
            assert threads == torch.get_num_threads() == 1 and blas_threads() == blas
        # two processes on a 6-core machine: the waiting one may spin a core, the main one takes the other 5
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
        with distributed.main_alone_threads() as threads:
            assert threads == torch.get_num_threads() == 5
            assert blas_threads() == {5}  # numpy's BLAS too, which read OMP_NUM_THREADS when it loaded
        assert torch.get_num_threads() == 1 and blas_threads() == blas  # set back after
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 processes on 6 cores: nothing left over, nothing changed
        with distributed.main_alone_threads() as threads:
            assert threads == torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_stage_inside_one_processs_share_is_refused(tiny_ctx, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "_sharding_depth", 1)
    with pytest.raises(RuntimeError, match="inside one process's share"):
        tiny_ctx.stage("inside_a_shard").run(lambda folder: {})
    with pytest.raises(RuntimeError, match="build what the shard needs"):
        monkeypatch.setattr(distributed, "world", lambda: (0, 2))
        distributed.barrier()


def test_accelerate_recipes_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    recipes = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    kinds = {path.stem: str(load_config_from_file(str(path)).distributed_type) for path in recipes.glob("*.yaml")}
    assert kinds == {"ddp": "DistributedType.MULTI_GPU", "fsdp": "DistributedType.FSDP"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str], book_root: Path, timeout: int = 600) -> None:
    env = {**os.environ, "T2IBOOK_ROOT": str(book_root), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def test_two_processes_ask_a_hosted_llm_each_question_once(book_root, tmp_path, echo_server):
    """Every process runs every stage under a launch: the endpoint's requests are split between them (a paid
    request is made once, not once per GPU), every process gets every reply, and each reply is cached once."""
    url, state = echo_server
    out = tmp_path / "out"
    out.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(Path(__file__).with_name("textgen_worker.py")), url, str(out)],
         book_root)
    results = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    words = [f"word{i}" for i in range(6)]
    assert sorted(state["asked"]) == sorted(words + ["word9"])  # six, then only the new one: seven requests
    for result in results:
        assert result["world_size"] == 2 and result["replies"] == [word.upper() for word in words]
        assert result["again"] == ["WORD0", "WORD1", "WORD9"]
    assert sorted(r["requests"] for r in results) == [3, 4]  # 3 + 3 of the six, then the new one on one process
    cached = [json.loads(line)["reply"] for line in (out / "replies.jsonl").read_text().splitlines()]
    assert sorted(cached) == sorted(word.upper() for word in words + ["word9"])


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
def test_the_fsdp_recipe_trains_and_saves_a_whole_agent(book_root, tmp_path, lora):
    """`accelerate launch --config_file configs/accelerate/fsdp.yaml` (one GPU process here; FSDP needs GPUs) runs
    notebook 06's SFT: FSDP shards the model, its layer checkpointing stands in for the model's own, every weight is
    fp32 (FSDP flattens one dtype per layer), and the main process saves the gathered agent, LoRA merged."""
    models.build_tiny_llama(tmp_path / "llm", seed=0)
    out = tmp_path / "out"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    _run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(recipe),
          "--num_processes", "1", "--main_process_port", str(_free_port()),
          str(Path(__file__).with_name("fsdp_worker.py")), str(out), str(tmp_path / "llm"), "lora" if lora else "full"],
         book_root, timeout=150)  # a tiny model's two steps: a launch that hangs (NCCL) leaves the GPU check time
    result = json.loads((out / "result.json").read_text())
    assert result["fsdp"] and not result["model_checkpointing"] and result["dtypes"] == ["torch.float32"]
    assert result["steps"] == 2 and np.isfinite([result["first_loss"], result["last_loss"]]).all()
    base, saved = load_file(tmp_path / "llm" / "model.safetensors"), load_file(out / "agent" / "model.safetensors")
    assert saved.keys() == base.keys()  # whole, adapters merged
    changed = [name for name in saved if not torch.equal(saved[name].float(), base[name].float())]
    assert changed and (all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed) if lora
                        else len(changed) > 2)


LEAVER = """
import atexit, json, os, sys
from pathlib import Path

import torch.distributed as dist

from helpers import config, distributed

out, how = Path(sys.argv[1]), sys.argv[2]


def report():  # registered first, so it runs last: after the handler helpers registers
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps({"in_group_at_exit": dist.is_initialized()}))


atexit.register(report)
if how == "setup":  # a notebook: config.setup, then a Trainer starts the group without asking helpers
    config.setup("tiny", quiet=True)
    dist.init_process_group("gloo")
    assert dist.is_initialized()
else:  # a script that only asks for its share
    assert distributed.world()[1] == 2
dist.barrier()
"""


@pytest.mark.parametrize("how", ["setup", "world"])
def test_a_launched_process_leaves_its_process_group_as_it_exits(book_root, tmp_path, how):
    """A process that exits still in its group can abort at exit as gloo's threads go; whether the group came from
    helpers.distributed or from a Trainer after `config.setup`, the process leaves it before it exits."""
    script, out = tmp_path / "leaver.py", tmp_path / "out"
    script.write_text(LEAVER)
    out.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(script), str(out), how], book_root)
    assert [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [{"in_group_at_exit": False}] * 2


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
    # and with LoRA and gradient checkpointing, as the paper recipe trains SFT and RRHF: only the adapted weights
    # moved, as on one process
    for trained in ("sft_lora", "rrhf"):
        assert two[trained]["first_loss"] == pytest.approx(one[trained]["first_loss"], rel=1e-5), trained
        alone, split = (load_file(out / f"world{n}" / trained / "model.safetensors") for n in (1, 2))
        changed = [name for name in alone if not torch.equal(before[name], alone[name])]
        assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), trained
        for name in alone:
            torch.testing.assert_close(split[name], alone[name], rtol=1e-5, atol=1e-6, msg=f"{trained} {name}")
    # ChatGen's image-text SFT: the Trainer's loss over the reply tokens of all 4 chats, split 2 + 2
    assert two["vlm_sft"]["first_loss"] == pytest.approx(one["vlm_sft"]["first_loss"], rel=1e-5)
    alone, split = (load_file(out / f"world{n}" / "vlm_sft" / "model.safetensors") for n in (1, 2))
    vlm_before = load_file(out / "vlm" / "model.safetensors")
    assert any(not torch.equal(vlm_before[name], alone[name]) for name in alone if name in vlm_before)
    for name in alone:
        torch.testing.assert_close(split[name], alone[name], rtol=1e-5, atol=1e-6, msg=f"vlm_sft {name}")
    # Diffusion-DPO under DDP: each process takes half of each micro-batch, gradients are all-reduced only in the
    # last of the two accumulated micro-batches, and the averaged gradient gives the same step (the worker's β is
    # small, so that rounding is not magnified: see there)
    assert two["dpo_log"][0]["loss"] == pytest.approx(one["dpo_log"][0]["loss"], rel=1e-5)
    assert two["dpo_synced_in"] == [2] and one["dpo_synced_in"] == []
    dpo_alone, dpo_split = (load_file(out / f"world{n}" / "dpo_unet.safetensors") for n in (1, 2))
    unet_before = load_file(Path(one["dpo_base"]) / "unet" / "diffusion_pytorch_model.safetensors")
    assert max((unet_before[name] - dpo_alone[name]).abs().max() for name in dpo_alone) > 1e-4  # it moved
    for name in dpo_alone:
        torch.testing.assert_close(dpo_split[name], dpo_alone[name], rtol=1e-5, atol=1e-6, msg=name)
    # sharded generation, scoring and decoding: the merged results equal the one-process ones
    # (the last image uses weights of each run's own, built during the sharded call)
    assert two["keys"][:5] == one["keys"][:5] and len(two["keys"]) == 6 and two["keys"][5] != one["keys"][5]
    np.testing.assert_array_equal(np.load(out / "world2" / "images.npy")[:5], np.load(out / "world1" / "images.npy")[:5])
    assert two["clip"][:5] == pytest.approx(one["clip"][:5], abs=1e-5)
    # drawn and scored in blocks of 4, each block split across the processes: the same rows, in request order
    for run in (one, two):
        assert run["block_keys"] == run["keys"] and run["block_clip"] == pytest.approx(run["clip"], rel=1e-6)  # batch sums
        assert run["block_computed"] == 6
    assert two["texts"] == one["texts"]
    assert two["proposals"] == one["proposals"] and all(len(c) == 4 for c in one["proposals"])
    # a stage under two processes: both return the main process's manifest; only its files are in the folder
    stage_main, stage_other = (json.loads((out / f"stage_world2_rank{rank}.json").read_text()) for rank in (0, 1))
    assert stage_main == stage_other and stage_main["counts"]["wrote_in_the_stage_folder"] is True
    written = sorted(p.name for p in Path(stage_main["folder"]).iterdir())
    assert written == ["manifest.json", "squares.json"]
    assert json.loads((Path(stage_main["folder"]) / "squares.json").read_text()) == [x * x for x in range(7)]
    # every process loads the agent it trained: the second one through links to the main process's files
    loaded = [json.loads((out / f"sft_loads_world2_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert loaded[0] == loaded[1] and len(loaded[0]["calls"]) == 3 and loaded[0]["calls"][0] == "cached answer"
    assert (out / "scratch1" / "model.safetensors").is_symlink()
    # the stage the second process reached late: both returned the main process's manifest of one real run
    assert [json.loads((out / f"late_world2_rank{rank}.json").read_text()) for rank in (0, 1)] == [{"wrote": 1}] * 2
    shares = [int((out / f"drawn_world2_rank{rank}.txt").read_text()) for rank in (0, 1)]
    # each process drew its own share, nothing twice: one run of batches each, [0, 1] [2, 3] and [4] [5], the
    # cheapest largest run there is (every image costs the same; each cut leaves 4 images on one side)
    assert shares == [4, 2] and one["drawn_here"] == 6
    # each process holds the pixels it drew; the other's came as keys into the shared cache. FID features: each
    # process embedded its share once (chunks of a batch of 2: images 0, 1, 4, 5 and 2, 3), every process has every row
    split = [json.loads((out / f"shares_world2_rank{rank}.json").read_text()) for rank in (0, 1)]
    alone = json.loads((out / "shares_world1_rank0.json").read_text())
    assert [(s["in_memory"], s["fid_extracted"]) for s in split] == [(4, 4), (2, 2)]
    # whole batches were shared out: each image was drawn in the batch one process draws it in (so bit for bit)
    assert alone["batches"] == [[0, 1], [2, 3], [4], [5]]
    assert [s["batches"] for s in split] == [[[0, 1], [2, 3]], [[4], [5]]]
    assert (alone["in_memory"], alone["fid_extracted"]) == (6, 6)
    # API calls too: 6 prompts in 3 length buckets of 2, decoded as one process batches them, with its cache width
    assert len(alone["decoded"]) == 3 and all(len(d["batch"]) == 2 for d in alone["decoded"])
    assert sorted(split[0]["decoded"] + split[1]["decoded"], key=str) == sorted(alone["decoded"], key=str)
    assert split[0]["decoded"] and split[1]["decoded"]  # both processes decoded
    # the local text backend: each process decoded its share of the 10 chats (5 greedy, 5 sampled), and every
    # process has every reply, sampled ones too, as one process writes them
    assert alone["local_rows"] == 10 and [s["local_rows"] for s in split] in ([6, 4], [4, 6])
    assert split[0]["local_replies"] == split[1]["local_replies"] == alone["local_replies"]
    assert alone["local_replies"]["sampled"] != alone["local_replies"]["greedy"]
    # ChatGen's chat replies: 3 length batches (2, 2, 1), each answered whole on one process, the same replies
    assert sorted(alone["chat_rows"]) == [1, 2, 2] and sorted(split[0]["chat_rows"] + split[1]["chat_rows"]) == [1, 2, 2]
    assert split[0]["chat_rows"] and split[1]["chat_rows"]
    assert split[0]["chat_replies"] == split[1]["chat_replies"] == alone["chat_replies"]
    # ChatGen's ModelTokens: 3 steps of 4 of the 5 contexts; every context ran through the frozen LM once, on one
    # process or the other, both processes took the same steps, and those are one process's steps
    assert alone["token_trained_rows"] == 5 and sorted(s["token_trained_rows"] for s in split)[0] > 0
    assert sum(s["token_trained_rows"] for s in split) == 5
    assert split[0]["token_log"] == split[1]["token_log"] and split[0]["token_head"] == split[1]["token_head"]
    for got, want in zip(split[0]["token_log"], alone["token_log"]):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(split[0]["token_head"], alone["token_head"], rtol=1e-5, atol=1e-6)
    assert np.abs(np.subtract(alone["token_head"], alone["token_head_before"])).max() > 1e-3  # the rows trained
    # selection: 3 length batches (2, 2, 1), each decoded whole on one process, the same choices everywhere
    assert sorted(alone["select_batches"]) == [1, 2, 2] and split[0]["select_batches"] and split[1]["select_batches"]
    assert sorted(split[0]["select_batches"] + split[1]["select_batches"]) == [1, 2, 2]
    assert split[0]["selected"] == split[1]["selected"] == alone["selected"]
    # the rows went to disk once (the main process wrote one file for the call that embedded), and read back exactly
    assert all(s["fid_reread"] and s["fid_files"] == 1 for s in (*split, alone))
    # rows on the main process only: the same rows there, every image known everywhere, each embedded once
    for how in ("embedded", "read"):
        found = [s["fid_main_only"][how] for s in (alone, *split)]
        assert [f["holds_rows"] for f in found] == [True, True, False] and all(f["has"] for f in found)
        assert [f["returned"] for f in found] == [True, True, None] and found[0]["rows"] is found[1]["rows"] is True
        assert "held by the main process only" in found[2]["rows"]
        assert [f["extracted"] for f in found] == ([6, 4, 2] if how == "embedded" else [0, 0, 0])
    # scores only, in blocks split across the processes: each drew its share, the main process removed every drawn
    # image but the kept one once its block was scored, and asked again neither process drew anything
    assert [s["reward_drawn"] for s in split] == [3, 2] and alone["reward_drawn"] == 5
    assert [s["reward_drawn_again"] for s in split] == [0, 0] and alone["reward_drawn_again"] == 0
    for run in (one, two):
        assert run["reward_left"] == [True, False, False, False, False] and run["reward_removed"] == 4
        assert run["reward_again_clip"] == run["reward_clip"]
    assert two["reward_clip"] == pytest.approx(one["reward_clip"], abs=1e-5)
    # Diffusion-DPO resumed at step 1 by new trainers: one step more (2 micro-batches) on every process, the other
    # process from the main one's resume point, and the same second step as on one process
    assert [s["resumed_micro_batches"] for s in split] == [2, 2] and alone["resumed_micro_batches"] == 2
    assert split[0]["resumed_unet_sum"] == split[1]["resumed_unet_sum"]  # the processes hold one model
    assert split[0]["resumed_unet_sum"] == pytest.approx(alone["resumed_unet_sum"], rel=1e-6)
    assert [row["step"] for row in two["dpo_resumed_log"]] == [1, 2] and two["dpo_resumed_log"][0] == two["dpo_log"][0]
    assert two["dpo_resumed_log"][1]["loss"] == pytest.approx(one["dpo_resumed_log"][1]["loss"], rel=1e-5)
    fid_one, fid_two = (np.load(out / f"world{n}" / "fid_rows.npy") for n in (1, 2))
    assert fid_two.shape == fid_one.shape == (6, fid_one.shape[1]) and fid_one.shape[1] > 1
    np.testing.assert_allclose(fid_two[:5], fid_one[:5], rtol=1e-5, atol=1e-6)


def test_the_process_group_a_trainers_arguments_started_is_the_one_used(tmp_path):
    """On a CPU, TrainingArguments without use_cpu joins the launch's process group while accelerate's shared state
    says one process: the helpers must still see two (a notebook's SFT config does exactly this)."""
    script = tmp_path / "group.py"
    script.write_text(
        "import json, os, sys\n"
        "from helpers import distributed, sft\n"
        "sft.AgentSFTConfig(output_dir=sys.argv[1], max_steps=1, report_to='none', bf16=False)\n"
        "rank, size = distributed.world()\n"
        "seen = distributed.broadcast_from_main(f'from rank {rank}')\n"
        "open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w').write(json.dumps([size, seen]))\n")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(script), str(tmp_path)], tmp_path)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[2, "from rank 0"]] * 2


@pytest.mark.slow
def test_notebooks_under_two_processes_match_one(tmp_path):
    """`t2ibook run` under torchrun: both processes run the whole book, the second draws, decodes and scores its
    share; the stage outputs of 00–05 equal a one-process run's (same thread count), bit for bit (from 06 on the
    global batch is larger, so the trained models differ). About seven minutes."""
    from conftest import copy_repo

    roots = {n: copy_repo(tmp_path / f"book{n}") for n in (1, 2)}
    cli = ["-m", "helpers.cli", "run", "--no-progress"]
    _run([sys.executable, *cli, "--from", "00", "--to", "05"], roots[1])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), *cli], roots[2], timeout=1800)
    notebooks = sorted(p.stem for p in (roots[2] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(p.stem for p in (roots[2] / "book").glob("[0-9][0-9]_*.ipynb")) == notebooks
    outputs = {}
    for n, root in roots.items():
        manifests = sorted((root / "data" / "runs" / "tiny").glob("0[0-5]_*/manifest.json"))
        outputs[n] = {m.parent.name: json.loads(m.read_text())["outputs"] for m in manifests}
    assert set(outputs[1]) == set(outputs[2]) and len(outputs[1]) == 6
    for stage in outputs[1]:
        if stage != "01_crawl_civitai":  # raw pages hold the local server's port
            assert outputs[2][stage] == outputs[1][stage], stage
    # the main process wrote the executed notebooks; the other kept its copies in a scratch folder
    assert sorted(p.name[:2] for p in (roots[2] / "book").glob("0[0-5]_*.ipynb")) == ["00", "01", "02", "03", "04", "05"]
