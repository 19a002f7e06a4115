"""Config validation and overrides: errors name the field, the bad value and what is accepted."""

from __future__ import annotations

import pytest

from jobs.config import ConfigError, apply_override, load_config, validate_config


def base_config(**operator) -> dict:
    fields = {"kind": "img2img", "model": "models/sd", "prompt": "a cat"}
    fields.update(operator)
    return {"source": {"uri": "in"}, "operators": [fields], "sink": {"uri": "out"}}


def error_text(data: dict) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_config(data)
    return str(caught.value)


def test_valid_config_has_documented_defaults():
    config = validate_config(base_config())
    operator = config.operators[0]
    assert (operator.stage_name, operator.strength, operator.num_inference_steps) == ("img2img", 0.6, 30)
    assert (config.run.seed, config.run.offline, config.sink.mode) == (0, True, "resume")
    assert operator.resolved_device() == "cpu" and operator.resolved_dtype() == "float32"
    gpu = validate_config(base_config(num_gpus=1)).operators[0]
    assert gpu.resolved_device() == "cuda" and gpu.resolved_dtype() == "float16"


def test_out_of_range_value_names_path_and_value():
    assert "operators[0].strength: Input should be less than or equal to 1, got 1.4" in error_text(
        base_config(strength=1.4)
    )


def test_unknown_field_lists_accepted_fields():
    text = error_text(base_config(strenght=0.5))
    assert "operators[0].strenght: unknown field; accepted: attention, batch_size, channels_last, compile," in text


def test_unknown_kind_lists_accepted_kinds():
    text = error_text({"source": {"uri": "in"}, "operators": [{"kind": "restyle"}], "sink": {"uri": "out"}})
    assert "operators[0].kind:" in text and "'restyle'" in text and "'img2img'" in text


def test_literal_lists_accepted_values():
    text = error_text(base_config(dtype="fp8"))
    assert "operators[0].dtype: Input should be 'auto', 'float32', 'float16' or 'bfloat16', got 'fp8'" in text


def test_missing_sections_and_empty_operator_list():
    text = error_text({"source": {"uri": "in"}, "operators": []})
    assert "operators: List should have at least 1 item" in text
    assert "sink: Field required" in text


def test_secret_values_never_appear_in_errors_or_repr():
    data = base_config()
    data["source"]["storage"] = {"secret_access_key": ["TOPSECRET-123"]}
    text = error_text(data)
    assert "source.storage.secret_access_key" in text and "TOPSECRET" not in text
    data["source"]["storage"] = {"secret_access_key": "TOPSECRET-123", "access_key_id": "AKIA-XYZ"}
    config = validate_config(data)
    assert "TOPSECRET" not in repr(config) and "TOPSECRET" not in config.model_dump_json()
    assert config.source.storage.storage_options()["secret"] == "TOPSECRET-123"


def test_duplicate_stage_names_are_refused():
    data = base_config()
    data["operators"].append(dict(data["operators"][0]))
    assert "stage names must be unique" in error_text(data)


def test_overrides_set_nested_values_and_list_items(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("source: {uri: in}\nsink: {uri: out}\noperators:\n  - {kind: img2img, model: m, prompt: p}\n")
    config = load_config(
        path, ["operators.0.strength=0.25", "run.seed=7", "sink.write_images=true", "operators.0.prompt=a, b"]
    )
    assert config.operators[0].strength == 0.25 and config.run.seed == 7 and config.sink.write_images
    assert config.operators[0].prompt == "a, b"


def test_override_errors():
    data = base_config()
    with pytest.raises(ConfigError, match="takes dotted.path=value"):
        apply_override(data, "run.seed")
    with pytest.raises(ConfigError, match=r"operators is a list of 1; '3' is not an index in it"):
        apply_override(data, "operators.3.strength=0.1")


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_errors_inside_nested_unions_name_the_step():
    data = base_config()
    data["operators"] = [{"kind": "standardize", "steps": [{"op": "clahe", "clip": 3}, {"op": "sharpen"}]}]
    text = error_text(data)
    assert "operators[0].steps[0].clip: unknown field; accepted: clip_limit, op, tile_grid_size, got 3" in text
    assert "operators[0].steps[1].op: Input tag 'sharpen'" in text and "'histogram_match'" in text


def test_locations_and_endpoints_that_work_are_accepted():
    data = base_config()
    for uri in ("in", "/data/in", "file:///data/in", "s3://bucket/prefix", "relative/dir@2x"):
        data["source"]["uri"] = uri
        assert validate_config(data).source.uri == uri
    for endpoint in ("http://127.0.0.1:9000", "https://s3.eu-west-1.amazonaws.com", "http://minio/"):
        data["source"]["storage"] = {"endpoint_url": endpoint}
        assert validate_config(data).source.storage.endpoint_url == endpoint


def test_unsupported_schemes_and_endpoints_are_refused_naming_what_is_accepted():
    data = base_config()
    data["source"]["uri"] = "ftp://host/in"
    data["sink"]["uri"] = "hdfs://name/out"
    text = error_text(data)
    assert (
        "source.uri: unsupported URI scheme 'ftp'; accepted: a local path, file://PATH, s3://BUCKET/PREFIX, "
        "gs://BUCKET/PREFIX, az://CONTAINER/PREFIX (or abfs://), hf://datasets/OWNER/NAME/PATH or memory://PATH"
    ) in text
    assert "sink.uri: unsupported URI scheme 'hdfs'" in text
    for endpoint in ("not a url", "ftp://host", "http://host:port", "http://"):
        data = base_config()
        data["sink"]["storage"] = {"endpoint_url": endpoint}
        assert "sink.storage.endpoint_url: must be http://HOST[:PORT] or https://HOST[:PORT]" in error_text(data)


def test_integers_are_bounded_and_the_range_is_named():
    text = error_text({**base_config(batch_size=10**15), "run": {"seed": 2**63}})
    assert "operators[0].batch_size: Input should be less than or equal to 65536" in text
    assert "accepted: whole numbers from 1 to 65536" in text
    assert "run.seed: Input should be less than or equal to 9223372036854775807" in text
    assert "sink.rows_per_shard" in error_text({**base_config(), "sink": {"uri": "out", "rows_per_shard": 10**7}})
    assert "operators[0].num_actors" in error_text(base_config(num_actors=1.5))


def test_misplaced_credentials_are_never_quoted():
    data = base_config()
    data["source"]["storage"] = "AKIA:SHOULD-NOT-SHOW"
    data["sink"]["password"] = "SHOULD-NOT-SHOW"
    data["run"] = {"model_storage": {"endpoint_url": "http://AKIA:SHOULD/NOT@SHOW:9000", "token": "SHOULD-NOT-SHOW"}}
    text = error_text(data)
    assert "SHOULD" not in text and "AKIA" not in text
    assert "source.storage: Input should be a valid dictionary or instance of StorageConfig, got a value that" in text
    assert "sink.password: unknown field" in text and "run.model_storage.token: unknown field" in text
    assert "run.model_storage.endpoint_url: must not hold credentials (USER:SECRET@)" in text


def test_unreadable_and_malformed_config_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    binary = tmp_path / "job.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    with pytest.raises(ConfigError, match="is not text"):
        load_config(binary)
    binary.write_text("")
    with pytest.raises(ConfigError, match=r"it holds nothing \(an empty file\)"):
        load_config(binary)
    with pytest.raises(ConfigError, match=r"--set run.seed: the value is not valid YAML \(.* at line 1, column 2\)"):
        apply_override(base_config(), "run.seed=[")
