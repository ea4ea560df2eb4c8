"""Hypernetwork-generated adapters and LoRA (mtlx/peft/hyper.py).

References no one here wrote: torch's linear / layer_norm and transformers' gelu_new (the ops
hyperformer's MetaLayersAdapterController uses), Hugging Face's PyTorch BertModel, Hugging Face
PEFT's LoRA, and the module shapes of the released HyperFormer++ code (rabeehk/hyperformer,
adapter_modeling.AdapterLayersOneHyperNetController) for the T5-base parameter count.
"""

import dataclasses
import math

import flax.traverse_util as tu
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mtlx.batch import make_batch
from mtlx.models import bert
from mtlx.models.bert import BertConfig
from mtlx.models.heads import TaskHead
from mtlx.models.layers import Routing
from mtlx.models.multitask import MultiTaskModel, init_params, with_backbone
from mtlx.models.report import parameter_report
from mtlx.peft import hyper as H
from mtlx.peft import registry
from mtlx.peft.adapters import bottleneck_delta
from mtlx.train.optim import trainable_mask

try:
    from mtlx.models.t5 import T5Config
except ImportError:  # pragma: no cover - T5 is written in parallel
    T5Config = None

ATOL = 1e-5
BERT_TASKS = (TaskHead("cls2", "classification", 2), TaskHead("cls3", "classification", 3),
              TaskHead("reg", "regression"))
T5_TASKS = (TaskHead("gen", "seq2seq"), TaskHead("cls", "classification", 3),
            TaskHead("gen2", "seq2seq"))
B, L, LT = 7, 6, 4
MIX = np.array([0, 1, 2, 1, 0, 2, 2])


def tiny_bert(**kw):
    cfg = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
               max_position_embeddings=32, type_vocab_size=2)
    cfg.update(kw)
    return BertConfig(**cfg)


def tiny_t5(**kw):
    if T5Config is None:
        pytest.fail("mtlx.models.t5 is not importable")
    cfg = dict(vocab_size=60, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
               num_heads=4, dropout_rate=0.1)
    cfg.update(kw)
    return T5Config(**cfg)


def names(tasks):
    return tuple(t.name for t in tasks)


def make_ext(kind, cfg, task_heads, **kw):
    """The method built directly and bound to the backbone (registry.attach is tested too)."""
    kw = dict({"rank": 3, "alpha": 6.0} if kind == "hyper_lora" else {"reduction_factor": 4}, **kw)
    return H.METHODS[kind](task_names=names(task_heads), **kw).bind(cfg)


def attach(cfg, ext):
    return dataclasses.replace(cfg, extensions=tuple(cfg.extensions) + (ext,))


def a_batch(task_ids=MIX, seed=0, vocab=50, seq2seq=False):
    rng = np.random.default_rng(seed)
    b = len(task_ids)
    lengths = rng.integers(2, L + 1, size=b)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
    fields = dict(input_ids=rng.integers(2, vocab, (b, L)) * mask, attention_mask=mask,
                  task_ids=np.asarray(task_ids))
    if seq2seq:
        tl = rng.integers(1, LT + 1, size=b)
        dmask = (np.arange(LT)[None] < tl[:, None]).astype(np.int32)
        fields.update(decoder_input_ids=rng.integers(2, vocab, (b, LT)) * dmask,
                      decoder_attention_mask=dmask)
    else:
        fields["token_type_ids"] = rng.integers(0, 2, (b, L)) * mask
    return make_batch(**fields)


def perturbed(params, ext_name, seed=1, std=0.05):
    """Generator params with seeded noise, so zero-initialised generators (HyperLoRA's B)
    produce non-trivial weights."""
    key = H.GENERATOR_PREFIX + ext_name
    leaves, tree = jax.tree_util.tree_flatten(params[key])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return dict(params, **{key: jax.tree_util.tree_unflatten(tree, noisy)})


def build(kind, cfg, task_heads, batch, seed=0, **kw):
    ext = make_ext(kind, cfg, task_heads, **kw)
    cfg = attach(cfg, ext)
    model = MultiTaskModel(cfg, task_heads)
    params = perturbed(init_params(model, jax.random.key(seed), batch), ext.name)
    return ext, cfg, model, params


