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
