"""Bad input gives clear errors naming the configuration key, task or extension at fault."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.models.bert import BertEncoder
from mtlx.models.layers import Routing
from mtlx.models.multitask import MultiTaskModel
from mtlx.peft import registry
from mtlx.peft.adapters import Adapter
from mtlx.peft.fusion import Fusion, load_fusion_sources
from mtlx.peft.lora import LoRA, merge_lora

from tests.peft_common import NAMES, TASKS, abstract, batch_for, tiny_bert, tiny_t5


def build(cfgs, names=NAMES):
    return registry.build_extensions(cfgs, names)


# ------------------------------------------------------------------ method names and values

def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"peft\[1\].method: unknown PEFT method 'loraa'; known: "
                                         r"\[.*'adapter'.*'lora'.*\]"):
        build([{"method": "lora"}, {"method": "loraa"}])
    with pytest.raises(ValueError, match=r"peft\[0\].method is missing"):
        build([{"rank": 4}])


@pytest.mark.parametrize("cfg,match", [
    ({"method": "lora", "rank": 0}, r"peft\[0\]: lora.rank must be a positive integer, got 0"),
    ({"method": "lora", "rank": 2.5}, r"lora.rank must be a positive integer, got 2.5"),
    ({"method": "lora", "alpha": -1}, r"lora.alpha must be a positive number"),
    ({"method": "adapter", "reduction_factor": 0}, r"adapter.reduction_factor must be a positive number"),
    ({"method": "adapter", "variant": "houlsbi"}, r"adapter.variant must be one of"),
    ({"method": "adapter", "activation": "gelu2"}, r"adapter.activation: unknown activation"),
    ({"method": "adapter", "layer_norm": "after"}, r"adapter.layer_norm must be one of"),
    ({"method": "compacter", "reduction_factor": -2}, r"compacter.reduction_factor must be a positive"),
    ({"method": "compacter", "phm_dim": 0}, r"compacter.phm_dim must be a positive integer"),
    ({"method": "prefix", "length": 0}, r"prefix.length must be a positive integer"),
    ({"method": "prompt", "insert_at": -1}, r"prompt.insert_at must be a non-negative integer"),
    ({"method": "fusion", "sources": ["a"]}, r"fusion.sources must name at least two"),
    ({"method": "lora", "rnak": 4}, r"peft\[0\]: unknown key\(s\) \['rnak'\] for method 'lora'"),
    ({"method": "lora", "tasks": ["a", "zz"]}, r"lora.tasks names unknown task\(s\) \['zz'\]"),
    ({"method": "lora", "tasks": []}, r"lora.tasks is empty"),
    ({"method": "lora", "name": "a/b"}, r"lora.name must be a non-empty string without '/'"),
])
def test_invalid_values_name_the_key(cfg, match):
    with pytest.raises(ValueError, match=match):
        build([cfg])


def test_two_methods_with_one_name_collide():
    with pytest.raises(ValueError, match=r"peft\[1\] and peft\[0\] share the name 'lora'"):
        build([{"method": "lora"}, {"method": "lora", "targets": ["ffn.input"]}])
    build([{"method": "lora"}, {"method": "lora", "name": "lora_ffn", "targets": ["ffn.input"]}])


def test_reduction_factor_too_large_for_the_model():
    cfg = registry.attach(tiny_bert(), [{"method": "adapter", "reduction_factor": 64}], NAMES)
    with pytest.raises(ValueError, match=r"adapter.reduction_factor=64 leaves no bottleneck for "
                                         r"hidden size 16"):
        abstract(MultiTaskModel(cfg, TASKS), batch_for([0]))


def test_phm_dim_must_divide_the_sizes():
    cfg = registry.attach(tiny_bert(), [{"method": "compacter", "phm_dim": 3, "reduction_factor": 4}], NAMES)
    with pytest.raises(ValueError, match=r"compacter.phm_dim=3 must divide the hidden size \(16\)"):
        abstract(MultiTaskModel(cfg, TASKS), batch_for([0]))


# ------------------------------------------------------------------ target patterns

@pytest.mark.parametrize("cfg,match", [
    ({"method": "lora", "targets": ["attention.qurey"]},
     r"lora.targets: pattern 'attention.qurey' matches no projection site; site names are"),
    ({"method": "lora", "targets": ["qkv"]}, r"pattern 'qkv' matches no projection site"),
    ({"method": "lora", "targets": []}, r"lora.targets must be a non-empty list"),
    ({"method": "adapter", "sites": ["ffn.output"]},
     r"adapter.sites: pattern 'ffn.output' matches no sublayer site"),
    ({"method": "prefix", "sites": ["cross_attention"]},
     r"prefix.sites: pattern 'cross_attention' matches no attention_kv site"),
    ({"method": "ia3", "input_targets": ["ffn.outptu"]}, r"ia3.input_targets: pattern 'ffn.outptu'"),
])
def test_patterns_that_can_match_nothing(cfg, match):
    with pytest.raises(ValueError, match=match):
        build([cfg])


@pytest.mark.parametrize("cfg,match", [
    ({"method": "lora", "targets": ["cross_attention.query"]},
     r"lora: lora.targets pattern 'cross_attention.query' matches no projection site of this "
     r"bert model \(2 layers\)"),
    ({"method": "lora", "targets": ["encoder.layer5.attention.value"]},
     r"pattern 'encoder.layer5.attention.value' matches no projection site of this bert model"),
    ({"method": "adapter", "sites": ["decoder.*.ffn"]},
     r"adapter.sites pattern 'decoder.\*.ffn' matches no sublayer site"),
    ({"method": "lora", "targets": ["ffn.gate"]}, r"'ffn.gate' matches no projection site"),
])
def test_patterns_matching_no_site_of_this_model(cfg, match):
    with pytest.raises(ValueError, match=match):
        registry.attach(tiny_bert(), [cfg], NAMES)


def test_t5_has_the_sites_bert_lacks():
    registry.attach(tiny_t5(), [{"method": "lora", "targets": ["cross_attention.query"]}], NAMES)
    with pytest.raises(ValueError, match=r"'ffn.gate' matches no projection site of this t5"):
        registry.attach(tiny_t5(), [{"method": "lora", "targets": ["ffn.gate"]}], NAMES)
    registry.attach(tiny_t5(feed_forward_proj="gated-gelu"),
                    [{"method": "lora", "targets": ["ffn.gate"]}], NAMES)


def test_patterns_match_a_dotted_tail_like_peft():
    from mtlx.models.layers import Site
    from mtlx.peft.base import site_matches
    q, cq = Site("decoder", 1, "attention.query"), Site("decoder", 1, "cross_attention.query")
    assert site_matches(q, "query") and site_matches(cq, "query")
    assert site_matches(q, "attention.query") and not site_matches(cq, "attention.query")
    assert site_matches(cq, "decoder.layer[0-1].cross_attention.*")
    assert not site_matches(Site("encoder", 1, "attention.query"), "decoder.*")


def test_ia3_site_in_both_lists():
    cfg = registry.attach(tiny_bert(), [{"method": "ia3", "targets": ["ffn.output"]}], NAMES)
    with pytest.raises(ValueError, match=r"site encoder.layer0.ffn.output matches both ia3.targets "
                                         r"and ia3.input_targets"):
        abstract(MultiTaskModel(cfg, TASKS), batch_for([0]))


def test_prompt_position_on_t5():
    with pytest.raises(ValueError, match=r"prompt.insert_at=1: T5 needs prompts prepended"):
        registry.attach(tiny_t5(), [{"method": "prompt", "insert_at": 1}], NAMES)
    ext = build([{"method": "prompt"}])[0]
    cfg = tiny_bert(extensions=(ext,))  # attached by hand: not bound to the backbone
    with pytest.raises(ValueError, match=r"prompt.insert_at is unset"):
        abstract(MultiTaskModel(cfg, TASKS), batch_for([0]))


def test_compacter_outside_the_multitask_model_needs_its_rules():
    cfg = registry.attach(tiny_bert(), [{"method": "compacter", "phm_dim": 2,
                                         "reduction_factor": 4}], ("only",))
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"compacter 'compacter' at encoder.layer0.attention: the "
                                         r"shared PHM rules come from the extension's generator"):
        jax.eval_shape(lambda: BertEncoder(cfg).init(jax.random.key(0), ids, ids))


# ------------------------------------------------------------------ task order and checkpoints

def test_extensions_built_for_other_task_order():
    cfg = registry.attach(tiny_bert(), [{"method": "lora"}], NAMES)
    registry.check_task_order(cfg, NAMES)
    with pytest.raises(ValueError, match=r"extension 'lora' was built for tasks \['a', 'b', 'c', "
                                         r"'d'\] but the model's tasks are \['b', 'a', 'c', 'd'\]"):
        registry.check_task_order(cfg, ("b", "a", "c", "d"))


def _params(cfgs):
    cfg = registry.attach(tiny_bert(), cfgs, NAMES)
    return cfg, abstract(MultiTaskModel(cfg, TASKS), batch_for([0]))


def _drop_task(tree, name, task):
    if isinstance(tree, dict):
        return {k: ({t: v2 for t, v2 in v.items() if t != task} if k == name else
                    _drop_task(v, name, task)) for k, v in tree.items()}
    return tree


def test_checkpoint_without_a_task_names_it():
    cfg, params = _params([{"method": "lora"}, {"method": "adapter", "tasks": ["a", "b"]}])
    registry.check_task_weights(params, cfg.extensions)
    broken = _drop_task(params, "adapter", "b")
    with pytest.raises(KeyError, match=r"no 'adapter' weights for task\(s\) \['b'\] \(extension "
                                       r"Adapter 'adapter', e.g. at backbone/layer_0/attention/adapter/\)"):
        registry.check_task_weights(broken, cfg.extensions)
    # a checkpoint trained for more tasks than the extension routes
    lora_only_a = registry.build_extensions([{"method": "lora", "tasks": ["a"]}], NAMES)
    with pytest.raises(KeyError, match=r"'lora' weights for task\(s\) \['b', 'c', 'd'\] that "
                                       r"extension 'lora' does not route"):
        registry.check_task_weights(params, lora_only_a)
    registry.check_task_weights(params, lora_only_a, allow_extra=True)


def test_checkpoint_without_an_extension_at_all():
    cfg, params = _params([{"method": "lora"}])
    prefix = registry.build_extensions([{"method": "prefix"}], NAMES)
    with pytest.raises(KeyError, match=r"no parameters of extension 'prefix'"):
        registry.check_task_weights(params, prefix)


def test_checkpoint_checks_shared_compacter_rules_and_fusion_sources():
    cfg, params = _params([{"method": "compacter", "phm_dim": 2, "reduction_factor": 4}])
    with pytest.raises(KeyError, match=r"task\(s\) \['c'\].*generators_compacter/"):
        registry.check_task_weights(_drop_task(params, "generators_compacter", "c"), cfg.extensions)
    cfg, params = _params([{"method": "fusion", "reduction_factor": 4,
                            "sources": ["a", "b", "other"]}])
    registry.check_task_weights(params, cfg.extensions)
    with pytest.raises(KeyError, match=r"task\(s\) \['other'\].*fusion/adapters/"):
        registry.check_task_weights(_drop_task(params, "adapters", "other"), cfg.extensions)


def test_merge_of_a_task_without_lora():
    ext = LoRA(task_names=NAMES, tasks=("a",))
    with pytest.raises(KeyError, match=r"task 'b' has no LoRA weights; tasks with weights: \['a'\]"):
        merge_lora({}, ext, "b")
    with pytest.raises(KeyError, match=r"params hold no LoRA parameters named 'lora'"):
        merge_lora({"x": {"kernel": np.zeros((2, 2))}}, ext, "a")


def test_fusion_sources_must_match_the_adapters():
    fusion = Fusion(task_names=NAMES, reduction_factor=4)
    with pytest.raises(ValueError, match=r"adapter.reduction_factor=8 differs from "
                                         r"fusion.reduction_factor=4"):
        load_fusion_sources({}, {}, Adapter(task_names=NAMES, reduction_factor=8), fusion)
    with pytest.raises(ValueError, match=r"sequential adapters"):
        load_fusion_sources({}, {}, Adapter(task_names=NAMES, variant="parallel"), fusion)


def test_without_extension_unknown_name():
    cfg = registry.attach(tiny_bert(), [{"method": "lora"}], NAMES)
    with pytest.raises(KeyError, match=r"no extension named 'adapter'; extensions: \['lora'\]"):
        registry.without_extension(cfg, "adapter")


def test_routing_without_task_ids_many_tasks():
    cfg = registry.attach(tiny_bert(), [{"method": "ia3"}], NAMES)
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"ia3 'ia3' at encoder.layer0.attention.key: no "
                                         r"routing.task_ids"):
        jax.eval_shape(lambda: BertEncoder(cfg).init(jax.random.key(0), ids, ids,
                                                     routing=Routing(task_ids=None)))