_JITTED = {}


def generate(params, cfg):
    return jax.jit(lambda p: H.generate(p, cfg))(params)


def encode_bert(cfg, params, batch, generated):
    """The BERT backbone called directly with the generated weights -> last_hidden_state."""
    fn = jax.jit(lambda p, b, g: bert.module(cfg).apply(
        {"params": p}, b.input_ids, b.attention_mask, b.token_type_ids,
        routing=Routing(task_ids=b.task_ids, generated=g)).last_hidden_state)
    return np.asarray(fn(params["backbone"], batch, generated))


def run(model, params, batch):
    """model.apply, jitted once per model (the models here live for the whole session)."""
    if id(model) not in _JITTED:
        _JITTED[id(model)] = (model, jax.jit(lambda p, b: model.apply({"params": p}, b)))
    return _JITTED[id(model)][1](params, batch)


# ------------------------------------------------------------------ the application math

def torch_adapter(x, w, eps=1e-5):
    """hyperformer's MetaLayersAdapterController.forward (add_layer_norm_after_adapter=True,
    add_layer_norm_before_adapter=False) for one task, in torch. Weights in torch Linear layout."""
    import torch
    import torch.nn.functional as F
    from transformers.activations import get_activation
    t = jax.tree_util.tree_map(lambda v: torch.as_tensor(np.array(v)), w)
    down = F.linear(x, weight=t["down"]["kernel"].T, bias=t["down"]["bias"])
    mid = get_activation("gelu_new")(down)
    up = F.linear(mid, weight=t["up"]["kernel"].T, bias=t["up"]["bias"])
    out = F.layer_norm(up, (x.shape[-1],), weight=t["norm"]["scale"], bias=t["norm"]["bias"], eps=eps)
    return out + x


