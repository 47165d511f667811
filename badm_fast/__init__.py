"""badm_fast: a fused BADM (batch ADMM) optimizer for PyTorch."""
