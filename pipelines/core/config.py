"""Job configuration: YAML files merged over `conf/default.yaml`, `--set` overrides, strict validation.

`conf/default.yaml` is the single source of default values; the models below only declare types and
ranges, so a key missing from the defaults file is an error rather than a silent second default.

The allowed names of a pluggable part (server strategies, robust rules, partitioners, attacks,
optimizers, model kinds) are the keys of the registry in the module that implements it, so adding
one there is all it takes (as scikit-learn builds `StrOptions(set(loss_functions))`). Errors for a
bad value name the key and list the allowed values in the registry's order.
"""
from __future__ import annotations

import copy
import functools
import re
import sys
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from pipelines.core.errors import UserError
from pipelines.federated import partitioners
from pipelines.federated.robust import NEEDS_INDIVIDUAL_UPDATES, RULES
from pipelines.federated.sampling import SAMPLERS
from pipelines.federated.server import STRATEGIES
from pipelines.store.rundir import local_path
from udfs.adapters import GRADIENT_FREE_KINDS, KINDS, USER_KINDS
from udfs.adapters.sklearn_estimator import ESTIMATORS, check_params
from udfs.adapters.torch_module import LOSS_HEADS
from udfs.core.models import FLOAT_DTYPES, INITIALISERS
from udfs.core.optimizers import OPTIMIZERS
from udfs.federated.attacks import ATTACKS
from udfs.federated.noise import DP_MODES


def _conf_dir() -> Path:
    """`conf/` of the source checkout (a clone, an editable install, the --py-files zip's sibling),
    else the copy a wheel installs under <prefix>/share/fedspark/conf (pyproject's data-files)."""
    source = Path(__file__).resolve().parents[2] / "conf"
    if (source / "default.yaml").is_file():
        return source
    return Path(sys.prefix) / "share" / "fedspark" / "conf"


CONF_DIR = _conf_dir()
DEFAULT_FILE = CONF_DIR / "default.yaml"
DEFAULT_EXPERIMENT = CONF_DIR / "fashion_mnist.yaml"


def one_of(names: Iterable[str]) -> Any:
    """The type of a key that accepts exactly `names` (a registry's keys), in their order."""
    return Literal[tuple(names)]


if TYPE_CHECKING:   # a type checker sees names; pydantic, at run time, the registries' exact options
    ModelKind: TypeAlias = str
    SklearnEstimator: TypeAlias = str
    ModelInit: TypeAlias = str
    OptimizerName: TypeAlias = str
    ServerStrategy: TypeAlias = str
    Partitioner: TypeAlias = str
    RobustRule: TypeAlias = str
    AttackKind: TypeAlias = str
    Dtype: TypeAlias = str
    Sampling: TypeAlias = str
    DpMode: TypeAlias = str
else:
    ModelKind = one_of(KINDS)
    SklearnEstimator = one_of(ESTIMATORS)
    ModelInit = one_of(INITIALISERS)
    OptimizerName = one_of(OPTIMIZERS)
    ServerStrategy = one_of(STRATEGIES)
    Partitioner = one_of(partitioners.NAMES)
    RobustRule = one_of(RULES)
    AttackKind = one_of(ATTACKS)
    Dtype = one_of(FLOAT_DTYPES)
    Sampling = one_of(SAMPLERS)
    DpMode = one_of(DP_MODES)
# option sets that are not registries: each declared once
TrainerStrategy = Literal["local", "sync", "federated", "mllib", "model_parallel"]
Preprocess = Literal["none", "standardize", "minmax"]
Impute = Literal["none", "mean", "zero"]
# the strategies whose blocks carry the feature transform (udfs/data/transform.py)
TRANSFORMED_STRATEGIES = ("local", "sync", "federated")


# Spark's own default for spark.redaction.regex (what its UI and event logs redact) and marker
REDACTION_KEY = "spark.redaction.regex"
SPARK_REDACTION_REGEX = r"(?i)secret|password|token|access[.]?key"
REDACTED = "*********(redacted)"


def redact_uri(uri: str) -> str:
    """`s3a://KEY:SECRET@bucket/path` -> `s3a://*********(redacted)@bucket/path`; other paths as
    they are."""
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{REDACTED}@{parts.netloc.rpartition('@')[2]}"))


class ConfigError(UserError):
    """A config file, key or value is wrong: exit code 2, nothing written."""


