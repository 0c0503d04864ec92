"""Our model against Hugging Face transformers' ImageGPT, which nobody here wrote."""

import pytest
import torch
from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

from igpt.config import ModelConfig
from igpt.model import IGPT
from igpt.model.hf import from_hf, to_hf


def random_hf(n_layer=3, n_embd=64, n_head=4, n_positions=64) -> ImageGPTForCausalImageModeling:
    torch.manual_seed(0)
    cfg = ImageGPTConfig(vocab_size=513, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = ImageGPTForCausalImageModeling(cfg).float().eval()
    with torch.no_grad():  # every weight random (HF's init leaves the norm gains at 1 and lm_head tiny)
        for name, p in hf.named_parameters():
            p.zero_() if name.endswith(".bias") else p.normal_(0.0, 0.2)
    return hf


def test_logits_match_after_converting_from_hf():
    hf = random_hf()
    ours = from_hf(hf).eval()
    x = torch.randint(0, 512, (4, 64))
    ids = ours.ar_inputs(x)
    assert ids[0, 0] == 512  # SOS is id 512 in both
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    assert ref.shape == got.shape == (4, 64, 512)
    assert (ref - got).abs().max().item() < 1e-5


def test_logits_match_after_converting_to_hf():
    torch.manual_seed(1)
    ours = IGPT(ModelConfig(size="debug", n_layer=3, resolution=8))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    hf = to_hf(ours.eval())
    x = torch.randint(0, 512, (4, 64))
    ids = ours.ar_inputs(x)
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max().item() < 1e-5
    # and back again, bit for bit
    back = from_hf(hf)
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items(), strict=False):
        assert torch.equal(a, b), n


def test_features_match_hf_hidden_states():
    hf = random_hf()
    ours = from_hf(hf).eval()
    x = torch.randint(0, 512, (2, 64))
    with torch.no_grad():
        hs = hf(input_ids=ours.ar_inputs(x), output_hidden_states=True).hidden_states  # inputs of each block
        feats = ours.features(x)
        assert sorted(feats) == list(range(len(hf.transformer.h) + 1))
        for layer in range(len(hf.transformer.h)):
            ref = hf.transformer.h[layer].ln_1(hs[layer]).mean(1)
            assert (ref - feats[layer]).abs().max().item() < 1e-5


def test_last_layer_feature_is_the_mean_of_hf_last_hidden_state():
    hf = random_hf()
    ours = from_hf(hf).eval()
    x = torch.randint(0, 512, (2, 64))
    L = ours.cfg.n_layer
    with torch.no_grad():
        # HF applies ln_f to the output of the last block: its last hidden state is the final norm's output
        out = hf.transformer(input_ids=ours.ar_inputs(x), output_hidden_states=True)
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state) and len(out.hidden_states) == L + 1
        ref = out.last_hidden_state.mean(1)
        got = ours.features(x, layers=[L])[L]
    assert (ref - got).abs().max().item() < 1e-5


def test_a_non_zero_bias_is_refused_not_dropped():
    hf = random_hf(n_layer=1)
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.bias[3] = 0.5
    with pytest.raises(ValueError, match="mlp.c_fc.bias is non-zero"):
        from_hf(hf)


def test_config_from_hf_picks_the_named_size():
    hf_small = ImageGPTConfig()  # transformers' default is iGPT-S
    from igpt.model.hf import config_from_hf

    cfg = config_from_hf(hf_small)
    assert (cfg.size, cfg.n_layer, cfg.d_model, cfg.n_head, cfg.resolution) == ("S", 24, 512, 8, 32)
