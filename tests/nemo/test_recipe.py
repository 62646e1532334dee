"""Real NeMo 2.7.3 recipes for the workshop matrix (no mocks). Runs only in the NeMo venv:

    .ci/nemo-venv /path/to/venv && /path/to/venv/bin/python -m pytest tests/nemo -q

Each run is built with ftscale.engines.nemo.train.build_recipe from the real ``llm.<recipe>.finetune_recipe``;
the tests read the settings back (recipe_fields), build every part NeMo can build without a GPU
(strategy, trainer on the CPU accelerator, data, optimizer, resume, logger, LoRA) and pass them to
NeMo's own ``llm.api._validate_config``. The model itself cannot be built on CPU: its config needs
Transformer Engine for ``apply_rope_fusion``, so the validation uses a copy with that one flag off.

The pure checks of a NeMo run (ftscale.engines.nemo.spec) are tested in the main suite
(tests/unit/engines/test_engines.py).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
# NeMo reads NEMO_HOME at import (SquadDataModule creates $NEMO_HOME/datasets/squad when built).
os.environ.setdefault("NEMO_HOME", os.path.join(tempfile.gettempdir(), "ftscale-nemo-home"))

llm = pytest.importorskip("nemo.collections.llm", reason="needs the NeMo venv (.ci/nemo-venv)")
fdl = pytest.importorskip("fiddle")
import torch  # noqa: E402

from ftscale.engines.nemo import convert as nemo_import  # noqa: E402
from ftscale.engines.nemo import train as engine  # noqa: E402
from ftscale.engines.nemo import without_te as nemo_without_te  # noqa: E402
from ftscale.study.check import run_errors  # noqa: E402
from ftscale.study.run import Run  # noqa: E402

MODELS = {
    "llama31_8b": {
        "name": "llama31_8b",
        "source": "hf://meta-llama/Llama-3.1-8B",
        "gated": True,
        "architecture": {"type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "vocab_size": 128256, "max_position_embeddings": 131072},
        "nemo": {"recipe": "llama31_8b", "model_class": "LlamaModel", "config_class": "Llama31Config8B"},
    },
    "mixtral_8x7b": {
        "name": "mixtral_8x7b",
        "source": "hf://mistralai/Mixtral-8x7B-v0.1",
        "gated": False,
        "architecture": {"type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                         "vocab_size": 32000, "max_position_embeddings": 32768,
                         "num_local_experts": 8, "num_experts_per_tok": 2},
        "nemo": {"recipe": "mixtral_8x7b", "model_class": "MixtralModel", "config_class": "MixtralConfig8x7B"},
    },
}

LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
LORA_NEMO_TARGETS = ["linear_qkv", "linear_proj"]  # what LORA's Hugging Face names become in NeMo


def make_run(track: str, model: str, tp: int, ep: int, dp: int, *, sp: bool = False, micro_batch: int = 1,
             global_batch: int, seq_length: int = 2048, nodes: int = 1, lora: dict | None = None,
             scaling: str | None = None, pp: int = 1, engine_options: dict | None = None) -> dict:
    """A run dict as ftscale.study.run.Run.to_dict writes it (gpus = tp x pp x ep x dp)."""
    gpus = tp * pp * ep * dp
    if track == "data_parallel":
        name = f"nemo_gpus{gpus}{f'_ep{ep}' if ep > 1 else ''}_mbs{micro_batch}_gbs{global_batch}_seq{seq_length}_bf16"
    else:
        stages = f"_pp{pp}" if pp > 1 else ""
        name = (f"nemo_tp{tp}{stages}_ep{ep}_dp{dp}{'_sp' if sp else ''}_mbs{micro_batch}_gbs{global_batch}"
                f"_seq{seq_length}_bf16")
    return {
        "track": track, "model": model, "engine": "nemo", "gpus": gpus, "nodes": nodes,
        "gpus_per_node": gpus // nodes, "tp": tp, "pp": pp, "ep": ep, "sp": sp, "dp": dp,
        "data_parallel_size": ep * dp, "micro_batch": micro_batch, "global_batch": global_batch,
        "grad_accum": global_batch // (micro_batch * ep * dp), "seq_length": seq_length, "steps": 50,
        "warmup_steps": 5, "learning_rate": 1.0e-4 if lora else 5.0e-6, "seed": 1234, "precision": "bf16",
        "device": "auto", "lora": copy.deepcopy(lora), "scaling": scaling, "weights": "pretrained",
        "checkpoint": f"models/{model}/nemo", "run_dir": f"experiments/{track}/{model}/{name}", "name": name,
        "data": {"kind": "corpus"}, "dataset_dir": "experiments/data/corpus", "tokenizer": f"models/{model}/model",
        "engine_options": dict(engine_options or {}),
    }


def workshop_runs() -> list[dict]:
    runs = []
    # Llama 3.1 8B, data-parallel track: LoRA, weak scaling (16 sequences per GPU: 128 at 8 GPUs)
    # and strong scaling (128 at every size), plus one two-node run.
    for gpus in (1, 2, 4, 8):
        runs.append(make_run("data_parallel", "llama31_8b", 1, 1, gpus, global_batch=16 * gpus, lora=LORA,
                             scaling="weak"))
    for gpus in (1, 2, 4):
        runs.append(make_run("data_parallel", "llama31_8b", 1, 1, gpus, global_batch=128, lora=LORA,
                             scaling="strong"))
    runs.append(make_run("data_parallel", "llama31_8b", 1, 1, 16, nodes=2, global_batch=256, lora=LORA,
                         scaling="weak"))
    # Llama 3.1 8B, model-parallel track: full fine-tuning, TP 2/4/8 with sequence parallelism.
    for tp in (2, 4, 8):
        runs.append(make_run("model_parallel", "llama31_8b", tp, 1, 1, sp=True, global_batch=16))
    # Mixtral 8x7B, data-parallel track, LoRA on 8 GPUs. With ep = 1 every GPU would hold all
    # 46.7 B parameters (~93 GB in bf16: more than an 80 GB H100), so the experts are spread with
    # ep = 8 (one expert per GPU, ~15 GB of weights each); attention stays replicated, and Megatron's
    # data-parallel size for the global batch is ep x dp = 8, as for the Llama run on 8 GPUs.
    runs.append(make_run("data_parallel", "mixtral_8x7b", 1, 8, 1, global_batch=128, lora=LORA))
    # Mixtral 8x7B, model-parallel track: full fine-tuning, TP x EP, sequence parallel where TP > 1.
    for tp, ep in ((1, 2), (2, 2), (1, 4), (2, 4), (1, 8)):
        runs.append(make_run("model_parallel", "mixtral_8x7b", tp, ep, 1, sp=tp > 1, global_batch=16 * ep))
    # ... and across nodes, where it fits: pipeline stages, the distributed optimizer over dp (NeMo's recipes).
    for pp, dp in ((2, 1), (1, 2), (2, 2), (4, 1)):
        runs.append(make_run("model_parallel", "mixtral_8x7b", 1, 8, dp, pp=pp, global_batch=16 * 8 * dp,
                             nodes=pp * dp))
    # the distributed optimizer off (a NeMo engine option; micro batch 2 for a name of its own)
    runs.append(make_run("model_parallel", "mixtral_8x7b", 1, 8, 1, pp=2, micro_batch=2, global_batch=128, nodes=2,
                         engine_options={"distributed_optimizer": False}))
    return runs


RUNS = workshop_runs()
# The main suite (tests/integration/test_nemo_recipes.py) hands over the plan of config/workshop.yaml, as the
# workflow expands it: then every run of the real workshop matrix is checked (plus the ones above).
if os.environ.get("FTSCALE_NEMO_PLAN"):
    import json

    _plan = json.loads(Path(os.environ["FTSCALE_NEMO_PLAN"]).read_text())
    MODELS.update(_plan["models"])
    _seen = {(r["model"], r["run_dir"]) for r in RUNS}
    RUNS += [r for r in _plan["runs"] if (r["model"], r["run_dir"]) not in _seen]


def run_id(run: dict) -> str:
    return f"{run['model']}-{run['track']}-{run['name']}"


@pytest.fixture(scope="module", params=RUNS, ids=run_id)
def built(request):
    run = request.param
    assert run_errors(Run.from_dict(run), MODELS[run["model"]]) == []
    return run, engine.build_recipe(Run.from_dict(run), MODELS[run["model"]])


def test_recipe_carries_the_run(built):
    run, recipe = built
    fields = engine.recipe_fields(recipe)
    # The run dict's keys, read back from the recipe.
    for key in ("tp", "pp", "ep", "sp", "gpus", "gpus_per_node", "nodes", "global_batch", "micro_batch", "seq_length",
                "seed", "warmup_steps", "name", "learning_rate"):
        assert fields[key] == run[key], (key, fields[key], run[key])
    assert fields["steps"] == run["steps"]
    # Explicit layout, whatever the recipe's defaults (Llama full FT: TP 2; Mixtral: EP 8, PP 4, VP 8).
    assert (fields["vp"], fields["cp"]) == (None, 1)
    assert fields["pipeline_dtype"] == (torch.bfloat16 if run.get("pp", 1) > 1 else None)
    assert fields["distributed_optimizer"] is (run["engine_options"] or {}).get("distributed_optimizer", True)
    assert recipe.trainer.strategy.expert_tensor_parallel_size is None
    assert fields["model_seq_length"] == run["seq_length"]
    assert fields["lr_max_steps"] == run["steps"]
    assert fields["precision"] == "bf16-mixed"
    # PEFT
    if run["lora"]:
        assert (fields["peft"], fields["lora_rank"], fields["lora_alpha"]) == ("lora", run["lora"]["rank"],
                                                                              run["lora"]["alpha"])
        assert fields["lora_targets"] == LORA_NEMO_TARGETS
    else:
        assert (fields["peft"], fields["lora_rank"], fields["lora_targets"]) == (None, None, None)
    # Restore from the local import, not nemo:// (the home cache); never resume a half-done run.
    assert fields["checkpoint"] == os.path.abspath(run["checkpoint"])
    assert not fields["checkpoint"].startswith("nemo://")
    assert fields["resume_if_exists"] is False
    assert fields["log_dir"] == os.path.join(os.path.abspath(run["run_dir"]), "nemo")
    # One ProgressPrinter line per step, with the step time.
    assert fields["log_every_n_steps"] == 1 and fields["progress_interval"] == 1
    assert recipe.trainer.strategy.replace_progress_bar is True
    assert fields["callbacks"].count("TimingCallback") == 1


def _build_parts(recipe):
    """Build what NeMo can build on a CPU: everything but the model (and the trainer on 'cpu')."""
    trainer_cfg = copy.deepcopy(recipe.trainer)
    trainer_cfg.accelerator = "cpu"
    parts = {
        "trainer": fdl.build(trainer_cfg),
        "data": fdl.build(recipe.data),
        "optim": fdl.build(recipe.optim),
        "resume": fdl.build(recipe.resume),
        "log": fdl.build(recipe.log),
        "peft": fdl.build(recipe.peft) if getattr(recipe, "peft", None) is not None else None,
    }
    model_cfg = copy.deepcopy(recipe.model)
    model_cfg.config.apply_rope_fusion = False  # the one setting that needs Transformer Engine
    parts["model"] = fdl.build(model_cfg)
    return parts


def test_recipe_builds_and_passes_nemo_validation(built):
    run, recipe = built
    from nemo import lightning as nl
    from nemo.collections.llm.api import _validate_config
    from nemo.utils.exp_manager import TimingCallback

    p = _build_parts(recipe)
    trainer, strategy = p["trainer"], p["trainer"].strategy
    assert isinstance(strategy, nl.MegatronStrategy)
    par = strategy.parallelism
    pp = run.get("pp", 1)
    assert (par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size,
            par.expert_model_parallel_size, par.sequence_parallel) == (run["tp"], pp, 1, run["ep"], run["sp"])
    if pp > 1:  # what the stages send each other (NeMo fills it from the precision plugin when pp = 1)
        assert par.pipeline_dtype == torch.bfloat16
    # Megatron's optimizer config as NeMo builds it: the distributed optimizer unless the run turns it off.
    from megatron.core.optimizer import OptimizerConfig

    assert isinstance(p["optim"].config, OptimizerConfig)
    assert p["optim"].config.use_distributed_optimizer is (run["engine_options"] or {}).get(
        "distributed_optimizer", True)
    assert par.virtual_pipeline_model_parallel_size is None
    assert (trainer.num_devices, trainer.num_nodes, trainer.max_steps) == (run["gpus_per_node"], run["nodes"],
                                                                          run["steps"])
    assert sum(isinstance(cb, TimingCallback) for cb in trainer.callbacks) == 1
    data = p["data"]
    assert (data.global_batch_size, data.micro_batch_size, data.seq_length, data.seed) == (
        run["global_batch"], run["micro_batch"], run["seq_length"], run["seed"])
    assert str(p["resume"].restore_config.path) == os.path.abspath(run["checkpoint"])
    assert p["model"].config.seq_length == run["seq_length"]
    if run["lora"]:
        assert (p["peft"].dim, p["peft"].alpha, p["peft"].target_modules) == (
            run["lora"]["rank"], run["lora"]["alpha"], LORA_NEMO_TARGETS)
    # NeMo's own checks of the layout and batch (llm.finetune runs them before training).
    _validate_config(p["model"], data, trainer, log=p["log"], resume=p["resume"], optim=p["optim"],
                     model_transform=p["peft"])
    # Unchanged by the validation: it silently rewrites SP / VP / pipeline_dtype when they clash.
    assert (strategy.sequence_parallel, strategy.virtual_pipeline_model_parallel_size) == (run["sp"], None)
    # NeMo's data-parallel size (what the global batch is split over) is ep x dp = gpus / (tp x pp).
    nemo_dp = trainer.num_devices * trainer.num_nodes // (run["tp"] * pp)
    assert nemo_dp == run["ep"] * run["dp"] == run["data_parallel_size"]
    assert run["global_batch"] // (run["micro_batch"] * nemo_dp) == run["grad_accum"]


def test_matrix_is_the_workshop_matrix():
    mp_mixtral = {(r["tp"], r["pp"], r["ep"], r["dp"]) for r in RUNS
                  if r["model"] == "mixtral_8x7b" and r["track"] == "model_parallel"}
    assert mp_mixtral == {(1, 1, 2, 1), (2, 1, 2, 1), (1, 1, 4, 1), (2, 1, 4, 1), (1, 1, 8, 1),
                          (1, 2, 8, 1), (1, 1, 8, 2), (1, 2, 8, 2), (1, 4, 8, 1)}
    assert {r["tp"] for r in RUNS if r["model"] == "llama31_8b" and r["track"] == "model_parallel"} == {2, 4, 8}
    assert {r["gpus"] for r in RUNS if r["model"] == "llama31_8b" and r["track"] == "data_parallel"} >= {1, 2, 4, 8}
    assert len({run_id(r) for r in RUNS}) == len(RUNS)


def test_recipe_defaults_that_build_recipe_overrides():
    """The recipe defaults this builder must not inherit (if NeMo changes them, re-read the recipes)."""
    mixtral = llm.mixtral_8x7b.finetune_recipe(dir="/tmp/x", name="x", num_nodes=1, num_gpus_per_node=2,
                                               peft_scheme="none")
    s = mixtral.trainer.strategy
    assert (s.expert_model_parallel_size, s.pipeline_model_parallel_size,
            s.virtual_pipeline_model_parallel_size) == (8, 4, 8)
    assert mixtral.resume.restore_config.path == "nemo://mistralai/Mixtral-8x7B-v0.1"
    assert mixtral.model.config.seq_length != mixtral.data.seq_length  # 4096 vs 2048: the recipe leaves them apart
    llama = llm.llama31_8b.finetune_recipe(dir="/tmp/x", name="x", num_nodes=1, num_gpus_per_node=8,
                                           peft_scheme="none")
    assert llama.trainer.strategy.tensor_model_parallel_size == 2
    assert llama.optim.lr_scheduler.max_steps != llama.trainer.max_steps  # cosine over 10 steps by default


def test_build_recipe_refuses_an_invalid_run():
    run = {**make_run("model_parallel", "mixtral_8x7b", 2, 4, 1, sp=True, global_batch=64), "ep": 3}
    with pytest.raises(ValueError, match=r"ep = 3"):
        engine.build_recipe(Run.from_dict(run), MODELS["mixtral_8x7b"])


# ----------------------------------------------------------------------------------------------
# NeMo's checkpoint conversion and model config: the parts that run without a GPU
# ----------------------------------------------------------------------------------------------


def test_import_classes_and_sources_resolve():
    for model in MODELS.values():
        model_cls = getattr(llm, model["nemo"]["model_class"])
        assert getattr(llm, model["nemo"]["config_class"])
        importer = model_cls.importer("hf://" + os.path.abspath("models/tiny_llama/model"))
        assert type(importer).__name__.startswith("HF"), type(importer)


def test_import_complete_marker(tmp_path):
    out = tmp_path / "model"
    for f in nemo_import.IMPORT_COMPLETE_FILES:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text("{}")
    assert nemo_import.import_complete(out)
    (out / "context" / "model.yaml").unlink()  # as if the import died before the context was dumped
    assert not nemo_import.import_complete(out)


def test_transformer_engine_config_needs_te_and_local_config_does_not():
    """NeMo's LLaMA config asks for TE's rope fusion; ``transformer_impl: local`` builds without TE."""
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine present")
    except ImportError:
        pass
    spec = MODELS["llama31_8b"]
    with pytest.raises(Exception, match="Transformer Engine|TE >= 1.4|apply_rope_fusion"):
        nemo_import.model_config(spec, {})
    config = nemo_import.model_config(spec, {"transformer_impl": "local"})
    assert config.apply_rope_fusion is False and config.gradient_accumulation_fusion is False
    spec_fn = config.transformer_layer_spec
    layer_spec = spec_fn(config) if callable(spec_fn) else spec_fn
    assert "TE" not in repr(layer_spec)[:2000]


TINY = {
    "name": "tiny_llama", "source": "synthetic", "synthetic_at_load": False,
    "architecture": {"type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 1024,
                     "max_position_embeddings": 512},
    "nemo": {"recipe": "llama31_8b", "model_class": "LlamaModel", "config_class": "Llama31Config8B"},
}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """A workflow directory holding TINY's real Hugging Face checkpoint (config and tokenizer; no weights
    needed) where its runs read it, models/tiny_llama/model."""
    from ftscale.importing.synthetic import hf_config, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_root")
    out = root / "models" / "tiny_llama" / "model"
    out.mkdir(parents=True)
    config = hf_config(TINY["architecture"])
    config.torch_dtype = "bfloat16"  # as save_pretrained of a bf16 model writes it (NeMo's importer reads it)
    config.save_pretrained(out)
    train_tokenizer(1024).save_pretrained(out)
    return root


@pytest.fixture
def tiny_hf(tiny_root, monkeypatch):
    """TINY's checkpoint, with the test in its workflow directory (a run's paths are relative to it)."""
    monkeypatch.chdir(tiny_root)
    return tiny_root / "models" / "tiny_llama" / "model"


def tiny_run(tiny_hf, **changes) -> Run:
    run = make_run("data_parallel", "tiny_llama", 1, 1, 1, global_batch=4, seq_length=128, lora=LORA)
    return Run.from_dict({**run, **{k: v for k, v in changes.items() if k != "dataset_dir"}})


def test_recipe_takes_the_models_shape_and_the_local_implementation(tiny_hf):
    """The 8B recipe restores a 2-layer model when the model.yaml says so; with transformer_impl local,
    the model config builds without Transformer Engine (the TE-only fusions off, the local spec)."""
    run = tiny_run(tiny_hf, engine_options={"transformer_impl": "local"})
    recipe = engine.build_recipe(run, TINY)
    fields = engine.recipe_fields(recipe)
    assert (fields["num_layers"], fields["hidden_size"], fields["vocab_size"]) == (2, 128, 1024)
    model = fdl.build(recipe.model)
    assert model.config.apply_rope_fusion is False
    assert model.config.transformer_layer_spec is nemo_import.local_layer_spec


def test_mock_data_uses_the_imported_tokenizer(tiny_hf):
    run = tiny_run(tiny_hf, data={"kind": "mock"}, dataset_dir=None)
    recipe = engine.build_recipe(run, TINY)
    assert engine.recipe_fields(recipe)["data"] == "MockDataModule"
    data = fdl.build(recipe.data)
    assert (data.seq_length, data.micro_batch_size, data.global_batch_size) == (128, 1, 4)
    assert data.tokenizer.vocab_size > 100  # the shipped BPE tokenizer, not a download
    # one global batch to validate, not NeMo's 10,000 samples every 30 steps
    assert (data.num_val_samples, data.num_test_samples) == (4, 4)


def test_prepared_data_is_read_from_the_dataset_directory(tiny_hf):
    recipe = engine.build_recipe(tiny_run(tiny_hf), TINY)
    fields = engine.recipe_fields(recipe)
    assert fields["data"] == "FineTuningDataModule"
    assert fields["dataset_root"] == os.path.abspath("experiments/data/corpus")
    assert recipe.data.dataset_kwargs == {"pad_to_max_length": True}


def test_hf_importer_config_builds_without_te_under_the_workaround(tiny_hf):
    """NeMo's HF importer makes its config with TE fusions on; te_free_importer swaps the classes."""
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine present")
    except ImportError:
        pass
    from nemo.collections.llm.gpt.model.llama import HFLlamaImporter, LlamaConfig

    importer = HFLlamaImporter(str(tiny_hf))
    with pytest.raises(Exception, match="Transformer Engine|TE >= 1.4|apply_rope_fusion"):
        _ = importer.config
    with nemo_import.te_free_importer(llm.LlamaModel):
        config = importer.config
    assert isinstance(config, LlamaConfig) and config.apply_rope_fusion is False
    assert config.num_layers == 2 and config.transformer_layer_spec is nemo_import.local_layer_spec
    import nemo.collections.llm.gpt.model.llama as llama_module

    assert llama_module.LlamaConfig is LlamaConfig  # restored after the block
    with pytest.raises(Exception, match="Transformer Engine|TE >= 1.4|apply_rope_fusion"):
        _ = importer.config