class _Section(BaseModel):
    """Every section: unknown keys are errors, values keep their YAML type, and no float may be
    NaN or infinite (an `.inf` attack scale or learning rate would reach training)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


Fraction = Field(ge=0.0, le=1.0)


class SparkSection(_Section):
    conf: dict[str, Any]
    delta_packages: str = Field(min_length=1)   # auto | none | Maven coordinates


class PathSection(_Section):
    path: str = Field(min_length=1)


class RunsSection(_Section):
    """Run directories: a local path, or any Hadoop URI (pipelines/store/rundir.py). A file: URI is made
    a local path, so it keeps the local file API's fast path (no copies)."""

    path: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _file_uri_as_path(cls, value: str) -> str:
        if value.startswith("file:"):
            path = str(local_path(value))
            return path if path.startswith("/") else value
        return value


class DataSection(_Section):
    table: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    version: int | None = Field(ge=0)
    partitions: int = Field(ge=1, le=10_000)
    validation_fraction: float = Field(ge=0.0, lt=1.0)
    worker_cache_gb: float = Field(ge=0.0)
    block_cache: str | None = Field(min_length=1)
    block_cache_gb: float = Field(ge=0.0)
    preprocess: Preprocess
    impute: Impute
    missing_indicator: bool

    @property
    def transforms(self) -> bool:
        """Whether the features are transformed (fitted from the table's federated statistics)."""
        return self.preprocess != "none" or self.impute != "none" or self.missing_indicator


# "package.module:name", how model.torch.module and a custom model.torch.loss name a function
IMPORT_PATH = r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*"


class TorchSection(_Section):
    """model.kind=torch: the nn.Module's factory, its keyword arguments, the user's file that
    holds it (shipped with the job) and the loss."""

    module: str | None = Field(pattern=f"^{IMPORT_PATH}$")
    file: str | None = Field(pattern=r"\.py$")
    kwargs: dict[str, Any]
    loss: str = Field(pattern=f"^({'|'.join(LOSS_HEADS)}|{IMPORT_PATH})$")

    @model_validator(mode="after")
    def _file_is_the_module(self) -> TorchSection:
        if self.file is not None and self.module is not None and \
                self.module.partition(":")[0] != Path(self.file).stem:
            raise ValueError(f"model.torch.module={self.module!r} must name the module of model.torch.file "
                             f"({Path(self.file).stem}:FACTORY)")
        return self


class SklearnSection(_Section):
    """model.kind=sklearn: a partial_fit estimator's class and its parameters."""

    estimator: SklearnEstimator | None
    params: dict[str, Any]

    @model_validator(mode="after")
    def _params_fit_the_estimator(self) -> SklearnSection:
        if self.estimator is not None:
            check_params(self.estimator, self.params)
        return self


class ModelSection(_Section):
    kind: ModelKind
    hidden: list[int]
    init: ModelInit
    input_shape: list[int] | None
    torch: TorchSection
    sklearn: SklearnSection

    @model_validator(mode="after")
    def _positive_layers(self) -> ModelSection:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be >= 1, got {self.hidden}")
        if self.input_shape is not None and (not self.input_shape or any(w < 1 for w in self.input_shape)):
            raise ValueError(f"model.input_shape must be positive widths, e.g. [1, 28, 28], got {self.input_shape}")
        if self.kind == "torch" and self.torch.module is None:
            raise ValueError("model.kind=torch needs model.torch.module ('package.module:factory', "
                             "e.g. udfs.adapters.torch_zoo:mlp)")
        if self.kind == "sklearn" and self.sklearn.estimator is None:
            raise ValueError(f"model.kind=sklearn needs model.sklearn.estimator, one of {list(ESTIMATORS)}")
        return self


class OptimizerSection(_Section):
    name: OptimizerName
    lr: float = Field(gt=0.0)
    beta1: float = Field(ge=0.0, lt=1.0)
    beta2: float = Field(ge=0.0, lt=1.0)
    eps: float = Field(gt=0.0)
    momentum: float = Field(ge=0.0, lt=1.0)


class TrainerSection(_Section):
    strategy: TrainerStrategy
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    seed: int = Field(ge=0)
    dtype: Dtype
    optimizer: OptimizerSection
    average_every: int | None = Field(ge=1)
    checkpoint_every: int = Field(ge=0)
    aggregation_depth: int = Field(ge=1, le=10)
    sync_ports: str = Field(pattern=r"^\d{1,5}(-\d{1,5})?$")

    @field_validator("sync_ports")
    @classmethod
    def _port_range(cls, value: str) -> str:
        first, _, last = value.partition("-")
        low, high = int(first), int(last or first)
        if high > 65535 or low > high or (low == 0) != (high == 0):
            raise ValueError(f"{value!r} is not 0 (any free port) or a port range like 47000-47100")
        return value


