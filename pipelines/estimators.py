"""`pipelines.estimators.FedsparkEstimator` and `FedsparkModel`, where pyspark.ml pipelines saved
before the stages moved to `pipelines.ml.estimators` record them: a saved PipelineModel names each
stage's class path, and this keeps those paths loadable."""
from pipelines.ml.estimators import FedsparkEstimator, FedsparkModel

__all__ = ["FedsparkEstimator", "FedsparkModel"]
