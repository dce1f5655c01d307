"""Swap the attention of one backbone by registry key, and run each on the same batch.

    python examples/swap_attention.py
"""

import time

import torch

import efficient_attn as ea

torch.manual_seed(0)
tokens = torch.randint(0, 256, (2, 1024))
for key in ea.list_attentions():
    causal = ea.get_spec(key).supports_causal
    task = "lm" if causal else "classify"
    extra = {} if causal else {"num_classes": 2}
    model = ea.build_model(key, task=task, vocab_size=256, dim=128, depth=2, num_heads=4, max_len=1024, **extra)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(tokens)
    elapsed = (time.perf_counter() - start) * 1000
    backends = sorted({block.attn.last_backend for block in model.blocks})
    print(f"{key:12s} task={task:8s} output {tuple(out.shape)}  backend={','.join(backends)}  {elapsed:7.1f} ms")
