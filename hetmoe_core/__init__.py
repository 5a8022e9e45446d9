"""hetmoe: heterogeneous analog-digital Mixture-of-Experts workbench (arXiv 2603.02633)."""
__version__ = "0.1.0"
