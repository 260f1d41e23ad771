"""Synthetic layers shared by the algorithm tests: Gaussian weights, activations with a
few outlier channels (x20), as in LLM activations."""

import torch

OUTLIERS = [3, 50, 100, 200]


def make_layer(out=64, k=256, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, k, generator=g)
    X = torch.randn(tokens, k, generator=g)
    X[:, [c for c in OUTLIERS if c < k]] *= 20
    return W, X


def output_mse(W, X, w_hat):
    return float((X @ w_hat.T - X @ W.T).pow(2).mean())
