import copy
import subprocess
import sys

import pytest
import torch

from igpt.config import PAPER_PARAMS_M, ModelConfig
from igpt.model import IGPT


def small(**kw) -> IGPT:
    torch.manual_seed(0)
    m = IGPT(ModelConfig(size="debug", resolution=kw.pop("resolution", 8), **kw))
    # the released init zeroes the output matrix: every logit starts equal, which would make several of the
    # checks below vacuous, so give it random weights
    torch.nn.init.normal_(m.head.weight, std=0.5)
    return m.eval()


@pytest.mark.parametrize("name", ["S", "M", "L", "XL"])
def test_paper_sizes_match_the_paper_parameter_counts(name):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = IGPT(cfg)
    n = model.num_params()
    assert n == cfg.param_count()
    paper = PAPER_PARAMS_M[name] * 1e6
    assert abs(n - paper) / paper < 0.01, (name, n, paper)


def test_release_initialisation():
    torch.manual_seed(0)
    m = IGPT(ModelConfig(size="small"))
    d, n_layer = m.cfg.d_model, m.cfg.n_layer
    assert torch.count_nonzero(m.head.weight) == 0  # zero-initialised, untied output matrix
    assert m.head.weight.data_ptr() != m.wte.weight.data_ptr() and m.head.weight.shape == (512, d)
    assert m.wte.weight.shape == (513, d)
    assert abs(m.wte.weight.std().item() - 0.02) < 0.002
    assert abs(m.wpe.weight.std().item() - 0.01) < 0.001
    assert abs(m.h[0].attn.qkv.weight.std().item() - d**-0.5) < 0.1 * d**-0.5
    assert abs(m.h[0].attn.proj.weight.std().item() - (d * n_layer) ** -0.5) < 0.1 * (d * n_layer) ** -0.5
    assert all(b is None for mod in m.modules() if isinstance(mod, torch.nn.Linear) for b in [mod.bias])
    assert all(torch.all(p == 1) for n, p in m.named_parameters() if "ln" in n)


def test_norm_and_activation_are_the_releases():
    m = small()
    x = torch.randn(2, 3, m.cfg.d_model) + 3.0  # a mean far from 0: a centring norm would differ
    with torch.no_grad():
        m.h[0].ln_1.weight.uniform_(0.5, 1.5)
    expected = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * m.h[0].ln_1.weight
    torch.testing.assert_close(m.h[0].ln_1(x), expected)
    from igpt.model.gpt import gelu2

    torch.testing.assert_close(gelu2(x), x * torch.sigmoid(1.702 * x))


def test_ar_is_causal():
    m = small()
    x = torch.randint(0, 512, (2, 64))
    y = x.clone()
    y[:, 40:] = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        a, b = m(m.ar_inputs(x)), m(m.ar_inputs(y))
    # input position i sees tokens < i; the logits at positions 0..40 predict tokens 0..40 from tokens < 40.
    torch.testing.assert_close(a[:, :41], b[:, :41], rtol=0, atol=0)
    assert not torch.allclose(a[:, 41:], b[:, 41:])


def test_ar_loss_is_next_token_cross_entropy():
    m = small()
    x = torch.randint(0, 512, (3, 64))
    logits = m(torch.cat([torch.full((3, 1), 512), x[:, :-1]], 1))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), x.reshape(-1))
    torch.testing.assert_close(m.loss(x, "ar"), ref)
    assert abs(IGPT(m.cfg).loss(x, "ar").item() - torch.log(torch.tensor(512.0)).item()) < 1e-5  # zero head


