import pytest

from ultramem_jax import MemoryConfig, ModelConfig, create_model
from ultramem_jax.config import from_dict
from ultramem_jax.placement import parse_placement

BASE = dict(vocab_size=64, d_model=32, num_layers=6, num_heads=2)


def _model(memory=None, placement="1:2"):
    return ModelConfig(**BASE, memory=memory or MemoryConfig(num_keys=8, topk=4), memory_placement=placement)


@pytest.mark.parametrize("memory,placement,field", [
    (MemoryConfig(num_keys=4, expansion=4, topk=9), "1:2", "memory.topk"),  # m > n' = 2·4
    (MemoryConfig(num_keys=8, topk=4, preselect=20), "1:2", "memory.preselect"),
    (MemoryConfig(num_keys=8, topk=4, expansion=2), "1:2", "memory.expansion"),  # not a perfect square
    (MemoryConfig(num_keys=8, topk=4, value_dim=15, cores=2), "1:2", "memory.value_dim"),
    (MemoryConfig(num_keys=8, topk=4, heads=0), "1:2", "memory.heads"),
    (MemoryConfig(num_keys=8, topk=4), "1:3/2:4", "memory_placement"),  # overlapping skip ranges
    (MemoryConfig(num_keys=8, topk=4), "1:3/3:4", "memory_placement"),  # shares block 3
    (MemoryConfig(num_keys=8, topk=4), "4:6", "memory_placement"),  # past the last block (0..5)
    (MemoryConfig(num_keys=8, topk=4), "3:2", "memory_placement"),  # adds before it reads
    (MemoryConfig(num_keys=8, topk=4), "1-2", "memory_placement"),
    (MemoryConfig(num_keys=8, topk=4), "", "memory_placement"),  # memory given, none placed
    (MemoryConfig(num_keys=8, topk=4, rank=1), "1:2", "memory.aux_loss"),
    (MemoryConfig(num_keys=8, topk=4, output_proj=False), "1:2", "memory.output_proj"),
])
def test_invalid_configs_name_the_field(memory, placement, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        _model(memory, placement)


def test_invalid_model_fields():
    with pytest.raises(ValueError, match="^num_heads:"):
        ModelConfig(d_model=30, num_heads=4)
    with pytest.raises(ValueError, match="^memory_placement:"):
        ModelConfig(**BASE, memory_placement="0:1")  # placed but no memory config


def test_from_dict_rejects_unknown_and_ill_typed_keys():
    with pytest.raises(ValueError, match=r"^memory\.topkk: unknown key"):
        from_dict(ModelConfig, {**BASE, "memory": {"topkk": 3}, "memory_placement": "1:2"})
    with pytest.raises(ValueError, match=r"^d_model: must be an integer"):
        from_dict(ModelConfig, {**BASE, "d_model": "big"})
    with pytest.raises(ValueError, match=r"^memory\.score_activation: must be one of"):
        from_dict(ModelConfig, {**BASE, "memory": {"score_activation": "tanh"}, "memory_placement": "1:2"})
    with pytest.raises(ValueError, match=r"^memory\.topk:"):
        from_dict(ModelConfig, {**BASE, "memory": {"num_keys": 2, "topk": 9}, "memory_placement": "1:2"})
    cfg = from_dict(ModelConfig, {**BASE, "memory": {"num_keys": 8, "topk": 4, "aux_alpha": "3e-4"},
                                  "memory_placement": "1:2"})
    assert cfg.memory.topk == 4 and cfg.memory.aux_alpha == 3e-4  # YAML 1.1 leaves 3e-4 a string
    with pytest.raises(ValueError, match=r"^memory\.aux_alpha: must be a number"):
        from_dict(ModelConfig, {**BASE, "memory": {"aux_alpha": "lots"}, "memory_placement": "1:2"})


def test_placement_parsing():
    assert parse_placement("2:5/6:9", 20) == [(2, 5), (6, 9)]
    assert parse_placement("all", 3) == [(0, 0), (1, 1), (2, 2)]
    assert parse_placement("", 3) == []


def test_pkm_layer_requires_pkm_config_in_lm():
    cfg = ModelConfig(**BASE, memory=MemoryConfig.pkm(num_keys=8, topk=4), memory_placement="2:2")
    model = create_model(cfg)
    assert type(model.memories[0]).__name__ == "PKMLayer"
    with pytest.raises(ValueError, match="^memory.kind:"):
        ModelConfig(**BASE, memory=MemoryConfig.pkm(num_keys=8, topk=4, expansion=4, output_proj=True),
                    memory_placement="2:2")
