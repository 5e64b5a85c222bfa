"""pipelines.core.py4j: failures in the JVM and in Spark's Python tasks, recognised by class."""
from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from pipelines.core import py4j


def refusing():
    """A task function that fails. Nested, so it is shipped by value and the workers need not
    import this test module; a built-in exception class for the same reason."""
    def refuse(_: object) -> None:
        raise LookupError("row id 7: refused\nmore detail")
    return refuse


def test_an_rdd_task_failure_names_the_python_exception(spark):
    with pytest.raises(Exception) as info:
        spark.sparkContext.parallelize([1], 1).map(refusing()).collect()
    assert py4j.task_error(info.value) == ("LookupError", "row id 7: refused")
    assert py4j.task_message(info.value, "LookupError") == "row id 7: refused"
    assert py4j.task_message(info.value, "Exception") is None   # the class raised, not a base
    assert py4j.raised(info.value, "LookupError")
    assert "org.apache.spark.SparkException" in py4j.java_classes(info.value)
    assert py4j.raised(info.value, "SparkException") and not py4j.raised(info.value, "BlockError")


def test_a_sql_udf_failure_names_the_python_exception(spark):
    udf = F.udf(refusing(), "int")
    with pytest.raises(Exception) as info:
        spark.range(1, numPartitions=1).select(udf("id")).collect()
    assert py4j.task_message(info.value, "LookupError") == "row id 7: refused"


def test_a_jvm_failure_names_its_java_class(spark):
    jvm = spark.sparkContext._jvm
    with pytest.raises(Exception) as info:
        jvm.java.lang.Class.forName("no.such.Class")
    assert py4j.raised(info.value, "java.lang.ClassNotFoundException")
    assert py4j.raised(info.value, "ClassNotFoundException")
    assert py4j.task_error(info.value) is None
