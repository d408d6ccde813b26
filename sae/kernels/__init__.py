"""Kernels: the hot loops, apart from model logic.

    autograd.py   sparse autograd functions (TopK / BatchTopK selection, sparse decode) with hand-written backwards
    native.py     the C kernels in csrc/, built on first use with the machine's compiler and loaded with ctypes
    matmul.py     matrix-product dispatch (oneDNN on the CPU where it is faster, bf16 products)

May import: sae.errors, sae.files, sae.distributed. Nothing else of the project.
"""
