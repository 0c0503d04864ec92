"""Our model against Hugging Face transformers' ImageGPT, which nobody here wrote."""

import re
import sys

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
    ImageGPTImageProcessor,
    ImageGPTModel,
)

from igpt import cli
from igpt.__main__ import main
from igpt.config import ModelConfig
from igpt.model import IGPT
from igpt.model.hf import from_hf, to_hf
from igpt.storage import Loc
from igpt.train import checkpoints


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


# ---- python -m igpt import-hf / export-hf: folders in and out -------------------------------------------------------
def random_centres(k=512, seed=0):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (k, 3)).astype(np.float32)


def hf_folder(path, hf, clusters=None):
    """What a user downloads: the model's save_pretrained folder with the image processor's beside it."""
    hf.save_pretrained(path)
    if clusters is not None:
        ImageGPTImageProcessor(clusters=clusters.tolist(), size={"height": 8, "width": 8}).save_pretrained(path)
    return path


def ar_checkpoint(folder, objective="ar", seed=1):
    """A run folder with one complete checkpoint, written as pretraining writes it."""
    torch.manual_seed(seed)
    ours = IGPT(ModelConfig(size="debug", n_layer=2, resolution=8, objective=objective))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.2)
    step = folder / "step_00000007"
    step.mkdir(parents=True)
    checkpoints.write_weights(step, ours.state_dict(), cli.to_dict(ours.cfg), random_centres(seed=seed), step=7)
    checkpoints.write_marker(step, {"step": 7})
    return ours.eval()


def max_logit_diff(hf, ours, what: str) -> float:
    """Max |logit difference| of the HF model and ours on the same random AR inputs (both (4, 64, 512))."""
    ids = ours.ar_inputs(torch.randint(0, 512, (4, 64)))
    with torch.no_grad():
        ref, got = hf(input_ids=ids).logits, ours(ids)
    assert ref.shape == got.shape == (4, 64, 512)
    diff = (ref - got).abs().max().item()
    print(f"{what}: max |logit diff| = {diff:.3g} (logits up to {ref.abs().max().item():.3g})")
    return diff