class FederatedSection(_Section):
    clients: int = Field(ge=1)
    partitioner: Partitioner
    alpha: float = Field(gt=0.0)
    shards_per_client: int = Field(ge=1)
    client_column: str
    holdout_fraction: float = Field(ge=0.0, lt=1.0)
    sampling: Sampling
    fraction: float = Field(gt=0.0, le=1.0)
    min_clients: int = Field(ge=1)
    rounds: int = Field(ge=1)
    local_epochs: int = Field(ge=1)
    local_batch_size: int = Field(ge=1)
    eval_every: int = Field(ge=1)
    target_accuracy: float | None = Fraction
    stop_at_target: bool
    strategy: ServerStrategy
    mu: float = Field(ge=0.0)
    server_lr: float = Field(gt=0.0)
    server_momentum: float = Field(ge=0.0, lt=1.0)
    tau: float = Field(gt=0.0)

    @model_validator(mode="after")
    def _target_to_stop_at(self) -> FederatedSection:
        if self.stop_at_target and self.target_accuracy is None:
            raise ValueError("federated.stop_at_target: true needs federated.target_accuracy "
                             "(the test accuracy to stop at)")
        return self


class PrivacySection(_Section):
    secure_aggregation: bool
    secagg_threshold: float = Field(gt=0.0, le=1.0)
    ring_bits: int = Field(ge=32, le=64)
    dp: DpMode
    noise_multiplier: float = Field(ge=0.0)
    clip: float | None = Field(gt=0.0)
    secagg_bound: float = Field(gt=0.0)
    adaptive_clip: bool
    target_quantile: float = Field(gt=0.0, lt=1.0)
    delta: float = Field(gt=0.0, lt=1.0)
    target_epsilon: float | None = Field(gt=0.0)
    reproducible_noise: bool


    @property
    def secure_clip(self) -> float:
        """The L2 bound a client clips to under secure aggregation, which bounds the fixed point:
        privacy.clip when set, else privacy.secagg_bound (far above ordinary updates)."""
        return self.clip if self.clip is not None else self.secagg_bound


class AttackSection(_Section):
    kind: AttackKind
    fraction: float = Fraction
    scale: float


class RobustSection(_Section):
    rule: RobustRule
    trim_fraction: float = Field(ge=0.0, lt=0.5)
    byzantine: int = Field(ge=0)
    attack: AttackSection


class ModelParallelSection(_Section):
    shards: int = Field(ge=1)
    parties: dict[str, Any]
    label_party: str | None


class TrackingSection(_Section):
    mlflow: bool


ALL_FEATURES = "*"


class StatsSection(_Section):
    """Federated feature statistics (pipelines/stats.py): histogram bins per feature, and declared
    ranges {feature index as a string, or "*" for every feature: [lo, hi]}."""

    bins: int = Field(ge=1, le=10_000)
    ranges: dict[str, list[float]]

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, value: dict[str, list[float]]) -> dict[str, list[float]]:
        for key, bounds in value.items():
            if key != ALL_FEATURES and not key.isdigit():
                raise ValueError(f"key {key!r}: a feature index (0, 1, ...) or {ALL_FEATURES!r}")
            if len(bounds) != 2 or not bounds[0] < bounds[1]:
                raise ValueError(f"feature {key}: expected [lo, hi] with lo < hi, got {bounds}")
        return value


class MllibSection(_Section):
    """trainer.strategy=mllib: Spark MLlib's own estimators, the built-in baseline."""

    max_iter: int = Field(ge=1)
    tol: float = Field(ge=0.0)
    reg_param: float = Field(ge=0.0)
    elastic_net: float = Field(ge=0.0, le=1.0)
    block_size: int = Field(ge=1)


# strategies that train only the built-in models, and why
STRATEGIES_FOR_BUILTINS = {
    "mllib": "it trains Spark MLlib's own estimators (the built-in baseline), not a user's model",
    "model_parallel": "it shards the first dense layer of a built-in model by feature blocks, and a "
                      "user's module is opaque to it",
}


