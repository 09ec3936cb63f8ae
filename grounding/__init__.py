"""Grounding DINO (arXiv 2303.05499) in pure PyTorch."""
