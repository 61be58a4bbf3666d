"""Model analysis: per-block MSA outputs and CLS attention (``capture``), and their CKA across blocks with the
skip choice it suggests (``cka``; SkipAt's Fig. 3). Nothing is imported here so that
``python -m skipssl.analysis.cka`` runs the module once."""
