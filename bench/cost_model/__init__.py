"""A cost model for GPUs: every aten op of a run recorded at the dispatcher on fake tensors (FLOPs and bytes),
a roofline time per op on named devices, one efficiency factor calibrated on the paper's ViT-T row, and
predictions of SkipAt's saving (``python -m bench.cost_model``; docs/saving.md)."""
