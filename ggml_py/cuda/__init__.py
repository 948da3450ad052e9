"""CUDA kernels of the CuPy backend (see DESIGN.md in this folder)."""