def test_adapter_math_matches_hyperformer_torch_math():
    """x + bottleneck_delta(x, generated, layer_norm='post', gelu_new) is hyperformer's adapter."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    g, d, m = 3, 16, 4
    x = rng.normal(size=(5, 6, d)).astype(np.float32)
    group = np.array([2, 0, 1, 2, 2])
    w = {}
    for (k, leaf), shape in H.adapter_shapes(d, m).items():
        w.setdefault(k, {})[leaf] = rng.normal(size=(g,) + shape).astype(np.float32)
    got = np.asarray(x + bottleneck_delta(jnp.asarray(x), w, jnp.asarray(group),
                                          activation="gelu_new", layer_norm="post"))
    for i, t in enumerate(group):
        one = jax.tree_util.tree_map(lambda v: v[t], w)
        np.testing.assert_allclose(got[i], torch_adapter(torch.as_tensor(x[i]), one).numpy(),
                                   atol=ATOL, rtol=0)


def test_generated_adapters_equal_plain_adapters_in_hf_bert(tmp_path):
    """HyperFormer++ on a mixed batch of a converted HF BertModel equals, row by row, the HF
    model with a plain (torch) adapter holding that row's task's generated weights, hooked
    after each attention/FFN output dense + dropout (before the residual LayerNorm)."""
    torch = pytest.importorskip("torch")
    from mtlx.models import hf
    from tests.hf_tiny import save_tiny_bert
    path, ref_model = save_tiny_bert(tmp_path)
    cfg, backbone = hf.load_pretrained(path)
    batch = a_batch(vocab=cfg.vocab_size)
    ext, cfg, model, params = build("hyperformer++", cfg, BERT_TASKS, batch)
    params = with_backbone(params, backbone)
    generated = generate(params, cfg)
    ours = encode_bert(cfg, params, batch, generated)
    gen = jax.tree_util.tree_map(np.asarray, generated[ext.name]["encoder"])
    for t in range(len(BERT_TASKS)):
        rows = np.flatnonzero(MIX == t)
        handles = []
        for i, layer in enumerate(ref_model.encoder.layer):
            for block, module in (("attention", layer.attention.output.dropout),
                                  ("ffn", layer.output.dropout)):
                w = jax.tree_util.tree_map(lambda v, i=i: v[i, t], gen[block])
                handles.append(module.register_forward_hook(
                    lambda mod, inp, out, w=w: torch_adapter(out, w)))
        with torch.no_grad():
            ref = ref_model(input_ids=torch.as_tensor(np.asarray(batch.input_ids)[rows], dtype=torch.long),
                            attention_mask=torch.as_tensor(np.asarray(batch.attention_mask)[rows]),
                            token_type_ids=torch.as_tensor(np.asarray(batch.token_type_ids)[rows],
                                                           dtype=torch.long)).last_hidden_state
        for h in handles:
            h.remove()
        np.testing.assert_allclose(ours[rows], ref.numpy(), atol=ATOL, rtol=0)


def test_generated_lora_equals_peft_lora_in_hf_bert(tmp_path):
    """HyperLoRA on a mixed batch equals, row by row, Hugging Face PEFT's LoRA (query, value)
    on the HF BertModel with lora_A/lora_B set to that task's generated factors."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from mtlx.models import hf
    from tests.hf_tiny import save_tiny_bert
    path, _ = save_tiny_bert(tmp_path)
    cfg, backbone = hf.load_pretrained(path)
    batch = a_batch(vocab=cfg.vocab_size)
    ext, cfg, model, params = build("hyper_lora", cfg, BERT_TASKS, batch)
    params = with_backbone(params, backbone)
    generated = generate(params, cfg)
    ours = encode_bert(cfg, params, batch, generated)
    gen = jax.tree_util.tree_map(np.asarray, generated[ext.name]["encoder"])
    assert np.abs(gen["attention.query"]["B"]).max() > 1e-3  # B really is non-zero here
    for t in range(len(BERT_TASKS)):
        import transformers
        ref = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
        lcfg = peft.LoraConfig(r=ext.rank, lora_alpha=ext.alpha, lora_dropout=0.0,
                               target_modules=["query", "value"])
        ref = peft.get_peft_model(ref, lcfg)
        with torch.no_grad():
            for i, layer in enumerate(ref.base_model.model.encoder.layer):
                for ours_name, module in (("attention.query", layer.attention.self.query),
                                          ("attention.value", layer.attention.self.value)):
                    module.lora_A["default"].weight.copy_(torch.as_tensor(np.array(gen[ours_name]["A"][i, t].T)))
                    module.lora_B["default"].weight.copy_(torch.as_tensor(np.array(gen[ours_name]["B"][i, t].T)))
            rows = np.flatnonzero(MIX == t)
            out = ref(input_ids=torch.as_tensor(np.asarray(batch.input_ids)[rows], dtype=torch.long),
                      attention_mask=torch.as_tensor(np.asarray(batch.attention_mask)[rows]),
                      token_type_ids=torch.as_tensor(np.asarray(batch.token_type_ids)[rows],
                                                     dtype=torch.long)).last_hidden_state
        np.testing.assert_allclose(ours[rows], out.numpy(), atol=ATOL, rtol=0)


