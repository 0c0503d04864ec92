"""``torch.compile`` for training: the model's forward (and, through AOTAutograd, its backward) as fused kernels.

Why: iGPT-S's blocks are small (d = 512): in eager PyTorch each norm, activation, residual add and the loss's
float cast is its own kernel reading and writing the activations, so the GPU waits on memory and kernel launches
between the matmuls. Inductor fuses those element-wise steps into the matmuls' neighbours.

How: :meth:`torch.nn.Module.compile` compiles the module's call *in place*. The module stays the same object with
the same parameters, so DeepSpeed can wrap it (``deepspeed.initialize`` after this call; it casts the parameters
to bf16 before the first forward, when compilation actually happens), and its ``state_dict`` keys stay as they
were: ``torch.compile(model)`` would instead return an ``OptimizedModule`` whose keys gain an ``_orig_mod.``
prefix, which checkpoints, ``weights.pt`` and the Hugging Face export could not read back.

Mode: the default one. ``reduce-overhead`` replays CUDA graphs, which need fixed memory addresses and no work
outside the graph between replays: DeepSpeed reduces gradients in backward hooks and manages its own buffers.
``max-autotune`` spends minutes benchmarking kernels. The first step of each new input shape and mode (train vs
evaluation under no_grad; the last, smaller evaluation batch; AR vs BERT) waits for compilation; later steps
reuse it. KV-cache decoding stays eager (:meth:`igpt.model.gpt.IGPT._decode`).

Checked equal to eager in fp32 on the CPU (tests/test_model.py) and in bf16 on a GPU (tests/test_gpu.py, ``-m
gpu``); benchmarks/gpu_pretrain.py times it under a ZeRO-2 engine. Not tried with ZeRO-3, whose parameter
gathering runs in hooks around every block, nor with activation checkpointing.
On the CPU inductor needs a C++ compiler (``g++``); ``backend="aot_eager"`` checks the tracing without one.
"""

from __future__ import annotations

from torch import nn


def compile_model(model: nn.Module, mode: str | None = None, backend: str = "inductor") -> nn.Module:
    """Compile ``model`` in place with ``torch.compile`` and return it (the same object, keys unchanged).

    Call it before ``deepspeed.initialize``. Compilation is lazy: it happens at the first forward."""
    model.compile(mode=mode, backend=backend)
    return model
