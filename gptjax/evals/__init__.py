"""Evaluation: sampling policies and scoring them (gold reward, reward-model score, KL), held-out text loss."""
