from pathlib import Path

import pytest

from pipeline.config import ConfigError
from stages import load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["download.rate_limit=2M", "download.concurrency=8", "ingest.inputs=[a.txt, b.parquet]"])
    assert cfg.stage("download").rate_limit == "2M"
    assert cfg.stage("download").concurrency == 8
    assert cfg.stage("ingest").inputs == ["a.txt", "b.parquet"]
    assert cfg.run.manifest_root == "manifests"


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"download\.rate_limt.*rate_limit"):
        load_config(None, ["download.rate_limt=2M"])


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match="downlaod"):
        load_config(None, ["downlaod.retries=2"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("download.concurrency=many", "download.concurrency"),
        ("download.allow_private_hosts=3", "download.allow_private_hosts"),
        ("download.retries=1.5", "download.retries"),
        ("run.flush_rows=[1]", "run.flush_rows"),
    ],
)
def test_ill_typed_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_with_wrong_types_fails_fast(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("download:\n  retries: three\n")
    with pytest.raises(ConfigError, match=r"download\.retries"):
        load_config(path)


def test_yaml_section_must_be_mapping(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("download: 5\n")
    with pytest.raises(ConfigError, match="download"):
        load_config(path)


def test_malformed_set_is_rejected():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["concurrency=3"])


def test_int_accepted_for_float_and_none_for_optional():
    cfg = load_config(None, ["download.backoff_s=3", "download.max_duration_s=null"])
    assert cfg.stage("download").backoff_s == 3.0
    assert cfg.stage("download").max_duration_s is None


@pytest.mark.parametrize("override, key", [
    ("filter.embedder=dino", "filter.embedder"),
    ("filter.frames=1", "filter.frames"),
    ("separate.overlap=1.5", "separate.overlap"),
    ("download.rate_limit=fast", "download.rate_limit"),
    ("download.sections=10..20", "download.sections"),
    ("tokens.model=encodec_64khz", "tokens.model"),
    ("shards.max_bytes=0", "shards.max_bytes"),
])
def test_stage_option_values_are_checked_when_the_stage_is_built(override, key):
    """Values of the right type but outside what the stage accepts fail as ConfigError naming the
    key, when `run` builds every stage up front — not per row inside a worker."""
    from stages import STAGES

    cfg = load_config(None, [override])
    stage = key.split(".")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        STAGES[stage](cfg.stage(stage), cfg.run)