@pytest.fixture
def model_parallel_on_cpu():
    """Megatron's parallel state for one CPU process (gloo), torn down afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_lora_wraps_the_local_spec_without_te_under_the_workaround(model_parallel_on_cpu):
    """NeMo's LoRA.transform asks `m.__class__ == te.Linear` of every target, which raises without TE (the
    first NeMo training on the H200 stopped there); te_free_lora lets it reach Megatron's own linear layers."""
    try:
        import transformer_engine  # noqa: F401
        pytest.skip("Transformer Engine present")
    except ImportError:
        pass
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from nemo.collections.llm import fn
    from nemo.collections.llm.peft.lora import LoRALinear
    from nemo.collections.llm.peft.utils import ParallelLinearAdapter
    from nemo.utils.import_utils import UnavailableError

    config = nemo_import.model_config(TINY, {"transformer_impl": "local"})
    config.use_cpu_initialization = True

    def tiny_gpt():
        return GPTModel(config=config, transformer_layer_spec=config.transformer_layer_spec(config),
                        vocab_size=1024, max_sequence_length=128, position_embedding_type="rope")

    from nemo.collections.llm.peft import lora as lora_module

    placeholder = lora_module.te
    lora = llm.peft.LoRA(target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], dim=8, alpha=16)
    with pytest.raises(UnavailableError, match="transformer_engine"):
        fn.walk(tiny_gpt(), lora.transform)
    with nemo_without_te.te_free_lora():
        model = fn.walk(tiny_gpt(), lora.transform)
    for layer in model.decoder.layers:
        for linear in (layer.self_attention.linear_qkv, layer.self_attention.linear_proj,
                       layer.mlp.linear_fc1, layer.mlp.linear_fc2):
            assert isinstance(linear, LoRALinear) and isinstance(linear.adapter, ParallelLinearAdapter)
    qkv = model.decoder.layers[0].self_attention.linear_qkv
    assert isinstance(qkv.to_wrap, ColumnParallelLinear) and qkv.adapter.linear_in.weight.shape == (8, 128)
    assert lora_module.te is placeholder  # restored after the block


