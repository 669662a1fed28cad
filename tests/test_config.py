import pytest

from headkv_vllm.method.config import HeadKVConfig, HeadKVConfigError


def test_empty_and_missing_sections_give_defaults():
    assert HeadKVConfig.from_additional_config({}) == HeadKVConfig()
    assert HeadKVConfig.from_additional_config(None) == HeadKVConfig()
    assert HeadKVConfig.from_additional_config({"other_plugin": {"x": 1}}) == HeadKVConfig()


def test_unknown_key_names_the_key_and_the_known_ones():
    with pytest.raises(HeadKVConfigError) as err:
        HeadKVConfig.from_additional_config({"headkv": {"kv_sise": 128}})
    msg = str(err.value)
    assert "'kv_sise'" in msg and "Known settings:" in msg and "--additional-config" in msg


@pytest.mark.parametrize("bad", [[1, 2], "kv_size=128", 3])
def test_section_must_be_an_object(bad):
    with pytest.raises(HeadKVConfigError, match="must be a JSON object"):
        HeadKVConfig.from_additional_config({"headkv": bad})


def test_additional_config_must_be_an_object():
    with pytest.raises(HeadKVConfigError, match="must be a JSON object"):
        HeadKVConfig.from_additional_config(["headkv"])


@pytest.mark.parametrize("speculative, ubatching, option", [(object(), False, "--speculative-config"),
                                                            (None, True, "--enable-dbo")])
def test_engine_options_headkv_cannot_serve_are_refused(speculative, ubatching, option):
    from types import SimpleNamespace

    from headkv_vllm.engine.settings import apply_engine_settings

    config = SimpleNamespace(speculative_config=speculative, parallel_config=SimpleNamespace(use_ubatching=ubatching),
                             scheduler_config=None, cache_config=None, model_config=SimpleNamespace(max_model_len=64))
    with pytest.raises(HeadKVConfigError, match=option):
        apply_engine_settings(config, logger=None)
