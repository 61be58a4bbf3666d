"""Evaluation: feature extraction, faiss k-NN, linear probe, reports."""