class Config(_Section):
    spark: SparkSection
    lake: PathSection
    runs: RunsSection
    data: DataSection
    model: ModelSection
    trainer: TrainerSection
    federated: FederatedSection
    privacy: PrivacySection
    robust: RobustSection
    model_parallel: ModelParallelSection
    tracking: TrackingSection
    mllib: MllibSection
    stats: StatsSection

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Config:
        if self.model.kind in USER_KINDS and self.trainer.strategy in STRATEGIES_FOR_BUILTINS:
            raise ValueError(f"trainer.strategy={self.trainer.strategy} cannot train model.kind="
                             f"{self.model.kind}: {STRATEGIES_FOR_BUILTINS[self.trainer.strategy]}; "
                             "use local, sync or federated")
        if self.model.kind in GRADIENT_FREE_KINDS and self.trainer.strategy == "sync":
            raise ValueError(f"trainer.strategy=sync all-reduces gradients, and a model.kind={self.model.kind} "
                             "partial_fit estimator has no gradient to reduce; use local or federated")
        if self.model.kind in GRADIENT_FREE_KINDS and self.federated.mu > 0:
            raise ValueError(f"federated.mu={self.federated.mu}: FedProx adds its proximal term to the "
                             f"gradient, and a model.kind={self.model.kind} estimator trains by partial_fit "
                             "without one; use federated.mu=0")
        if self.privacy.secure_aggregation and self.robust.rule in NEEDS_INDIVIDUAL_UPDATES:
            raise ValueError(
                f"robust.rule={self.robust.rule!r} needs individual updates, which "
                "privacy.secure_aggregation hides; use rule mean or norm_bound, or turn secure "
                "aggregation off")
        if self.privacy.dp == "central" and self.federated.sampling != "poisson":
            raise ValueError("privacy.dp=central requires federated.sampling=poisson "
                             "(the privacy accountant assumes Poisson client sampling)")
        if self.privacy.dp == "central" and self.robust.rule != "mean":
            raise ValueError(f"privacy.dp=central adds its noise to the plain sum of the clipped "
                             f"updates; robust.rule={self.robust.rule!r} cannot be combined with it "
                             "(use rule mean)")
        if self.privacy.adaptive_clip and self.privacy.dp != "central":
            raise ValueError("privacy.adaptive_clip needs privacy.dp=central (the clients' "
                             "within-clip bits are only private inside the noisy central count)")
        if DP_MODES[self.privacy.dp].enabled and self.privacy.clip is None:
            raise ValueError(f"privacy.dp={self.privacy.dp} needs privacy.clip, the L2 bound every "
                             "client clips its update to (the noise is proportional to it)")
        if self.data.transforms and self.trainer.strategy not in TRANSFORMED_STRATEGIES:
            raise ValueError(f"data.preprocess, data.impute and data.missing_indicator apply to the "
                             f"strategies {', '.join(TRANSFORMED_STRATEGIES)}, not "
                             f"trainer.strategy={self.trainer.strategy}")
        if self.data.missing_indicator and self.data.impute == "none":
            raise ValueError("data.missing_indicator needs data.impute (mean or zero): the "
                             "indicator marks the values imputation filled")
        if self.privacy.secure_aggregation and self.data.transforms and not self.stats.ranges:
            raise ValueError("data.preprocess or data.impute under privacy.secure_aggregation fits "
                             "the transform from secure statistics, which need stats.ranges "
                             "(declared [lo, hi] per feature, or \"*\" for all)")
        if self.robust.rule == "norm_bound" and self.privacy.clip is None:
            raise ValueError("robust.rule=norm_bound needs privacy.clip, the L2 bound it scales "
                             "updates down to")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def redacted(self) -> Config:
        """This config as fedspark stores it (config.yaml, the `runs` table, MLflow): the values of
        spark.conf keys that Spark's spark.redaction.regex matches, and credentials in lake.path
        and runs.path URIs, replaced by REDACTED."""
        pattern = re.compile(str(self.spark.conf.get(REDACTION_KEY, SPARK_REDACTION_REGEX)))
        conf = {k: REDACTED if k != REDACTION_KEY and (pattern.search(k) or pattern.search(str(v))) else v
                for k, v in self.spark.conf.items()}
        return self.model_copy(update={
            "spark": self.spark.model_copy(update={"conf": conf}),
            "lake": self.lake.model_copy(update={"path": redact_uri(self.lake.path)}),
            "runs": self.runs.model_copy(update={"path": redact_uri(self.runs.path)})})

    def holds_redactions(self) -> bool:
        return REDACTED in yaml.safe_dump(self.to_dict())

    def with_version(self, version: int | None) -> Config:
        """This config reading data.table at `version` (a run pins the version it resolved)."""
        return self.model_copy(update={"data": self.data.model_copy(update={"version": version})})


