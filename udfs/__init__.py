"""Executor code: what runs inside Spark tasks. It never imports `pipelines` (driver code), and of
third-party distributions only pyspark (the cluster's own) and EXECUTOR_REQUIREMENTS, which is all
an executor's Python needs: scripts/package.sh installs exactly these, at the versions of the
driver's environment, into the environment it ships to executors, and tests/test_layout.py checks
the imports against them. EXECUTOR_EXTRAS are the distributions a user model kind adds on the
executors: package.sh ships them only when asked (FEDSPARK_PACKAGE_EXTRAS=torch,sklearn), since
torch with its CUDA libraries is about 6 GB (scikit-learn is a dependency of the driver anyway)."""

EXECUTOR_REQUIREMENTS = ("numpy", "scipy", "pandas", "pyarrow", "cryptography", "threadpoolctl")
EXECUTOR_EXTRAS = {"torch": ("torch", "safetensors"), "sklearn": ("scikit-learn",)}