def test_bert_masks_content_not_position_and_scores_masked_positions_only():
    m = small(objective="bert")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 512, (64, 64))
    mask = m.bert_mask(x, g)
    assert abs(mask.float().mean().item() - 0.15) < 0.02  # each position with probability 0.15

    # the content embedding of masked positions is zeroed, the position embedding kept
    emb = m._embed(x, mask)
    pos = m.wpe.weight[:64].expand_as(emb)
    torch.testing.assert_close(emb[mask], pos[mask])
    torch.testing.assert_close(emb[~mask], (m.wte(x) + pos)[~mask])
    # the masked input carries no information about the masked tokens
    y = torch.where(mask, torch.randint(0, 512, x.shape), x)
    with torch.no_grad():
        torch.testing.assert_close(m(x, causal=False, content_mask=mask), m(y, causal=False, content_mask=mask))

    # the loss is the release's: cross-entropy over masked positions, averaged per image, then over images
    logits = m(x, causal=False, content_mask=mask)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x, reduction="none")
    ref = torch.stack([ce[i][mask[i]].mean() for i in range(len(x))]).mean()
    torch.testing.assert_close(m.loss(x, "bert", mask=mask), ref)

    # no causal mask: a later token changes earlier outputs
    z = x.clone()
    z[:, -1] = (z[:, -1] + 1) % 512
    keep = torch.zeros_like(mask)
    with torch.no_grad():
        assert not torch.allclose(m(x, causal=False, content_mask=keep)[:, 0],
                                  m(z, causal=False, content_mask=keep)[:, 0])


def test_bert_loss_gradient_comes_from_masked_positions_only():
    m = small(objective="bert").train()
    x = torch.randint(0, 512, (4, 64))
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, 5] = True
    mask[0, 9] = True
    seen = {}

    def keep_logits(mod, inp, out):
        out.retain_grad()
        seen["logits"] = out

    m.head.register_forward_hook(keep_logits)
    m.loss(x, "bert", mask=mask).backward()
    has_grad = seen["logits"].grad.abs().sum(-1) > 0
    assert torch.equal(has_grad, mask)


