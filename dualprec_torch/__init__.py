"""dualprec_torch: carries a dualprec Policy out in PyTorch."""
