"""What a paper-scale reproduction costs in GPU-hours: work counts per stage × seconds per unit of work.

Seconds per unit come, in this order, from (1) a `t2ibook bench --size full` results file measured on a GPU,
(2) the H100 measurements recorded in the project's design notes (API generation and images, both paths),
(3) a FLOP count at a stated share of the H100's bf16 peak. Every cost row says which source it used, so a
reader sees at once what was measured and what is an estimate.

The hours are on one GPU: the results file's (an H100's if there is one), else the design notes' H100. A file
from another GPU (a cloud A100, say) gets the H100 figures it does not measure scaled to it by the datasheets'
bf16 peaks, so no table adds one GPU's hours to another's; the budget and the targets stay in H100 terms.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

H100_BF16_PEAK = 790e12  # FLOP/s: the bf16 matmul peak the design notes measured on their H100 (datasheet: 989)
UTILISATION = {"project": 0.40, "naive": 0.10}  # share of peak assumed where nothing was measured

# H100 (random weights) measurements from the design notes: s/unit for the plain and the project's path.
# The project's API figure is batched `generate` with a dynamic cache (0.019–0.021 s), an upper bound for the
# static-cache path until a GPU results file replaces it.
DESIGN_H100 = {"api": {"naive": 5.4, "project": 0.020}, "image": {"naive": 1.07, "project": 0.083}}
DESIGN_SOURCE = "design notes: H100 measurement"
ESTIMATE_LABEL = "FLOP estimate"

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (without sparsity), FLOP/s, by a pattern of the name torch
# reports for the GPU (first match wins). Only their ratios are used: a GPU's speed next to the H100 (SXM) that
# the design notes measured on.
DATASHEET_BF16 = ((r"H[12]00 NVL", 835e12), (r"H200", 989e12), (r"H100.*PCIe", 756e12), (r"H100", 989e12),
                  (r"A100", 312e12), (r"L40S", 362e12), (r"\bL40\b", 181e12), (r"\bL4\b", 121e12))
H100_DATASHEET_BF16 = 989e12

# FLOP per unit of work, for units without a measurement
SCORE_FLOP = 2 * (17.6e9 + 61.6e9 + 167.4e9)  # CLIP B/16 + BLIP ViT-L/16 + ViT-H/14 image towers at 224 px (MACs×2)
VQA_FLOP = 8 * 2 * 3.9e9 * 64 + 2 * 1.0e9 * 257  # AGFSync: ~8 questions on a BLIP-2-class model, + ViT-g once
# TIFA at evaluation: BLIP-2 Flan-T5-XL answers each question freely with TIFA's decoding (5 beams, ≤ 30 new
# tokens), the image encoded once. Per question: the T5 encoder (~1.2B) reads 32 query + ~40 prompt tokens; the
# decoder (~1.6B) runs 5 beams × 30 steps (an upper bound: answers are mostly a word or two, then stop)
TIFA_QUESTIONS, TIFA_TEXTS = 25_000, 4_081  # TIFA v1.0: ~25K questions on 4,081 texts (≈ 6.1 per image)
TIFA_FLOP = TIFA_QUESTIONS / TIFA_TEXTS * (2 * 1.2e9 * 72 + 5 * 30 * 2 * 1.6e9) + 2 * 1.0e9 * 257
LLAMA7B_PARAMS = 6.7e9
INTERNVL2_2B_PARAMS = 2.2e9
SD15_UNET_FORWARD_FLOP = 0.80e12  # one 512-px UNet forward, 77 text tokens (torch's FlopCounterMode: 0.803e12)
SD15_UNET_TRAIN_FLOP = 3 * SD15_UNET_FORWARD_FLOP  # forward + backward of one image (FlopCounterMode: 2.41e12)
SD15_UNET_PARAMS = 859.5e6
SD15_VAE_ENCODE_FLOP = 1.08e12  # one 512-px image through the SD 1.5 VAE encoder (torch's FlopCounterMode)
SD15_POSTERIOR_BYTES = 2 * 4 * 64 * 64 * 4  # a 512-px image's posterior mean and std, 4×64×64 each, in float32
AGFSYNC_PROMPTS = 45_834  # AGFSync dataset card


# What one unit of each kind of work is, at paper scale
UNIT_WORK = {
    "api": "one API call: 7B Llama, 96-token prompt + 128 new tokens",
    "image": "one 512-px SD 1.5 image, 20 steps with CFG",
    "score": "one image through CLIP B/16 + ImageReward + HPS v2",
    "vqa": "one image's ~8 yes/no questions on BLIP-2 (AGFSync)",
    "tifa": "one image's ~6 TIFA questions, free-form answers, 5 beams",
    "train_token_lora": "one training token, 7B with LoRA, activations checkpointed",
    "train_token_full": "one training token, 7B, all weights, activations checkpointed",
    "train_token_full_2b": "one training token, 2B (InternVL2), all weights, activations checkpointed",
    "forward_token_2b": "one token through the frozen 2B model (ModelTokens: only the new head rows learn)",
    "dpo_pair": "one Diffusion-DPO preference pair at 512 px from its latents (SD 1.5 UNet, checkpointed)",
    "vae_encode": "one 512-px image through the SD 1.5 VAE encoder",
}


@dataclass(frozen=True)
class Work:
    """One stage's work at paper scale: how many units of which kind, and where the count comes from; `part` says
    whether it reproduces the paper (`REPRODUCTION`) or is one of the book's own checks and ablations
    (`BOOK_EXTRA`), which a run of the paper recipe pays for too. `naive_count`: where the plain path does more
    units than the project's (it repeats work the project keeps), its count; None, the same."""

    method: str
    stage: str
    unit: str  # one of UNIT_WORK
    count: float
    basis: str
    part: str = "reproduction"
    naive_count: float | None = None


REPRODUCTION, BOOK_EXTRA = "reproduction", "book extra"


