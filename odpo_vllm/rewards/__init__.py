"""Rewards: reward models, callables and pairwise judges (scorer), and reward-model actors (workers)."""
