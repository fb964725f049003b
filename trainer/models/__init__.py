"""Encoders and their heads. Model code holds no parallelism: no torch.distributed here."""
