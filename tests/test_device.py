"""Device placement. The CPU suite checks the choices with a simulated CUDA; `-m gpu` runs the real thing."""
import pytest
import torch

from helpers import device, models, smoke


def test_cpu_when_no_gpu(monkeypatch):
    monkeypatch.delenv("T2IBOOK_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.pick_device() == "cpu"
    assert device.pick_dtype("cpu") is torch.float32


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_preferred_with_its_best_half_precision(monkeypatch, bf16, expected):
    monkeypatch.delenv("T2IBOOK_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert device.pick_device() == "cuda"
    assert device.pick_dtype("cuda") is expected


def test_asking_for_cuda_without_one_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("T2IBOOK_DEVICE", "cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        device.pick_device()


def test_place_moves_and_casts():
    layer = device.place(torch.nn.Linear(2, 2).train(), "cpu", torch.float64)
    assert layer.weight.dtype is torch.float64 and not layer.training


def test_setup_context_carries_the_choice(tiny_ctx):
    assert tiny_ctx.device == device.pick_device()
    assert tiny_ctx.dtype is device.pick_dtype(tiny_ctx.device)


@pytest.mark.gpu
def test_tiny_models_run_on_cuda(tiny_ctx, tmp_path):
    """On a GPU machine: build the tiny models, move them to CUDA, run a forward pass and a generation."""
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker was selected but torch sees no CUDA device")
    assert tiny_ctx.device == "cuda"
    paths = {role: tiny_ctx.model_path(role) for role in ("agent_llm", "t2i_pipeline", "clip")}
    model, tokenizer = models.load_causal_lm(paths["agent_llm"], "cuda", tiny_ctx.dtype)
    logits = model(**tokenizer(["a photo of a cat"], return_tensors="pt").to("cuda")).logits
    assert logits.is_cuda and logits.dtype is tiny_ctx.dtype and torch.isfinite(logits.float()).all()
    assert smoke.generate_reply(model, tokenizer, "a cat", 8)["new_tokens"] == 8
    counts = smoke.run_smoke_test(tmp_path, paths, "cuda", tiny_ctx.dtype, "a cat", 2, 8, [0, 1])
    result = (tmp_path / "smoke.json").read_text()
    assert counts["images"] == 2 and '"device": "cuda:0"' in result
