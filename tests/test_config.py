import re
from pathlib import Path

import pytest

from pipeline.options import ConfigError
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
def test_stage_option_values_are_checked_before_any_work(override, key):
    """Values of the right type but outside what the stage accepts fail as ConfigError naming the
    key: a value outside an option's choices when the config loads, other limits when `run` builds
    every stage up front — never per row inside a worker."""
    from stages import STAGES

    stage = key.split(".")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cfg = load_config(None, [override])
        STAGES[stage](cfg.stage(stage), cfg.run)


@pytest.mark.parametrize("override", [
    "filter.embedder=dino", "filter.decoder=opencv", "features.pooling=max", "tokens.precision=fp16",
    "clips.last_partial=loop", "shards.heldout_split=train", "beats.flow_method=lucas", "separate.device=tpu",
    "run.weights=pretrianed",
])
def test_choices_are_checked_by_the_loader_in_one_style(override):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"^config key '{re.escape(key)}' must be one of .*; got '{value}'"):
        load_config(None, [override])


def test_options_built_in_code_are_checked_like_loaded_ones():
    from stages.clips import Clips, ClipsConfig

    with pytest.raises(ConfigError, match=r"config key 'clips\.last_partial' must be one of drop, pad; got 'loop'"):
        Clips(ClipsConfig(last_partial="loop"), load_config().run)


def test_a_restated_fact_must_agree_with_its_source():
    """tokens.clip_s and features.clip_s restate clips.clip_s: a run where they differ would make
    500-step tokens for 12 s clips; it fails when the config loads, naming both keys."""
    assert load_config(None, ["clips.clip_s=5", "tokens.clip_s=5", "features.clip_s=5"]).stage("tokens").clip_s == 5
    with pytest.raises(ConfigError, match=r"'tokens\.clip_s' is 10\.0 but 'clips\.clip_s' is 12\.0"):
        load_config(None, ["clips.clip_s=12"])


def test_params_are_derived_from_the_options():
    """What decides a redo comes from each option's `output` flag: worker settings never count,
    options that only apply in one mode count only there, and nothing can drift from the options."""
    from stages import STAGES

    def params(name, *overrides):
        cfg = load_config(None, list(overrides))
        return STAGES[name](cfg.stage(name), cfg.run).params()

    assert "decoder" in params("features") and "decoder" in params("filter")  # the drift the issue found
    for name in ("filter", "separate", "beats", "tokens", "features"):
        assert not {"batch_size", "concurrency", "num_cpus", "num_gpus", "device"} & set(params(name)), name
    assert params("filter", "filter.batch_size=2") == params("filter")
    assert params("filter", "filter.threshold=0.5") != params("filter")
    assert "model" in params("filter") and "model" not in params("filter", "filter.embedder=pixels")
    assert "raft_iters" not in params("beats") and "raft_iters" in params("beats", "beats.flow_method=raft_small")
    assert "random_init" not in params("separate") and "random_init" in params("separate", "run.weights=random")
    assert params("shards")["heldout"] is None  # a run-level fact beside the options


def test_help_of_a_restated_default_comes_from_the_shared_option():
    from pipeline.config import describe
    from stages.features import FeaturesConfig

    rows = {name: (default, help_text) for name, _, default, help_text in describe(FeaturesConfig)}
    assert rows["batch_size"][0] == 4 and rows["batch_size"][1] == "rows per process() call"
    assert rows["device"] == ("auto", "torch device: auto (cuda when a GPU is reserved) | cpu | cuda")
