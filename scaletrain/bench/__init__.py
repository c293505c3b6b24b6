"""`scaletrain bench`: peak GEMM, tokens/s, MFU, step-time breakdown, hand-loop comparison."""
