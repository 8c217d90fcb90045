"""One process of the multi-process check (tests/test_distributed.py): run alone, or as each of two torchrun ranks.

It trains one tiny SFT step, draws images through the executor, decodes API calls and scores the images, all
through the helpers' own code paths, and the main process writes what came out to OUT/world<N>/ for the test
to compare with a one-process run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(out: Path, llm: str) -> None:
    from helpers import config, distributed, sft, t2i
    from helpers.agent import Agent
    from helpers.candidates import propose
    from helpers.scoring import ScoreCache, ScoringRun, load_scorer

    ctx = config.setup("tiny", 0, quiet=True)
    rank, world_size = distributed.world()
    folder = out / f"world{world_size}"

    # one SFT step: 4 examples per process on two processes is the one-process batch of 8. Plain SGD, so the
    # update is lr × gradient (Adam's first step, g/(|g|+eps), would amplify float-order noise in tiny gradients)
    records = [{"split": "train", "instruction": {"prompt": f"a {animal} in the snow, watercolour", "negative_prompt": ""},
                "api": {"model": "AlphaMix", "type": "Checkpoint", "base_model": "SD 1.5", "width": 512,
                        "height": 512, "sampling_method": "Euler a", "sampling_steps": 20 + i, "cfg_scale": 7.0,
                        "model_description": "x"}}
               for i, animal in enumerate(["fox", "cat", "owl", "hare", "wolf", "deer", "lynx", "seal"])]
    # no use_cpu here, as in notebook 06 (bf16 off on a CPU): on a CPU launch the config itself picks data
    # parallelism over gloo
    settings = sft.AgentSFTConfig(output_dir=str(out / f"trainer{world_size}-{rank}"), max_steps=1,
                                  per_device_train_batch_size=8 // world_size, learning_rate=1e-2, report_to="none",
                                  save_strategy="no", bf16=False, logging_steps=1, max_length=256, optim="sgd",
                                  disable_tqdm=True, seed=0, dataloader_drop_last=False)
    saved_to = folder / "sft" if rank == 0 else out / f"scratch{rank}"
    summary = sft.train(llm, sft.sft_dataset(records), settings, saved_to)
    # the paper recipe's SFT under DDP: LoRA adapters with gradient checkpointing (recomputed blocks whose
    # gradients DDP all-reduces once per step), merged into the saved agent
    lora_settings = sft.AgentSFTConfig(output_dir=str(out / f"lora_trainer{world_size}-{rank}"), max_steps=1,
                                       per_device_train_batch_size=8 // world_size, learning_rate=1e-1,
                                       report_to="none", save_strategy="no", bf16=False, logging_steps=1,
                                       max_length=256, optim="sgd", disable_tqdm=True, seed=0,
                                       dataloader_drop_last=False, use_lora=True, lora_r=4,
                                       lora_target_modules=["q_proj", "v_proj"], gradient_checkpointing=True)
    lora_summary = sft.train(llm, sft.sft_dataset(records), lora_settings,
                             folder / "sft_lora" if rank == 0 else out / f"scratch_lora{rank}")
    # ChatGen's image-text SFT (transformers' Trainer, its own collator): 4 chats, 2 with a reference image
    from helpers.chatgen import evo
    from helpers.chatgen.vlm import build_tiny_vlm

    vlm = out / "vlm"
    if world_size == 1:  # built once, by the one-process run that goes first
        build_tiny_vlm(vlm, llm, seed=0)
    rng = np.random.default_rng(5)
    chats = [[{"role": "user", "content": f"in this style, a {animal}"},
              {"role": "assistant", "content": f"a {animal}, ink wash, misty"}]
             for animal in ("crane", "tiger", "carp", "pine")]
    pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) if k % 2 == 0 else None
                for k in range(4)]
    vlm_summary = evo.train_vlm_sft(str(vlm), chats, pictures,
                                    folder / "vlm_sft" if rank == 0 else out / f"scratch_vlm{rank}", steps=1,
                                    lr=1e-1, batch_size=4 // world_size, optim="sgd", disable_tqdm=True, seed=0,
                                    dataloader_drop_last=False)
    # one RRHF step on 4 prompts of 3 candidates each (2 per process), LoRA with checkpointing as in notebook 07
    from helpers.rrhf import build_rrhf_dataset, train_agent

    ranked = [{"prompt": f"a {animal} by the sea", "rewards": [0.2, 0.9, 0.5],
               "candidates": [f"model: Alpha{k}, steps: {20 + k}" for k in range(3)]}
              for animal in ("gull", "crab", "seal", "otter")]
    base = Agent.load(llm)
    rrhf_summary = train_agent(base.model, base.tokenizer, build_rrhf_dataset(ranked),
                               folder / "rrhf" if rank == 0 else out / f"scratch_rrhf{rank}", max_steps=1,
                               per_device_train_batch_size=4 // world_size, learning_rate=1e-1, optim="sgd",
                               report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                               use_lora=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"],
                               gradient_checkpointing=True)
    # transformers writes the weights on the main process only; the others can still load the trained agent
    # and decode with it: the processes' cache keys differ (links hash unlike files), the sharded prompts do not
    # (with caches of their own, as a stage folder and a scratch folder: the main process's holds one answer
    # already, the other's none; the main process's cache decides and its answers are everyone's)
    from helpers.agent import ApiCallCache

    trained = Agent.load(str(saved_to))
    night = [f"a {animal} at night" for animal in ("fox", "owl", "cat")]
    cache = ApiCallCache(out / f"calls_world{world_size}_rank{rank}.jsonl")
    if rank == 0:
        cache.put_many([(ApiCallCache.key(trained.model_id, night[0], trained.decoding(6)),
                         "cached answer")])
    (out / f"sft_loads_world{world_size}_rank{rank}.json").write_text(json.dumps({
        "weights": trained.model.model.embed_tokens.weight[:2, :3].tolist(),
        "calls": trained.api_calls(night, max_new_tokens=6, batch_size=2, cache=cache, progress=False)}))

    # sharded image generation through the executor, into a cache of this run's own
    # "Fresh" gets a version (so tiny weights) of its own per run: under two processes they are built during the
    # call, and only one process's share draws with them
    catalog = t2i.ModelCatalog.from_records([
        {"api": {"model": name, "type": "Checkpoint", "model_description": "x"}, "architecture": "SD 1.5",
         "model_id": version // 10, "model_version_id": version, "lora_base": None}
        for name, version in (("AlphaMix", 11), ("Fresh", 50 + world_size))])
    executor = t2i.Executor(catalog, t2i.weights_store(ctx), t2i.ImageCache(out / f"cache{world_size}"),
                            t2i.ExecutorConfig(max_side=32, batch_size=2))
    call = {"model": "AlphaMix", "type": "Checkpoint", "base_model": "SD 1.5", "width": 512, "height": 512,
            "sampling_method": "Euler a", "sampling_steps": 3, "cfg_scale": 7.0}
    prompts = [f"a lighthouse at dusk, style {i}" for i in range(5)]
    fresh = t2i.Request({**call, "model": "Fresh"}, "a quiet harbour", seed=9)
    requests = [t2i.Request(call, prompt, seed=i) for i, prompt in enumerate(prompts)] + [fresh]
    batches: list[list[int]] = []  # the requests each diffusers call of this process drew together
    draw = executor._draw

    def recording(group, batch):
        batches.append([requests.index(planned[0]) for _, planned in batch])
        return draw(group, batch)

    executor._draw = recording
    generated = executor.generate(requests, progress=False)
    executor._draw = draw
    in_memory = sum(g.decoded for g in generated)  # this process's drawn share; the rest are keys into the cache

    # sharded scoring and sharded API-call decoding
    scores = ScoringRun({"clip": load_scorer("clip", ctx)}, ScoreCache(out / f"scores{world_size}.jsonl"))
    table = scores.score(generated)
    # the same requests again in blocks of 4, each block sharded (images from the cache, scores computed afresh)
    in_blocks = ScoringRun({"clip": scores.scorers["clip"]}, ScoreCache(out / f"block_scores{world_size}.jsonl"))
    block_table = in_blocks.generate_and_score(executor, requests, block_size=4)
    # scores and FID features only (RRHF's rewards, ChatGen's evaluation), in blocks of 4 split across the processes:
    # whichever process drew an image, it leaves the cache once its block is scored and embedded, but the kept one;
    # asked again, by new objects reading the scores and the features from disk, no process draws any
    from helpers.scorers.fid import FidFeatures

    reward_store = out / f"reward_features{world_size}"
    reward_features = lambda: FidFeatures(ctx.model_path("clip"), image_size=32, batch_size=2,  # noqa: E731
                                          store=reward_store)
    rewards = [t2i.Request(call, f"a windmill in fog, {i}", seed=i) for i in range(5)]
    rewarding = t2i.Executor(catalog, t2i.weights_store(ctx), executor.cache, executor.config)
    only_scores = ScoringRun({"clip": scores.scorers["clip"]}, ScoreCache(out / f"reward_scores{world_size}.jsonl"))
    reward_table = only_scores.generate_and_score(rewarding, rewards, block_size=4, keep={0}.__contains__,
                                                  also=[reward_features()])
    reward_left = [executor.cache.has(key) for key in reward_table["key"]]  # the main process removes them
    again = t2i.Executor(catalog, t2i.weights_store(ctx), executor.cache, executor.config)
    reward_again = only_scores.generate_and_score(again, rewards, block_size=4, keep={0}.__contains__,
                                                  also=[reward_features()])
    # FID features of the same images, split across the processes; asked again, nothing is embedded twice
    fid_store = out / f"fid_store{world_size}"
    fid = FidFeatures(ctx.model_path("clip"), image_size=32, batch_size=2, store=fid_store)
    fid_rows = fid(generated, [g.key for g in generated])
    fid(generated[:3], [g.key for g in generated[:3]])
    distributed.barrier()  # the main process has written the rows; every process reads them back from disk
    reread = FidFeatures(ctx.model_path("clip"), image_size=32, store=fid_store)
    fid_reread = bool(np.array_equal(reread.rows([g.key for g in generated]), fid_rows)) and reread.extracted == 0
    # rows on the main process only (notebook 11): embedded split across the processes, or read back from the
    # store; the other processes know each image has its row, and nothing is embedded again
    fid_main_only = {}
    for how, held in (("embedded", FidFeatures(ctx.model_path("clip"), image_size=32, batch_size=2,
                                               rows_on_main_only=True)),
                      ("read", FidFeatures(ctx.model_path("clip"), image_size=32, store=fid_store,
                                           rows_on_main_only=True))):
        returned = held(generated, [g.key for g in generated])
        held(generated[:3], [g.key for g in generated[:3]])
        try:
            rows = held.rows([g.key for g in generated])
        except RuntimeError as error:
            rows = str(error)
        fid_main_only[how] = {"holds_rows": held.holds_rows, "extracted": held.extracted,
                              "has": all(held.has(g.key) for g in generated),
                              "returned": None if returned is None else bool(np.allclose(returned, fid_rows,
                                                                                         rtol=1e-5, atol=1e-6)),
                              "rows": rows if isinstance(rows, str) else bool(np.allclose(rows, fid_rows, rtol=1e-5,
                                                                                          atol=1e-6))}
    agent = Agent.load(llm)
    from helpers import speed

    decoded: list[dict] = []  # the batches this process's decoding calls ran, as prompt token lists, and the width
    greedy = speed.greedy_decode

    def recording_decode(model, prompts, *, batches=None, **options):
        planned = batches if batches is not None else speed.length_buckets([len(p) for p in prompts],
                                                                           options["settings"].batch_size)
        decoded.extend({"batch": [prompts[i] for i in chunk], "widest": max(map(len, prompts))}
                       for chunk in planned)
        return greedy(model, prompts, batches=batches, **options)

    speed.greedy_decode = recording_decode
    texts = agent.api_calls(prompts + ["a red bicycle"], max_new_tokens=12, batch_size=2, progress=False)
    # the local text backend (the small profile's): 5 chats in batches of 2, greedy and sampled, shared out whole
    from helpers import textgen

    local = textgen.make_generator("transformers", model_path=llm, batch_size=2)
    chats = [[{"role": "user", "content": f"describe {thing}"}] for thing in
             ("a cat", "a lighthouse at dusk in winter", "a dog", "a boat on a grey sea at dawn", "a castle")]
    decoded_before = len(decoded)
    local_replies = {"greedy": local.generate(chats, max_new_tokens=5),
                     "sampled": local.generate(chats, max_new_tokens=5, temperature=1.0, seed=4)}
    local_rows = sum(len(d["batch"]) for d in decoded[decoded_before:])
    del decoded[decoded_before:]
    speed.greedy_decode = greedy
    # ChatGen's replies (its three stages and the baselines answer chats this way), from a text-only chat model
    from helpers.chatgen.evo import _generate
    from helpers.chatgen.vlm import load_chat_model

    chat_model, chat_rows = load_chat_model(llm, "cpu"), []
    chat_generate = chat_model.generate
    chat_model.generate = lambda chats, **kw: chat_rows.append(len(chats)) or chat_generate(chats, **kw)
    chat_replies = _generate(chat_model, chats, [None] * len(chats), 5, 2, "chats", False)
    # ChatGen stage 2 (ModelTokens) on the 5 chats: training runs each process's share of every step's contexts
    # through the frozen LM, and every process takes the same step; selection shares out whole length batches
    from helpers import models
    from helpers.chatgen import model_tokens

    token_lm, token_tokenizer = models.load_causal_lm(llm)
    token_rows: list[int] = []
    token_lm.register_forward_pre_hook(lambda _, args, kwargs: token_rows.append(len(kwargs["input_ids"])),
                                       with_kwargs=True)
    names = ["AlphaMix", "BetaReal", "GammaOil"]
    contexts = [{"messages": chat, "prompt": f"prompt {i}", "model": names[i % 3]} for i, chat in enumerate(chats)]
    head = model_tokens.ModelTokenHead(token_lm, names, token_tokenizer)
    head_before = head.rows.tolist()
    token_log = model_tokens.train_model_tokens(head, token_tokenizer, contexts, steps=3, lr=0.05, batch_size=4,
                                                seed=0, progress=False)
    token_trained_rows, select_batches = sum(token_rows), []
    choose = model_tokens._greedy_choice
    model_tokens._greedy_choice = lambda head, ids, *rest: select_batches.append(len(ids)) or choose(head, ids, *rest)
    selected = model_tokens.select_models(head, token_tokenizer, contexts, max_new_tokens=2, batch_size=2,
                                          return_written=True)
    model_tokens._greedy_choice = choose
    proposals = propose(agent, prompts[:3], num_samples=2, num_beams=2, num_beam_groups=2, diversity_penalty=1.0,
                        max_new_tokens=8, batch_size=2, progress=False)  # RRHF candidates: sampled + diverse beams

    # one Diffusion-DPO step on a global batch of 4 pairs in two micro-batches of 2: 2 per micro-batch on one
    # process, 1 + 1 under DDP on two (plain SGD). β = 2, not the paper's 5000: at the first step the policy is the
    # reference, so each pair's loss weight is sigmoid(β/2 × a rounding-sized difference); at β/2 = 2500 a 1-ulp
    # kernel difference moves it by ~1e-4 relative, and with it the whole step, which is not what this checks
    from safetensors.torch import save_file

    from helpers.diffusion_dpo import DiffusionDPOConfig, DiffusionDPOTrainer
    from helpers.models import load_sd_pipeline

    rng = np.random.default_rng(0)
    picture = lambda: Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))  # noqa: E731
    pairs = [{"prompt": f"a castle, {i}", "chosen": picture(), "rejected": picture()} for i in range(8)]
    pipeline = load_sd_pipeline(t2i.weights_store(ctx).base("SD 1.5").path)
    dpo_settings = dict(resolution=32, beta=2.0, logging_steps=1, seed=0, train_batch_size=2 // world_size,
                        gradient_accumulation_steps=2, output_dir=str(out / f"dpo{rank}"), save_steps=1)
    trainer = DiffusionDPOTrainer(pipeline, DiffusionDPOConfig(max_steps=1, **dpo_settings), pairs)
    trainer.optimizer = torch.optim.SGD(trainer.trainable, lr=0.1)  # an update far above float rounding
    # which micro-batch each DDP gradient all-reduce ran in: accumulation should sync only in the last one
    micro_batches, synced_in = [0], []
    compute_loss = trainer.compute_loss
    trainer.compute_loss = lambda rows: (micro_batches.__setitem__(0, micro_batches[0] + 1), compute_loss(rows))[1]
    if world_size > 1:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(group, bucket):
            synced_in.append(micro_batches[0])
            return allreduce_hook(group, bucket)

        trainer.policy.register_comm_hook(dist.group.WORLD, counting_hook)
    dpo_log = trainer.train()
    # the run continued by a new trainer (as after a crash) for a second step, from the resume point the main
    # process wrote at step 1: under two processes the other one reads the main process's files
    resumed = DiffusionDPOTrainer(load_sd_pipeline(t2i.weights_store(ctx).base("SD 1.5").path),
                                  DiffusionDPOConfig(max_steps=2, **dpo_settings), pairs)
    resumed.optimizer = torch.optim.SGD(resumed.trainable, lr=0.1)
    resumed_micro_batches = []
    resumed_loss = resumed.compute_loss
    resumed.compute_loss = lambda rows: (resumed_micro_batches.append(1), resumed_loss(rows))[1]
    resumed_log = resumed.train()

    # a stage: every process computes (its share of the sharded step), only the main process writes the folder
    def squares(stage_folder: Path) -> dict:
        values = distributed.map_sharded(lambda xs: [x * x for x in xs], list(range(7)))
        (stage_folder / "squares.json").write_text(json.dumps(values))
        return {"values": len(values), "wrote_in_the_stage_folder": stage_folder == stage.folder}

    stage = ctx.stage("multiprocess_check", params={"world_size": world_size})
    record = stage.run(squares)
    (out / f"stage_world{world_size}_rank{rank}.json").write_text(json.dumps(
        {"fingerprint": record["fingerprint"], "counts": record["counts"], "folder": str(stage.folder)}))

    # a stage without a sharded step that the other process reaches only after the main one wrote its manifest:
    # the main process's decision (run it) holds for both, so neither waits for the other forever
    if rank == 1:
        time.sleep(2)
    late = ctx.stage("late_arrival", params={"world_size": world_size}).run(
        lambda stage_folder: {"wrote": (stage_folder / "x.txt").write_text("x")})
    (out / f"late_world{world_size}_rank{rank}.json").write_text(json.dumps(late["counts"]))

    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in pipeline.unet.state_dict().items()},
                  folder / "dpo_unet.safetensors")
        np.save(folder / "images.npy", np.stack([np.asarray(g.image) for g in generated]))
        (folder / "result.json").write_text(json.dumps({
            "world_size": world_size, "sft": summary, "sft_lora": lora_summary, "rrhf": rrhf_summary,
            "vlm_sft": vlm_summary, "keys": [g.key for g in generated],
            "clip": table["clip"].tolist(), "block_keys": block_table["key"].tolist(),
            "block_clip": block_table["clip"].tolist(), "block_computed": in_blocks.computed, "texts": texts, "drawn_here": executor.stats["generated"],
            "reward_clip": reward_table["clip"].tolist(), "reward_again_clip": reward_again["clip"].tolist(),
            "reward_left": reward_left,
            "reward_removed": rewarding.stats["removed_once_scored"] + again.stats["removed_once_scored"],
            "dpo_log": dpo_log, "dpo_resumed_log": resumed_log, "dpo_synced_in": sorted(set(synced_in)), "proposals": proposals, "dpo_base": str(t2i.weights_store(ctx).base("SD 1.5").path)}))
        np.save(folder / "fid_rows.npy", fid_rows)
    # every process reports its own share of the drawing and of the FID features, so the test sees the work split
    (out / f"drawn_world{world_size}_rank{rank}.txt").write_text(str(executor.stats["generated"]))
    (out / f"shares_world{world_size}_rank{rank}.json").write_text(json.dumps(
        {"in_memory": in_memory, "batches": batches, "decoded": decoded, "local_replies": local_replies,
         "local_rows": local_rows, "chat_replies": chat_replies, "chat_rows": chat_rows,
         "token_trained_rows": token_trained_rows, "token_log": token_log, "token_head": head.rows.tolist(),
         "token_head_before": head_before,
         "select_batches": select_batches, "selected": selected,
         "fid_extracted": fid.extracted,
         "fid_reread": fid_reread, "fid_main_only": fid_main_only,
         "fid_files": len(list(fid_store.rglob("*.npz"))), "resumed_micro_batches": len(resumed_micro_batches),
         "reward_drawn": rewarding.stats["generated"], "reward_drawn_again": again.stats["generated"],
         "resumed_unet_sum": float(sum(p.double().sum() for p in resumed.unet.parameters()))}))
    distributed.barrier()  # and leaves the group as it exits (helpers.distributed.leave_group_at_exit)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2])
