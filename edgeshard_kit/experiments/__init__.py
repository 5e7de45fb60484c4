"""Experiments over the library: run folders, figures, the notebooks' steps, the benchmark against the baselines, the paper, the demo."""