def test_hyperformer_pp_generator_matches_its_formula():
    """Generated weights for (task, layer, block) = linear generators of
    LN(W2 relu(W1 concat(task, layer, block) + b1) + b2), recomputed in numpy from the params."""
    cfg = tiny_bert()
    batch = a_batch()
    ext, cfg, model, params = build("hyperformer++", cfg, BERT_TASKS, batch)
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params[H.GENERATOR_PREFIX + ext.name])
    gen = generate(params, cfg)[ext.name]["encoder"]
    s = p["encoder"]
    for t, task in enumerate(ext.active):
        for layer in range(cfg.num_layers):
            for bi, block in enumerate(H.BLOCKS):
                z = np.concatenate([p["task_embeddings"][task]["embedding"],
                                    s["layer_embeddings"][layer], s["block_embeddings"][bi]])
                h = np.maximum(z @ s["mlp"]["hidden"]["kernel"] + s["mlp"]["hidden"]["bias"], 0)
                c = h @ s["mlp"]["output"]["kernel"] + s["mlp"]["output"]["bias"]
                c = (c - c.mean()) / np.sqrt(c.var() + ext.hyper_eps)
                c = c * s["mlp"]["layer_norm"]["scale"] + s["mlp"]["layer_norm"]["bias"]
                for (k, leaf), shape in H.adapter_shapes(ext.d_model, ext.adapter_dim).items():
                    g = s["generators"][f"{k}_{leaf}"]
                    want = (c @ g["kernel"] + g["bias"]).reshape(shape)
                    np.testing.assert_allclose(np.asarray(gen[block][k][leaf][layer, t]), want,
                                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ mixed batches

def _assert_rows_match(model, params, batch, num_tasks):
    """Each task's rows of the mixed batch give the outputs they give in a batch holding only
    that task's rows (repeated to the same batch size, so one compiled function serves all)."""
    out = run(model, params, batch)
    ids = np.asarray(batch.task_ids)
    for t in range(num_tasks):
        rows = np.flatnonzero(ids == t)
        alone = run(model, params, batch.select(np.resize(rows, len(ids))))
        for key in out:
            np.testing.assert_allclose(np.asarray(out[key])[rows], np.asarray(alone[key])[:len(rows)],
                                       atol=ATOL, rtol=0, err_msg=f"task {t} output {key}")
    return out


@pytest.mark.parametrize("kind", ["hyperformer++", "hyperformer", "hyper_lora"])
def test_mixed_batch_equals_each_task_alone_bert(kind):
    batch = a_batch()
    _, _, model, params = build(kind, tiny_bert(), BERT_TASKS, batch)
    _assert_rows_match(model, params, batch, len(BERT_TASKS))


@pytest.mark.parametrize("kind", ["hyperformer++", "hyper_lora"])
def test_mixed_batch_equals_each_task_alone_t5_encoder_decoder(kind):
    cfg = tiny_t5()
    batch = a_batch(task_ids=[0, 1, 2, 1, 0, 2, 0], vocab=cfg.vocab_size, seq2seq=True)
    kw = {} if kind == "hyperformer++" else {"targets": ("attention.query", "attention.value",
                                                         "cross_attention.query", "ffn.output")}
    ext, cfg, model, params = build(kind, cfg, T5_TASKS, batch, **kw)
    assert dict(ext.stacks) == {"encoder": 2, "decoder": 2}
    out = _assert_rows_match(model, params, batch, len(T5_TASKS))
    # The decoder's generated weights reach the decoder: changing only the decoder's
    # generator changes the seq2seq logits.
    gen = H.GENERATOR_PREFIX + ext.name
    other = jax.tree_util.tree_map(lambda x: x * 1.5 + 0.01, params[gen]["decoder"])
    changed = run(model, dict(params, **{gen: dict(params[gen], decoder=other)}), batch)
    assert float(jnp.abs(changed["seq2seq"] - out["seq2seq"]).max()) > 1e-3
    np.testing.assert_array_equal(changed["pooled"], out["pooled"])  # encoder untouched


def test_t5_classification_only_has_no_decoder_generator():
    cfg = tiny_t5()
    tasks = (TaskHead("a", "classification", 2), TaskHead("b", "regression"))
    ext = make_ext("hyperformer++", cfg, tasks, decoder=False)
    assert dict(ext.stacks) == {"encoder": 2}
    model = MultiTaskModel(attach(cfg, ext), tasks)
    batch = a_batch(task_ids=[0, 1, 1, 0], vocab=cfg.vocab_size)
    params = init_params(model, jax.random.key(0), batch)
    assert set(params[H.GENERATOR_PREFIX + ext.name]) == {"task_embeddings", "encoder"}
    _assert_rows_match(model, params, batch, 2)


def test_generate_feeds_t5_decoding_directly():
    """`generate` gives the routing a direct backbone call needs: the seq2seq logits of the
    multi-task model equal T5Model.decode's with Routing(generated=generate(params, cfg))."""
    from mtlx.models.t5 import T5Model
    cfg = tiny_t5()
    batch = a_batch(task_ids=[0, 2, 0, 2], vocab=cfg.vocab_size, seq2seq=True)
    ext, cfg, model, params = build("hyperformer++", cfg, T5_TASKS, batch)
    routing = Routing(task_ids=batch.task_ids, generated=generate(params, cfg))
    logits = T5Model(cfg).apply({"params": params["backbone"]}, batch.input_ids,
                                batch.attention_mask, batch.decoder_input_ids,
                                batch.decoder_attention_mask, routing=routing)
    np.testing.assert_allclose(logits, run(model, params, batch)["seq2seq"], atol=ATOL, rtol=0)


# ------------------------------------------------------------------ once per step

class _CountingPPGenerator(H.HyperFormerPPGenerator):
    calls = 0

    def __call__(self):
        type(self).calls += 1
        return super().__call__()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CountingPP(H.HyperFormerPP):
    def generator(self):
        return _CountingPPGenerator(self)


def _dot_operand_shapes(jaxpr, out):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _dot_operand_shapes(sub, out)
    return out


def test_weights_generated_once_per_forward_and_one_compile_for_any_mix():
    cfg = tiny_t5()
    ext = _CountingPP(task_names=names(T5_TASKS), reduction_factor=4).bind(cfg)
    assert ext.stacks == (("encoder", 2), ("decoder", 2))
    cfg = attach(cfg, ext)
    model = MultiTaskModel(cfg, T5_TASKS)
    mixes = ([0, 1, 2, 1, 0, 2, 0], [0] * 7, [2, 2, 1, 1, 1, 0, 2])
    params = init_params(model, jax.random.key(0), a_batch(task_ids=mixes[0], vocab=60, seq2seq=True))
    traces = []

    @jax.jit
    def step(p, b):
        traces.append(1)
        return jax.value_and_grad(lambda q: model.apply({"params": q}, b)["seq2seq"].sum())(p)

    gen_kernel = (ext.projected_dim, ext.d_model * ext.adapter_dim)
    for mix in mixes:
        batch = a_batch(task_ids=mix, vocab=60, seq2seq=True)
        _CountingPPGenerator.calls = 0
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, batch)["seq2seq"])(params)
        assert _CountingPPGenerator.calls == 1, mix
        # The down- and up-kernel generators (both [p, d*m]) run once per stack per forward:
        # 2 stacks x 2 products, whatever the mix of tasks in the batch.
        gens = [s for s in _dot_operand_shapes(jaxpr.jaxpr, []) if gen_kernel in s]
        assert len(gens) == 4, (mix, gens)
        _, grads = jax.block_until_ready(step(params, batch))
        # Tasks absent from the batch get no gradient on their embedding; present ones do.
        emb = grads[H.GENERATOR_PREFIX + ext.name]["task_embeddings"]
        for t, task in enumerate(ext.active):
            assert (float(jnp.abs(emb[task]["embedding"]).max()) > 0) == (t in mix), (mix, task)
    assert len(traces) == 1  # one trace (and compile) of the training step for all three mixes


