"""The iGPT decoder, as the official release (openai/image-gpt, ``src/model.py``) builds it, in plain PyTorch.

Where it differs from GPT-2, and why (each follows the release):
- Layer norm has no mean-centring and no bias: ``x * rsqrt(mean(x^2) + 1e-5) * g``.
- No biases anywhere; activation ``x * sigmoid(1.702 x)`` ("gelu2", the sigmoid approximation of GELU).
- The output matrix is untied from the input embedding and starts at zero, so every colour starts equally likely.
- A start-of-sequence token: the AR input is ``[SOS, x_0, ..., x_{n-2}]`` predicting ``x_0 .. x_{n-1}``. The release
  keeps SOS as its own vector; like Hugging Face ``transformers`` we keep it as row 512 of the embedding
  (vocabulary 513), so converted checkpoints line up.
- BERT objective: no SOS, no causal mask; masked positions have their *content* embedding zeroed (the position
  embedding is still added), and the loss counts masked positions only.

Decoding (``igpt/model/sampling.py``) passes a :class:`KVCache` to :meth:`IGPT.forward`: each block keeps the keys and
values of the positions already seen, so a new pixel costs one position's worth of work instead of re-running
the whole prefix. Without a cache the forward pass is exactly the training one; ``igpt.train.compile`` compiles
that pass with ``torch.compile``, and decoding with a cache stays eager.

This file knows nothing of Ray or DeepSpeed: parallelism wraps the module from outside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from igpt.model.config import ModelConfig


class RMSNorm(nn.Module):
    """The release's ``norm``: scale by the root mean square, multiply by a gain; no centring, no bias."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is exactly x * rsqrt(mean(x^2) + eps) * weight, in one fused kernel where one exists
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def gelu2(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class KVCache:
    """Keys and values of every block for the positions decoded so far, for incremental AR decoding.

    Why: without it, predicting pixel i re-runs positions 0..i through every block (O(T^2) position-steps for
    an image, each re-computing keys and values that cannot change under a causal mask). With it, each call
    runs only the new positions and attends to the stored keys and values.

    Buffers are allocated on the first write with the full context length (n_ctx) and the dtype/device of the
    keys themselves (bf16 under a bf16 engine), so appending is an in-place copy, never a growing ``cat``.
    ``length`` is the number of positions stored; :meth:`IGPT.forward` advances it after all blocks ran.
    """

    def __init__(self, n_layer: int, n_ctx: int):
        self.n_ctx = n_ctx
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' k, v (B, H, t, hd) of one block after the cached ones; return all of them
        (B, H, length + t, hd) as views into the buffers."""
        b, h, t, hd = k.shape
        if self.k[layer] is None:
            self.k[layer] = k.new_empty(b, h, self.n_ctx, hd)
            self.v[layer] = v.new_empty(b, h, self.n_ctx, hd)
        end = self.length + t
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)  # q, k, v stacked: one matmul
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, causal: bool, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for y in self.qkv(x).split(d, -1))
        if cache is None:
            # SDPA dispatches to flash / memory-efficient kernels on GPUs; the scale is 1/sqrt(head_dim) as released.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            past = cache.length
            k, v = cache.append(layer, k, v)  # now every position 0 .. past + t - 1
            if t == 1:
                # one new query, the last position: everything stored is in its past, so no mask at all
                y = F.scaled_dot_product_attention(q, k, v)
            elif past == 0:
                # prefill of a prefix into an empty cache: queries and keys are the same positions, plain causal
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                # several new queries after cached ones: SDPA's is_causal aligns the mask to the top-left corner
                # (query 0 would see key 0 only), so give the bottom-right-aligned mask explicitly
                mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(gelu2(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_2 = RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, causal: bool, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, cache, layer)
        return x + self.mlp(self.ln_2(x))


class IGPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)  # 512 colours + SOS (id 512)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_colors, bias=False)  # untied; SOS is never predicted
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The release's initialisers: wte N(0, 0.02), wpe N(0, 0.01), q/k/v N(0, 1/sqrt(d)),
        attention output N(0, 1/sqrt(d * n_layer)), MLP N(0, 0.02), output matrix 0, norm gains 1."""
        d, n_layer = self.cfg.d_model, self.cfg.n_layer
        nn.init.normal_(self.wte.weight, std=0.02)
        nn.init.normal_(self.wpe.weight, std=0.01)
        for blk in self.h:
            nn.init.normal_(blk.attn.qkv.weight, std=1 / math.sqrt(d))
            nn.init.normal_(blk.attn.proj.weight, std=1 / math.sqrt(d * n_layer))
            nn.init.normal_(blk.mlp.fc.weight, std=0.02)
            nn.init.normal_(blk.mlp.proj.weight, std=0.02)
            blk.ln_1.weight.fill_(1.0)
            blk.ln_2.weight.fill_(1.0)
        self.ln_f.weight.fill_(1.0)
        nn.init.zeros_(self.head.weight)

    # ---- the network ------------------------------------------------------------------------------------
    def _embed(self, idx: torch.Tensor, content_mask: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        """Content + position embedding of ``idx`` (B, t) sitting at positions ``start .. start + t - 1``
        (``start`` > 0 only when decoding with a cache: the new tokens follow the cached ones)."""
        t = idx.shape[1]
        if start + t > self.cfg.n_ctx:
            raise ValueError(f"sequence of {start + t} tokens exceeds the context of {self.cfg.n_ctx}")
        h = self.wte(idx)
        if content_mask is not None:
            h = h * (~content_mask).unsqueeze(-1).to(h.dtype)  # zero the content, keep the position below
        return h + self.wpe(torch.arange(start, start + t, device=idx.device))

    def _blocks(self, h: torch.Tensor, causal: bool) -> torch.Tensor:
        for blk in self.h:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(blk, h, causal, use_reentrant=False)
            else:
                h = blk(h, causal)
        return self.ln_f(h)

    def forward(
        self,
        idx: torch.Tensor,
        causal: bool | None = None,
        content_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, 512) for raw input ids (B, T) in [0, 513); ``content_mask`` (B, T) bool zeroes the
        content embedding of those positions. Use :meth:`ar_inputs` / :meth:`loss` for the objectives.

        ``causal`` defaults to the model's objective (AR: a causal mask; BERT: none): a caller that gives only
        ``idx`` (MLflow's pyfunc serving a logged model, say) gets the attention the model was trained with.

        With ``targets`` (the colour tokens, B, T), the objective's loss instead (:meth:`loss`): the training step
        calls the model this way, so that it goes through DeepSpeed's engine forward (:meth:`objective_inputs`).

        With ``cache`` (from :meth:`new_cache`; AR decoding only): ``idx`` holds the *next* input ids, at
        positions ``cache.length ..``; they attend to the cached positions and themselves, their keys and values
        are appended, and the logits are those the full causal forward gives at these positions."""
        if causal is None:
            causal = self.cfg.objective == "ar"
        if cache is None:
            logits = self.head(self._blocks(self._embed(idx, content_mask), causal))
            return logits if targets is None else self._objective_loss(logits, targets, content_mask)
        return self._decode(idx, causal, content_mask, cache)

    # A compiled model (igpt.train.compile) decodes eagerly, exactly as tested here: compile is for training, and
    # tracing this would compile two more graphs (the prefix, then one position at a dynamic cache length) around
    # in-place writes to the cache, at the first completions of a run.
    @torch.compiler.disable
    def _decode(self, idx: torch.Tensor, causal: bool, content_mask: torch.Tensor | None,
                cache: KVCache) -> torch.Tensor:
        if not causal or content_mask is not None:
            raise ValueError("a KV cache is for causal (AR) decoding: no content_mask, causal=True")
        h = self._embed(idx, None, start=cache.length)
        for i, blk in enumerate(self.h):
            h = blk(h, True, cache, i)
        cache.length += idx.shape[1]  # only now: every block wrote its keys at the same positions
        return self.head(self.ln_f(h))

    def new_cache(self) -> KVCache:
        """An empty KV cache for this model (buffers appear on the first cached forward)."""
        return KVCache(self.cfg.n_layer, self.cfg.n_ctx)

    # ---- objectives -------------------------------------------------------------------------------------
    def ar_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Colour tokens (B, T) -> AR input ids ``[SOS, x_0 .. x_{T-2}]``."""
        sos = torch.full_like(tokens[:, :1], self.cfg.sos_id)
        return torch.cat([sos, tokens[:, :-1]], 1)

    def bert_mask(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each position masked independently with probability ``bert_mask_prob``, as released."""
        u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
        return u < self.cfg.bert_mask_prob

    def objective_inputs(
        self, tokens: torch.Tensor, objective: str | None = None, mask: torch.Tensor | None = None
    ) -> dict:
        """:meth:`forward`'s arguments for the objective's loss on colour tokens (B, T): ``model(**inputs)`` is
        :meth:`loss`, and ``engine(**inputs)`` the same through DeepSpeed's forward. AR: the SOS-shifted input
        under a causal mask. BERT: the tokens with ``mask`` (default: a fresh :meth:`bert_mask`) zeroed, no causal
        mask."""
        objective = objective or self.cfg.objective
        if objective == "ar":
            return {"idx": self.ar_inputs(tokens), "causal": True, "targets": tokens}
        if objective == "bert":
            mask = self.bert_mask(tokens) if mask is None else mask
            return {"idx": tokens, "causal": False, "content_mask": mask, "targets": tokens}
        raise ValueError(f"unknown objective {objective!r}; expected 'ar' or 'bert'")

    def loss(
        self, tokens: torch.Tensor, objective: str | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean cross-entropy in nats per predicted token.

        ``ar``: next-token loss over every position. ``bert``: loss over masked positions only, averaged per
        image then over the batch (as released); ``mask`` defaults to a fresh :meth:`bert_mask`.
        """
        return self(**self.objective_inputs(tokens, objective, mask))

    @staticmethod
    def _objective_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:  # AR: every position predicts its token
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long())
        ce = F.cross_entropy(logits.transpose(1, 2).float(), targets.long(), reduction="none")  # (B, T)
        m = mask.to(ce.dtype)
        return ((ce * m).sum(1) / m.sum(1).clamp(min=1)).mean()

    # ---- linear-probe features -------------------------------------------------------------------------
    @torch.no_grad()
    def features(
        self,
        tokens: torch.Tensor,
        layers: list[int] | None = None,
        objective: str | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """For each requested layer l in 0..L (L = ``n_layer``; default all L + 1), the sequence-mean (B, d) of
        the residual stream after l blocks, normalised: ``ln_1(h_l)`` of block l's input for l < L, and
        ``ln_f(h_L)`` for l = L, the final output the fine-tuning head pools (the paper probes every layer, the
        last included). All from a single forward pass, run as the model was trained: AR models see the
        SOS-shifted input under a causal mask, BERT models the unshifted input with no mask (and ``mask``
        zeroed, if given)."""
        objective = objective or self.cfg.objective
        n_layer = self.cfg.n_layer
        layers = list(range(n_layer + 1)) if layers is None else list(layers)
        for l in layers:
            if not 0 <= l <= n_layer:
                raise ValueError(f"layer {l} out of range [0, {n_layer}]")
        taps: dict[int, torch.Tensor] = dict.fromkeys(layers)  # type: ignore[arg-type]
        h = self._embed(self.ar_inputs(tokens), None) if objective == "ar" else self._embed(tokens, mask)
        # run only the blocks below the deepest requested layer: later ones cannot change the taps
        deepest = max(layers)
        for i in range(deepest + 1):
            if i in taps:  # the paper's probe feature: the pooled stream after i blocks, normalised
                taps[i] = (self.h[i].ln_1(h) if i < n_layer else self.ln_f(h)).mean(1)
            if i < deepest:
                h = self.h[i](h, objective == "ar")
        return taps

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
