"""Kernel templates and their code generator (installed as ``attn_compiler.templates``).

The kernel templates arrive with the Triton kernels.
"""
