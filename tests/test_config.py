"""Config loading: defaults, overrides, and errors that name the key and the allowed values."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.core.config import ConfigError, load_config
from tests.conftest import ROOT


def test_defaults_and_sample_config():
    c = load_config()
    assert (c.model.kind, c.model.hidden, c.trainer.strategy) == ("mlp", [128], "sync")
    assert (c.trainer.epochs, c.trainer.batch_size, c.data.validation_fraction) == (5, 64, 0.2)
    assert c.trainer.optimizer.eps == 1e-7 and c.lake.path == "./lake"


def test_set_overrides_scalars_and_lists():
    c = load_config(None, ["trainer.epochs=2", "model.hidden=[200,200]", "data.version=3",
                           "spark.conf={spark.executor.memory: 2g}"])
    assert c.trainer.epochs == 2 and c.model.hidden == [200, 200] and c.data.version == 3
    assert c.spark.conf == {"spark.executor.memory": "2g"}


def test_set_spark_conf_keeps_the_spark_key_whole_and_merges(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("spark:\n  conf:\n    spark.sql.shuffle.partitions: 4\n")
    c = load_config(f, ["spark.conf.spark.executor.memory=4g"])
    assert c.spark.conf == {"spark.sql.shuffle.partitions": 4, "spark.executor.memory": "4g"}
    c = load_config(f, ["spark.conf={spark.executor.memory: 2g}"])
    assert c.spark.conf == {"spark.sql.shuffle.partitions": 4, "spark.executor.memory": "2g"}


def test_credentials_are_redacted_from_what_is_stored():
    from pipelines.core.config import dump_yaml

    config = load_config(None, ["spark.conf.spark.hadoop.fs.s3a.secret.key=S3CR3T",
                                "spark.conf.spark.hadoop.fs.s3a.access.key=AKIA0001",
                                "spark.conf.spark.executor.memory=2g",
                                "lake.path=s3a://AKIA0001:S3CR3T@bucket/lake",
                                "runs.path=s3a://AKIA0001:S3CR3T@bucket/runs"])
    stored = dump_yaml(config)
    assert "S3CR3T" not in stored and "AKIA0001" not in stored
    back = load_config(None, [])
    assert not back.holds_redactions() and not config.holds_redactions()
    redacted = config.redacted()
    assert redacted.spark.conf == {"spark.hadoop.fs.s3a.secret.key": "*********(redacted)",
                                   "spark.hadoop.fs.s3a.access.key": "*********(redacted)",
                                   "spark.executor.memory": "2g"}
    assert redacted.lake.path == "s3a://*********(redacted)@bucket/lake" and redacted.holds_redactions()
    assert config.lake.path == "s3a://AKIA0001:S3CR3T@bucket/lake"   # the job itself keeps them


def test_an_error_in_a_set_value_names_the_set_not_the_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("trainer:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(f, ["trainer.batch_size=8", "trainer.epochs=0"])
    assert "--set trainer.epochs=0: trainer.epochs:" in str(err.value)
    assert str(f) not in str(err.value)
    f.write_text("trainer:\n  epochs: 0\n")   # the file's own error still names the file
    with pytest.raises(ConfigError, match="exp.yaml: trainer.epochs"):
        load_config(f, ["trainer.batch_size=8"])


def test_experiment_file_overrides_defaults(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("trainer:\n  strategy: sync\n  optimizer: {lr: 0.01}\n")
    c = load_config(f)
    assert c.trainer.strategy == "sync" and c.trainer.optimizer.lr == 0.01
    assert c.trainer.optimizer.name == "adam"


@pytest.mark.parametrize("item,needles", [
    ("trainer.epoch=2", ["unknown key 'trainer.epoch'", "epochs", "batch_size"]),
    ("trainer.epochs=abc", ["trainer.epochs", "integer", "'abc'"]),
    ("trainer.epochs=0", ["trainer.epochs", "greater than or equal to 1"]),
    ("trainer.optimizer.name=rmsprop", ["trainer.optimizer.name", "'adam', 'sgd' or 'momentum'"]),
    ("data.validation_fraction=1.5", ["data.validation_fraction", "less than 1"]),
    ("model.hidden=[0]", ["hidden layer sizes must be >= 1"]),
    ("nosuch.key=1", ["unknown key 'nosuch'", "trainer"]),
    ("trainer.epochs", ["expected KEY=VALUE"]),
    ("robust.attack.scale=.inf", ["robust.attack.scale", "finite number"]),
    ("trainer.optimizer.lr=.nan", ["trainer.optimizer.lr", "finite number"]),
    ("federated.stop_at_target=true", ["federated.stop_at_target: true needs federated.target_accuracy"]),
])
def test_bad_values_name_the_key(item, needles):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    for needle in needles:
        assert needle in str(err.value)


def test_allowed_values_are_the_registries():
    """Adding a rule, sampler or DP mode to its registry is all it takes; and every trainer strategy
    the config accepts has a runner (the runners read the config, so config.py cannot import them)."""
    from typing import get_args

    from pipelines.core import config
    from pipelines.federated.sampling import SAMPLERS
    from pipelines.training.runners import RUNNERS
    from udfs.core.models import FLOAT_DTYPES
    from udfs.federated.noise import DP_MODES

    fields = {"trainer": config.TrainerSection.model_fields, "federated": config.FederatedSection.model_fields,
              "privacy": config.PrivacySection.model_fields}
    assert get_args(fields["trainer"]["dtype"].annotation) == tuple(FLOAT_DTYPES)
    assert get_args(fields["federated"]["sampling"].annotation) == tuple(SAMPLERS)
    assert get_args(fields["privacy"]["dp"].annotation) == tuple(DP_MODES)
    assert get_args(config.TrainerStrategy) == tuple(RUNNERS)


def test_cross_section_rules():
    with pytest.raises(ConfigError, match="secure_aggregation"):
        load_config(None, ["privacy.secure_aggregation=true", "robust.rule=median"])
    with pytest.raises(ConfigError, match="poisson"):
        load_config(None, ["privacy.dp=central"])
    with pytest.raises(ConfigError, match="privacy.dp=central needs privacy.clip"):
        load_config(None, ["privacy.dp=central", "federated.sampling=poisson"])
    with pytest.raises(ConfigError, match="norm_bound needs privacy.clip"):
        load_config(None, ["robust.rule=norm_bound"])
    assert load_config(None, ["privacy.dp=central", "federated.sampling=poisson",
                              "privacy.clip=1.0"]).privacy.dp == "central"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("args,needle", [
    (["--config", "/nonexistent/x.yaml"], "config file not found: /nonexistent/x.yaml"),
    (["--set", "trainer.epoch=2"], "unknown key 'trainer.epoch'"),
    (["--set", "trainer.strategy=model_parallel", "--set", "model_parallel.label_party=bank"],
     "model_parallel.label_party is set but model_parallel.parties is empty"),
])
def test_train_job_exits_2_on_bad_config(args, needle):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
