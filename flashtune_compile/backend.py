"""The Dynamo backend: ``torch.compile(model, backend="flashtune", options={...})``.

Given the FX graph Dynamo captured, it routes MoE layers and matmul-family nodes to tunable
``flashtune`` ops and
hands the graph to the inner compiler (Inductor by default, so its fusions around our ops
survive; or eager FX). Registered through the ``torch_dynamo_backends`` entry point, so
``backend="flashtune"`` works after ``pip install`` without importing this package.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .kernels import FAMILIES as KERNEL_FAMILIES
from .kernels import hugepages
from .ops import DIRECT, op_families
from .ops.registry import IMPLS, NO_GRAD, OPS, op_name
from .ops.routing import ROUTINGS
from .ops.site import DEFAULT_CACHE, SiteOptions, run
from .passes import REWRITES, training  # first: importing the passes registers their ops
from .passes.fx_nodes import _val, attr
from .tuner.autotuner import TUNE_MODES, AutoTuner
from .tuner.buckets import LADDERS, make_ladder
from .tuner.cache import resolve_dir
from .tuner.distributed import STRATEGIES
from .tuner.weights import WeightCache

log = logging.getLogger("flashtune")

OP_FAMILIES = op_families()  # ("linear", "mm", "bmm", "moe", "quantized"): the registered ops' families
INNER = ("inductor", "eager")
_UNSET = object()


@dataclass(frozen=True)
class Options:
    """The backend's options, validated. See DESIGN.md for what each means."""

    inner: str = "inductor"
    tune: str | None = None  # None: the tuner's mode ($FLASHTUNE_TUNE, else "auto")
    cache_dir: Any = _UNSET  # _UNSET: the tuner's ($FLASHTUNE_CACHE_DIR, else user cache); None: memory
    ops: frozenset = frozenset(OP_FAMILIES)
    buckets: Any = "hybrid"
    max_tokens: int = 8192
    kernels: frozenset = frozenset(KERNEL_FAMILIES)
    moe_routing: str = "zipf"
    mode: str | None = None  # Inductor's mode (as torch.compile's mode=), for when options are given too
    inductor_config: Mapping[str, Any] = field(default_factory=dict)  # patches of torch._inductor.config
    distributed: str | None = None  # strategy across ranks; None: $FLASHTUNE_DISTRIBUTED, else "auto"

    def inductor_patches(self, mode: str | None = None) -> dict[str, Any]:
        """The config the inner Inductor compiles under: ``mode``'s settings (torch.compile's
        ``mode=``, else the ``mode`` option), then ``inductor_config`` on top."""
        from torch._inductor import list_mode_options

        mode = mode or self.mode
        return {**(list_mode_options(mode) if mode else {}), **self.inductor_config}

    def cuda_graphs(self, mode: str | None = None) -> bool:
        """Whether the inner compiler will replay CUDA graphs (Inductor's ``triton.cudagraphs``)."""
        if self.inner != "inductor":
            return False
        from torch._inductor import config

        return bool(self.inductor_patches(mode).get("triton.cudagraphs", config.triton.cudagraphs))

    def site_options(self, mode: str | None = None, training: bool = False) -> SiteOptions:
        """What each routed call's site carries: this model's tuning options and tactic cache,
        whether candidates are timed as CUDA graph replays (when the inner Inductor uses them), and
        whether the graph trains (``training``: its weights change between calls)."""
        cache_dir: str | None = DEFAULT_CACHE
        if self.cache_dir is not _UNSET:  # a site carries the directory as an absolute path string
            resolved = resolve_dir(self.cache_dir)
            cache_dir = None if resolved is None else str(resolved)
        kernels = tuple(sorted(self.kernels))
        return SiteOptions(
            self.buckets,
            self.max_tokens,
            self.tune,
            kernels,
            self.moe_routing,
            cache_dir,
            self.cuda_graphs(mode),
            self.distributed,
            training,
        )


def _subset(name: str, value: Any, valid: Sequence[str]) -> frozenset:
    items = [value] if isinstance(value, str) else value
    try:
        chosen = frozenset(items)
    except TypeError:
        raise ValueError(f"flashtune option {name!r} must be a set of {sorted(valid)}, got {value!r}") from None
    bad = sorted(str(x) for x in chosen - set(valid))
    if bad:
        raise ValueError(f"flashtune option {name!r}: unknown {bad}; valid: {sorted(valid)}")
    return chosen


def check_mode(mode: Any) -> str | None:
    """``mode`` if it is one of Inductor's modes (or None); else ValueError listing them."""
    from torch._inductor import list_mode_options

    modes = list(list_mode_options())
    if mode is not None and mode not in modes:
        raise ValueError(f"flashtune: mode must be one of {modes}, got {mode!r}")
    return mode


