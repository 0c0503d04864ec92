"""GPU checks (marker ``gpu``): never in CI; run on a CUDA machine with ``python -m pytest -m gpu``. Without a
CUDA device they fail (they are not skipped): selecting them claims a GPU."""

import pytest
import torch

from igpt.model import IGPT, ModelConfig

pytestmark = pytest.mark.gpu


def test_bf16_logits_on_the_gpu_match_fp32_on_the_cpu():
    assert torch.cuda.is_available(), "-m gpu selects tests that need a CUDA device"
    torch.manual_seed(0)
    model = IGPT(ModelConfig(size="tiny", resolution=16))
    x = torch.randint(0, 512, (4, 16 * 16))
    with torch.no_grad():
        ref = model(x, causal=True).float()
        gpu = model.to("cuda", torch.bfloat16)(x.cuda(), causal=True).float().cpu()
    # bf16 keeps 8 bits of mantissa: the logits agree to a few hundredths of their spread, the argmax nearly always
    assert (gpu - ref).abs().mean() < 0.05 * ref.std()
    assert (gpu.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_one_deepspeed_zero2_bf16_step_lowers_the_loss_on_the_gpu():
    import deepspeed

    from igpt.train.deepspeed_config import build

    assert torch.cuda.is_available(), "-m gpu selects tests that need a CUDA device"
    from igpt.config import DeepSpeedConfig, OptimConfig

    ds, _ = build(DeepSpeedConfig(preset="cpu", zero_stage=2, precision="bf16", micro_batch=4),
                  OptimConfig(lr=1e-3, global_batch=4, warmup_steps=1), 1, True)
    from benchmarks.gpu_pretrain import init_single_process

    init_single_process()
    torch.manual_seed(0)
    model = IGPT(ModelConfig(size="tiny", resolution=16))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    x = torch.randint(0, 512, (4, 16 * 16), device=engine.device)
    losses = []
    for _ in range(5):
        loss = engine.module.loss(x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_compiled_model_matches_eager_in_bf16_on_the_gpu():
    """torch.compile (inductor: Triton kernels) as a bf16 engine runs the model: the loss and gradients agree with
    eager's to bf16 precision (8 bits of mantissa: fused kernels round at other points, ~1e-2 relative)."""
    import copy

    from igpt.train.compile import compile_model

    assert torch.cuda.is_available(), "-m gpu selects tests that need a CUDA device"
    torch.manual_seed(0)
    eager = IGPT(ModelConfig(size="tiny", resolution=16)).to("cuda", torch.bfloat16).train()
    torch.nn.init.normal_(eager.head.weight, std=0.02)  # not the released zeros: gradients everywhere
    compiled = compile_model(copy.deepcopy(eager))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randint(0, 512, (8, 16 * 16), device="cuda")
    for objective in ("ar", "bert"):
        inputs = eager.objective_inputs(x, objective, mask=eager.bert_mask(x))
        losses = []
        for m in (eager, compiled):
            m.zero_grad()
            losses.append(m(**inputs))
            losses[-1].backward()
        assert abs(losses[1].item() - losses[0].item()) < 1e-2 * losses[0].item(), objective
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            err = (q.grad.float() - p.grad.float()).norm() / p.grad.float().norm()
            assert err < 0.05, (objective, name, err.item())
