"""Fine-tuning: the classifier around a pretrained iGPT, its evaluation, and the per-worker loop (runs inside each
Ray Train worker; the driver is ``igpt/train/finetune_job.py``).

The paper's recipe (Chen et al. 2020, section 3.3): average-pool the last layer's output (after the final norm)
over the sequence, a linear head to the classes, and train everything on L = L_CLF + L_GEN, where L_GEN is the
objective the model was pretrained with, on the same forward pass of the same images. BERT models are evaluated as
the paper does it: each image under 5 independent masks (``igpt.eval.ensemble``), the modal prediction wins.

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from igpt.eval.ensemble import eval_masks, modal
from igpt.model import IGPT, ModelConfig
from igpt.train.trainer import RunSpec, Trainer

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
    masks = eval_masks(list(keys), cfg.n_ctx, cfg.bert_mask_prob).to(tokens.device)  # (N_MASKS, B, T)
    scores = torch.stack([model(tokens, m, gen_loss=False)[0].float().cpu() for m in masks])  # (N_MASKS, B, C)
    return modal(scores.argmax(-1), scores)


def owner(key: str, world: int) -> int:
    """The rank that evaluates this record: a keyed hash, so the ranks' shares are disjoint and cover the split
    whatever order each rank reads it in."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % world


def save_classifier(folder: Path, state_dict: dict, model_cfg: dict, n_classes: int, palette: list, **info) -> Path:
    """The fine-tuned weights (backbone.* and clf.*, fp32) with the model config, classes and palette; loads with
    ``torch.load(weights_only=True)``."""
    path = Path(folder) / CLASSIFIER
    torch.save({"state_dict": state_dict, "model": model_cfg, "n_classes": n_classes,
                "palette": torch.tensor(palette, dtype=torch.float32), **info}, path)
    return path


def load_classifier(path: str | Path) -> Classifier:
    """A fine-tuned classifier from its ``classifier/`` folder or ``classifier.pt``, local or on object storage."""
    import io

    from igpt import cli
    from igpt.storage import Loc

    p = Loc(path)
    data = torch.load(io.BytesIO((p / CLASSIFIER if p.is_dir() else p).read_bytes()), map_location="cpu",
                      weights_only=True)
    model = Classifier(IGPT(cli.from_dict(ModelConfig, data["model"])), data["n_classes"])
    model.load_state_dict(data["state_dict"])
    return model.eval()


@dataclass(frozen=True)
class FinetuneSpec:
    """What the fine-tuning driver decided for every worker, beyond the shared :class:`RunSpec`."""

    run: RunSpec
    checkpoint: str
    """the pretrained weights (weights.pt) the backbone starts from"""
    n_classes: int
    lr: float
    clf_weight: float
    epochs: int
    patience: int | None
    """epochs without a higher validation accuracy before stopping; None: train every epoch (a refit)"""
    steps_per_epoch: int
    evals: tuple[str, ...]
    """"val" for early stopping, or "test" once at the end (never both: a refit keeps its last epoch)"""


def finetune_loop(config: dict) -> None:
    """One fine-tuning run on one worker; ``config["spec"]`` is the driver's :class:`FinetuneSpec`."""
    job = Finetuning(config["spec"])
    try:
        job.run()
    finally:
        job.t.close()


