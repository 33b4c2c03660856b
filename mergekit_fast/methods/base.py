"""The merge-method protocol: a method is data plus a reference, never a branch in the engine.

A ``MergeMethod`` declares everything the rest of the package needs, and config, plan, engine and
verify work from these declarations alone (they never test a method's name):

* ``params``: name, scope (input / non-base / shared), type, default, required, and a ``check`` of the
  values mergekit 0.1.5 accepts. Config validation type-checks every value where it is written;
  ``check_values`` (per output tensor, with the resolved values) rejects what mergekit rejects, with
  the key path of the setting.
* ``contract``: base required / optional / ignored / forbidden, and the input counts.
* ``optional_policy``: what an optional weight missing from some inputs becomes (mergekit's
  OptionalTensorPolicy names).
* ``plan``: the method's planning hook -- from one output tensor's inputs and resolved parameters to
  the planned computation (inputs in the order the method reads them, parameter tuple), or a
  passthrough, or nothing.
* ``reference``: the torch reference -- the semantics, the oracle of --verify and the tests, the CPU
  fallback -- and ``tolerance``: --verify's limit in ulps per output dtype (0: bit-exact).
* ``result_dtype``: the dtype of the result for a given input dtype (default: the input dtype; the
  output dtype when the config sets no out_dtype).
* ``compute`` (default: the reference) and the traits the engine may use: ``batch_max_numel`` (small
  tensors merged many per launch by ``compute_many``), ``native_cpu`` (runs by address on mapped
  memory, without torch), ``copies_bytes`` (the output is the inputs' bytes), ``same_shape``,
  ``finite_probe`` ("first": a NaN/Inf input makes every output element NaN, one element tells).

Planned parameters (``OutputTensor.params``) are a tuple of ``(name, value)`` pairs: a shared value
as is, a per-input value as a tuple aligned with ``OutputTensor.inputs``, a non-base value aligned
with the inputs after the base (which comes first when ``OutputTensor.has_base``).

Nothing here imports torch: a CPU merge whose methods run natively never needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from mergekit_fast.config.errors import ConfigError


class Scope(str, Enum):
    """Along which inputs a parameter takes values (mergekit's ParameterScope)."""

    INPUT = "input"  # one value per input model, the base included
    NON_BASE = "non_base"  # one value per input model other than the base
    SHARED = "shared"  # one value for the output tensor


class BasePolicy(str, Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    IGNORED = "ignored"
    FORBIDDEN = "forbidden"


class OptionalPolicy(str, Enum):
    """What an optional weight present in only some inputs becomes (mergekit's names)."""

    ERROR = "error"  # merged from the inputs that have it, if the contract still holds
    PASSTHROUGH_SINGLETON = "passthrough_singleton"  # one input has it: copied from that input
    PASSTHROUGH_BASE_SINGLETON = "passthrough_base_singleton"  # only the base has it: copied
    BASE_OR_SKIP = "base_or_skip"  # too few inputs: the base's copy, else not written


MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()

_ADAPTERS: dict[Any, Any] = {}


def _adapter(tp):
    a = _ADAPTERS.get(tp)
    if a is None:
        from pydantic import TypeAdapter

        a = _ADAPTERS[tp] = TypeAdapter(tp)
    return a


@dataclass(frozen=True)
class Param:
    """One parameter of a method, as mergekit 0.1.5 declares it (ParameterSpec)."""

    name: str
    type: Any  # float, bool, int, float | None, ...
    scope: Scope
    default: Any = MISSING
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def validate(self, value: Any) -> Any:
        # mergekit validates every scalar with a pydantic TypeAdapter of the parameter's type (lax mode:
        # "1e-5" -> 1e-05, True -> 1.0 for floats, 1 -> True for bools); use the very same conversion.
        return _adapter(self.type).validate_python(value)

    @property
    def type_name(self) -> str:
        if self.type is float or self.type == (float | None):
            return "a number"
        if self.type is bool:
            return "true or false"
        if self.type is int:
            return "an integer"
        return str(self.type)


@dataclass(frozen=True)
class Contract:
    """Which inputs one output tensor takes (mergekit's InputContract)."""

    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    hint: str = ""  # appended to a count error, e.g. " (the base_model and exactly one other model)"

    def check(self, method: str, inputs: Sequence[str], base: str | None, where: str) -> None:
        """mergekit's validate_ids, same rules, messages that name the key path."""
        if len(set(inputs)) != len(inputs):
            dup = next(m for m in inputs if list(inputs).count(m) > 1)
            raise ConfigError(f"{where}: model {dup} appears twice among the inputs of one merge")
        if self.base == BasePolicy.IGNORED:
            base = None
        has_base = base is not None and base in inputs
        if base is not None and not has_base:
            raise ConfigError(
                f"{where}: base_model {base} is not one of the slice's sources {list(inputs)} ({method} "
                "merges the base with the other model, so the base must be a source)"
            )
        if self.base == BasePolicy.REQUIRED and not has_base:
            raise ConfigError(f"{where}: merge_method {method} needs a base_model")
        if self.base == BasePolicy.FORBIDDEN and has_base:
            raise ConfigError(f"{where}: merge_method {method} does not take a base_model")
        self._count(method, "input model(s)", list(inputs), self.min_inputs, self.max_inputs, where)
        if self.min_non_base is not None or self.max_non_base is not None:
            others = [m for m in inputs if m != base]
            self._count(method, "model(s) besides the base", others, self.min_non_base or 0, self.max_non_base,
                        where)  # fmt: skip

    def _count(self, method, what, models, lo, hi, where) -> None:
        n = len(models)
        if n >= lo and (hi is None or n <= hi):
            return
        if lo == hi:
            want = f"exactly {lo}"
        elif hi is None:
            want = f"at least {lo}"
        elif n > hi:
            want = f"at most {hi}"
        else:
            want = f"at least {lo}"
        raise ConfigError(f"{where}: merge_method {method} needs {want} {what}{self.hint}; got {n}: {models}")


@dataclass(frozen=True)
class InputRef:
    model: str  # key into MergePlan.sources (the model path string as in the config, normalised)
    tensor: str  # tensor name inside that model
    # The input's rows re-indexed to the output vocabulary (mergekit_fast.vocabulary.RowMap), applied by
    # the engine while it loads the input; None: the tensor as stored. Methods pass it through unchanged.
    rows: Any = None
    # The input is these file tensors one after another (an MoE checkpoint's per-expert tensors read as
    # the fused tensor its definition names; mergekit_fast.conversion): ``tensor`` is then the fused name.
    parts: tuple[str, ...] | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """The file tensors this input reads, in order."""
        return self.parts if self.parts is not None else (self.tensor,)


@dataclass
class TensorGroup:
    """What the planner hands a method's ``plan`` hook for one output tensor."""

    name: str  # output tensor name
    models: list[str]  # the group's models, in slice order
    refs: list[InputRef | None]  # per model: the tensor it contributes, None where it lacks it
    base: str | None  # the slice's base model (None when absent from the config)
    shared: dict[str, Any]  # resolved shared parameters
    per_input: dict[str, dict[str, Any]]  # model -> resolved per-input parameters
    optional: bool  # the weight may be missing from some inputs
    where: Callable[[str], str] = field(default=lambda m: m)  # model -> key path, for messages

    @property
    def present(self) -> list[int]:
        return [i for i, r in enumerate(self.refs) if r is not None]


@dataclass(frozen=True)
class Planned:
    """A method's plan for one output tensor."""

    method: str
    inputs: tuple[InputRef, ...]
    params: tuple[tuple[str, Any], ...]
    has_base: bool = False


@dataclass
class Context:
    """Per-call facts a method's compute may need beyond its inputs and parameters."""

    name: str = ""  # the output tensor's name (keys counter-based random draws)
    seed: int | None = None  # the run's random seed
    backend: str = "auto"  # requested kernel backend
    threads: int = 0  # CPU threads (0: every core)


class MergeMethod:
    """Base class of every merge method; subclasses set the class attributes and override hooks."""

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()
    contract: ClassVar[Contract] = Contract()
    optional_policy: ClassVar[OptionalPolicy] = OptionalPolicy.ERROR
    internal: ClassVar[bool] = False  # used by the MoE builder; not a merge_method of a config
    random: ClassVar[bool] = False  # draws random numbers (keyed by --random-seed and the tensor name)
    # engine traits
    same_shape: ClassVar[bool] = True  # every input has the output's shape
    batch_max_numel: ClassVar[int] = 0  # tensors up to this size run many per launch (compute_many)
    finite_probe: ClassVar[str] = "all"  # "first": one output element shows a non-finite input
    # --verify: the limit in ulps of the output dtype (by dtype name), measured at verify_scale
    tolerance: ClassVar[Mapping[str, float]] = {
        "bfloat16": 1.0,
        "float16": 1.0,
        "float32": 2.0,
        "float64": 2.0,
    }
    description: ClassVar[str] = ""

    # -- declarations derived from params
    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def shared_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == Scope.SHARED)

    @property
    def input_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope != Scope.SHARED)

    def check_inputs(self, inputs: Sequence[str], base: str | None, where: str) -> None:
        self.contract.check(self.name, inputs, base, where)

    # -- planning
    def check_values(self, group: TensorGroup, where: Callable[[str, str | None], str]) -> None:
        """Reject resolved values mergekit 0.1.5 rejects, raising ConfigError. ``where(param, model)``
        gives the key path of the setting a value came from. Default: nothing to check."""

    def order(self, group: TensorGroup) -> tuple[list[int], bool] | Planned | None:
        """Which of the group's inputs the method reads, in its order, and whether the first is the base;
        or a Planned passthrough, or None (the weight is not written). Applies the optional-tensor
        policy."""
        present = group.present
        base = group.base if self.contract.base != BasePolicy.IGNORED else None
        if len(present) < len(group.models):
            policy = self.optional_policy
            if len(present) == 1 and (
                policy == OptionalPolicy.PASSTHROUGH_SINGLETON
                or (policy == OptionalPolicy.PASSTHROUGH_BASE_SINGLETON and group.models[present[0]] == base)
            ):
                return passthrough_of(group.refs[present[0]])
            if policy == OptionalPolicy.BASE_OR_SKIP and len(present) < self.contract.min_inputs:
                if len(present) == 1 and group.models[present[0]] == base:
                    return passthrough_of(group.refs[present[0]])
                import logging

                logging.getLogger("mergekit_fast").warning(
                    "skipping optional weight %s: only %d of its %d inputs have it", group.name, len(present),
                    len(group.models),
                )  # fmt: skip
                return None
        models = [group.models[i] for i in present]
        self.check_inputs(models, group.base, f"output tensor {group.name}")
        if base is not None and base in models:
            b = models.index(base)
            return [present[b]] + [i for j, i in enumerate(present) if j != b], True
        return present, False

    def plan(self, group: TensorGroup) -> Planned | None:
        """The method's planning hook (see the module docstring for the parameter layout)."""
        ordered = self.order(group)
        if ordered is None or isinstance(ordered, Planned):
            return ordered
        idx, has_base = ordered
        models = [group.models[i] for i in idx]
        params: list[tuple[str, Any]] = [(p.name, group.shared[p.name]) for p in self.shared_params]
        for p in self.input_params:
            who = models if p.scope == Scope.INPUT else models[1 if has_base else 0 :]
            params.append((p.name, tuple(group.per_input[m][p.name] for m in who)))
        return Planned(self.name, tuple(group.refs[i] for i in idx), tuple(params), has_base)

    # -- math
    def reference(self, inputs: list, params: dict, ctx: Context):
        """The torch reference: the method's semantics, in plain torch. Inputs are in the planned order,
        already in the plan's in_dtype; the result is in ``result_dtype(in_dtype)`` (default in_dtype)."""
        raise NotImplementedError(f"merge method {self.name} has no torch reference")

    def compute(self, inputs: list, params: dict, ctx: Context, out=None):
        """The engine's computation on torch tensors (kernels where the method has them). Default: the
        reference. ``out``, when given, is a buffer of the output's shape and in_dtype to write into."""
        result = self.reference(inputs, params, ctx)
        if out is not None:
            out.copy_(result)
            return out
        return result

    def compute_many(self, inputs_list: list[list], params_list: list[dict], ctxs: list[Context], outs=None):
        """Many output tensors of this method in as few launches as possible. Default: one by one."""
        outs = outs or [None] * len(inputs_list)
        return [self.compute(i, p, c, o) for i, p, c, o in zip(inputs_list, params_list, ctxs, outs)]

    def result_dtype(self, in_dtype, params: dict):
        """The dtype of the method's result for inputs of ``in_dtype`` (a ``mergekit_fast.dtypes.DType``),
        which is what the output is written in when the config sets no out_dtype. Default: ``in_dtype``.
        A method whose mergekit kernel promotes (an fp32 mask times bf16 deltas gives fp32, and mergekit
        writes that) returns the promoted dtype, and its compute and reference return tensors of it."""
        return in_dtype

    def tolerance_of(self, dtype_name: str, params: dict) -> float:
        """--verify's limit in ulps of the output dtype for one planned tensor (default: ``tolerance``)."""
        return self.tolerance.get(dtype_name, 2.0)

    def verify_scale(self, inputs: list, params: dict):
        """Per-element scale of the error measure (the terms' magnitude before they cancel); None: |ref|."""
        return None

    def copies_bytes(self, params: dict) -> bool:
        """The output is the inputs' bytes one after another (no math): the engine copies file to file."""
        return False

    # Native CPU path (optional): ``native_cpu(tensors, inputs, outs, threads, seed)`` runs the method on
    # tensors of one dtype given by address (inputs: per tensor, one address per planned input; outs: one
    # address per tensor), without torch. None: the method has no native path.
    native_cpu: ClassVar[Callable | None] = None

    def native_ok(self, tensor) -> bool:
        """Whether ``native_cpu`` serves this planned tensor (dtype and parameters). Default: when it exists."""
        return self.native_cpu is not None

    def native_writes(self, tensor) -> bool:
        """Whether ``native_cpu`` writes this planned tensor's out_dtype (its kernel stores the result in
        ``tensor.out_dtype``). Default: only the input dtype."""
        return tensor.out_dtype == tensor.in_dtype

    # -- streaming: a tensor larger than the memory budget, in chunks (optional)
    # 0: never streamed (the whole tensor in memory); 1: one pass (the method is elementwise); 2: a reduce
    # pass over every chunk (norms, dot products, histograms), then an apply pass writing chunk by chunk.
    stream_passes: ClassVar[int] = 0
    # chunk boundaries fall on multiples of this many elements of the flattened tensor (results then do not
    # depend on the chunk size); with stream_rows, on whole rows (the last dimension) instead
    stream_align: ClassVar[int] = 1 << 14
    stream_rows: ClassVar[bool] = False

    def stream_begin(self, t, params: dict, ctx: Context) -> dict:
        """The state of one streamed tensor (``t`` is its planned OutputTensor)."""
        return {}

    def stream_reduce(self, state: dict, inputs: list, start: int, params: dict, ctx: Context) -> None:
        """Pass 1 (stream_passes == 2): accumulate over the chunk of elements [start, start + n) of the
        flattened inputs (contiguous torch tensors in the plan's in_dtype, in the planned order)."""

    def stream_between(self, state: dict, params: dict, ctx: Context) -> None:
        """After pass 1: turn the accumulated statistics into what the apply pass needs."""

    def stream_apply(self, state: dict, inputs: list, start: int, params: dict, ctx: Context, out):
        """The result for the chunk [start, start + n) in the result dtype; write it into ``out`` (a
        contiguous buffer of n elements of in_dtype) when convenient, and return it."""
        raise NotImplementedError(f"merge method {self.name} does not stream")

    def __repr__(self) -> str:
        return f"<merge method {self.name}>"


def passthrough_of(ref: InputRef) -> Planned:
    """The plan of an output copied from one input (mergekit's passthrough, scale None)."""
    return Planned("passthrough", (ref,), (("scale", None),), False)
