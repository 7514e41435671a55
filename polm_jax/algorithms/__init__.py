"""Algorithms as loss functions over a batch: each returns (sum, count, metrics); the train step divides once."""
