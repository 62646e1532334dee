"""ftscale.estimate.memory: hand-computed cases, and the activation formula against the tensors autograd
really saves for backward in small Hugging Face models (bf16 and fp32, LoRA and full, dense and MoE)."""

import dataclasses

import pytest
from paths import architecture
from runs import make_run

from ftscale.engines import engine
from ftscale.estimate.memory import (
    ALLOCATOR_OVERHEAD_MIB,
    MIB,
    activation_bytes,
    layer_activation_bytes,
    logits_bytes,
    memory_setting,
    predict_memory,
    state_bytes,
)

LLAMA_8B = architecture("llama31_8b")
MIXTRAL_8X7B = architecture("mixtral_8x7b")
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = {"type": "llama", "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 1,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 512}


def test_llama_8b_lora_state_by_hand():
    s = memory_setting(LLAMA_8B, {"rank": 8, "targets": ALL7}, {}, micro_batch=1, seq_length=2048, dtype_bytes=2)
    st = state_bytes(s)
    adapters = 20_971_520  # 32 layers x 8 x (q 8192 + k 5120 + v 5120 + o 8192 + gate 18432 + up 18432 + down 18432)
    assert st.weights == 8_030_261_248 * 2 + adapters * 4  # bf16 base, fp32 adapters (peft)
    assert st.gradients == adapters * 4  # fp32 grads, what the parameters' .grad hold
    assert st.ddp_buckets == adapters * 4  # DDP's bucket copy of them: in the peak, not in the state
    assert st.optimizer == adapters * 4 * 2  # AdamW's two moments in fp32


def test_full_finetuning_embedded_is_8_bytes_per_param_in_bf16_and_tp_divides_it():
    one = state_bytes(memory_setting(LLAMA_8B, None, {"tp": 2, "sp": True}, micro_batch=1, seq_length=2048,
                                     dtype_bytes=2, track="model_parallel"))
    per_gpu = (8_030_261_248 - 4096 * 65) // 2 + 4096 * 65  # norms (2 per layer + final) replicated
    assert one.total == per_gpu * 8  # weights, grads, exp_avg, exp_avg_sq: 2 bytes each
    four = state_bytes(memory_setting(LLAMA_8B, None, {"tp": 4, "sp": True}, micro_batch=1, seq_length=2048,
                                      dtype_bytes=2, track="model_parallel"))
    assert four.total < one.total / 1.99


def test_ep_divides_the_experts_and_nemo_is_mixed_precision():
    def state(ep: int) -> float:
        return state_bytes(memory_setting(MIXTRAL_8X7B, None, {"ep": ep}, micro_batch=1, seq_length=2048,
                                          dtype_bytes=2, track="model_parallel")).total
    expert_bytes = 32 * 8 * 3 * 4096 * 14336 * 8  # all experts, 8 bytes per parameter
    assert state(1) - state(2) == expert_bytes / 2
    nemo = state_bytes(memory_setting(MIXTRAL_8X7B, None, {"ep": 1}, micro_batch=1, seq_length=2048, dtype_bytes=2,
                                      terms=engine("nemo").planner_terms(make_run(engine="nemo"), 2),
                                      track="model_parallel"))
    assert nemo.total == 46_702_792_704 * (2 + 4 + 12)  # the issue's ~16 bytes per parameter (+2 main grads)


def test_eager_lora_layer_by_hand():
    s = memory_setting(LLAMA_8B, {"rank": 8, "targets": ALL7}, {}, micro_batch=1, seq_length=4096, dtype_bytes=2)
    h, q, kv, inter = 4096, 4096, 1024, 14336
    parts = layer_activation_bytes(s)
    assert parts["norms"] == 2 * 4 * h
    assert parts["attention"] == 2 * 2 * q + 2 * 2 * kv + 4 * 32
    assert parts["lora"] == 4 * (h * 3 + q + h * 2 + inter) + 7 * 4 * 8
    assert parts["mlp"] == 3 * 2 * inter
    mem = predict_memory(s)
    assert mem.logits_mib == 4096 * 12 * 128256 / MIB
    assert mem.peak_mib == pytest.approx(mem.state_mib + mem.ddp_buckets_mib + mem.activations_mib + mem.logits_mib
                                         + ALLOCATOR_OVERHEAD_MIB)


def test_sp_divides_the_norms_and_checkpointing_keeps_layer_inputs():
    kw = dict(micro_batch=1, seq_length=2048, dtype_bytes=2, track="model_parallel")
    no_sp = layer_activation_bytes(memory_setting(LLAMA_8B, None, {"tp": 4}, **kw))
    sp = layer_activation_bytes(memory_setting(LLAMA_8B, None, {"tp": 4, "sp": True}, **kw))
    assert sp["norms"] == no_sp["norms"] / 4 and sp["attention"] == no_sp["attention"]
    eager = memory_setting(LLAMA_8B, None, {"tp": 4, "sp": True}, **kw)
    ckpt = memory_setting(LLAMA_8B, None, {"tp": 4, "sp": True}, activation_checkpointing=True, **kw)
    one_layer = sum(layer_activation_bytes(eager).values())
    assert predict_memory(ckpt).activations_mib * MIB == 2048 * (32 * 2 * 4096 / 4 + one_layer)
    assert predict_memory(ckpt).activations_mib < predict_memory(eager).activations_mib / 10


def _saved_bytes_per_token_per_layer(kind, dtype, lora, lora_dtype="float32"):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))

    def build(layers):
        torch.manual_seed(0)
        common = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=512, attn_implementation="sdpa")
        if kind == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
        else:
            model = transformers.MixtralForCausalLM(
                transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
        model = model.to(dtype)
        if lora:
            model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=lora, task_type="CAUSAL_LM"),
                                        autocast_adapter_dtype=lora_dtype == "float32")
        return model.train()

    def saved(model):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                storages[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        return sum(storages.values())

    return (saved(build(3)) - saved(build(1))) / 2 / ids.numel()  # two more layers: per layer, per token


@pytest.mark.parametrize("kind,dtype_name,lora,lora_dtype", [
    ("llama", "bfloat16", ALL7, "float32"),
    ("llama", "bfloat16", ALL7, "model"),  # embedded.lora_dtype: model (bf16 adapters, no cast copies)
    ("llama", "bfloat16", None, "float32"),
    ("llama", "float32", ["q_proj", "v_proj", "o_proj", "down_proj"], "float32"),
    ("mixtral", "bfloat16", ["q_proj", "k_proj", "v_proj", "o_proj"], "float32"),
    ("mixtral", "bfloat16", None, "float32"),
])
def test_layer_formula_matches_autograd_saved_tensors(kind, dtype_name, lora, lora_dtype):
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    measured = _saved_bytes_per_token_per_layer(kind, dtype, lora, lora_dtype)
    arch = {**SMALL, "type": kind, **({"num_local_experts": 4, "num_experts_per_tok": 2} if kind == "mixtral" else {})}
    s = memory_setting(arch, lora and {"rank": 8, "targets": lora}, {}, micro_batch=2, seq_length=64,
                       dtype_bytes=dtype.itemsize, adapter_bytes=dtype.itemsize if lora_dtype == "model" else 4)
    assert sum(layer_activation_bytes(s).values()) == pytest.approx(measured, rel=0.01)


def test_fused_ce_keeps_one_chunk_of_logits_by_hand():
    """fused_ce (embedded, data-parallel): the hidden states' gradient + one chunk's fp32 logits and their
    bf16 gradient, instead of 12 bytes per vocabulary entry for every token."""
    kw = dict(micro_batch=1, seq_length=4096, dtype_bytes=2)
    lora = {"rank": 8, "targets": ALL7}
    eager = predict_memory(memory_setting(LLAMA_8B, lora, {}, **kw))
    chunked = predict_memory(memory_setting(LLAMA_8B, lora, {}, fused_ce="chunked", **kw))
    liger = predict_memory(memory_setting(LLAMA_8B, lora, {}, fused_ce="liger", **kw))
    grad_hidden = 4096 * 2 * 4096
    assert chunked.logits_mib == (grad_hidden + 512 * 6 * 128256) / MIB  # 2**26 / 128256 -> 512 tokens
    assert liger.logits_mib == (grad_hidden + 128 * 6 * 128256) / MIB  # 4096 / ceil(128256 / 4096) = 128
    assert eager.peak_mib - chunked.peak_mib == pytest.approx(eager.logits_mib - chunked.logits_mib)
    # not on the model-parallel track (the engine leaves it off there: the head is split by TP)
    mp = make_run(track="model_parallel", gpus=2, tp=2, sp=True, engine_options={"fused_ce": "chunked"})
    assert engine("embedded").planner_terms(mp, 2).fused_ce == "off"


# Mixtral 8x7B by hand: one layer's non-expert parameters (q, k, v, o; 2 norms; the router), one expert's,
# and the untied embedding / LM head.
MIXTRAL_LAYER = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 2 * 4096 + 4096 * 8  # 41,984,000
MIXTRAL_EXPERT = 3 * 4096 * 14336  # 176,160,768
MIXTRAL_VOCAB = 32000 * 4096  # 131,072,000


def _nemo(layout: dict, **options) -> object:
    run = make_run(engine="nemo", track="model_parallel", engine_options=options)
    return memory_setting(MIXTRAL_8X7B, None, layout, micro_batch=1, seq_length=2048, dtype_bytes=2,
                          terms=engine("nemo").planner_terms(run, 2), track="model_parallel", microbatches=16)


def test_distributed_optimizer_shards_main_weights_and_moments_over_the_data_parallel_ranks():
    """Megatron's 6 + 12/d bytes per parameter: d = ep x dp for the dense part, dp for the experts; off: 18."""
    dense = 32 * MIXTRAL_LAYER + 2 * MIXTRAL_VOCAB + 4096  # 1,605,636,096
    expert = 32 * MIXTRAL_EXPERT  # one expert per GPU at ep 8: 5,637,144,576
    sharded = state_bytes(_nemo({"ep": 8, "dp": 2}))
    assert sharded.weights == (dense + expert) * 2 and sharded.gradients == (dense + expert) * 4  # not sharded
    assert sharded.optimizer == 12 * (dense / 16 + expert / 2)
    whole = state_bytes(_nemo({"ep": 8, "dp": 2}, distributed_optimizer=False))
    assert whole.optimizer == 12 * (dense + expert)
    assert (whole.weights, whole.gradients) == (sharded.weights, sharded.gradients)


def test_pipeline_stages_split_the_layers_embedding_first_lm_head_last():
    s = _nemo({"ep": 8, "pp": 2})
    first, last = state_bytes(s), state_bytes(dataclasses.replace(s, stage="last"))
    layers = 16 * MIXTRAL_LAYER + 16 * MIXTRAL_EXPERT  # half the layers, one expert each
    assert first.weights == (layers + MIXTRAL_VOCAB) * 2  # the embedding
    assert last.weights == (layers + MIXTRAL_VOCAB + 4096) * 2  # the LM head and the final norm
    assert first.optimizer == 12 * ((16 * MIXTRAL_LAYER + MIXTRAL_VOCAB) / 8 + 16 * MIXTRAL_EXPERT)


def test_the_first_stage_holds_pp_micro_batches_and_the_last_the_logits():
    one, two, four = _nemo({"ep": 8}), _nemo({"ep": 8, "pp": 2}), _nemo({"ep": 8, "pp": 4})
    per_layer = 2048 * sum(layer_activation_bytes(one).values())
    assert activation_bytes(one) == 32 * per_layer
    # 1F1B: the first stage starts min(pp, m) micro-batches before its first backward, of its L/pp layers
    assert activation_bytes(two) == 2 * 16 * per_layer and activation_bytes(four) == 4 * 8 * per_layer
    assert activation_bytes(dataclasses.replace(four, microbatches=2)) == 2 * 8 * per_layer
    last = dataclasses.replace(four, stage="last")
    assert activation_bytes(last) == 8 * per_layer
    assert logits_bytes(four) == 0 and logits_bytes(last) == logits_bytes(one) == 2048 * 6 * 32000
    # the run's prediction is its larger stage: here the first (4 micro-batches of 8 layers > 1 and the logits)
    pred = predict_memory(four)
    assert pred.stage == "first" and pred.logits_mib == 0
    assert pred.activations_mib == activation_bytes(four) / MIB
    assert predict_memory(one).stage == ""