class Finetuning:
    """The fine-tuning loop of one worker: epochs of L = clf_weight * L_CLF + L_GEN, evaluation after each epoch,
    the best epoch's weights kept (early stopping) or the last (a refit), reported to Ray Train at the end."""

    def __init__(self, spec: FinetuneSpec):
        from igpt.train import checkpoints

        if "test" in spec.evals and "val" in spec.evals:
            raise ValueError("a run evaluates test only without early stopping (its last epoch is the one it keeps)")
        self.spec = spec
        torch.manual_seed(spec.run.seed)  # the same head (zeros) and the same BERT training masks on every rank
        self.backbone = IGPT(ModelConfig(**spec.run.model))
        self.backbone.load_state_dict(checkpoints.load(spec.checkpoint)["state_dict"])
        self.t = Trainer(spec.run, Classifier(self.backbone, spec.n_classes))
        self.shares: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}
        self.best_dir = Path(tempfile.mkdtemp(prefix="igpt_finetune_"))

    def check_labels(self, y: torch.Tensor) -> None:
        n = self.spec.n_classes
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
            raise ValueError(f"labels must lie in [0, {n}) (n_classes), got {int(y.min())}..{int(y.max())}"
                             " (-1: a record without a label)")

    def share(self, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """This rank's share of an evaluation split, read once (no augmentation: the same images every epoch)."""
        import ray.train

        if name not in self.shares:
            xs, ys, ks = [], [], []
            for b in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="numpy"):
                mine = [i for i, k in enumerate(b["key"]) if owner(str(k), self.t.world) == self.t.rank]
                if mine:
                    xs.append(torch.as_tensor(_stack(b["tokens"])[mine].astype("int64")))
                    ys.append(torch.as_tensor(b["label"][mine].astype("int64")))
                    ks += [str(b["key"][i]) for i in mine]
            x = torch.cat(xs) if xs else torch.zeros(0, self.backbone.cfg.n_ctx, dtype=torch.int64)
            y = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.int64)
            self.check_labels(y)
            self.shares[name] = (x, y, ks)
        return self.shares[name]

    def evaluate(self, name: str) -> tuple[float, int]:
        """Accuracy over the whole split and its image count: each rank its share, padded to as many forwards
        as the largest share (ZeRO-3 gathers parameters collectively in each forward), counts summed."""
        x, y, keys = self.share(name)
        micro, engine = self.t.micro, self.t.engine
        batches = torch.tensor([math.ceil(len(y) / micro)])
        dist.all_reduce(batches, op=dist.ReduceOp.MAX)
        correct = 0
        engine.eval()
        for i in range(int(batches)):
            sl = slice(i * micro, (i + 1) * micro)
            if len(y[sl]) == 0:  # this rank's share is used up: a padding pass, not counted
                pad = torch.zeros(1, self.backbone.cfg.n_ctx, dtype=torch.int64, device=self.t.device)
                predict(engine.module, pad, ["pad"])
                continue
            correct += int((predict(engine.module, x[sl].to(self.t.device), keys[sl]) == y[sl]).sum())
        engine.train()
        counts = torch.tensor([correct, len(y)], dtype=torch.float64)
        dist.all_reduce(counts)
        return float(counts[0] / max(counts[1], 1)), int(counts[1])

    def keep_weights(self, **info) -> None:
        weights = self.t.gathered_weights()  # collective: every rank gathers
        if self.t.rank == 0:
            run = self.spec.run
            save_classifier(self.best_dir, weights, run.model, self.spec.n_classes, run.palette, **info)

    def _loss(self, engine, batch: dict):
        x, y = batch["tokens"], batch["label"]
        self.check_labels(y)
        mask = self.backbone.bert_mask(x) if self.backbone.cfg.objective == "bert" else None
        logits, gen = engine(x, mask)
        clf = F.cross_entropy(logits.float(), y)
        kept = torch.tensor([clf.item(), gen.item(), int((logits.argmax(1) == y).sum()), len(y)],
                            dtype=torch.float64)
        return self.spec.clf_weight * clf + gen, kept

    def train_epoch(self, batches, step: int) -> tuple[int, torch.Tensor]:
        """One epoch of optimizer steps; (the step reached, the epoch's summed clf loss, gen loss and steps)."""
        epoch_sums = torch.zeros(3, dtype=torch.float64)
        for _ in range(self.spec.steps_per_epoch):
            t0 = time.perf_counter()
            sums = torch.stack(self.t.step(batches, self._loss)).sum(0)  # clf, gen, correct, images
            step += 1
            dist.all_reduce(sums)
            wait = self.t.data_wait(time.perf_counter() - t0, 1, step)
            clf_mean, gen_mean = (sums[:2] / (self.t.accum * self.t.world)).tolist()
            if not (math.isfinite(clf_mean) and math.isfinite(gen_mean)):
                raise FloatingPointError(f"loss is not finite at step {step} (clf {clf_mean}, gen {gen_mean}): "
                                         f"lower the learning rate ({self.spec.lr:g})")
            epoch_sums += torch.tensor([clf_mean, gen_mean, 1.0], dtype=torch.float64)
            self.t.log({"train/loss": self.spec.clf_weight * clf_mean + gen_mean, "train/loss_clf": clf_mean,
                        "train/loss_gen": gen_mean, "train/accuracy": float(sums[2] / sums[3]),
                        "train/lr": self.t.lr(), **wait}, step)
        return step, epoch_sums

    def run(self) -> None:
        import ray.train

        spec = self.spec
        batches = iter(ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=self.t.micro, drop_last=True, dtypes={"tokens": torch.int64, "label": torch.int64},
            device=self.t.device))
        early_stopping = "val" in spec.evals
        step, epoch, best_acc, best_epoch, stopped_early, val_images = 0, 0, -1.0, 0, False, 0
        self.t.engine.train()
        for epoch in range(1, spec.epochs + 1):
            step, sums = self.train_epoch(batches, step)
            self.t.log({"epoch/loss_clf": sums[0] / sums[2], "epoch/loss_gen": sums[1] / sums[2],
                        "epoch/step": step}, epoch)
            if early_stopping:
                acc, val_images = self.evaluate("val")
                self.t.log({"val/accuracy": acc, "val/images": val_images}, epoch)
                if acc > best_acc:  # strictly higher: a tie keeps the earlier (shorter) epoch
                    best_acc, best_epoch = acc, epoch
                    self.keep_weights(epoch=epoch, val_accuracy=acc)
                elif epoch - best_epoch >= spec.patience:
                    stopped_early = True
                    break
        if not early_stopping:  # a refit keeps its last epoch
            best_epoch = epoch
            self.keep_weights(epoch=epoch)
        self.t.log_data_wait_share(step)
        result = {"epochs": epoch, "steps": step, "best_epoch": best_epoch, "stopped_early": stopped_early}
        if early_stopping:
            result.update(best_val_accuracy=best_acc, val_images=val_images)
        if "test" in spec.evals:  # no early stopping: the kept weights are the engine's own
            acc, n = self.evaluate("test")
            result.update(test_accuracy=acc, test_images=n)
            self.t.log({"test/accuracy": acc, "test/images": n}, step)
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(str(self.best_dir))
                         if self.t.rank == 0 else None, checkpoint_dir_name="classifier")
        shutil.rmtree(self.best_dir, ignore_errors=True)  # persisted by report


def _stack(col):
    """A Ray Data numpy column of fixed-size token lists -> (B, T) array (it may arrive as an object array)."""
    import numpy as np

    arr = np.asarray(col)
    return np.stack(arr) if arr.dtype == object else arr
