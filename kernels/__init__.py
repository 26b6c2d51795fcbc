"""Standalone Triton kernels (import only torch and triton); fastdino chooses when to call them."""
