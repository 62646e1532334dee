"""The embedded engine as every stage sees it: PyTorch + transformers + peft, on the CPU (gloo) or CUDA
GPUs, both tracks. Its training code is ``ftscale.engines.embedded.train`` and the modules beside it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ftscale.engines.base import EngineSpec, Errors, PlannerTerms, choice, option_errors

if TYPE_CHECKING:
    from ftscale.study.run import Run


@dataclass(frozen=True)
class EmbeddedOptions:
    """The config's ``embedded:`` section (docs/engines.md describes each option)."""

    activation_checkpointing: bool = choice(False, True, doc="recompute activations in backward")
    compile: bool = choice(False, True, doc="torch.compile (CUDA only)")
    compile_mode: str = choice("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead",
                               doc="torch.compile mode, with compile only")
    compile_scope: str = choice("layers", "model", doc="each decoder layer on its own, or the whole model")
    fused_ce: str = choice("off", "chunked", "liger", doc="fused LM head + loss (data_parallel track)")
    liger_kernels: bool = choice(False, True, doc="liger-kernel's RMSNorm, SwiGLU and RoPE (CUDA only)")
    attention: str = choice("auto", "flash", "cudnn", "efficient", "math", doc="the SDPA backend")
    lora_dtype: str = choice("float32", "model", doc="the adapters' dtype: peft's float32 or the model's")
    fp8: str = choice("off", "tensorwise", "rowwise", doc="the frozen linear layers' matrix multiplies in float8")
    experts: str = choice("grouped", "loop", doc="a mixture of experts' projections: one grouped matrix multiply "
                                                 "each (torch._grouped_mm), or a loop over the experts")

    def differing(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}


#: Option values that need a CUDA GPU (Triton kernels, CUDA-only attention backends), and what to use instead.
CUDA_ONLY: dict[str, tuple[tuple, str]] = {
    "fused_ce": (("liger",), "use 'chunked' on the CPU"),
    "liger_kernels": ((True,), ""),
    "attention": (("flash", "cudnn", "efficient"), "use 'math' or 'auto' on the CPU"),
    "fp8": (("tensorwise", "rowwise"), "float8 matrix multiplies need a Hopper GPU or newer"),
}
#: What the ``fp8`` option keeps beside each frozen weight: its float8 copy and that of its transpose.
FP8_COPY_BYTES = 2
#: How many times faster the frozen linear layers multiply with the ``fp8`` option, within a compiled step
#: (fitted on the GPU examples: docs/planner.md gives the runs).
FP8_MATMUL_SPEEDUP = 1.4
#: Option values that need liger-kernel (``pip install -e '.[gpu]'``).
NEEDS_LIGER: dict[str, tuple] = {"fused_ce": ("liger",), "liger_kernels": (True,)}
#: torch.compile modes that capture CUDA graphs.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: Why liger's kernels are refused under torch.compile: Inductor fails to compile a decoder layer holding them.
LIGER_WITH_COMPILE = (
    "cannot run with embedded.compile: true: torch.compile of a layer with liger-kernel's RMSNorm/SwiGLU/RoPE fails "
    "in Inductor (BackendCompilerFailed: 'Attempting to broadcast a dimension ...' at the residual add). "
    "Use one or the other: compile with fused_ce: chunked is the faster of the two"
)
#: Why CUDA-graph modes are refused with compile_scope layers: all layers replay one compiled graph, so each
#: layer's replay overwrites the outputs the layer before saved for backward.
CUDA_GRAPHS_WITH_LAYERS = (
    "captures CUDA graphs, which cannot run with embedded.compile_scope: layers: every decoder layer replays one "
    "graph and overwrites the outputs the layer before saved for backward ('accessing tensor output of "
    "CUDAGraphs that has been overwritten by a subsequent run'). Use max-autotune-no-cudagraphs, or compile_scope: model"
)
#: What a compiled run did for an option its layout line does not name, because the line was written before
#: the option existed: such runs compiled the whole model.
OPTIONS_BEFORE_LINE_NAMED_THEM: dict[str, object] = {"compile_scope": "model"}

#: Fraction of the dense matmul rate a whole step reaches, by how the model runs; fitted on the GPU examples
#: (docs/planner.md gives each figure's runs).
STEP_EFFICIENCY = {
    "eager": 0.37,
    "compile_model": 0.46,
    "compile_layers": 0.56,
    "compile_layers_bf16": 0.66,
}


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def given_options(run: Run) -> dict:
    """The run's ``embedded:`` section as given (YAML reads a bare ``off`` as false: that is ``off``)."""
    given = dict(run.engine_options)
    if given.get("fused_ce") is False:
        given["fused_ce"] = "off"
    return given