# Per-run multipliers the paper recipe (configs/paper.yaml) sets; a test keeps the two in step.
RECIPE_COUNTS = {
    "rrhf_images_per_candidate": 10,  # 07_rrhf num_images (DiffAgent: k = 10)
    "rrhf_texts_per_prompt": 8,  # 07_rrhf num_samples + num_beams: the agent texts decoded per alignment prompt
    "table2_seeds": 4,  # 08_evaluate_diffagent num_seeds
    "table2_prompts_per_set": 1_000,  # 08_evaluate_diffagent prompts_per_set (COCO, PartiPrompts)
    "chatgen_seeds": 4,  # 11_chatgen_evo num_seeds
    "agfsync_candidates": 8,  # 12_agfsync_preferences num_candidates (AGFSync: N = 8)
    "dpo_steps": 1_000,  # 13_diffusion_dpo max_steps
    "dpo_batch": 128,  # 13_diffusion_dpo train_batch_size × gradient_accumulation_steps
    "agfsync_eval_seeds": 4,  # 13_diffusion_dpo eval_seeds
    "agfsync_eval_share": 0.05,  # 12_agfsync_preferences eval_share: prompts held out for notebook 13's before/after
    "agfsync_ablation_models": 4,  # 13_diffusion_dpo ablation: models trained on pairs chosen by other score weights
    "rrhf_loss_variants": 2,  # 07_rrhf weight_variants: RRHF runs with other rank and CE weights (notebook 08 too)
    "diffagent_sft_epochs": 3,  # 06_sft num_epochs (max_steps -1)
    "rrhf_epochs": 1,  # 07_rrhf num_epochs (max_steps -1)
    "chatgen_sft_epochs": 1,  # 11_chatgen_evo sft_epochs (sft_steps -1): ChatGen-Base and Evo stage 1 each
    "chatgen_token_steps": 2_000,  # 11_chatgen_evo selection_steps (ModelTokens)
    "chatgen_token_batch": 32,  # 11_chatgen_evo selection_batch_size
}
# Distinct RRHF candidates per prompt: the recipe proposes 4 samples + 4 diverse beams + the default API (up to 9);
# duplicates merge once only the model part is kept. ~240,000 RRHF images at k = 10 assume 6 per prompt.
RRHF_CANDIDATES = 6


def _epochs(count: float) -> str:
    return f"{count:g} epoch{'' if count == 1 else 's'}"