# ------------------------------------------------------------------ adding a task

# The other kinds share the task-embedding mechanism; they run with the heavy tests.
@pytest.mark.parametrize("kind", ["hyperformer++", pytest.param("hyperformer", marks=pytest.mark.heavy),
                                  pytest.param("hyper_lora", marks=pytest.mark.heavy)])
def test_adding_a_task_keeps_other_tasks(kind):
    batch = a_batch()
    cfg = tiny_bert()
    more = BERT_TASKS + (TaskHead("new", "classification", 2),)
    ext, ext2 = make_ext(kind, cfg, BERT_TASKS), make_ext(kind, cfg, more)
    c1, c2 = attach(cfg, ext), attach(cfg, ext2)
    m1, m2 = MultiTaskModel(c1, BERT_TASKS), MultiTaskModel(c2, more)
    p1 = init_params(m1, jax.random.key(0), batch)
    p2 = init_params(m2, jax.random.key(0), batch)
    f1, f2 = tu.flatten_dict(p1, sep="/"), tu.flatten_dict(p2, sep="/")
    gen = H.GENERATOR_PREFIX + ext.name
    assert set(f2) - set(f1) == {f"{gen}/task_embeddings/new/embedding", "heads/new/kernel",
                                 "heads/new/bias"}
    for k in f1:
        np.testing.assert_array_equal(f1[k], f2[k], err_msg=k)
    # Old tasks' generated weights and outputs do not change when a task is added.
    g1, g2 = generate(p1, c1)[ext.name], generate(p2, c2)[ext.name]
    for path, a in tu.flatten_dict(g1, sep="/").items():
        b = tu.flatten_dict(g2, sep="/")[path]
        np.testing.assert_allclose(a, b[:, :3], atol=1e-6, rtol=0, err_msg=path)  # [L, T, ...]
    o1, o2 = run(m1, p1, batch), run(m2, p2, batch)
    np.testing.assert_allclose(o1["regression"], o2["regression"], atol=1e-6)
    np.testing.assert_allclose(o1["classification"], o2["classification"][:, :3], atol=1e-6)
    np.testing.assert_allclose(o1["pooled"], o2["pooled"], atol=1e-6)


