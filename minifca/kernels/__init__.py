"""Fast paths beside the NumPy reference, each function named after the one it replaces.

`cpu`  Numba kernels (backend="numba", the default): `import minifca.kernels.cpu as ops`.
`cuda` numba.cuda kernels (backend="cuda").

Nothing is imported here, so choosing one backend never compiles or initialises another.
"""
