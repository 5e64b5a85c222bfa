"""fedspark's trainers as pyspark.ml stages: `FedsparkEstimator` fits with the `local`, `sync` or
`federated` strategy on any DataFrame with a vector or array features column and a numeric label,
and returns a `FedsparkModel` whose `transform` adds prediction and probability columns on the
executors (mapInArrow in udfs/ml/scoring.py, as score.py; no collect). Both live in Pipelines, CrossValidator and
TrainValidationSplit, and save and load with pyspark.ml's persistence: the model's weights are
stored as JSON numbers in its metadata, never pickled.

    from pipelines.ml.estimators import FedsparkEstimator
    est = FedsparkEstimator(strategy="local", modelKind="mlp", hidden=[64], epochs=5)
    model = Pipeline(stages=[VectorAssembler(...), StandardScaler(...), est]).fit(df)

Params are declared once (`_FedsparkParams`) and shared by the Estimator and the Model, as
pyspark.ml does. Each maps to a config key (conf/default.yaml gives the defaults) and is checked
by the same rules, with errors that name the Param.
"""
from __future__ import annotations

import secrets
from typing import Any

import numpy as np
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import HasFeaturesCol, HasLabelCol, HasPredictionCol, HasProbabilityCol, HasSeed
from pyspark.ml.util import (
    DefaultParamsReadable,
    DefaultParamsReader,
    DefaultParamsWritable,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.core.config import Config, ConfigError, config_from_dict, deep_merge, nested
from pipelines.core.errors import UserError
from pipelines.data.blocks import blocks_from_rows, training_rows
from pipelines.federated import privacy, rounds
from pipelines.federated.clients import clients_from_rows
from pipelines.ml.scoring import score_rows
from pipelines.store import artifacts
from pipelines.training import data_parallel, runners
from udfs.core import models
from udfs.core.models import ModelSpec
from udfs.data.transform import NONE, Transform
from udfs.ml.scoring import Scoring

SOURCE = "DataFrame"
SCORED_FEATURES = "_fedspark_features"          # the features as array<float>, for scoring
SCORED_PROBABILITY = "_fedspark_probability"    # the probabilities as array<double>, before vector

# Param -> (config key, type converter, default): the defaults are conf/default.yaml's
PARAMS: dict[str, tuple[str, Any]] = {
    "strategy": ("trainer.strategy", TypeConverters.toString),
    "modelKind": ("model.kind", TypeConverters.toString),
    "hidden": ("model.hidden", TypeConverters.toListInt),
    "epochs": ("trainer.epochs", TypeConverters.toInt),
    "batchSize": ("trainer.batch_size", TypeConverters.toInt),
    "optimizer": ("trainer.optimizer.name", TypeConverters.toString),
    "learningRate": ("trainer.optimizer.lr", TypeConverters.toFloat),
    "validationFraction": ("data.validation_fraction", TypeConverters.toFloat),
    "partitions": ("data.partitions", TypeConverters.toInt),
    "dtype": ("trainer.dtype", TypeConverters.toString),
    "clients": ("federated.clients", TypeConverters.toInt),
    "partitioner": ("federated.partitioner", TypeConverters.toString),
    "clientCol": ("federated.client_column", TypeConverters.toString),
    "fraction": ("federated.fraction", TypeConverters.toFloat),
    "localEpochs": ("federated.local_epochs", TypeConverters.toInt),
    "localBatchSize": ("federated.local_batch_size", TypeConverters.toInt),
    "rounds": ("federated.rounds", TypeConverters.toInt),
    "federatedStrategy": ("federated.strategy", TypeConverters.toString),
}
STRATEGIES = ("local", "sync", "federated")


class _FedsparkParams(HasFeaturesCol, HasLabelCol, HasPredictionCol, HasProbabilityCol, HasSeed):
    """The Params of FedsparkEstimator and FedsparkModel (see PARAMS for the config keys)."""

    def __init__(self) -> None:
        super().__init__()
        defaults = config_from_dict({})
        self._setDefault(**{name: self._config_value(defaults, key) for name, (key, _) in PARAMS.items()})
        self._setDefault(seed=0, strategy="local", probabilityCol="probability")

    @staticmethod
    def _config_value(config: Config, key: str) -> Any:
        node: Any = config.to_dict()
        for part in key.split("."):
            node = node[part]
        return node

    def config(self) -> Config:
        """The job configuration these Params describe; an illegal value is a ValueError naming the
        Param, its rule and the value given."""
        raw: dict = {"trainer": {"seed": self.getOrDefault(self.seed) % (2 ** 31)}}
        for name, (key, _) in PARAMS.items():
            value = self.getOrDefault(getattr(self, name))
            try:
                config_from_dict(deep_merge(raw, nested(key, value)), f"Param {name}")
            except ConfigError as exc:
                detail = str(exc).split("\n", 1)[-1].strip().split(f"{key}: ", 1)[-1]
                raise ValueError(f"Param {name}={value!r} is not allowed ({key}): {detail}") from None
            raw = deep_merge(raw, nested(key, value))
        strategy = self.getOrDefault("strategy")   # Params made from PARAMS are looked up by name
        if strategy not in STRATEGIES:
            raise ValueError(f"Param strategy must be one of {STRATEGIES}, got {strategy!r}")
        return config_from_dict(raw, "Params")


for _name, (_key, _converter) in PARAMS.items():  # declared once, on the shared class
    setattr(_FedsparkParams, _name, Param(Params._dummy(), _name, f"config key {_key}",
                                          typeConverter=_converter))


def _features_as_array(dataset: DataFrame, column: str) -> Any:
    """The features column as array<float>, from a vector or a numeric array column."""
    if column not in dataset.columns:
        raise ValueError(f"features column {column!r} not found; the DataFrame has {dataset.columns}")
    kind = dataset.schema[column].dataType
    if isinstance(kind, VectorUDT):
        return vector_to_array(F.col(column), "float32")
    if isinstance(kind, T.ArrayType) and isinstance(kind.elementType, T.NumericType):
        return F.col(column).cast("array<float>")
    raise ValueError(f"features column {column!r} is {kind.simpleString()}; expected a vector "
                     "(e.g. from VectorAssembler) or an array of numbers")


class FedsparkEstimator(Estimator, _FedsparkParams, DefaultParamsReadable, DefaultParamsWritable):
    """Trains a fedspark model with the `local`, `sync` or `federated` strategy."""

    _input_kwargs: dict[str, Any]   # set by @keyword_only, as in pyspark.ml's own estimators

    @keyword_only
    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self._set(**self._input_kwargs)

    @keyword_only
    def setParams(self, **kwargs: Any) -> FedsparkEstimator:
        return self._set(**self._input_kwargs)

    def _training_rows(self, dataset: DataFrame, config: Config) -> DataFrame:
        label = self.getLabelCol()
        if label not in dataset.columns:
            raise ValueError(f"label column {label!r} not found; the DataFrame has {dataset.columns}")
        kind = dataset.schema[label].dataType
        if not isinstance(kind, T.NumericType):
            raise ValueError(f"label column {label!r} is {kind.simpleString()}; expected numbers "
                             "(index string labels first, e.g. with StringIndexer)")
        cast = "int" if isinstance(kind, T.IntegralType) or config.model.kind != "linear" else "double"
        extra = []
        if config.trainer.strategy == "federated" and config.federated.partitioner == "column":
            extra = [F.col(config.federated.client_column)]
        rows = dataset.select(F.monotonically_increasing_id().alias("id"),
                              _features_as_array(dataset, self.getFeaturesCol()).alias("features"),
                              F.col(label).cast(cast).alias("label"), F.lit("train").alias("split"),
                              *extra)
        if rows.limit(1).count() == 0:
            raise ValueError("the DataFrame to fit has no rows")
        return training_rows(rows, SOURCE, tuple(c for c in rows.columns[4:]))

    def _fit(self, dataset: DataFrame) -> FedsparkModel:
        config = self.config()
        spark = dataset.sparkSession
        rows = self._training_rows(dataset, config)
        try:
            spec, theta = _train(spark, config, rows)
        except UserError as exc:
            raise ValueError(f"features column {self.getFeaturesCol()!r} / label column "
                             f"{self.getLabelCol()!r}: {exc}") from None
        if not isinstance(spec, ModelSpec):
            raise ValueError(f"FedsparkEstimator trains the built-in models; modelKind={spec.kind} is not one")
        model = FedsparkModel(spec.kind, list(spec.layers), theta)
        return self._copyValues(model)


def _train(spark: Any, config: Config, rows: DataFrame) -> tuple[models.Model, np.ndarray]:
    """Train with the configured strategy; (spec, final weights)."""
    t = config.trainer
    sc = spark.sparkContext
    if t.strategy == "federated":
        clients = clients_from_rows(spark, config, rows, SOURCE, 0)
        try:
            spec, fed_state = runners.federated_start(config, clients)
            fed_state = rounds.fit(sc, config, clients, None, spec, fed_state, lambda s, r: None,
                                   client_eval=False, run_id=f"estimator-{secrets.token_hex(8)}",
                                   noise_secret=privacy.fresh_secret(config))
        finally:
            clients.release()
        return spec, fed_state.theta
    data = blocks_from_rows(spark, rows, SOURCE, 0, config.data.partitions, t.seed,
                            config.data.validation_fraction, ("train",))
    try:
        spec, job, state = runners.data_parallel_start(config, data)
        state = data_parallel.train(sc, data, job, runners.settings_of(config), state, lambda s, r: None)
    finally:
        data.release()
    return spec, state.theta


class FedsparkModel(Model, _FedsparkParams, MLReadable, MLWritable):
    """A trained fedspark model: `transform` adds `predictionCol` (and `probabilityCol` for
    classifiers, as a vector) on the executors, the features first transformed by the model's
    feature transform (`feature_transform`: a train.py model's imputation and scaling; the
    identity for one this estimator fitted, whose Pipeline scales with its own stages)."""

    def __init__(self, kind: str = "softmax", layers: list[int] | None = None,
                 theta: np.ndarray | None = None, feature_transform: Transform = NONE) -> None:
        super().__init__()
        self.spec = ModelSpec(kind, tuple(layers or (1, 1)))
        self.theta = np.zeros(self.spec.n_params) if theta is None else np.asarray(theta)
        self.feature_transform = feature_transform

    @classmethod
    def from_run(cls, model_or_run_dir: str) -> FedsparkModel:
        """The model train.py saved in a run directory (or its model/), with its transform."""
        spec, theta, meta = artifacts.load_model(model_or_run_dir)
        if not isinstance(spec, ModelSpec):
            raise ValueError(f"{model_or_run_dir} holds a {type(spec).__name__}; FedsparkModel holds "
                             "fedspark's own models: score a PyTorch or scikit-learn run with score.py")
        return cls(spec.kind, list(spec.layers), theta, Transform.from_dict(meta.get("transform")))

    def _transform(self, dataset: DataFrame) -> DataFrame:
        """Every column of `dataset` (the prediction and probability columns replaced, as
        withColumn would), then the prediction and, for classifiers, the probability vector. The
        rows pass through score.py's mapInArrow scoring with the features as array<float>."""
        spec, features = self.spec, self.getFeaturesCol()
        prediction, probability = self.getPredictionCol(), self.getProbabilityCol()
        keep = tuple(c for c in dataset.columns if c not in {prediction, probability})
        has_id = "id" in keep and isinstance(dataset.schema["id"].dataType, (T.LongType, T.IntegerType))
        rows = dataset.withColumn(SCORED_FEATURES, _features_as_array(dataset, features))
        scoring = Scoring(spec, SCORED_FEATURES, features, keep, "id" if has_id else None,
                          (prediction, SCORED_PROBABILITY), self.feature_transform)
        # the weights' broadcast lives as long as the lazy result may be computed: not destroyed
        scored, _ = score_rows(dataset.sparkSession, scoring, self.theta, rows)
        if not spec.is_classifier:
            return scored
        return (scored.withColumn(probability, array_to_vector(F.col(SCORED_PROBABILITY)))
                .drop(SCORED_PROBABILITY))

    def write(self) -> MLWriter:
        return _ModelWriter(self)

    @classmethod
    def read(cls) -> MLReader:
        return _ModelReader(cls)


class _ModelWriter(MLWriter):
    """Params and weights as JSON metadata (pyspark.ml's own format): no pickle, any Hadoop path."""

    def __init__(self, instance: FedsparkModel) -> None:
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        m = self.instance
        DefaultParamsWriter.saveMetadata(m, path, self.sc, extraMetadata={
            "kind": m.spec.kind, "layers": list(m.spec.layers), "dtype": str(m.theta.dtype),
            "theta": m.theta.astype(np.float64).tolist(),
            "feature_transform": m.feature_transform.to_dict()})


class _ModelReader(MLReader):
    def __init__(self, cls: type) -> None:
        super().__init__()
        self.cls = cls

    def load(self, path: str) -> FedsparkModel:
        meta = DefaultParamsReader.loadMetadata(path, self.sc)
        model = self.cls(meta["kind"], meta["layers"], np.array(meta["theta"], dtype=meta["dtype"]),
                         Transform.from_dict(meta.get("feature_transform")))
        model._resetUid(meta["uid"])
        DefaultParamsReader.getAndSetParams(model, meta)
        return model
