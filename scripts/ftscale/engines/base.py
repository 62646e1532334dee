"""What every engine declares (``EngineSpec``) and the pieces its checks share.

Light on purpose: no torch, no engine code, no other ftscale package. Every stage may import it; a
run arrives as ``ftscale.study.run.Run`` (typed, read once from run.json), a model as its model.yaml
mapping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

if TYPE_CHECKING:
    from ftscale.study.run import Run

#: Hugging Face names of the linear layers a LoRA adapter may target, by where they sit in a block.
HF_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
HF_MLP = ("gate_proj", "up_proj", "down_proj")
HF_LINEAR = HF_ATTENTION + HF_MLP

#: The linear layers LoRA may target in a model, by its model.yaml ``architecture.type``: the nn.Linear modules
#: of a decoder layer of transformers' model of that type, in its names.
LORA_MODULES: dict[str, tuple[str, ...]] = {"llama": HF_LINEAR, "mixtral": HF_ATTENTION}
#: Why an architecture lacks names of ``HF_LINEAR`` (said in the error that refuses one).
LORA_MODULES_WHY: dict[str, str] = {
    "mixtral": "transformers' Mixtral has no gate_proj/up_proj/down_proj modules: its experts are fused parameters "
               "(MixtralExperts.gate_up_proj and .down_proj) and its router one weight (MixtralTopKRouter.weight), "
               "no nn.Linear that a LoRA adapter can wrap",
}

#: Megatron's fused linear layers (the names NeMo's LoRA knows) -> the Hugging Face modules each fuses. A
#: fused layer is adapted as a whole, so its HF names come together (q_proj alone has no Megatron layer).
MEGATRON_LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "linear_proj": ("o_proj",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}


def lora_modules(architecture: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The Hugging Face names LoRA may target in a model of ``architecture`` (a model.yaml ``architecture``
    mapping; None: any of ``HF_LINEAR``, for a caller that knows no model)."""
    if architecture is None:
        return HF_LINEAR
    kind = architecture.get("type")
    if kind not in LORA_MODULES:
        raise ValueError(f"architecture.type = {kind!r}: LoRA targets are known for {list(LORA_MODULES)}")
    return LORA_MODULES[kind]


def megatron_lora_names(modules: tuple[str, ...]) -> list[str]:
    """The Megatron fused names whose whole group is among ``modules``."""
    return [name for name, group in MEGATRON_LORA_GROUPS.items() if set(group) <= set(modules)]


def _refused(unknown: list[str], architecture: Mapping[str, Any] | None, valid: list[str]) -> ValueError:
    kind = (architecture or {}).get("type")
    why = LORA_MODULES_WHY.get(kind or "", "")
    where = f"a {kind} model" if kind else "the model"
    return ValueError(f"{where} has no module(s) {unknown} for LoRA: the valid targets are {valid}"
                      + (f" ({why})" if why and set(unknown) & set(HF_LINEAR + tuple(MEGATRON_LORA_GROUPS)) else ""))


def hf_lora_targets(targets: list[str], architecture: Mapping[str, Any] | None = None,
                    fused_names: bool = True) -> list[str]:
    """The Hugging Face module names of the run's LoRA targets in a model of ``architecture``: Hugging Face
    names, and (``fused_names``) Megatron fused names expanded to their group. ValueError naming the valid
    targets for a name the model does not have."""
    modules = lora_modules(architecture)
    out: list[str] = []
    unknown: list[str] = []
    for t in targets:
        group = MEGATRON_LORA_GROUPS.get(t) if fused_names else None
        for n in group or (t,):
            if n not in modules:
                unknown.append(t)
                break
            if n not in out:
                out.append(n)
    if unknown:
        valid = list(modules) + (megatron_lora_names(modules) if fused_names else [])
        raise _refused(list(dict.fromkeys(unknown)), architecture, valid)
    return out


