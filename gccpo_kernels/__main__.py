"""``python -m gccpo_kernels``: print versions, devices, usable backends and the automatic choice."""

from gccpo_kernels._backend import explain

if __name__ == "__main__":
    print(explain())