def test_features_are_pooled_ln1_inputs_from_one_pass():
    m = small(resolution=8)
    x = torch.randint(0, 512, (3, 64))
    feats = m.features(x, layers=[0, 1])
    assert set(feats) == {0, 1} and all(f.shape == (3, m.cfg.d_model) for f in feats.values())
    # by hand
    with torch.no_grad():
        h = m._embed(m.ar_inputs(x), None)
        ref0 = m.h[0].ln_1(h).mean(1)
        h = m.h[0](h, True)
        ref1 = m.h[1].ln_1(h).mean(1)
    torch.testing.assert_close(feats[0], ref0)
    torch.testing.assert_close(feats[1], ref1)
    # one forward pass: each block runs once however many layers are asked for, and only the blocks below the
    # deepest requested layer run at all
    calls = []
    hooks = [b.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, b in enumerate(m.h)]
    m.features(x, layers=[0, 1, 2])
    assert calls == [0, 1]
    calls.clear()
    m.features(x, layers=[0, 1])
    assert calls == [0]
    calls.clear()
    m.features(x, layers=[0])
    assert calls == []
    for hk in hooks:
        hk.remove()
    with pytest.raises(ValueError, match=r"layer 3 out of range \[0, 2\]"):
        m.features(x, layers=[3])
    with pytest.raises(ValueError, match="out of range"):
        m.features(x, layers=[-1])


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_features_have_every_layer_and_the_last_is_the_final_norm_output(objective):
    m = small(resolution=8, objective=objective)
    L = m.cfg.n_layer
    with torch.no_grad():  # gains other than 1, so that ln_f is told apart from any other norm
        m.ln_f.weight.uniform_(0.5, 1.5)
    x = torch.randint(0, 512, (3, 64))
    mask = m.bert_mask(x, torch.Generator().manual_seed(0)) if objective == "bert" else None
    feats = m.features(x, mask=mask)
    assert sorted(feats) == list(range(L + 1))
    with torch.no_grad():  # the blocks run by hand: layer l < L is ln_1 of block l's input, layer L is ln_f(h_L)
        h = m._embed(m.ar_inputs(x), None) if objective == "ar" else m._embed(x, mask)
        for l, blk in enumerate(m.h):
            torch.testing.assert_close(feats[l], blk.ln_1(h).mean(1))
            h = blk(h, objective == "ar")
        torch.testing.assert_close(feats[L], m.ln_f(h).mean(1))
    assert not torch.allclose(feats[L], feats[L - 1])
    torch.testing.assert_close(m.features(x, layers=[L], mask=mask)[L], feats[L])


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 512, (2, 64))
    grads = []
    for ckpt in (False, True):
        m = small(activation_checkpointing=ckpt).train()
        m.loss(x).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference over the reference's largest magnitude: elementwise relative error is meaningless for
    the entries near zero every logit and gradient tensor has."""
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("objective", ["ar", "bert"])
def test_compiled_model_equals_eager_on_the_cpu(objective):
    """torch.compile (inductor: C++ kernels on the CPU) gives eager's loss, gradients and logits, with the same
    state_dict keys. Tolerance: 1e-5 of each tensor's largest magnitude. Both run in fp32 (unit roundoff 6e-8);
    fused kernels sum in another order, which moves the results by ~1e-6 of their scale after two blocks
    (measured: loss 8e-8, logits 5e-7, gradients up to 1.5e-6), while a real difference (a lost mask, a wrong
    scale) is of order 1. Cold compilation of the forward and backward takes about a minute on two busy CPU
    cores (a third of it inductor's one-time header build); inductor's cache (under /tmp) makes reruns take
    seconds."""
    from torch._dynamo.utils import counters

    from igpt.train.compile import compile_model

    eager = small(objective=objective).train()
    keys = list(eager.state_dict())
    compiled = compile_model(copy.deepcopy(eager))
    assert list(compiled.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints and exports read the same keys
    x = torch.randint(0, 512, (4, 64))
    inputs = eager.objective_inputs(x, mask=eager.bert_mask(x, torch.Generator().manual_seed(1)))
    logits = []  # the logits of the same call, from a hook: no second graph to compile for them
    for m in (eager, compiled):
        m.head.register_forward_hook(lambda mod, inp, out: logits.append(out.detach()))
    graphs = counters["stats"]["unique_graphs"]

    losses = [m(**inputs) for m in (eager, compiled)]  # the training step's call: the loss from targets
    for loss in losses:
        loss.backward()
    assert counters["stats"]["unique_graphs"] > graphs  # it was compiled, not silently run eagerly
    assert len(logits) == 2

    assert _rel_diff(losses[1], losses[0]) < 1e-5
    assert _rel_diff(logits[1], logits[0]) < 1e-5
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert _rel_diff(q.grad, p.grad) < 1e-5, name


def test_a_compiled_model_decodes_eagerly_and_the_same():
    """Sampling from the training model (completions at epoch ends) goes through the KV cache, which stays out of
    compilation: no graph is traced for it. The eager backend: no kernels to build."""
    from torch._dynamo.utils import counters

    from igpt.model.sampling import complete
    from igpt.train.compile import compile_model

    m = small()
    x = torch.randint(0, 512, (2, 64))
    ref = complete(m, x, 32, generator=torch.Generator().manual_seed(0))
    graphs = counters["stats"]["unique_graphs"]
    out = complete(compile_model(m, backend="eager"), x, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, ref)
    assert counters["stats"]["unique_graphs"] == graphs


def test_sequence_longer_than_context_is_an_error():
    m = small(resolution=4)
    with pytest.raises(ValueError, match="exceeds the context"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_model_imports_neither_ray_nor_deepspeed():
    code = "import sys, igpt.model; print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'deepspeed')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_model_pulls_no_ray_pyarrow_or_mlflow():
    """The network is plain PyTorch: a user (or a worker) that only needs the model imports none of the stack."""
    import subprocess
    import sys

    code = ("import sys, igpt.model, igpt.model.sampling; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pyarrow', 'mlflow', 'deepspeed'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