# ------------------------------------------------------------------ what trains

def test_registry_builds_it_and_trains_hypernetworks_layer_norms_and_heads():
    batch = a_batch()
    cfg = registry.attach(tiny_bert(), [{"method": "hyperformer++", "reduction_factor": 4}],
                          names(BERT_TASKS))
    (ext,) = cfg.extensions
    assert isinstance(ext, H.HyperFormerPP) and ext.stacks == (("encoder", 2),) and ext.d_model == 16
    registry.check_task_order(cfg, names(BERT_TASKS))
    model = MultiTaskModel(cfg, BERT_TASKS)
    params = init_params(model, jax.random.key(0), batch)
    mask = tu.flatten_dict(trainable_mask(params, registry.trainable_patterns(cfg)), sep="/")
    on = {k for k, v in mask.items() if v}
    gen = H.GENERATOR_PREFIX + ext.name
    assert {k for k in mask if k.startswith(gen + "/") or k.startswith("heads/")} <= on
    backbone_on = sorted(k for k in on if k.startswith("backbone/"))
    assert backbone_on and all("/layer_norm/" in k for k in backbone_on)
    # 2 layers x 2 sublayer norms + the embedding norm, scale and bias each.
    assert len(backbone_on) == (2 * 2 + 1) * 2
    assert not mask["backbone/layer_0/attention/query/kernel"]


# ------------------------------------------------------------------ T5-base parameter count

def t5_base():
    return tiny_t5(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                   num_decoder_layers=12, num_heads=12, feed_forward_proj="relu",
                   tie_word_embeddings=True)


GLUE8 = ("rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola")


def released_hyperformer_pp_count(d=768, r=32, layers=(12, 12), t=64, hidden=128, p=64, tasks=8):
    """Trainable parameters of the released HyperFormer++ (configs/hyperformer++.json on T5-base)
    from its module definitions: per stack an AdapterLayersOneHyperNetController (layer-id and
    block-type nn.Embeddings, TaskHyperNet 3t->hidden->p, LayerNorm(p), up/down
    AdapterLayersHyperNet, post LayerNormHyperNet); one t-dim embedding per task."""
    m = d // r
    lin = lambda i, o: i * o + o  # noqa: E731  nn.Linear(i, o)
    per_stack = lambda n: (n * t + 2 * t + lin(3 * t, hidden) + lin(hidden, p) + 2 * p  # noqa: E731
                           + lin(p, d * m) + lin(p, d)        # up sampler: weight, bias
                           + lin(p, m * d) + lin(p, m)        # down sampler
                           + 2 * lin(p, d))                   # post layer norm gamma, beta
    return sum(per_stack(n) for n in layers) + tasks * t