class EmbeddedSpec(EngineSpec):
    name = "embedded"
    entry_module = "ftscale.engines.embedded.train"
    Options = EmbeddedOptions
    step_pattern = "embedded_step"
    writes_done_line = True
    reads_corpus_itself = True

    def options(self, run: Run) -> EmbeddedOptions:
        names = {f.name for f in dataclasses.fields(EmbeddedOptions)}
        return EmbeddedOptions(**{k: v for k, v in given_options(run).items() if k in names})

    def as_built(self, run: Run, layout: Mapping[str, Any] | None = None) -> EmbeddedOptions:
        """The run's options as built where the log's layout line (``layout``, as parsed) names them, else as
        configured; a compiled run whose line predates an option took ``OPTIONS_BEFORE_LINE_NAMED_THEM``."""
        opts = self.options(run)
        if not layout:
            return opts
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(EmbeddedOptions):
            if f.name in layout:
                value = layout[f.name]
                changes[f.name] = bool(int(value)) if isinstance(f.default, bool) else str(value)
            elif f.name in OPTIONS_BEFORE_LINE_NAMED_THEM and "compile" in layout and changes["compile"]:
                changes[f.name] = OPTIONS_BEFORE_LINE_NAMED_THEM[f.name]
        return dataclasses.replace(opts, **changes)

    def option_errors(self, run: Run, device: str, have_liger: Callable[[], bool] | None = None) -> list[str]:
        """Reasons the run's options cannot be honoured on ``device`` ('cpu', 'cuda', or 'auto': not known yet,
        as when jobs are planned; the engine checks again with the device it got). Never a silent fallback."""
        errs = Errors(run.name)
        option_errors(EmbeddedOptions, given_options(run), self.name, errs)
        if errs:
            return errs
        opts = self.options(run)
        if opts.compile_mode != "default" and not opts.compile:
            errs.add("embedded.compile_mode", opts.compile_mode, "applies to torch.compile only: set embedded.compile: true")
        if opts.compile_scope != "layers" and not opts.compile:
            errs.add("embedded.compile_scope", opts.compile_scope, "applies to torch.compile only: set embedded.compile: true")
        if opts.compile and opts.compile_mode in CUDA_GRAPH_MODES and opts.compile_scope == "layers":
            errs.add("embedded.compile_mode", opts.compile_mode, CUDA_GRAPHS_WITH_LAYERS)
        if opts.liger_kernels and opts.compile:
            errs.add("embedded.liger_kernels", True, LIGER_WITH_COMPILE)
        if opts.fp8 != "off" and (run.track != "data_parallel" or not run.lora):
            errs.add("embedded.fp8", opts.fp8, "applies to the frozen linear layers under LoRA (the data_parallel "
                                               "track); full fine-tuning keeps the model's dtype")
        for key, (values, instead) in CUDA_ONLY.items():
            if getattr(opts, key) in values and device == "cpu":
                errs.add(f"embedded.{key}", getattr(opts, key), "needs a CUDA GPU and this run's device is cpu"
                         + (f"; {instead}" if instead else ""))
        for key, values in NEEDS_LIGER.items():
            if getattr(opts, key) in values and not (have_liger or liger_installed)():
                errs.add(f"embedded.{key}", getattr(opts, key), "needs liger-kernel, which is not installed: "
                                                                "pip install -e '.[gpu]' (on a GPU machine)")
        return errs

    def errors(self, run: Run, model: Mapping[str, Any]) -> list[str]:
        errs = Errors(run.name)
        if run.track == "data_parallel" and run.ep > 1:
            errs.add("ep", run.ep, "the embedded engine splits experts on the model_parallel track only")
        return errs + self.option_errors(run, run.device)

    def planner_terms(self, run: Run, dtype_bytes: int, built: Mapping[str, Any] | None = None) -> PlannerTerms:
        opts = self.as_built(run, built)
        # liger-kernel's fused RMSNorm/SwiGLU/RoPE keep what compile's fusions keep and run about as fast as
        # the layer-compiled model: the same terms.
        fused = bool(opts.compile or opts.liger_kernels)
        adapter_bytes = dtype_bytes if opts.lora_dtype == "model" else 4
        if not fused:
            efficiency = STEP_EFFICIENCY["eager"]
        elif opts.compile and opts.compile_scope == "model":
            efficiency = STEP_EFFICIENCY["compile_model"]
        else:
            bf16 = run.lora is not None and adapter_bytes == dtype_bytes == 2
            efficiency = STEP_EFFICIENCY["compile_layers_bf16" if bf16 else "compile_layers"]
        return PlannerTerms(
            adapter_bytes=adapter_bytes, fused_kernels=fused,
            fused_ce=opts.fused_ce if run.track == "data_parallel" else "off",
            activation_checkpointing=opts.activation_checkpointing,
            own_expert_layer=run.track == "model_parallel", cuda_context_mib=1245.0, reserve_fraction=0.0037,
            eager_final_norm=opts.compile and opts.compile_scope == "layers", looped_experts=opts.experts == "loop",
            step_efficiency=efficiency, fp8_copy_bytes=FP8_COPY_BYTES if opts.fp8 != "off" else 0,
            fp8_matmul_speedup=FP8_MATMUL_SPEEDUP if opts.fp8 != "off" else 1.0)

    def options_label(self, run: Run, built: Mapping[str, Any] | None = None) -> str:
        """'compile, fused_ce=chunked' ('defaults' when none differs), as built where the layout line names them."""
        shown = [key if value is True else f"{key}={value}"
                 for key, value in self.as_built(run, built).differing().items()]
        return ", ".join(shown) or "defaults"