@functools.cache
def default(key: str) -> Any:
    """The value of dotted `key` in conf/default.yaml, for a library function whose callers (tests,
    benchmarks) may leave out a setting that jobs pass from their config."""
    node: Any = read_yaml(DEFAULT_FILE)
    for part in key.split("."):
        node = node[part]
    return node


def read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping, naming the file in every error."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, "
                          f"got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` laid over it; nested mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_set(item: str) -> dict[str, Any]:
    """Turn `a.b.c=VALUE` into {'a': {'b': {'c': VALUE}}}, VALUE parsed as a YAML scalar or list."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, "
                          "e.g. --set trainer.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not a YAML scalar or list: {exc}") from exc
    return nested(key, value)


# mappings whose own keys hold dots (Spark's settings): `spark.conf.spark.executor.memory=4g` sets
# the key `spark.executor.memory` of spark.conf
FLAT_MAPPINGS = ("spark.conf",)


def key_parts(key: str) -> list[str]:
    """The path of dotted `key` through the config: split on dots, except inside a FLAT_MAPPING."""
    for flat in FLAT_MAPPINGS:
        if key.startswith(flat + ".") and len(key) > len(flat) + 1:
            return [*flat.split("."), key[len(flat) + 1:]]
    return key.split(".")


def nested(key: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': {'c': value}}} for the dotted key 'a.b.c'."""
    tree: dict[str, Any] = {}
    node = tree
    parts = key_parts(key)
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _allowed_keys(section: type[BaseModel] | None) -> str:
    return ", ".join(section.model_fields) if section else ""


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at `loc` (for listing allowed keys)."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type)
                                 and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _describe(err: ErrorDetails, source: str) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _section_model(loc[:-1])
        allowed = _allowed_keys(parent)
        where = ".".join(str(p) for p in loc[:-1]) or "the top level"
        return f"{source}: unknown key {key!r}; allowed keys in {where}: {allowed}"
    if err["type"] == "missing":
        return f"{source}: missing key {key!r} (is {DEFAULT_FILE.name} complete?)"
    message = err["msg"].removeprefix("Value error, ")
    if not loc or isinstance(err.get("input"), dict):
        return f"{source}: {message}"
    return f"{source}: {key}: {message} (got {err.get('input')!r})"


def validate(raw: dict[str, Any], source: str, sets: Sequence[str] = ()) -> Config:
    """The config `raw` describes; an error names the `--set` that gave the bad key (the last one
    whose key is on the error's path), else `source`."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, _source_of(tuple(str(p) for p in err["loc"]), source, sets))
                 for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _source_of(loc: tuple[str, ...], source: str, sets: Sequence[str]) -> str:
    for item in reversed(sets):
        parts = tuple(key_parts(item.partition("=")[0]))
        n = min(len(parts), len(loc))
        if loc and parts[:n] == loc[:n]:
            return f"--set {item}"
    return source


def load_config(path: str | Path | None = None, sets: Sequence[str] = ()) -> Config:
    """Defaults, then the experiment file (default: conf/fashion_mnist.yaml), then `--set`s."""
    experiment = Path(path) if path else DEFAULT_EXPERIMENT
    merged = deep_merge(read_yaml(DEFAULT_FILE), read_yaml(experiment))
    for item in sets:
        merged = deep_merge(merged, parse_set(item))
    return validate(merged, str(experiment), sets)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a full or partial config mapping laid over the defaults (used by tests and resume)."""
    return validate(deep_merge(read_yaml(DEFAULT_FILE), raw), source)


def dump_yaml(config: Config) -> str:
    """The config as fedspark stores it: credentials redacted (Config.redacted)."""
    return yaml.safe_dump(config.redacted().to_dict(), sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipelines.core.config [--config F] [--set K=V ...] KEY ...`: print resolved values, one
    per line (used by scripts/train.sh to find the table and lake before it starts Spark)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m pipelines.core.config")
    p.add_argument("--config")
    p.add_argument("--set", dest="sets", action="append", default=[])
    p.add_argument("keys", nargs="+", help="dotted keys, e.g. data.table")
    args = p.parse_args(argv)
    values = load_config(args.config, args.sets).to_dict()
    for key in args.keys:
        node: Any = values
        for part in key.split("."):
            node = node[part]
        print(node)


if __name__ == "__main__":
    main()
