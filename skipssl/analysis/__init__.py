"""Model analysis: per-block MSA outputs and CLS attention (``capture``), and their CKA across blocks with the
skip choice it suggests (``cka``; SkipAt's Fig. 3), attention maps (``attention``). The commands that run them
on checkpoints are :mod:`skipssl_eval.cka` and :mod:`skipssl_eval.attention`."""
