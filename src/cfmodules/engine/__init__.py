"""Cut a generator at a layer and run what follows.

Graph capture, the prefix state, suffix runs, the linear shortcut, BatchNorm folding and
GEMM transposed convolutions live here; influence maps, hybrids and evaluation use them
through the adapter's ``split``.
"""