def test_mock_data_gives_the_attention_mask_local_attention_needs_under_the_workaround(tiny_hf):
    """Without TE NeMo's MockDataModule means to add an attention mask but passes the flag as the seed (the
    second NeMo training on the H200 stopped at gpt_forward_step's assertion); the workaround makes the mask."""
    import torch
    from nemo.collections.llm.gpt.data import mock

    if mock.HAVE_TE:
        pytest.skip("Transformer Engine present")
    run = tiny_run(tiny_hf, data={"kind": "mock"}, dataset_dir=None)
    recipe = engine.build_recipe(run, TINY)
    recipe.data.num_workers = 0

    def first_batch():
        data = fdl.build(recipe.data)
        assert data.create_attention_mask  # forced on without TE
        data.setup()
        return next(iter(data.val_dataloader()))

    assert "attention_mask" not in first_batch()  # NeMo 2.7.3 as shipped
    with nemo_without_te.te_free_training():
        batch = first_batch()
    assert batch["attention_mask"].shape == (1, 1, 128, 128) and batch["attention_mask"].dtype == torch.bool
    # causal: a position masks (True) exactly the positions after it
    assert bool(batch["attention_mask"][0, 0, 0, 1]) and not bool(batch["attention_mask"][0, 0, 1, 0])
    assert batch["tokens"].shape == (1, 128)
    assert "attention_mask" not in first_batch()  # restored after the block