def paper_work(table2_seeds: int | None = None) -> list[Work]:
    """Work counts per stage at paper scale, each with its basis (paper, dataset card or the paper recipe).

    `table2_seeds` overrides the recipe's images per prompt and system in DiffAgent's Table 2 evaluation.
    """
    counts = RECIPE_COUNTS
    dabench_train, dabench_test, align_prompts = 40_000, 5_000, 4_000
    candidates, k = RRHF_CANDIDATES, counts["rrhf_images_per_candidate"]
    seeds = counts["table2_seeds"] if table2_seeds is None else table2_seeds
    eval_prompts = dabench_test + 2 * counts["table2_prompts_per_set"]  # DABench test + COCO + PartiPrompts
    chatgen_train, chatgen_test, chatgen_multimodal = 256_606, 14_564, 69_548 + 1_668
    chatgen_sets = 3 + 3  # Table 4's three systems + Table 6's three one-stage variants of ChatGen-Evo
    agf_prompts, agf_candidates = AGFSYNC_PROMPTS, counts["agfsync_candidates"]
    hps_prompts = 3_200  # HPS v2 benchmark: 4 styles × 800 prompts
    agf_eval = TIFA_TEXTS + hps_prompts
    agf_eval_seeds = counts["agfsync_eval_seeds"]
    # AGFSync trained on its 45,834 prompts; the book holds out a share more for the before/after and the score-weight
    # ablation (AGFSync Table 2), which the base, AGFSync and each ablation model draw, scored like the candidates
    share, ablation = counts["agfsync_eval_share"], counts["agfsync_ablation_models"]
    held_out = round(agf_prompts * share / (1 - share))
    held_out_images = held_out * (2 + ablation) * agf_eval_seeds
    dpo = f"{counts['dpo_steps']:,} steps × {counts['dpo_batch']} pairs"
    dpo_models = 1 + ablation  # AGFSync's model and the ablation's, each on its own pairs of the same candidates
    variants = counts["rrhf_loss_variants"]  # each trained like RRHF, then decoded and drawn on DABench test
    token_examples = counts["chatgen_token_steps"] * counts["chatgen_token_batch"]
    sft_epochs, rrhf_epochs, chat_epochs = (counts[name] for name in ("diffagent_sft_epochs", "rrhf_epochs",
                                                                      "chatgen_sft_epochs"))
    return [
        Work("DiffAgent", f"SFT ({_epochs(sft_epochs)}, LoRA)", "train_token_lora", dabench_train * sft_epochs * 224,
             f"~40K DABench train pairs (ChatGen Table 1) × {_epochs(sft_epochs)} × 224 tokens"),
        Work("DiffAgent", "RRHF candidates (API calls)", "api", align_prompts * counts["rrhf_texts_per_prompt"],
             f"{align_prompts:,} alignment prompts × {counts['rrhf_texts_per_prompt']} texts (samples + diverse "
             f"beams; ~{candidates} distinct candidates remain)"),
        Work("DiffAgent", "RRHF images", "image", align_prompts * candidates * k,
             f"{align_prompts:,} prompts × {candidates} candidates × k = {k}"),
        Work("DiffAgent", "RRHF scoring (unified reward)", "score", align_prompts * candidates * k,
             "every RRHF image, three scorers"),
        Work("DiffAgent", f"RRHF training ({_epochs(rrhf_epochs)}, LoRA)", "train_token_lora",
             align_prompts * candidates * rrhf_epochs * 224,
             f"{align_prompts:,} prompts × {candidates} candidates × {_epochs(rrhf_epochs)} × 224 tokens"),
        Work("DiffAgent", "Table 2 API calls", "api", eval_prompts * 2,
             "SFT and RRHF agents on every evaluation prompt"),
        Work("DiffAgent", "Table 2 images", "image", eval_prompts * 6 * seeds,
             f"{eval_prompts:,} prompts × 6 systems × {seeds} seed{'s' if seeds > 1 else ''} (configs/paper.yaml)"),
        Work("DiffAgent", "Table 2 scoring", "score", eval_prompts * 6 * seeds, "every Table 2 image"),
        Work("DiffAgent", f"RRHF loss-weight variants: training ({variants} runs)", "train_token_lora",
             variants * align_prompts * candidates * 224,
             f"07_rrhf weight_variants: {variants} more RRHF runs (ranking loss alone, cross-entropy alone) on the same "
             "candidates", BOOK_EXTRA),
        Work("DiffAgent", "RRHF loss-weight variants: API calls", "api", variants * dabench_test,
             f"{variants} variant agents on the 5,000 DABench test prompts (notebook 08)", BOOK_EXTRA),
        Work("DiffAgent", "RRHF loss-weight variants: images", "image", variants * dabench_test * seeds,
             f"{variants} variants × 5,000 DABench test prompts × {seeds} seed{'s' if seeds > 1 else ''}",
             BOOK_EXTRA),
        Work("DiffAgent", "RRHF loss-weight variants: scoring", "score", variants * dabench_test * seeds,
             "every variant image", BOOK_EXTRA),
        Work("ChatGen", "Bench demonstration images", "image", chatgen_multimodal,
             "one reference image per multimodal chat (Table 3: 69,548 train + 1,668 benchmark)"),
        Work("ChatGen", "ChatGen-Base SFT (2B, full)", "train_token_full_2b", chatgen_train * chat_epochs * 600,
             f"256,606 training chats (Table 3) × ~600 tokens × {_epochs(chat_epochs)} (configs/paper.yaml): the "
             "one-stage baseline ChatGen compares to"),
        Work("ChatGen", "Evo stage 2 ModelTokens (2B forward)", "forward_token_2b", token_examples * 600,
             f"{counts['chatgen_token_steps']:,} steps × {counts['chatgen_token_batch']} chats × ~600 tokens "
             "(configs/paper.yaml); the 2B model is frozen"),
        Work("ChatGen", "Evo stage 1 SFT (2B, full)", "train_token_full_2b", chatgen_train * chat_epochs * 600,
             f"256,606 training chats (Table 3) × ~600 tokens × {_epochs(chat_epochs)} (configs/paper.yaml)"),
        Work("ChatGen", "Evaluation API calls", "api", chatgen_test * 3, "14,564 benchmark chats × 3 systems"),
        Work("ChatGen", "Evaluation images", "image", chatgen_test * (chatgen_sets + 1) * counts["chatgen_seeds"],
             f"14,564 chats × ({chatgen_sets} image sets + the ground-truth calls, FID's reference) × "
             f"{counts['chatgen_seeds']} seeds; an upper bound (a call equal to the truth shares its image)"),
        Work("ChatGen", "Evaluation scoring", "score", chatgen_test * chatgen_sets * counts["chatgen_seeds"],
             f"every image of the {chatgen_sets} sets; FID's Inception features of every image (~6 GFLOP each, "
             "0.02% of drawing it) are left out"),
        Work("AGFSync", f"Candidate images (N = {agf_candidates})", "image", agf_prompts * agf_candidates,
             f"45,834 prompts (AGFSync dataset card) × {agf_candidates} candidates"),
        Work("AGFSync", "VQA scores", "vqa", agf_prompts * agf_candidates, "every candidate, its prompt's questions"),
        Work("AGFSync", "CLIP + aesthetic scores", "score", agf_prompts * agf_candidates,
             "every candidate (costed like the three unified-reward scorers: an upper bound)"),
        Work("AGFSync", f"Diffusion-DPO ({dpo})", "dpo_pair", counts["dpo_steps"] * counts["dpo_batch"],
             f"SD 1.5 recipe: {counts['dpo_steps']:,} steps, batch {counts['dpo_batch']} (Diffusion-DPO / configs/paper.yaml)"),
        Work("AGFSync", f"Diffusion-DPO score-weight ablation ({ablation} models × {dpo})", "dpo_pair",
             ablation * counts["dpo_steps"] * counts["dpo_batch"],
             f"AGFSync Table 2, 13_diffusion_dpo ablation: {ablation} more models (VQA, CLIP or aesthetic only; the "
             "released code's weights), each on its own pairs with the same recipe"),
        Work("AGFSync", "Diffusion-DPO: training images through the VAE", "vae_encode", dpo_models * agf_prompts * 2,
             f"each training image once (its posterior is kept: helpers.diffusion_dpo.PosteriorCache), at most 2 per "
             f"pair × 45,834 pairs × {dpo_models} models (fewer where their pairs share images); the plain path "
             f"encodes both images of every pair it uses: {dpo_models} × {dpo} × 2",
             naive_count=dpo_models * counts["dpo_steps"] * counts["dpo_batch"] * 2),
        Work("AGFSync", "Held-out evaluation images", "image", held_out_images,
             f"{held_out:,} held-out prompts (eval_share {share:g}) × {2 + ablation} models (base, AGFSync, "
             f"{ablation} ablation) × {agf_eval_seeds} seeds: the ablation's table (AGFSync Table 2)"),
        Work("AGFSync", "Held-out evaluation: VQA scores", "vqa", held_out_images, "every held-out image"),
        Work("AGFSync", "Held-out evaluation: CLIP + aesthetic", "score", held_out_images,
             "every held-out image (costed like the three unified-reward scorers: an upper bound)"),
        Work("AGFSync", "Benchmark images (TIFA, HPS v2)", "image", agf_eval * agf_eval_seeds * 2,
             f"TIFA v1.0 (4,081) + HPS v2 (3,200) prompts × {agf_eval_seeds} seeds × base and aligned"),
        Work("AGFSync", "Evaluation: TIFA answers (free-form, 5 beams)", "tifa", TIFA_TEXTS * agf_eval_seeds * 2,
             f"every TIFA image (4,081 × {agf_eval_seeds} seeds × 2 systems), ~6 questions each"),
        Work("AGFSync", "Evaluation: HPS v2 scores", "score", hps_prompts * agf_eval_seeds * 2,
             "every HPS v2 image (costed like the three unified-reward scorers: an upper bound)"),
    ]


# Disk. Every drawn image stays in the image cache as a PNG, so that no image is drawn twice: the project's zlib
# level (t2i.ImageCache.COMPRESS_LEVEL; a test keeps the two in step) next to PIL's default.
PNG_LEVELS = {"project": 1, "naive": 6}


def png_bytes_per_image(side: int = 512, count: int = 8) -> dict[str, float]:
    """Mean PNG size in bytes of `count` `side`-px crops of a photograph, at each path's zlib level (measured here)."""
    from .photos import png_bytes, photo_crops

    crops = photo_crops(side, count)
    return {path: sum(png_bytes(crop, level) for crop in crops) / count for path, level in PNG_LEVELS.items()}


# image-drawing stages whose images leave the image cache once scored (their stage's `keep_images: false`): at most
# one block of them (`t2i.IMAGE_BLOCK`) is on disk at a time
SCORED_THEN_REMOVED = {("DiffAgent", "RRHF images"): "07_rrhf", ("ChatGen", "Evaluation images"): "11_chatgen_evo",
                       ("AGFSync", "Held-out evaluation images"): "13_diffusion_dpo",
                       ("AGFSync", "Benchmark images (TIFA, HPS v2)"): "13_diffusion_dpo"}


