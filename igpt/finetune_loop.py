"""Fine-tuning: the classifier around a pretrained iGPT, its evaluation, and the per-worker loop (runs inside each
Ray Train worker; the driver is ``pipelines/finetune.py``).

The paper's recipe (Chen et al. 2020, section 3.3): average-pool the last layer's output (after the final norm)
over the sequence, a linear head to the classes, and train everything on L = L_CLF + L_GEN, where L_GEN is the
objective the model was pretrained with, on the same forward pass of the same images. BERT models are evaluated as
the paper does it: each image under 5 independent masks (``igpt.ensemble``), the modal prediction wins.

Each worker is a DeepSpeed engine (ZeRO stage and precision from the same ``DeepSpeedConfig`` as pretraining) over
its share of the augmented training stream. Evaluation splits are read whole by every worker; each worker
evaluates the images whose key hashes to its rank, padded to the same number of forward passes on every rank
(ZeRO-3 gathers parameters collectively in each forward), and the counts are summed over ranks.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from igpt.ensemble import eval_masks, modal
from igpt.model import IGPT

CLASSIFIER = "classifier.pt"


class Classifier(nn.Module):
    """A pretrained iGPT with a linear head on the sequence mean of its last layer's output (after ``ln_f``).

    The head starts at zero: every class starts equally likely (the first loss is ln(n_classes)) and the
    backbone's first gradients come from L_GEN alone, so fine-tuning starts from the pretrained model itself."""

    def __init__(self, backbone: IGPT, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.clf = nn.Linear(backbone.cfg.d_model, n_classes)
        nn.init.zeros_(self.clf.weight)
        nn.init.zeros_(self.clf.bias)

    @property
    def objective(self) -> str:
        return self.backbone.cfg.objective

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, gen_loss: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits (B, n_classes) and, with ``gen_loss``, L_GEN of the same pass (else None).

        The pass is the pretraining one: AR models see ``[SOS, x_0 .. x_{T-2}]`` under a causal mask and L_GEN is
        the next-token loss; BERT models see the tokens with the content of ``mask`` (B, T) zeroed, no causal mask,
        and L_GEN is the loss on the masked positions, per image then over the batch (as ``IGPT.loss``)."""
        m = self.backbone
        if self.objective == "ar":
            h = m._blocks(m._embed(m.ar_inputs(tokens), None), causal=True)
        else:
            if mask is None:
                raise ValueError("a BERT model is seen under a mask: pass one (bert_mask, or eval_masks)")
            h = m._blocks(m._embed(tokens, mask), causal=False)
        logits = self.clf(h.mean(1))
        if not gen_loss:
            return logits, None
        ce = F.cross_entropy(m.head(h).transpose(1, 2).float(), tokens.long(), reduction="none")  # (B, T)
        if self.objective == "ar":
            return logits, ce.mean()
        w = mask.to(ce.dtype)
        return logits, ((ce * w).sum(1) / w.sum(1).clamp(min=1)).mean()


@torch.no_grad()
def predict(model: Classifier, tokens: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """Predicted classes (B,) on the CPU. AR: one plain forward. BERT: one forward under each of the image's 5
    masks (``eval_masks``: keyed by the record, so the same 5 in every job and on every worker), the modal class
    of the 5 predictions (``modal``; ties to the tied class with the larger summed logits)."""
    if model.objective == "ar":
        return model(tokens, gen_loss=False)[0].argmax(1).cpu()
    cfg = model.backbone.cfg
    masks = eval_masks(list(keys), cfg.n_ctx, cfg.bert_mask_prob).to(tokens.device)  # (5, B, T)
    scores = torch.stack([model(tokens, m, gen_loss=False)[0].float().cpu() for m in masks])  # (5, B, C)
    return modal(scores.argmax(-1), scores)


def owner(key: str, world: int) -> int:
    """The rank that evaluates this record: a keyed hash, so the ranks' shares are disjoint and cover the split
    whatever order each rank reads it in."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % world


def save_classifier(folder: Path, state_dict: dict, meta: dict, **info) -> Path:
    """The fine-tuned weights (backbone.* and clf.*, fp32) with the model config, classes and palette; loads with
    ``torch.load(weights_only=True)``."""
    path = Path(folder) / CLASSIFIER
    torch.save({"state_dict": state_dict, "model": meta["model"], "n_classes": meta["n_classes"],
                "palette": torch.tensor(meta["palette"], dtype=torch.float32), **info}, path)
    return path


def load_classifier(path: str | Path) -> Classifier:
    from igpt import cli
    from igpt.config import ModelConfig

    p = Path(path)
    data = torch.load(p / CLASSIFIER if p.is_dir() else p, map_location="cpu", weights_only=True)
    model = Classifier(IGPT(cli.from_dict(ModelConfig, data["model"])), data["n_classes"])
    model.load_state_dict(data["state_dict"])
    return model.eval()


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to the full rate over ``warmup_steps``, then constant (fine-tuning has no decay)."""
    return 1.0 if step >= warmup_steps else (step + 1) / warmup_steps


def finetune_loop(config: dict) -> None:
    """One fine-tuning run on one worker. ``config["meta"]`` (from the driver) holds: checkpoint (weights.pt), model,
    n_classes, palette, lr, clf_weight, epochs, patience (None: train all epochs), steps_per_epoch, warmup_steps,
    ds_config, seed, evals ("val" for early stopping, "test" once at the end), run_id, tracking_uri, use_gpu."""
    import deepspeed
    import ray.train
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from igpt import checkpoints, cli
    from igpt.checkpoints import full_fp32_state_dict
    from igpt.config import ModelConfig

    meta = config["meta"]
    if "test" in meta["evals"] and "val" in meta["evals"]:
        raise ValueError("a run evaluates test only without early stopping (its last epoch is the one it keeps)")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if meta["use_gpu"] else torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if meta["use_gpu"] else "gloo")

    torch.manual_seed(meta["seed"])  # the same head (zeros) and the same BERT training masks on every rank
    backbone = IGPT(cli.from_dict(ModelConfig, meta["model"]))
    backbone.load_state_dict(checkpoints.load(meta["checkpoint"])["state_dict"])
    model = Classifier(backbone, meta["n_classes"])
    warmup = meta["warmup_steps"]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=meta["ds_config"],
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, warmup)))
    accum, micro = engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()
    bert = backbone.cfg.objective == "bert"
    n_classes, clf_weight = meta["n_classes"], meta["clf_weight"]
    client = MlflowClient(meta["tracking_uri"]) if rank == 0 else None
    run_id = meta["run_id"]

    def log(metrics: dict, step: int) -> None:
        if client:
            ms = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), ms, step) for k, v in metrics.items()])

    def check_labels(y: torch.Tensor) -> None:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(f"labels must lie in [0, {n_classes}) (n_classes), got {int(y.min())}..{int(y.max())}"
                             " (-1: a record without a label)")

    # ---- evaluation splits: this rank's share, read once (no augmentation: the same images every epoch) ------
    shares: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}

    def share(name: str):
        if name not in shares:
            xs, ys, ks = [], [], []
            for b in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy"):
                mine = [i for i, k in enumerate(b["key"]) if owner(str(k), world) == rank]
                if mine:
                    xs.append(torch.as_tensor(_stack(b["tokens"])[mine].astype("int64")))
                    ys.append(torch.as_tensor(b["label"][mine].astype("int64")))
                    ks += [str(b["key"][i]) for i in mine]
            x = torch.cat(xs) if xs else torch.zeros(0, backbone.cfg.n_ctx, dtype=torch.int64)
            y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
            check_labels(y)
            shares[name] = (x, y, ks)
        return shares[name]

    def evaluate(name: str) -> tuple[float, int]:
        x, y, keys = share(name)
        batches = torch.tensor([math.ceil(len(y) / micro)])
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)  # every rank runs as many forwards (ZeRO-3 collectives)
        correct = 0
        engine.eval()
        for i in range(int(batches)):
            xb, yb, kb = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro], keys[i * micro:(i + 1) * micro]
            if len(yb) == 0:  # this rank's share is used up: a padding pass, not counted
                predict(engine.module, torch.zeros(1, backbone.cfg.n_ctx, dtype=torch.int64, device=device), ["pad"])
                continue
            correct += int((predict(engine.module, xb.to(device), kb) == yb).sum())
        engine.train()
        counts = torch.tensor([correct, len(y)], dtype=torch.float64)
        dist.all_reduce(counts)
        return float(counts[0] / max(counts[1], 1)), int(counts[1])

    best_dir = Path(tempfile.mkdtemp(prefix="igpt_finetune_"))

    def keep_weights(**info) -> None:
        weights = full_fp32_state_dict(engine)  # collective: every rank gathers
        if rank == 0:
            save_classifier(best_dir, weights, meta, **info)

    # ---- training ------------------------------------------------------------------------------------------
    batches = ray.train.get_dataset_shard("train").iter_torch_batches(
        batch_size=micro, drop_last=True, dtypes={"tokens": torch.int64, "label": torch.int64}, device=device)
    it = iter(batches)
    steps_per_epoch, patience = meta["steps_per_epoch"], meta["patience"]
    early_stopping = "val" in meta["evals"]
    step, epoch, best_acc, best_epoch, stopped_early = 0, 0, -1.0, 0, False
    val_images = 0
    engine.train()
    for epoch in range(1, meta["epochs"] + 1):
        epoch_sums = torch.zeros(3, dtype=torch.float64)  # clf, gen, micro-batches
        for _ in range(steps_per_epoch):
            sums = torch.zeros(4, dtype=torch.float64)  # clf, gen, correct, images
            for _ in range(accum):
                batch = next(it)
                x, y = batch["tokens"], batch["label"]
                check_labels(y)
                mask = backbone.bert_mask(x) if bert else None
                logits, gen = engine(x, mask)
                clf = F.cross_entropy(logits.float(), y)
                engine.backward(clf_weight * clf + gen)
                engine.step()
                sums += torch.tensor([clf.item(), gen.item(), int((logits.argmax(1) == y).sum()), len(y)],
                                     dtype=torch.float64)
            step += 1
            dist.all_reduce(sums)
            clf_mean, gen_mean = (sums[:2] / (accum * world)).tolist()
            if not (math.isfinite(clf_mean) and math.isfinite(gen_mean)):
                raise FloatingPointError(f"loss is not finite at step {step} (clf {clf_mean}, gen {gen_mean}): "
                                         f"lower the learning rate ({meta['lr']:g})")
            epoch_sums += torch.tensor([clf_mean, gen_mean, 1.0], dtype=torch.float64)
            log({"train/loss": clf_weight * clf_mean + gen_mean, "train/loss_clf": clf_mean,
                 "train/loss_gen": gen_mean, "train/accuracy": float(sums[2] / sums[3]),
                 "train/lr": engine.get_lr()[0]}, step)
        log({"epoch/loss_clf": epoch_sums[0] / epoch_sums[2], "epoch/loss_gen": epoch_sums[1] / epoch_sums[2],
             "epoch/step": step}, epoch)
        if early_stopping:
            acc, val_images = evaluate("val")
            log({"val/accuracy": acc, "val/images": val_images}, epoch)
            if acc > best_acc:  # strictly higher: a tie keeps the earlier (shorter) epoch
                best_acc, best_epoch = acc, epoch
                keep_weights(epoch=epoch, val_accuracy=acc)
            elif epoch - best_epoch >= patience:
                stopped_early = True
                break
    if not early_stopping:  # a refit keeps its last epoch
        best_epoch = epoch
        keep_weights(epoch=epoch)
    result = {"epochs": epoch, "steps": step, "best_epoch": best_epoch, "stopped_early": stopped_early}
    if early_stopping:
        result.update(best_val_accuracy=best_acc, val_images=val_images)
    if "test" in meta["evals"]:  # no early stopping: the kept weights are the engine's own
        acc, n = evaluate("test")
        result.update(test_accuracy=acc, test_images=n)
        log({"test/accuracy": acc, "test/images": n}, step)
    ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(str(best_dir)) if rank == 0 else None,
                     checkpoint_dir_name="classifier")
    shutil.rmtree(best_dir, ignore_errors=True)  # persisted by report


def _stack(col):
    """A Ray Data numpy column of fixed-size token lists -> (B, T) array (it may arrive as an object array)."""
    import numpy as np

    arr = np.asarray(col)
    return np.stack(arr) if arr.dtype == object else arr