class Errors(list):
    """Reasons a run cannot run, each naming the run, the key and the value."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name or "<unnamed run>"

    def add(self, key: str, value: Any, why: str) -> None:
        self.append(f"run {self.name}: {key} = {value!r}: {why}")


def choice(*values: object, doc: str = "") -> Any:
    """An option field whose value must be one of ``values``; the first is its default."""
    return dataclasses.field(default=values[0], metadata={"choices": values, "doc": doc})


def text(doc: str = "") -> Any:
    """An optional free-text option field (None: not set)."""
    return dataclasses.field(default=None, metadata={"choices": None, "doc": doc})


def option_errors(cls: type, given: Mapping[str, Any], section: str, errs: Errors) -> None:
    """Unknown keys and values outside a field's choices (or of another type) of ``given``, an engine's
    options section, added to ``errs`` as ``<section>.<key>``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in given.items():
        field = fields.get(key)
        if field is None:
            errs.add(f"{section}.{key}", value, f"unknown option: the {section} engine has {list(fields)}")
            continue
        choices = field.metadata["choices"]
        if choices is None:
            if value is not None and (not isinstance(value, str) or not value):
                errs.add(f"{section}.{key}", value, "must be a non-empty string")
        elif value not in choices or type(value) is not type(choices[0]):
            errs.add(f"{section}.{key}", value, f"must be one of {list(choices)}")