def disk_table(png_bytes: dict[str, float]):
    """Disk per stage at paper scale, in GB: each image-drawing stage's PNGs in the image cache at `png_bytes` per
    image (one block at most for `SCORED_THEN_REMOVED` stages), AGFSync's preference dataset (it embeds a copy of
    each pair's PNGs), the training images' VAE posteriors while notebook 13 trains and the Diffusion-DPO resume
    point."""
    import pandas as pd

    from ..t2i import IMAGE_BLOCK

    rows = []
    for w in paper_work():
        if w.unit != "image":
            continue
        notebook = SCORED_THEN_REMOVED.get((w.method, w.stage))
        kept = min(w.count, IMAGE_BLOCK) if notebook else w.count
        rows.append((w.method, w.stage, w.count, kept * png_bytes["project"], kept * png_bytes["naive"],
                     f"one block of {IMAGE_BLOCK:,} PNGs at most: each leaves once scored ({notebook} keep_images: "
                     f"false; {w.count * png_bytes['project'] / 1e9:,.0f} GB if kept)" if notebook
                     else "PNGs in the image cache"))
    pairs = 2 * AGFSYNC_PROMPTS
    rows.append(("AGFSync", "Preference dataset (winner + loser per prompt)", pairs, pairs * png_bytes["project"],
                 pairs * png_bytes["naive"], "PNG copies embedded in the dataset (datasets.save_to_disk)"))
    encoded = next(w.count for w in paper_work() if w.unit == "vae_encode")
    rows.append(("AGFSync", "Diffusion-DPO: VAE posteriors (while notebook 13 trains)", encoded,
                 encoded * SD15_POSTERIOR_BYTES, encoded * SD15_POSTERIOR_BYTES,
                 "mean and std of each training image's latent in float32 (128 kB); the folder goes once every "
                 "model is trained"))
    resume = SD15_UNET_PARAMS * 4 * 3  # fp32 weights + AdamW's two fp32 moments; only the newest is kept
    rows.append(("AGFSync", "Diffusion-DPO resume point (newest only)", 0, resume, resume,
                 "SD 1.5 UNet in fp32 + AdamW state"))
    table = pd.DataFrame(rows, columns=["method", "stage", "images", "bytes", "bytes at PIL's default", "what"])
    for column in ("bytes", "bytes at PIL's default"):
        table[column.replace("bytes", "GB")] = table.pop(column) / 1e9
    return table[["method", "stage", "images", "GB", "GB at PIL's default", "what"]]


