"""Executor code: what runs inside Spark tasks. It never imports `pipelines` (driver code), and of
third-party distributions only pyspark (the cluster's own) and EXECUTOR_REQUIREMENTS, which is all
an executor's Python needs: scripts/package.sh installs exactly these, at the versions of the
driver's environment, into the environment it ships to executors, and tests/test_layout.py checks
the imports against them. EXECUTOR_EXTRAS are what an optional model kind adds (pyproject's extra
of the same name): package.sh ships them only when asked (FEDSPARK_PACKAGE_EXTRAS=torch), since
torch with its CUDA libraries is about 6 GB."""

EXECUTOR_REQUIREMENTS = ("numpy", "scipy", "pandas", "pyarrow", "cryptography", "threadpoolctl")
EXECUTOR_EXTRAS = {"torch": ("torch", "safetensors")}
