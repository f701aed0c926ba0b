"""Benchmarks of safedpo-kernels against eager PyTorch, torch.compile, Liger-Kernel and Cut Cross-Entropy.

Run as modules from the repository root (see docs/benchmarks.md):
    python -m benchmarks.logprobs_memory          # linear_logprobs memory/time, torch path vs eager
    python -m benchmarks.loss --preset cpu        # SafeDPO loss fwd+bwd, every implementation
    python -m benchmarks.end_to_end               # training steps of a tiny random Llama
"""