def test_t5_base_hyperformer_pp_trains_0_29_percent_per_task():
    """Karimi Mahabadi et al. 2021, Table 1: HyperFormer++ on T5-base trains 0.29% of the
    parameters per task (hypernetworks + task embeddings + layer norms, amortised over the 8
    GLUE tasks). Shapes only (jax.eval_shape), no weights."""
    cfg = t5_base()
    tasks = tuple(TaskHead(n, "seq2seq") for n in GLUE8)
    cfg = registry.attach(cfg, [{"method": "hyperformer++"}], GLUE8)  # the paper's defaults
    (ext,) = cfg.extensions
    assert (ext.reduction_factor, ext.task_embedding_dim, ext.layer_embedding_dim,
            ext.block_embedding_dim, ext.hidden_dim, ext.projected_dim) == (32, 64, 64, 64, 128, 64)
    model = MultiTaskModel(cfg, tasks)
    batch = a_batch(task_ids=[0, 1], vocab=cfg.vocab_size, seq2seq=True)
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), batch))
    trainable = trainable_mask(shapes, registry.trainable_patterns(cfg, heads=False))
    rep = parameter_report(shapes, GLUE8, trainable)
    assert rep["backbone"] == 222_903_552  # HF t5-base (tied LM head)
    layer_norms = (2 * 12 + 1) * 768 + (3 * 12 + 1) * 768
    gen = tu.flatten_dict(shapes[H.GENERATOR_PREFIX + ext.name])
    assert sum(math.prod(v.shape) for v in gen.values()) == released_hyperformer_pp_count()
    assert rep["trainable"] == released_hyperformer_pp_count() + layer_norms
    pct = rep["per_task"]["rte"]["trainable_pct_of_backbone"]
    assert abs(pct - 0.29) <= 0.03, pct
    assert all(abs(r["trainable_pct_of_backbone"] - pct) < 1e-9 for r in rep["per_task"].values())


# ------------------------------------------------------------------ errors

def test_errors_name_what_is_wrong():
    cfg = tiny_bert()
    pp = H.HyperFormerPP
    with pytest.raises(ValueError, match="hyperformer\\+\\+.reduction_factor \\(32\\) must divide "
                                         "d_model \\(16\\)"):
        pp(task_names=("a",)).bind(cfg)
    with pytest.raises(ValueError, match="task_names repeats \\['a'\\]"):
        H.HyperFormer(task_names=("a", "a"))
    with pytest.raises(ValueError, match="hyperformer\\+\\+.activation: unknown activation 'tanhh'"):
        pp(task_names=("a",), activation="tanhh")
    with pytest.raises(ValueError, match="hyperformer\\+\\+.hidden_dim must be a positive integer"):
        pp(task_names=("a",), hidden_dim=0)
    with pytest.raises(ValueError, match="hyper_lora.targets \\['attention.q'\\] are not projection"):
        H.HyperLoRA(task_names=("a",), targets=("attention.q",))
    with pytest.raises(ValueError, match="hyper_lora.targets \\['cross_attention.query'\\] do not "
                                         "exist in BertConfig"):
        H.HyperLoRA(task_names=("a",), targets=("cross_attention.query",)).bind(cfg)
    with pytest.raises(ValueError, match="hyper_lora.rank must be a positive integer"):
        H.HyperLoRA(task_names=("a",), rank=0)
    with pytest.raises(ValueError, match="hyperformer.decoder=True but BertConfig has no decoder"):
        H.HyperFormer(task_names=("a",), reduction_factor=4, decoder=True).bind(cfg)
    with pytest.raises(ValueError, match="hyperformer\\+\\+.d_model=8 disagrees with the backbone"):
        pp(task_names=("a",), reduction_factor=4, d_model=8).bind(cfg)
    with pytest.raises(ValueError, match="is not bound to a backbone: call .bind"):
        pp(task_names=("a",)).generator()
    with pytest.raises(ValueError, match="peft\\[0\\]: unknown key\\(s\\) \\['reduction'\\]"):
        registry.attach(cfg, [{"method": "hyperformer", "reduction": 4}], ("a",))
    ext = make_ext("hyperformer++", cfg, BERT_TASKS)
    with_ext = attach(cfg, ext)
    with pytest.raises(ValueError, match="built for tasks \\['cls2', 'cls3', 'reg'\\] but the "
                                         "model's tasks are \\['cls3', 'cls2', 'reg'\\]"):
        registry.check_task_order(with_ext, ["cls3", "cls2", "reg"])
    with pytest.raises(KeyError, match="no 'generators_hyperformer_pp'"):
        H.generate({"backbone": {}}, with_ext)
    batch = a_batch()
    # The backbone alone, without MultiTaskModel's generator pass.
    with pytest.raises(ValueError, match="hyper.py: hyperformer\\+\\+ 'hyperformer_pp' at "
                                         "encoder.layer0.attention found no generated weights"):
        bert.module(with_ext).init(jax.random.key(0), batch.input_ids, batch.attention_mask,
                                   routing=Routing(task_ids=batch.task_ids))
    # An extension bound to a shallower backbone than the one it runs in.
    short = attach(tiny_bert(num_layers=3), ext)
    with pytest.raises(ValueError, match="generated weights for 2 encoder layers but "
                                         "encoder.layer2.attention is layer 2"):
        init_params(MultiTaskModel(short, BERT_TASKS), jax.random.key(0), batch)


