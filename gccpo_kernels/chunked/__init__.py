"""The torch backend: memory-bounded chunked code for any device and any float dtype.

Each module here mirrors one op of gccpo_kernels and has the same semantics as the reference;
no function here allocates a tensor whose size grows with N * V.
"""