def _inductor_config(value: Any) -> dict[str, Any]:
    """A dict of torch._inductor.config settings, every key checked to exist there."""
    from torch._inductor import config

    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(
            f"flashtune option 'inductor_config' must be a dict of torch._inductor.config names, got {value!r}"
        )
    known = config.get_config_copy()
    for key in value:
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=3)
            hint = f"; did you mean {near}?" if near else ""
            raise ValueError(
                f"flashtune option 'inductor_config': {key!r} is not a torch._inductor.config setting{hint}"
            )
    return dict(value)


def parse_options(options: Mapping[str, Any] | None) -> Options:
    """Validate ``options``; ValueError naming the bad key or value and the valid ones."""
    options = dict(options or {})
    valid = [f for f in Options.__dataclass_fields__]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"flashtune: unknown option(s) {unknown}; valid options: {valid}")
    kw: dict[str, Any] = {}
    if "inner" in options:
        if options["inner"] not in INNER:
            raise ValueError(f"flashtune option 'inner' must be one of {list(INNER)}, got {options['inner']!r}")
        kw["inner"] = options["inner"]
    if "tune" in options:
        if options["tune"] not in TUNE_MODES:
            raise ValueError(f"flashtune option 'tune' must be one of {list(TUNE_MODES)}, got {options['tune']!r}")
        kw["tune"] = options["tune"]
    if "cache_dir" in options:
        d = options["cache_dir"]
        if d is not None and (not isinstance(d, (str, Path)) or not str(d)):
            raise ValueError(f"flashtune option 'cache_dir' must be a non-empty path or None, got {d!r}")
        kw["cache_dir"] = None if d is None else Path(d).expanduser()
    if "ops" in options:
        kw["ops"] = _subset("ops", options["ops"], OP_FAMILIES)
    if "kernels" in options:
        kw["kernels"] = _subset("kernels", options["kernels"], KERNEL_FAMILIES)
    if "max_tokens" in options:
        mt = options["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise ValueError(f"flashtune option 'max_tokens' must be a positive int, got {mt!r}")
        kw["max_tokens"] = mt
    if "moe_routing" in options:
        if options["moe_routing"] not in ROUTINGS:
            raise ValueError(
                f"flashtune option 'moe_routing' must be one of {list(ROUTINGS)}, got {options['moe_routing']!r}"
            )
        kw["moe_routing"] = options["moe_routing"]
    if "buckets" in options:
        b = options["buckets"]
        if isinstance(b, str) and b not in LADDERS:
            raise ValueError(
                f"flashtune option 'buckets' must be one of {list(LADDERS)} or a sorted list of ints, got {b!r}"
            )
        try:
            make_ladder(b, kw.get("max_tokens", 8192))
        except (ValueError, TypeError) as e:
            raise ValueError(f"flashtune option 'buckets': {e}") from None
        kw["buckets"] = b if isinstance(b, str) else tuple(int(x) for x in b)
    if "mode" in options:
        kw["mode"] = check_mode(options["mode"])
    if "inductor_config" in options:
        kw["inductor_config"] = _inductor_config(options["inductor_config"])
    if "distributed" in options:
        if options["distributed"] not in STRATEGIES:
            raise ValueError(
                f"flashtune option 'distributed' must be one of {list(STRATEGIES)}, got {options['distributed']!r}"
            )
        kw["distributed"] = options["distributed"]
    opts = Options(**kw)
    if opts.inner != "inductor" and (opts.mode or opts.inductor_config):
        raise ValueError("flashtune options 'mode' and 'inductor_config' apply to inner='inductor' only")
    return opts


def _direct_calls(gm: torch.fx.GraphModule, grad: bool) -> torch.fx.GraphModule:
    """Point flashtune op nodes at plain callables: nothing traces this graph any more, so the
    dispatcher's round trip buys nothing. ``grad``: grad mode when compiled. Dynamo guards on it and
    on every input tensor's type, so a graph compiled under no_grad whose op arguments are plain
    tensors only ever runs that way: its nodes call the ops' implementations (``registry.IMPLS``).
    Otherwise a node calls the op's Autograd-key kernel (``DIRECT``; ``NO_GRAD`` without grad mode),
    which decides per call."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverloadPacket) and hasattr(target, "default"):
            target = target.default  # user code calling torch.ops.flashtune.moe(...) records the packet
        if target not in DIRECT:
            continue
        if grad:
            node.target = DIRECT[target]
        elif not all(_plain(a) for a in node.args if isinstance(a, torch.fx.Node)):
            node.target = NO_GRAD[target]
        elif node.kwargs or (OPS[target._opname].flatten_rows and _rank(node.args[0]) != 2):
            node.target = IMPLS[target._opname]  # e.g. flattens the rows first
        else:  # the op's inputs as they are: run(site, inputs) is all its implementation does
            *inputs, site = node.args
            node.target, node.args = run, (site, tuple(inputs))
    gm.recompile()
    return gm


def routed_weights(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The weights the graph's flashtune ops read, each once: parameters (as graph inputs or
    attributes), and the tensors in their ops' ``state_args`` (a quantized weight's integers and
    scales: buffers, or a tensor subclass's inner tensors read by ``getattr``), which it marks as
    model state (``WeightCache.mark_state``)."""
    values: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        values[node] = value

    def value_of(arg: torch.fx.Node) -> Any:
        value = values.get(arg)
        if value is None and arg.op == "get_attr":
            value = attr(gm, arg.target)
        if value is None and arg.target is getattr and isinstance(arg.args[0], torch.fx.Node):
            value = getattr(value_of(arg.args[0]), arg.args[1], None)  # a subclass's inner tensor
        if value is None and arg.op == "call_method" and arg.target == "flatten":  # a view: its copy follows its source
            value = value_of(arg.args[0]) if isinstance(arg.args[0], torch.fx.Node) else None
        return value

    found: dict[int, torch.Tensor] = {}
    state: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        name = op_name(node)
        if name is None:
            continue
        args = node.args[1] if node.target is run else node.args
        for i, arg in enumerate(args):
            if not isinstance(arg, torch.fx.Node):
                continue
            value = value_of(arg)
            if isinstance(value, torch.nn.Parameter):
                found[id(value)] = value
            elif isinstance(value, torch.Tensor) and i in OPS[name].state_args:
                found[id(value)] = value
                state.append(value)
    WeightCache.mark_state(state)
    return list(found.values())


def _rank(node: Any) -> int | None:
    value = _val(node)
    return value.dim() if isinstance(value, torch.Tensor) else None


def _plain(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a plain tensor (not a subclass such as DTensor) as Dynamo traced it."""
    from torch._subclasses.fake_tensor import FakeTensor

    return type(_val(node)) is FakeTensor


def _trains(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Whether the graph is compiled for training: grad mode (Dynamo guards on it) and a parameter
    that requires a gradient, which an optimizer may then update between calls."""
    if not torch.is_grad_enabled():
        return False
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)] + list(gm.parameters())
    return any(p.requires_grad for p in params)


def backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Route the graph's matmul and MoE nodes to tunable ops, then compile it with the inner
    compiler. Each routed call carries this model's options (its site), so models compiled with
    different options, ``cache_dir`` included, keep their tuning apart in one process.

    ``mode`` is torch.compile's ``mode=`` (Inductor's modes; torch.compile passes it here when no
    options are given, else give it as the ``mode`` option). Under a CUDA-graph mode the inner
    Inductor captures the graph after its warm-up runs; buckets are tuned in those runs, timed as
    graph replays, and a bucket first seen during capture runs its cached choice or the default.

    You do not call it: name it in ``torch.compile`` (an entry point, so the import is optional).

    Args:
        gm: the FX graph Dynamo captured (given by torch.compile).
        example_inputs: the graph's example inputs (given by torch.compile).
        options: torch.compile's ``options=``: ``inner``, ``tune``, ``cache_dir``, ``ops``,
            ``moe_routing``, ``buckets``, ``max_tokens``, ``kernels``, ``mode``,
            ``inductor_config``, ``distributed`` (the README's options table).
        mode: torch.compile's ``mode=``.

    Raises:
        ValueError: an unknown option or a bad value (the message names it and the valid ones),
            or ``mode`` with ``inner="eager"``.

    Example::

        compiled = torch.compile(model, backend="flashtune", dynamic=True, options={"cache_dir": "tuned"})
    """
    opts = parse_options(options)
    mode = check_mode(mode)
    if mode is not None and opts.inner != "inductor":
        raise ValueError(f"flashtune: mode={mode!r} applies to inner='inductor' only")
    site_options = opts.site_options(mode, _trains(gm, example_inputs))
    routed = sum(rewrite(gm, opts.ops, site_options) for rewrite in REWRITES)
    handed_back = training.settle(gm, example_inputs) if site_options.training and routed else 0
    routed -= handed_back
    tuner = AutoTuner.get()
    tuner.stats.routed_ops += routed
    tuner.stats.handed_back += handed_back
    tuner.stats.compiles += 1
    weights = routed_weights(gm, example_inputs)
    tuner.weights.register(weights)  # the weight-copy budget is a share of these (tuner/weights.py)
    hugepages.advise(weights)
    patches = opts.inductor_patches(mode) if opts.inner == "inductor" else {}
    log.info(
        "flashtune: routed %d op(s) of a %d-node graph%s; inner compiler %s%s%s%s",
        routed,
        len(gm.graph.nodes),
        f" (training: {handed_back} handed back to ATen, tuned no faster)" if handed_back else "",
        opts.inner,
        f" {patches}" if patches else "",
        "; candidates timed as CUDA graph replays" if site_options.cuda_graph else "",
        "; training: weight copies timed made again per call" if site_options.training and routed else "",
    )
    if opts.inner == "eager":
        return _direct_calls(gm, torch.is_grad_enabled()).forward
    from torch._inductor.compile_fx import compile_fx

    from .ops import inductor

    inductor.install()  # Inductor's code calls our ops' implementations directly
    return compile_fx(gm, example_inputs, config_patches=patches or None)