@pytest.mark.parametrize("kind", ["hyperformer++", pytest.param("hyper_lora", marks=pytest.mark.heavy)])
def test_tasks_without_weights_run_the_plain_backbone(kind):
    """`tasks` (the TaskExtension subset owning weights): only those tasks get an embedding and
    generated weights; the other tasks' rows equal the model without the extension."""
    batch = a_batch()
    ext, cfg, model, params = build(kind, tiny_bert(), BERT_TASKS, batch, tasks=("cls3",))
    gen = params[H.GENERATOR_PREFIX + ext.name]
    assert set(gen["task_embeddings"]) == {"cls3"}
    out = run(model, params, batch)
    plain = MultiTaskModel(dataclasses.replace(cfg, extensions=()), BERT_TASKS)
    base = run(plain, {k: v for k, v in params.items() if k != H.GENERATOR_PREFIX + ext.name}, batch)
    others, own = np.flatnonzero(MIX != 1), np.flatnonzero(MIX == 1)
    np.testing.assert_allclose(np.asarray(out["pooled"])[others], np.asarray(base["pooled"])[others],
                               atol=ATOL, rtol=0)
    assert np.abs(np.asarray(out["pooled"])[own] - np.asarray(base["pooled"])[own]).max() > 1e-3


def _param_counts_script():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "param_counts.py"
    spec = importlib.util.spec_from_file_location("param_counts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_param_counts_script_lora_row_equals_hf_peft_count():
    """scripts/param_counts.py counts LoRA r=8 on q,v of T5-base exactly as Hugging Face PEFT
    does (target_modules=['q', 'v'] on transformers' T5ForConditionalGeneration, meta device),
    (the T5-base backbone count is checked against transformers' too)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pc = _param_counts_script()
    ((_, methods, norms, _),) = [r for r in pc.ROWS if r[0].startswith("LoRA")]
    rep = pc.count(pc.t5_base(), methods, pc.GLUE8, norms)
    ref = pc.peft_lora_count(rank=8)
    assert ref["backbone"] == 222_903_552
    assert rep["per_task"]["rte"]["trainable_amortised"] == ref["trainable"]


@pytest.mark.parametrize("impl", ["ragged", "onehot"])
@pytest.mark.parametrize("kind", ["hyperformer++", pytest.param("hyper_lora", marks=pytest.mark.heavy)])
def test_ragged_routing_equals_gather(kind, impl):
    """impl='ragged' (grouped matmul over examples sorted by task) and impl='onehot' (one dense
    product over all tasks' weights) give the same outputs as the default per-example gather,
    with the same generated weights."""
    batch = a_batch()
    _, _, model, params = build(kind, tiny_bert(), BERT_TASKS, batch)
    _, _, ragged, _ = build(kind, tiny_bert(), BERT_TASKS, batch, impl=impl)
    a, b = run(model, params, batch), run(ragged, params, batch)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=ATOL, rtol=0, err_msg=key)