def plot_disk(table):
    """Horizontal bars: GB per stage at the image cache's zlib level, coloured by method, the total in the title."""
    import matplotlib.pyplot as plt
    import numpy as np

    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(table) + 1.2))
    colours = {"DiffAgent": "#4c72b0", "ChatGen": "#55a868", "AGFSync": "#dd8452"}
    ax.barh(y, table["GB"], color=[colours.get(m, "#999999") for m in table["method"]])
    ax.set_yticks(y, [f"{m}: {s}" for m, s in zip(table["method"], table["stage"])], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB on disk")
    ax.set_title(f"Disk at paper scale: {table['GB'].sum():,.0f} GB in all")
    fig.tight_layout()
    return fig


# Host memory. Rows one unit of work adds to the score cache (`image_cache/scores.jsonl`, one file per profile that
# the process of every scoring notebook reads whole): the unified reward's three scorers (an upper bound for AGFSync's
# two), BLIP-2's ~8 yes/no answers, TIFA's ~6 free-form answers. FID rows: Inception-v3 pool features in float32.
SCORE_ROWS_PER_UNIT = {"score": 3, "vqa": 8, "tifa": 6}
FID_DIM = 2048


def score_cache_rows() -> int:
    """Rows in the score cache at paper scale, once every stage has scored."""
    return round(sum(w.count * SCORE_ROWS_PER_UNIT[w.unit] for w in paper_work() if w.unit in SCORE_ROWS_PER_UNIT))


def fid_rows() -> int:
    """FID feature rows ChatGen's evaluation holds (notebook 11): one per evaluation image, its reference set's too."""
    return round(next(w.count for w in paper_work() if (w.method, w.stage) == ("ChatGen", "Evaluation images")))


def load_host_memory(folder: Path) -> dict[str, dict[str, Any]]:
    """The host-memory results documents in `folder`/host_memory (`benchmarks/score_cache_memory.py --out`,
    `benchmarks/fid_memory.py --out`), by benchmark name; the last file (by name) wins."""
    from .harness import HOST_MEMORY, load_results

    documents = (load_results(path) for path in sorted((Path(folder) / HOST_MEMORY).glob("*.json")))
    return {document["name"]: document for document in documents if document.get("kind") == HOST_MEMORY}


HOST_MEASURES = {"score_cache": (("seconds", "s to read"), ("held_mb", "MB held after reading"),
                                 ("peak_mb", "MB at the peak while reading")),
                 "fid_sets": (("seconds", "s for every set's FID"),
                              ("peak_above_rows_mb", "MB at the peak above the rows held"))}


def host_memory_measured(documents: dict[str, dict[str, Any]]):
    """One row per measure of each host-memory document: naive, project, naive ÷ project, and what was measured
    on which CPU."""
    import pandas as pd

    rows = []
    for name, document in documents.items():
        shapes = document["shapes"]
        size = (f"{shapes['rows']:,} score rows ({shapes['file_mb']:.0f} MB of JSON lines)" if name == "score_cache"
                else f"{shapes['sets']} FIDs over {shapes['rows']:,} rows of {shapes['dim']:,} features")
        for key, measure in HOST_MEASURES[name]:
            naive, project = document["naive"][key], document["project"][key]
            rows.append({"benchmark": name, "size": size, "measure": measure, "naive": naive, "project": project,
                         "naive ÷ project": naive / project if project else float("nan"),
                         "device": document["device"].get("name"), "created": document["created"]})
    return pd.DataFrame(rows, columns=["benchmark", "size", "measure", "naive", "project", "naive ÷ project",
                                       "device", "created"])


def host_memory_at_paper_scale(documents: dict[str, dict[str, Any]]):
    """GB one process holds at paper scale, each path, scaled from the host-memory documents: the score cache
    (`score_cache_rows`, as the last scoring notebook reads it) at the measured bytes per row, and ChatGen's FID
    rows (`fid_rows` in float32) plus the measured peak of its set-level FIDs above them (the naive peak grows with
    the rows; the project's, a chunk of rows and a few sets' sums, does not). Under a multi-GPU launch every
    process holds its own copy of the score cache; the FID rows, the main process alone
    (`FidFeatures(rows_on_main_only=True)`)."""
    import pandas as pd

    rows = []
    scores = documents.get("score_cache")
    if scores is not None:
        count, measured = score_cache_rows(), scores["shapes"]["rows"]
        per_row = {path: {key: scores[path][key] * 1e6 / measured for key in ("held_mb", "peak_mb")}
                   for path in ("naive", "project")}
        rows.append({"what": "score cache (image_cache/scores.jsonl), every stage's scores", "rows": count,
                     "naive peak GB": per_row["naive"]["peak_mb"] * count / 1e9,
                     "project peak GB": per_row["project"]["peak_mb"] * count / 1e9,
                     "project held GB": per_row["project"]["held_mb"] * count / 1e9,
                     "basis": f"bytes per row measured over {measured:,} rows × the paper-scale count"})
    fid = documents.get("fid_sets")
    if fid is not None:
        count, measured, dim = fid_rows(), fid["shapes"]["rows"], fid["shapes"]["dim"]
        held = count * FID_DIM * 4
        naive = held + fid["naive"]["peak_above_rows_mb"] * 1e6 * count / measured * (FID_DIM / dim)
        project = held + fid["project"]["peak_above_rows_mb"] * 1e6 * (FID_DIM / dim) ** 2
        rows.append({"what": "ChatGen's FID rows and set-level FIDs (notebook 11, main process)", "rows": count,
                     "naive peak GB": naive / 1e9, "project peak GB": project / 1e9, "project held GB": held / 1e9,
                     "basis": f"{FID_DIM}-d float32 rows; peak above them measured over {measured:,} rows of {dim:,}"
                              + ("" if dim == FID_DIM else f", scaled to {FID_DIM:,}") + " features"})
    table = pd.DataFrame(rows, columns=["what", "rows", "naive peak GB", "project peak GB", "project held GB",
                                        "basis"])
    table["naive ÷ project"] = table["naive peak GB"] / table["project peak GB"]
    return table


def plot_host_memory(table):
    """Paired horizontal bars: one process's peak host memory at paper scale on each path, per item of
    `host_memory_at_paper_scale`, the rows held (the project's) hatched inside the project's bar."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    y = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(9, 0.8 * len(table) + 1.8))
    ax.barh(y - 0.2, table["naive peak GB"], height=0.4, color="#c44e52")
    ax.barh(y + 0.2, table["project peak GB"], height=0.4, color="#4c72b0")
    ax.barh(y + 0.2, table["project held GB"], height=0.4, color="none", edgecolor="white", hatch="///")
    for i, (naive, project) in enumerate(zip(table["naive peak GB"], table["project peak GB"])):
        ax.text(naive, i - 0.2, f" {naive:.1f} GB", va="center", fontsize=8)
        ax.text(project, i + 0.2, f" {project:.1f} GB", va="center", fontsize=8)
    ax.set_yticks(y, table["what"], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15 * max(table["naive peak GB"].max(), table["project peak GB"].max(), 1e-3))
    ax.set_xlabel("GB of host memory, one process")
    ax.set_title("Host memory at paper scale, per process (scaled from the CPU measurements)")
    ax.legend(handles=[Patch(color="#c44e52", label="naive path, peak"),
                       Patch(color="#4c72b0", label="project's path, peak"),
                       Patch(facecolor="#4c72b0", edgecolor="white", hatch="///", label="of which held after")],
              loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=8)
    fig.tight_layout()
    return fig


def _download_bytes(version: dict[str, Any]) -> float | None:
    """The bytes `/api/download/models/{version}` serves: the primary file's `sizeKB` (KiB), else the first model
    file's; None when the crawl lists no file."""
    files = version.get("files") or []
    file = next((f for f in files if f.get("primary")), None) or next((f for f in files if f.get("type") == "Model"),
                                                                        None)
    return None if file is None or file.get("sizeKB") is None else float(file["sizeKB"]) * 1024


# a run's crawl (file sizes) and DABench (the model versions the agent can call), under data/runs/<profile>/
CATALOG_FILES = ("01_crawl_civitai/models.jsonl", "04_build_dabench/dabench.jsonl")


def crawl_source(crawl_models: Path) -> str:
    """Where the crawl next to `crawl_models` read its models: "local" (the project's Civitai server) or a URL."""
    import json

    return str(json.loads((Path(crawl_models).parent / "manifest.json").read_text())["params"]["source"])


def catalog_weights(crawl_models: Path, dabench: Path, download_mb_per_s: float = 50.0):
    """The Civitai files a run of the agent's catalog may download, per model type and base model: every model
    version DABench can call and the base checkpoint each LoRA was shown with, sized from the crawl (`sizeKB` of the
    file the download endpoint serves). The base models come from the hub and are not counted. A run keeps every
    file it downloads (`T2IBOOK_WEIGHTS_CACHE`); `hours to download` assumes `download_mb_per_s` MB/s. As in
    `t2i.ModelCatalog`, a version's first DABench record gives its type and its LoRA's base."""
    import json

    import pandas as pd

    sizes: dict[int, float | None] = {}
    with open(crawl_models) as handle:
        for line in filter(str.strip, handle):
            for version in json.loads(line).get("modelVersions", []):
                sizes[version["id"]] = _download_bytes(version)
    needed: dict[int, tuple[str, str]] = {}
    seen: set[int] = set()
    with open(dabench) as handle:
        for line in filter(str.strip, handle):
            record = json.loads(line)
            if record["model_version_id"] in seen:  # a version's first record defines it (t2i.ModelCatalog)
                continue
            seen.add(record["model_version_id"])
            needed.setdefault(record["model_version_id"], (record["api"]["type"], record["architecture"]))
            if (record.get("lora_base") or {}).get("model_version_id"):
                needed.setdefault(record["lora_base"]["model_version_id"], ("Checkpoint", record["architecture"]))
    table = pd.DataFrame([{"type": kind, "base model": base, "versions": 1, "GB": (sizes.get(v) or 0.0) / 1e9,
                           "size unknown": int(sizes.get(v) is None)} for v, (kind, base) in needed.items()],
                         columns=["type", "base model", "versions", "GB", "size unknown"])
    table = table.groupby(["type", "base model"], as_index=False).sum().sort_values(["type", "base model"])
    table["hours to download"] = table["GB"] * 1e3 / download_mb_per_s / 3600
    return table.reset_index(drop=True)


def _flop_seconds(unit: str) -> dict[str, float] | None:
    # Every paper-recipe trainer checkpoints activations (notebooks 06, 07, 11 and 13): the backward pass runs each
    # forward again, one more forward's FLOP per training token or image
    flop = {"score": SCORE_FLOP, "vqa": VQA_FLOP, "tifa": TIFA_FLOP,
            # forward, its recompute, activation gradients; frozen weights get none
            "train_token_lora": (2 + 2 + 2) * LLAMA7B_PARAMS,
            "train_token_full": (6 + 2) * LLAMA7B_PARAMS, "train_token_full_2b": (6 + 2) * INTERNVL2_2B_PARAMS,
            "forward_token_2b": 2 * INTERNVL2_2B_PARAMS,  # no weight gradients; the head rows' are negligible
            # winner + loser trained (with the recompute), + the frozen reference's forwards
            "dpo_pair": 2 * (SD15_UNET_TRAIN_FLOP + SD15_UNET_FORWARD_FLOP) + 2 * SD15_UNET_FORWARD_FLOP,
            "vae_encode": SD15_VAE_ENCODE_FLOP}.get(unit)
    if flop is None:
        return None
    return {path: flop / (H100_BF16_PEAK * share) for path, share in UTILISATION.items()}


def _measured(results: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """Seconds per unit from a full-size GPU results file, keyed like `Work.unit`."""
    if not results or results.get("size") != "full" or not str(results["device"]["device"]).startswith("cuda"):
        return {}
    found: dict[str, dict[str, float]] = {}
    for bench in results["benchmarks"]:
        paths = {name: p["seconds_per_unit"] for name, p in bench["paths"].items()}
        shapes = bench["shapes"]
        if bench["name"] == "api_generation":
            found["api"] = {"naive": paths["naive"], "project": paths["project"]}
        elif bench["name"] == "image_generation":
            found["image"] = {"naive": paths["naive"], "project": paths["project"]}
        elif bench["name"] == "scoring":
            found["score"] = {"naive": paths["naive"], "project": paths["project"]}
        elif bench["name"] == "rrhf_step":
            tokens = shapes["candidates"] * (shapes["prompt_tokens"] + shapes["response_tokens"])
            for mode in ("lora", "full"):
                found[f"train_token_{mode}"] = {path: paths[f"{path}_{mode}"] / tokens for path in ("naive", "project")}
        elif bench["name"] == "dpo_step":
            found["dpo_pair"] = {path: paths[path] / shapes["pairs"] for path in ("naive", "project")}
        elif bench["name"] == "vqa_scoring":  # per image with its questions, as the cost rows count VQA work
            found["vqa"] = {"naive": paths["naive"], "project": paths["project"]}
    return found


def speed_next_to_h100(gpu: str) -> float | None:
    """The datasheet bf16 peak of the GPU named `gpu` ÷ an H100's (0.32 for an A100); None for a GPU not listed in
    `DATASHEET_BF16`."""
    for pattern, peak in DATASHEET_BF16:
        if re.search(pattern, gpu):
            return peak / H100_DATASHEET_BF16
    return None


def cost_gpu(results: dict[str, Any] | None) -> tuple[str, float | None]:
    """The GPU the cost model's hours are on and its `speed_next_to_h100`: a full-size GPU results file's GPU, else
    the design notes' H100 (1.0)."""
    if not _measured(results):
        return "H100", 1.0
    name = str(results["device"].get("name") or "GPU")  # type: ignore[index]
    return name, speed_next_to_h100(name)


def gpu_line(results: dict[str, Any] | None) -> str:
    """One sentence: which GPU the cost model's seconds and hours are on, and how they relate to an H100."""
    gpu, speed = cost_gpu(results)
    if speed is None:
        return (f"Seconds and hours below are on the {gpu}, which has no datasheet figure in cost.DATASHEET_BF16: "
                "the figures it did not measure are an H100's, so its totals mix two GPUs.")
    if speed == 1.0:
        return f"Seconds and hours below are on the {gpu}."
    return (f"Seconds and hours below are on the {gpu}, which computes at {speed:.2f}× an H100 by datasheet bf16 "
            "peaks: the figures it did not measure are scaled to it.")


def as_h100_hours(hours: float, results: dict[str, Any] | None) -> float | None:
    """`hours` on the cost model's GPU as H100-hours (by datasheet peaks); None for a GPU with no datasheet figure."""
    speed = cost_gpu(results)[1]
    return None if speed is None else hours * speed


def unit_costs(results: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Seconds per unit for each kind of work and path, on the GPU of `cost_gpu`, with the source of each figure
    (`source`, and in short, `label`: "measured on <GPU>", "design notes (H100)" or "FLOP estimate", with
    ", scaled to <GPU>" where an H100 figure was scaled to another GPU) and `estimated` for FLOP estimates."""
    measured = _measured(results)
    gpu, speed = cost_gpu(results)
    scale = 1.0 if speed is None else 1.0 / speed
    if scale != 1.0:
        note, short = f"; scaled to {gpu} by datasheet bf16 peaks (×{scale:.2f})", f", scaled to {gpu}"
    elif speed is None:  # a GPU missing from DATASHEET_BF16: its own measurements next to H100 seconds, said so
        note, short = f"; H100 seconds: {gpu} has no datasheet figure in cost.DATASHEET_BF16 to scale them by", ""
    else:
        note = short = ""
    costs: dict[str, dict[str, Any]] = {}
    for unit in sorted({w.unit for w in paper_work()}):
        if unit in measured:
            costs[unit] = {**measured[unit], "source": f"t2ibook bench --size full on {gpu}",
                           "label": f"measured on {gpu}"}
        elif unit in DESIGN_H100:
            costs[unit] = {**{path: s * scale for path, s in DESIGN_H100[unit].items()},
                           "source": DESIGN_SOURCE + note, "label": "design notes (H100)" + short}
        else:
            estimate = _flop_seconds(unit)
            share = ", ".join(f"{path} {int(100 * s)}%" for path, s in UTILISATION.items())
            costs[unit] = {**{path: s * scale for path, s in estimate.items()},
                           "source": f"FLOP estimate at a share of the H100 bf16 peak ({share})" + note,
                           "label": ESTIMATE_LABEL + short, "estimated": True}
    return costs


def unit_table(results: dict[str, Any] | None = None):
    """Seconds per unit of work on each path, what a unit is, and where each figure comes from, in short (one row
    per unit)."""
    import pandas as pd

    costs = unit_costs(results)
    return pd.DataFrame([{"unit": unit, "one unit is": UNIT_WORK[unit], "naive s/unit": cost["naive"],
                          "project s/unit": cost["project"], "speed-up": cost["naive"] / cost["project"],
                          "source": cost["label"]} for unit, cost in costs.items()])


def cost_table(results: dict[str, Any] | None = None, *, project_seconds: dict[str, float] | None = None,
               table2_seeds: int | None = None):
    """GPU-hours per stage for the plain and the project's paths, with the count basis and the cost source.

    `project_seconds` replaces the project's s/unit for some units (a what-if); `table2_seeds` see `paper_work`.
    """
    import pandas as pd

    costs = unit_costs(results)
    for unit, seconds in (project_seconds or {}).items():
        costs[unit] = {**costs[unit], "project": seconds, "source": costs[unit]["source"] + " (project: what-if)"}
    rows = []
    for work in paper_work(table2_seeds):
        cost = costs[work.unit]
        naive_count = work.count if work.naive_count is None else work.naive_count
        rows.append({"method": work.method, "stage": work.stage, "part": work.part, "unit": work.unit,
                     "count": int(work.count), "naive count": int(naive_count),
                     "naive GPU-h": naive_count * cost["naive"] / 3600,
                     "project GPU-h": work.count * cost["project"] / 3600,
                     "count basis": work.basis, "cost source": cost["source"],
                     "estimated": bool(cost.get("estimated"))})
    table = pd.DataFrame(rows)
    table["speed-up"] = table["naive GPU-h"] / table["project GPU-h"]
    return table


# What the project aims for on one H100, in s/unit: API calls at about half the compute peak, 512-px images at ~75%
PROJECT_H100_TARGETS = {"api": 0.008, "image": 0.055}
# ... and as speed-ups of the project's API decoding over one `generate` per prompt and over batched `generate`
PROJECT_H100_RATIOS = {"api_naive": 600.0, "api_batched_generate": 2.5}


def targets_table(results: dict[str, Any] | None, target_hours: float = 6.0):
    """The H100 targets next to what a full-size GPU results file measured (`met` is None where nothing was).

    `measured` is on the file's GPU; `as on an H100` converts times and hours by datasheet bf16 peaks (ratios
    stand as measured), and `met` compares that with the bound. A GPU without a datasheet figure is compared on
    the ratios only.
    """
    import pandas as pd

    measured = _measured(results)
    gpu, speed = cost_gpu(results)
    benches = {b["name"]: b for b in (results or {}).get("benchmarks", [])} if measured else {}
    api_paths = {name: p["seconds_per_unit"] for name, p in benches.get("api_generation", {}).get("paths", {}).items()}
    project_api = api_paths.get("project")
    hours = None
    if "api" in measured and "image" in measured:  # the two units the DiffAgent total hangs on
        hours = reproduction_hours(cost_table(results), "DiffAgent")
    # (target, sign, bound, measured, whether it is a time: seconds or hours, which scale with the GPU's speed)
    rows = [("API generation, s/API", "≤", PROJECT_H100_TARGETS["api"], project_api, True),
            ("API generation, naive ÷ project", "≥", PROJECT_H100_RATIOS["api_naive"],
             api_paths["naive"] / project_api if project_api else None, False),
            ("API generation, batched generate ÷ project", "≥", PROJECT_H100_RATIOS["api_batched_generate"],
             api_paths["batched_generate"] / project_api if project_api and "batched_generate" in api_paths else None,
             False),
            ("image generation, s/image (512 px, 20 steps, CFG)", "≤", PROJECT_H100_TARGETS["image"],
             measured.get("image", {}).get("project"), True),
            ("DiffAgent SD 1.5 reproduction, H100-hours", "≤", target_hours, hours, True)]
    table = []
    for name, sign, bound, value, is_time in rows:
        on_h100 = value if value is None or not is_time else (None if speed is None else value * speed)
        where = "not measured on a GPU" if value is None else gpu
        if value is not None and is_time and speed != 1.0:
            where += (f" (×{speed:.2f} as on an H100, by datasheet bf16 peaks)" if speed is not None
                      else " (no datasheet figure: not compared)")
        table.append({"target": name, "bound": f"{sign} {bound:g}", "measured": value, "as on an H100": on_h100,
                      "met": None if on_h100 is None else (on_h100 <= bound if sign == "≤" else on_h100 >= bound),
                      "measured on": where})
    return pd.DataFrame(table)


def budget_scenarios(results: dict[str, Any] | None = None, target_hours: float = 6.0):
    """DiffAgent's project-path GPU-hours as things stand, with the H100 targets met, and with one Table 2 seed.

    Shows which change brings the reproduction within `target_hours` (H100-hours), and by how much each one helps.
    Hours and seconds are on the cost model's GPU (`cost_gpu`); the H100 targets are scaled to it.
    """
    import pandas as pd

    speed = cost_gpu(results)[1]
    on_gpu = {unit: seconds / (speed or 1.0) for unit, seconds in PROJECT_H100_TARGETS.items()}
    recipe_seeds = RECIPE_COUNTS["table2_seeds"]
    rows = []
    for label, overrides, seeds in (("as recorded", None, recipe_seeds),
                                    ("API calls and images at the H100 targets", on_gpu, recipe_seeds),
                                    ("one image per Table 2 prompt and system", None, 1),
                                    ("both", on_gpu, 1)):
        table = cost_table(results, project_seconds=overrides, table2_seeds=seeds)
        unit = unit_costs(results) if overrides is None else {k: {"project": v} for k, v in overrides.items()}
        hours = reproduction_hours(table, "DiffAgent")
        h100 = as_h100_hours(hours, results)
        rows.append({"scenario": label, "image s/unit": unit["image"]["project"],
                     "API s/unit": unit["api"]["project"], "Table 2 seeds": seeds,
                     "DiffAgent project GPU-h": hours, "as H100-hours": h100,
                     "within budget": None if h100 is None else h100 <= target_hours})
    return pd.DataFrame(rows)


def budget_line(table, results: dict[str, Any] | None, target_hours: float) -> str:
    """One sentence: DiffAgent's reproduction on both paths against the budget, in H100-hours."""
    gpu, speed = cost_gpu(results)
    hours, naive = (reproduction_hours(table, "DiffAgent", path) for path in ("project", "naive"))
    if speed is None:
        return (f"DiffAgent's reproduction on the project's path: {hours:.1f} hours, {gpu} seconds where measured and "
                f"H100 seconds elsewhere ({gpu} has no datasheet figure to convert them by), against a budget of "
                f"{target_hours:g} H100-hours: not compared; naive path: {naive:.0f} hours")
    within = "within" if hours * speed <= target_hours else "over"
    on = ("" if gpu == "H100" else f" on the {gpu}" if speed == 1.0 else
          f" on the {gpu} ({hours:.1f} GPU-hours there, ×{speed:.2f} by datasheet bf16 peaks)")
    return (f"DiffAgent's reproduction on the project's path: {hours * speed:.1f} H100-hours{on} against a budget of "
            f"{target_hours:g} ({within} budget); naive path: {naive * speed:.0f} H100-hours")


def verdict_lines(results: dict[str, Any] | None, target_hours: float = 6.0) -> list[str]:
    """What `t2ibook bench --size full` prints after its timings: which GPU the hours are on, each H100 target
    with what the run measured, and DiffAgent's reproduction against the budget, as notebook 14 shows them. Empty
    for a file that measured nothing on a GPU (a CPU or tiny run: the targets are about full-size shapes)."""
    measured = _measured(results)
    if not measured:
        return []

    def missing(value) -> bool:
        return value is None or value != value  # None or NaN (pandas stores a missing float as NaN)
    verdict = {True: "met", False: "NOT met"}
    lines = [gpu_line(results), f"{'H100 target':<50} {'bound':>8} {'measured':>10} {'as on H100':>10}  verdict"]
    for row in targets_table(results, target_hours).to_dict("records"):
        value, on_h100 = (("—" if missing(v) else f"{v:.4g}") for v in (row["measured"], row["as on an H100"]))
        said = ("not measured" if missing(row["measured"]) else
                "not compared" if missing(row["met"]) else verdict[bool(row["met"])])
        lines.append(f"{row['target']:<50} {row['bound']:>8} {value:>10} {on_h100:>10}  {said}")
    if "api" in measured and "image" in measured:
        lines.append(budget_line(cost_table(results), results, target_hours))
    else:
        lines.append("DiffAgent's reproduction against the budget: needs api_generation and image_generation measured")
    return lines


def reproduction_hours(table, method: str, path: str = "project") -> float:
    """A method's GPU-hours on `path` for the paper's reproduction alone, without the book's extras (the budget's
    scope)."""
    chosen = (table["method"] == method) & (table["part"] == REPRODUCTION)
    return float(table.loc[chosen, f"{path} GPU-h"].sum())


def totals(table) -> "Any":
    """GPU-hours per method, both paths, and the ratio; `of which book extras`: the project path's hours of the
    book's own checks and ablations within the method's total."""
    summed = table.groupby("method", sort=False)[["naive GPU-h", "project GPU-h"]].sum()
    summed["speed-up"] = summed["naive GPU-h"] / summed["project GPU-h"]
    extras = table[table["part"] == BOOK_EXTRA].groupby("method", sort=False)["project GPU-h"].sum()
    summed["of which book extras (project GPU-h)"] = extras.reindex(summed.index).fillna(0.0)
    return summed


def plot_costs(table, gpu: str = "H100"):
    """Horizontal bars, log scale: GPU-hours on `gpu` per stage, naive against the project's path, by method.

    Bars whose seconds per unit are a FLOP estimate (nothing measured them) are hatched."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    labels = [f"{m}: {s}" for m, s in zip(table["method"], table["stage"])]
    y = np.arange(len(table))
    estimated = table["estimated"].to_numpy()
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(table) + 1.2))
    for column, offset, colour in (("naive GPU-h", -0.2, "#c44e52"), ("project GPU-h", 0.2, "#4c72b0")):
        bars = ax.barh(y + offset, table[column], height=0.4, color=colour, edgecolor="white", linewidth=0.5)
        for bar, guess in zip(bars, estimated):
            bar.set_hatch("///" if guess else "")
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"{gpu} GPU-hours (log scale)")
    ax.set_title("Cost to reproduce at paper scale, per stage")
    ax.legend(handles=[Patch(color="#c44e52", label="naive path"), Patch(color="#4c72b0", label="project's path"),
                       Patch(facecolor="#999999", edgecolor="white", hatch="///", label="FLOP estimate (not measured)")],
              loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def measured_table(documents: list[dict[str, Any]]):
    """One row per benchmark per results file: device, size, naive and project s/unit, ratio, and each path's peak
    GPU memory in GiB (NaN on a CPU): what tells a 40 GB card from an 80 GB one. `other` holds the further ratios,
    the peak memory of paths beyond the two compared (RRHF's full fine-tune next to its LoRA step), and any path
    timed at a smaller batch than planned because the GPU ran out of memory."""
    import pandas as pd

    from .harness import headline, smaller_batches

    nan = float("nan")
    rows = []
    for document in documents:
        for bench in document["benchmarks"]:
            naive, project = headline(bench)
            others = [f"{k} {v:g}" for k, v in bench["ratios"].items() if k != "naive/project"]
            others += [f"{name} peak {path['peak_memory_gib']:g} GiB" for name, path in bench["paths"].items()
                       if name not in bench["headline"] and path.get("peak_memory_gib") is not None]
            others += smaller_batches(bench)
            rows.append({"device": document["device"].get("name"), "size": document["size"],
                         "benchmark": bench["name"], "unit": bench["unit"],
                         "naive": naive["seconds_per_unit"], "project": project["seconds_per_unit"],
                         "naive ÷ project": bench["ratio"],
                         "naive peak GiB": nan if naive.get("peak_memory_gib") is None else naive["peak_memory_gib"],
                         "project peak GiB": nan if project.get("peak_memory_gib") is None
                         else project["peak_memory_gib"],
                         "other": "; ".join(others)})
        for failure in document.get("failed", []):  # a benchmark that raised: its row says so instead of a time
            rows.append({"device": document["device"].get("name"), "size": document["size"],
                         "benchmark": failure["name"], "unit": "", "naive": nan, "project": nan,
                         "naive ÷ project": nan, "naive peak GiB": nan, "project peak GiB": nan,
                         "other": f"failed: {failure['error']}"})
    return pd.DataFrame(rows)


def load_all(folder: Path) -> list[dict[str, Any]]:
    """Every results file in `folder` (sorted by name), checked for the schema."""
    from .harness import load_results

    return [load_results(path) for path in sorted(Path(folder).glob("*.json"))]


def gpu_results(documents: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The full-size GPU results document the cost model uses: the first H100's (the targets are an H100's), else
    the first of any GPU."""
    found = [d for d in documents if d["size"] == "full" and str(d["device"]["device"]).startswith("cuda")]
    return next((d for d in found if "H100" in str(d["device"].get("name", ""))), found[0] if found else None)