def test_import_hf_writes_a_checkpoint_with_hf_logits_and_palette(tmp_path, capsys):
    hf = random_hf(n_layer=2, n_embd=64, n_head=2)
    centres = random_centres()
    src, out = hf_folder(tmp_path / "hf", hf, centres), tmp_path / "imported"
    main(["import-hf", "--hf", str(src), "--out", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("imported") and str(out / "weights.pt") in printed[0]
    assert "2 layers, d_model 64, 8x8, 512 colours" in printed[0]
    assert checkpoints.resolve(out) == Loc(out / "weights.pt") and checkpoints.load(out)["step"] == 0
    ours = checkpoints.load_model(out)
    assert (ours.cfg.n_layer, ours.cfg.d_model, ours.cfg.n_head, ours.cfg.objective) == (2, 64, 2, "ar")
    assert np.array_equal(checkpoints.load_palette(out).centres, centres)
    assert max_logit_diff(hf, ours, "import-hf") <= 1e-5


def test_export_hf_is_loaded_by_transformers_with_our_logits_and_palette(tmp_path, capsys):
    ours = ar_checkpoint(tmp_path / "run")
    out = tmp_path / "hf"
    main(["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out)])  # a run folder: its newest step
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("exported") and "step_00000007" in printed[0]
    hf = ImageGPTForCausalImageModeling.from_pretrained(out).eval()
    proc = ImageGPTImageProcessor.from_pretrained(out)
    palette = checkpoints.load_palette(tmp_path / "run").centres
    assert np.array_equal(np.asarray(proc.clusters, dtype=np.float32), palette)
    assert (proc.size["height"], proc.size["width"]) == (8, 8)
    assert max_logit_diff(hf, ours, "export-hf") <= 1e-5


def test_import_of_an_export_is_the_same_checkpoint_bit_for_bit(tmp_path):
    ar_checkpoint(tmp_path / "run", seed=3)
    main(["export-hf", "--checkpoint", str(tmp_path / "run" / "step_00000007"), "--out", str(tmp_path / "hf")])
    main(["import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    a, b = checkpoints.load(tmp_path / "run"), checkpoints.load(tmp_path / "back")
    assert a["model"] == b["model"] and torch.equal(a["palette"], b["palette"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, t in a["state_dict"].items():
        assert t.dtype == b["state_dict"][name].dtype and torch.equal(t, b["state_dict"][name]), name


def error_line(capsys, argv) -> str:
    """The command's one-line complaint: exit code 2, one ``error:`` line, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def test_import_hf_refuses_a_non_zero_bias(tmp_path, capsys):
    hf = random_hf(n_layer=2, n_embd=64, n_head=2)
    with torch.no_grad():
        hf.transformer.h[1].attn.c_proj.bias[5] = -0.25
    src = hf_folder(tmp_path / "hf", hf, random_centres())
    msg = error_line(capsys, ["import-hf", "--hf", str(src), "--out", str(tmp_path / "out")])
    assert "transformer.h.1.attn.c_proj.bias is non-zero" in msg and "no biases" in msg
    assert not (tmp_path / "out" / "weights.pt").exists()


@pytest.mark.parametrize("other", ["gpt2", "imagegpt-base"])
def test_import_hf_refuses_what_is_not_an_imagegpt_causal_model(tmp_path, capsys, other):
    if other == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=513,
                                               bos_token_id=512, eos_token_id=512))
    else:  # ImageGPT without the output head
        model = ImageGPTModel(ImageGPTConfig(vocab_size=513, n_positions=64, n_embd=32, n_layer=1, n_head=2))
    src = hf_folder(tmp_path / "hf", model, random_centres())
    msg = error_line(capsys, ["import-hf", "--hf", str(src), "--out", str(tmp_path / "out")])
    assert "not an ImageGPT ImageGPTForCausalImageModeling" in msg
    assert ("'gpt2'" in msg and "GPT2LMHeadModel" in msg) if other == "gpt2" else "ImageGPTModel" in msg


@pytest.mark.parametrize("how", ["no processor file", "processor without clusters"])
def test_import_hf_needs_the_clusters(tmp_path, capsys, how):
    src = hf_folder(tmp_path / "hf", random_hf(n_layer=1))
    if how == "processor without clusters":
        ImageGPTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(src)
        assert (src / "preprocessor_config.json").is_file()
    msg = error_line(capsys, ["import-hf", "--hf", str(src), "--out", str(tmp_path / "out")])
    assert "no colour palette" in msg and "preprocessor_config.json" in msg and "clusters" in msg


def test_import_hf_missing_folder_or_config(tmp_path, capsys):
    msg = error_line(capsys, ["import-hf", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert "no Hugging Face model folder" in msg and "nowhere" in msg
    (tmp_path / "empty").mkdir()
    msg = error_line(capsys, ["import-hf", "--hf", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "no config.json" in msg and "save_pretrained" in msg


def test_export_hf_refuses_a_bert_checkpoint(tmp_path, capsys):
    ar_checkpoint(tmp_path / "run", objective="bert")
    msg = error_line(capsys, ["export-hf", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert "'bert' objective" in msg and "causal (AR)" in msg and "no BERT iGPT head" in msg
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("command", ["import-hf", "export-hf"])
def test_without_transformers_both_commands_say_how_to_install_it(tmp_path, capsys, monkeypatch, command):
    ar_checkpoint(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    src = "--hf" if command == "import-hf" else "--checkpoint"
    msg = error_line(capsys, [command, src, str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    assert "pip install -e '.[hf]'" in msg


def test_an_imported_hf_model_is_extracted_and_probed_like_our_own(tmp_path, capsys, ray_local):
    """The path of a user holding OpenAI's released checkpoint: save_pretrained folder -> import-hf -> extract
    every layer's features (Ray Data) -> probe sweep with refit (Ray Tune), on the shipped sample at 8x8."""
    import json

    from mlflow.tracking import MlflowClient

    from igpt import cli
    from igpt.eval import extract_job, probe_job
    from tests.conftest import SAMPLE

    src, ckpt = hf_folder(tmp_path / "hf", random_hf(n_layer=2, n_embd=32, n_head=2), random_centres()), \
        tmp_path / "imported"
    main(["import-hf", "--hf", str(src), "--out", str(ckpt)])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    extract_job.run(cli.parse(extract_job.ExtractJobConfig, [
        "--name", "hf-small", "--storage_path", str(tmp_path / "features"), "--checkpoint", str(ckpt),
        "--train.path", str(SAMPLE), "--train.key_prefix", "train/",  # (sorted by class: no max_images)
        "--test.path", str(SAMPLE), "--test.key_prefix", "test/", "--holdout", "0.2", "--no-pixels",
        "--tracking.tracking_uri", uri]))
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"job": "probe_lbfgs", "params": {"layer": {"grid_search": "all"},
                                                                   "C": {"grid_search": [1.0]}}}))
    probe_job.run(cli.parse(probe_job.ProbeJobConfig, [
        "--name", "hf-small", "--storage_path", str(tmp_path / "probe"), "--features",
        str(tmp_path / "features" / "hf-small"), "--space", str(space), "--no-pixels", "--tracking.tracking_uri", uri]))
    printed = capsys.readouterr().out
    print(printed)  # the note quotes these lines
    assert "imported " in printed and "2 layers, d_model 32, 8x8, 512 colours, objective ar" in printed
    assert re.search(r"train: \d{3} images, 0 skipped", printed) and re.search(r"test: 200 images", printed)
    best = re.search(r"best \{'layer': (\d), 'C': 1.0\} val ([\d.]+) -> test ([\d.]+)", printed)
    assert best and 0 <= int(best[1]) <= 2 and 0.0 < float(best[3]) <= 1.0, printed
    result = json.loads((tmp_path / "probe" / "hf-small" / "result.json").read_text())
    assert result["trials"] == 3 and result["test_images"] == 200
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("igpt").experiment_id], "attributes.status = 'FINISHED'")}
    assert {"hf-small/extract", "hf-small/probe"} <= set(runs)
    assert runs["hf-small/probe"].data.tags["igpt.checkpoint"].endswith("imported/weights.pt")