def options_from(cls: type, given: Mapping[str, Any]) -> Any:
    """``cls`` (an options dataclass) from a checked options section; keys it lacks keep their default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in given.items() if k in names})


@dataclass(frozen=True)
class PlannerTerms:
    """How an engine holds a run in memory and how fast it steps, for ``ftscale.estimate``."""

    #: Bytes per LoRA adapter parameter.
    adapter_bytes: int
    #: Mixed precision as Megatron (and FSDP2's mixed precision) keep it: fp32 main weights beside the
    #: bf16 ones, fp32 gradients and Adam moments; else the model's dtype throughout (the embedded engine).
    fp32_main_weights: bool = False
    #: Compiled or fused kernels (norms, activations) that keep fewer intermediates.
    fused_kernels: bool = False
    #: The fused LM head + loss: off, chunked or liger.
    fused_ce: str = "off"
    activation_checkpointing: bool = False
    #: Unfused attention that keeps each head's s x s probabilities (Megatron's local layer spec).
    unfused_attention: bool = False
    #: The engine's own expert-parallel MoE layer (all-to-all dispatch), not Hugging Face's routing loop.
    own_expert_layer: bool = False
    #: What an RMSNorm keeps for backward: "fp32_copy" (Hugging Face's LlamaRMSNorm, written out in
    #: PyTorch: the fp32 upcast of its input) or "input" (a fused kernel: torch's RMSNorm on CUDA, Liger's,
    #: Transformer Engine's: the input in the model dtype and an fp32 rstd per token).
    norm_keeps: str = "fp32_copy"
    #: The LoRA function keeps lora_A's output for lora_B's weight gradient (peft); False: recomputes it
    #: (AutoModel's Triton LoRA).
    lora_keeps_rank_output: bool = True
    #: gate, up, SwiGLU and down (with their LoRA) in one autograd function that keeps only its input and the
    #: gate and up outputs, recomputing the rest in backward (AutoModel's fused LoRA MLP).
    fused_lora_mlp: bool = False
    #: Megatron's SwiGLU without bias_activation_fusion, ``silu(x_glu) * (x_linear + glu_linear_offset)``:
    #: keeps the whole fc1 output, SiLU's output and the offset sum (a copy, even at offset 0).
    unfused_glu: bool = False
    #: DDP's flat gradient buckets, a second copy of the gradients on the data-parallel track (torch DDP);
    #: False under FSDP2 and Megatron's own DDP (whose fp32 grad buffer is the gradients themselves).
    gradient_buckets: bool = True
    #: GPU memory the engine's process holds outside PyTorch's allocator (CUDA context, kernel modules,
    #: cuBLAS/NCCL workspaces), MiB: read from the engine's out-of-memory message ("this process has X in use"
    #: less what PyTorch allocated and reserved); the largest measured where an engine has none.
    cuda_context_mib: float = 2022.0
    #: Memory PyTorch keeps reserved but cannot hand out when an allocation fails (free pieces of segments
    #: still in use, after the allocator has released its cached blocks), as a fraction of the allocated
    #: memory: read from the same message; the largest measured where an engine has none.
    reserve_fraction: float = 0.013
    #: With ``fp32_main_weights``: the fp32 main weights and Adam moments sharded over the data-parallel ranks
    #: (Megatron's distributed optimizer); False: every rank holds them whole.
    sharded_optimizer: bool = True
    #: A mixture of experts' projections one matrix multiply per expert in a Python loop (the embedded engine's
    #: experts: loop), not one grouped matrix multiply each.
    looped_experts: bool = False
    #: The final norm runs eager after the compiled decoder layers (the embedded engine's compile_scope: layers).
    eager_final_norm: bool = False
    #: Fraction of the dense matmul rate a whole step reaches (fitted on the GPU examples).
    step_efficiency: float = 0.37
    #: Bytes held beside each parameter of the decoder layers' linear modules (not the experts'): float8
    #: copies of frozen weights.
    fp8_copy_bytes: int = 0
    #: How many times faster those linear modules multiply (forward and input gradient) in float8 than in the
    #: model's dtype, within a whole step (fitted on the GPU examples); 1: not in float8.
    fp8_matmul_speedup: float = 1.0


class EngineSpec:
    """One engine, as every stage sees it. An engine package subclasses this in its ``spec`` module and
    registers one instance (``ftscale.engines.register``)."""

    #: The name in the config's ``engine:`` and in every run's name.
    name: ClassVar[str]
    #: What runs one job, once per rank: ``python -m <entry_module> RUN_DIR/run.json`` (under torchrun across nodes).
    entry_module: ClassVar[str]
    #: The options dataclass of the config section named after the engine.
    Options: ClassVar[type]
    #: Which file of the imported model the engine reads (``ftscale.study.paths.MODEL_FILES``).
    checkpoint_role: ClassVar[str] = "checkpoint"
    #: The key of ``ftscale.run.logformat.PATTERNS`` its step lines match.
    step_pattern: ClassVar[str]
    #: Whether a complete run ends with the engine's own ``[ftscale] done`` line (else: exit code 0 and
    #: every step seen).
    writes_done_line: ClassVar[bool] = False
    #: Whether it reads the shipped corpus itself (no prepared dataset directory).
    reads_corpus_itself: ClassVar[bool] = False
    #: Whether its jobs need the configured container image (``container:``).
    needs_container: ClassVar[bool] = False
    #: A section each model.yaml must have for this engine (e.g. the recipe names), or None.
    model_section: ClassVar[str | None] = None
    #: Files the engine adds to each model directory (role -> name), e.g. its conversion of the checkpoint.
    model_files: ClassVar[dict[str, str]] = {}
    #: Python distributions whose versions the provenance reports (column name -> distribution).
    packages: ClassVar[dict[str, str]] = {}
    #: Whether it runs pipeline parallelism (a layout's ``pp`` > 1); the common checks refuse pp > 1 otherwise.
    pipeline_parallel: ClassVar[bool] = False
    #: Options read once per study, not per run (the checkpoint conversion's): every option set of a config
    #: that lists several must give them the same value.
    study_options: ClassVar[tuple[str, ...]] = ()

    def options(self, run: Run) -> Any:
        """The run's options, typed, every one present (defaults where the config leaves one out)."""
        return options_from(self.Options, run.engine_options)

    def errors(self, run: Run, model: Mapping[str, Any]) -> list[str]:
        """Reasons the engine cannot run ``run`` for ``model`` (a model.yaml mapping), beyond the
        checks every engine shares (``ftscale.study.check``)."""
        errs = Errors(run.name)
        option_errors(self.Options, run.engine_options, self.name, errs)
        return errs

    def lora_targets(self, targets: list[str], architecture: Mapping[str, Any] | None = None) -> list[str]:
        """The engine's module names for the run's LoRA targets in a model of ``architecture`` (its model.yaml
        ``architecture``); ValueError naming the valid targets for a name the model does not have. Here:
        Hugging Face names only, as peft's ``target_modules`` takes them."""
        return hf_lora_targets(targets, architecture, fused_names=False)

    def planner_terms(self, run: Run, dtype_bytes: int, built: Mapping[str, Any] | None = None) -> PlannerTerms:
        """What the planner needs of the engine for ``run`` (``built``: the log's layout line, if it ran)."""
        raise NotImplementedError

    def options_label(self, run: Run, built: Mapping[str, Any] | None = None) -> str:
        """The options the tables name in their options column ("" when all are defaults)."""
        return ""

    def python(self, section: Mapping[str, Any]) -> str | None:
        """The interpreter of the engine's jobs when its config section names one (``<engine>.python``)."""
        return section.get("python")

    def conversion_command(self, section: Mapping[str, Any], ftscale: str) -> str:
        """The shell command that makes the engine's own checkpoint role from the Hugging Face import (wildcard
        ``model``, input the import, output the converted directory), for an engine with such a role;
        ``ftscale`` is the words that start ftscale's command line in the job (``ftscale.run.command``)."""
        raise NotImplementedError(f"engine {self.name!r} reads the Hugging Face checkpoint itself")

    def cuda_only_errors(self, run: Run, errs: Errors, engine_title: str) -> None:
        if run.device not in ("auto", "cuda"):
            errs.add("device", run.device, f"{engine_title} trains on CUDA GPUs only")
