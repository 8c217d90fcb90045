"""Device placement: CUDA when present (bf16, else fp16), otherwise CPU in fp32."""
from __future__ import annotations

import os

import torch


def pick_device() -> str:
    """`cuda` when a GPU is visible (`cuda:LOCAL_RANK` in a multi-process launch; override with
    T2IBOOK_DEVICE=cpu|cuda|cuda:1), else `cpu`."""
    wanted = os.environ.get("T2IBOOK_DEVICE")
    if wanted:
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"T2IBOOK_DEVICE={wanted} but torch sees no CUDA device; unset it or use cpu")
        return wanted
    if not torch.cuda.is_available():
        return "cpu"
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # accelerate launch / torchrun: one GPU per process
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"
    return "cuda"


def pick_dtype(device: str) -> torch.dtype:
    """bf16 on GPUs that support it (A100, H100), fp16 on older GPUs, fp32 on CPU."""
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def place(module: torch.nn.Module, device: str, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Move a model to `device` (and `dtype` when given) and put it in eval mode."""
    module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    return module.eval()


def describe(device: str) -> dict[str, str]:
    """Facts about the device for the setup table."""
    facts = {"device": device, "torch": torch.__version__, "cpu threads": str(torch.get_num_threads())}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        facts.update({"gpu": props.name, "gpu memory (GiB)": f"{props.total_memory / 2**30:.1f}",
                      "cuda": str(torch.version.cuda), "bf16": str(torch.cuda.is_bf16_supported())})
    return facts


def environment_table(device: str):
    """Device facts and library versions as one two-column DataFrame for the setup chapter."""
    import pandas as pd

    from .manifest import library_versions

    facts = describe(device)
    facts.update({name: version for name, version in library_versions().items() if name not in facts})
    return pd.DataFrame({"value": facts}).rename_axis("what")
