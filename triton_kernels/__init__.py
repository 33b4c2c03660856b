"""Triton kernels, installed as ``mergekit_fast.triton_kernels`` (one module per op).

Importing a submodule imports triton; set TRITON_INTERPRET=1 before that to run them on the CPU.
"""
