"""What ``func`` reads, and replaying it in the backward pass (README, What func may do).

The symplectic backward re-evaluates ``func`` long after the forward solve and pulls
cotangents back through each evaluation. Everything an evaluation depends on must
therefore be what the forward saw, and every tensor requiring grad that it reads must be
an input of the autograd function, or its gradient is silently lost. This module holds
the pieces the torch adapter plugs in:

* :class:`FuncObserver` wraps the vector field during the forward solve. Its first
  evaluation (the solve's own, not an extra one) runs under :class:`_ReadMode`, a
  ``TorchFunctionMode`` that records every tensor argument requiring grad that was not
  created inside the call (parameters, closure captures, plain attributes,
  ``functional_call`` weights, non-leaf tensors of an upstream graph), every other
  outside tensor that the call changed in place (module state such as BatchNorm's running
  statistics), and whether it drew random numbers (generator state before/after). Later
  evaluations pay nothing unless ``func`` is random; then each one records the generator
  state it started from, so that the backward replays the same numbers.
* :class:`Inputs` turns the listed parameters and the discovered reads into the autograd
  function's inputs (each tensor once; a listed tensor that ``func`` reads only through a
  tensor computed from it outside ``func`` -- a view, a hypernetwork output -- gets its
  gradient through that tensor's graph, not twice), checks their version counters
  before the backward (a tensor changed in place after the forward is refused, as
  autograd refuses it), and :meth:`Inputs.check_graph` verifies, per backward
  evaluation and cheaply (a few microseconds), that the graph reaches no tensor requiring
  grad besides the known inputs: a read the first evaluation did not make (a
  data-dependent branch) raises instead of losing its gradient.
* :class:`Replay` is the backward's context: the forward's autocast state, the recorded
  generator states per evaluation (forked: the caller's random stream is untouched by
  the backward), and the module state ``func`` mutates, restored after the backward so it
  ends exactly as after the forward solve alone.
* :class:`Cut` for the graph-enabled (``create_graph=True``) backward: the stage input
  of each VJP is a function of ``y0`` and the parameters through the replayed
  trajectory; the cut hides that history from the first-order VJP (so a parameter is
  not also differentiated through the trajectory) and passes through in the second
  order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = [
    "Cut",
    "FuncObserver",
    "Inputs",
    "Reads",
    "Replay",
    "RngTape",
    "autocast_state",
    "check_no_transform",
    "check_time_options",
    "describe",
]


def describe(x: torch.Tensor) -> str:
    """A short name of a tensor for error messages: shape, dtype, leaf or computed."""
    kind = "a leaf" if x.grad_fn is None else f"computed by {type(x.grad_fn).__name__}"
    if isinstance(x, torch.nn.Parameter):
        kind = "a Parameter"
    return f"tensor of shape {tuple(x.shape)} ({x.dtype}, {kind})"


def _version(x: torch.Tensor) -> int:
    try:
        return x._version
    except RuntimeError:  # inference tensors have no version counter
        return -1


class Reads:
    """What one observed evaluation of ``func`` read.

    Attributes:
        grad: tensors requiring grad that ``func`` passed to a torch function and did not
            create, in the order first read (each object once).
        mutated: outside tensors not requiring grad that the evaluation changed in place.
        random: whether the evaluation changed a random generator's state.
        hidden: autograd nodes of tensors computed outside ``func`` that operations the
            mode does not see (TorchScript) read: the tensors themselves are not known
            here; :class:`Inputs` finds them among the listed ones or refuses.
    """

    def __init__(self, grad: list, mutated: list, random: bool, hidden: Sequence = ()) -> None:
        self.grad = grad
        self.mutated = mutated
        self.random = random
        self.hidden = list(hidden)


# Functions that update running statistics inside their kernel, without bumping the
# tensors' version counters: their outside tensor arguments count as mutated state.
_RUNNING_STATS = frozenset({"batch_norm", "instance_norm"})


class _ReadMode(TorchFunctionMode):
    """Records the outside tensors the torch functions called inside it receive.

    A tensor is "own" (created inside) when a call inside returned it for the first time;
    ``exclude`` (the evaluation's own arguments) counts as own. All others are outside
    tensors: those requiring grad go to ``grad``, the rest to ``seen`` with their
    version, to detect in-place changes afterwards (and, for the normalisations that
    update running statistics without a version bump, to ``stats``).
    """

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.own: set[int] = {id(x) for x in exclude}
        self.keep: list[Any] = list(exclude)  # hold created tensors: their ids stay unique
        self.grad: dict[int, torch.Tensor] = {}
        self.seen: dict[int, tuple[torch.Tensor, int]] = {}
        self.stats: dict[int, torch.Tensor] = {}
        self.hidden: dict[Any, None] = {}  # upstream nodes read by unseen operations
        self.mark = _graph_mark()

    def read(self, x: torch.Tensor) -> None:
        """Record an outside tensor ``x`` requiring grad that reached the mode (an argument
        of a torch function, or a returned tensor)."""
        if x.grad_fn is None or x.grad_fn._sequence_nr() <= self.mark:
            # A leaf, or a non-leaf of an upstream graph (``return self.velocity``).
            self.grad.setdefault(id(x), x)
            return
        # Computed during the call by operations the mode does not see (a TorchScript
        # module or function): it read what its graph since the mark reaches, the leaves
        # and the upstream non-leaf tensors (known here only by their nodes).
        self.own.add(id(x))
        self.keep.append(x)
        leaves, upstream = _reached_since(x.grad_fn, self.mark)
        for leaf in leaves:
            self.grad.setdefault(id(leaf), leaf)
        self.hidden.update(dict.fromkeys(upstream))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stats = getattr(func, "__name__", "") in _RUNNING_STATS
        for x in tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor) and id(x) not in self.own:
                if x.requires_grad:
                    self.read(x)
                elif id(x) not in self.seen:
                    self.seen[id(x)] = (x, _version(x))
                if stats and not x.requires_grad:
                    self.stats[id(x)] = x
        out = func(*args, **kwargs)
        for x in tree_leaves(out):
            i = id(x)
            if isinstance(x, torch.Tensor) and i not in self.own and i not in self.grad:
                if i not in self.seen:
                    self.own.add(i)
                    self.keep.append(x)
        return out

    def mutated(self) -> list[torch.Tensor]:
        changed = {i: x for i, (x, v) in self.seen.items() if v >= 0 and _version(x) != v}
        return list({**changed, **self.stats}.values())


def _refuse_mutated_state(mode: _ReadMode) -> None:
    """Refuse floating-point state that ``func`` changes in place at an evaluation.

    The backward re-evaluates ``func`` with the state as it is then, not as each forward
    evaluation saw it (a counter buffer, the power-iteration vector of
    ``nn.utils.spectral_norm`` in train mode), so its gradient would silently differ
    from backprop's. Running statistics of batch/instance norm are exempt: in training
    mode the kernel writes them but does not read them (restored after the backward),
    and integer counters (``num_batches_tracked``) never enter a gradient.
    """
    bad = [
        x
        for x in mode.mutated()
        if x.is_floating_point() and not any(x is s for s in mode.stats.values())
    ]
    if bad:
        shapes = ", ".join(str(tuple(x.shape)) for x in bad[:3])
        raise ValueError(
            f"func changed tensor state in place during an evaluation (shapes {shapes}), "
            "e.g. a buffer updated at every call or nn.utils.spectral_norm in train mode: "
            "adjoint='symplectic' re-evaluates func in the backward pass and cannot replay "
            "that state, so its gradient would differ from backprop's. Update such state "
            "outside func (after the solve), put the module in eval mode, or use "
            "adjoint='backprop'"
        )


class RngTape:
    """The random generators ``func`` may draw from: the CPU one and, for a state on an
    accelerator, that device's (as ``torch.utils.checkpoint`` preserves them)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None
        return torch.get_rng_state(), cuda

    def set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None and self.cuda is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)

    @staticmethod
    def same(a: tuple, b: tuple) -> bool:
        return all(
            (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
            for x, y in zip(a, b, strict=True)
        )


class FuncObserver:
    """Wraps the vector field ``base(t, y)`` of the forward solve.

    ``observer(base, t, y)`` evaluates ``base``. The first call is observed
    (:class:`Reads` in ``reads``); when it drew random numbers, this and every later call
    record the generator state they started from: ``last_state`` after each call,
    ``first_state`` for the first. Nothing else is done per call, so a deterministic
    ``func`` pays one observed evaluation per solve.
    """

    def __init__(self, device: torch.device) -> None:
        self.tape = RngTape(device)
        self.reads: Reads | None = None
        self.random = False
        self.first_state: tuple | None = None
        self.last_state: tuple | None = None
        self._start: tuple | None = None

    def __call__(self, base: Callable, t: torch.Tensor, y: torch.Tensor) -> Any:
        if self.reads is None:
            return self._observe(base, t, y)
        if self.random:
            self.last_state = self.tape.get()
        return base(t, y)

    def _observe(self, base: Callable, t: torch.Tensor, y: torch.Tensor) -> Any:
        before = self.tape.get()
        self._start = before
        # Aliases of the arguments: the state handed to the first evaluation may be the
        # user's y0 itself, which a closure may also read (then it is an input too).
        ta, ya = t.detach(), y.detach()
        mode = _ReadMode((ta, ya))
        # With a graph even in the no-grad forward solve: operations the mode does not see
        # (TorchScript) are then found from the graph they leave (:meth:`_ReadMode.read`).
        recording = torch.is_grad_enabled()
        with mode, torch.enable_grad():
            out = base(ta, ya)
        # A returned tensor the mode did not see made: returned as it is (a parameter, an
        # upstream non-leaf) or made by operations it does not see (TorchScript).
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor) and x.requires_grad and id(x) not in mode.own:
                mode.read(x)
        _refuse_mutated_state(mode)
        after = self.tape.get()
        self.random = not RngTape.same(before, after)
        self.reads = Reads(list(mode.grad.values()), mode.mutated(), self.random,
                           list(mode.hidden))  # fmt: skip
        if self.random:
            self.first_state = self.last_state = before
        if not recording:
            out = tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, out)
        return out

    def drew_later(self) -> bool:
        """Whether ``func`` drew random numbers during the solve although its first
        evaluation did not (its later evaluations then cannot be replayed)."""
        if self.random or self._start is None:
            return False
        return not RngTape.same(self._start, self.tape.get())


def _walk(root: Any, stop: Callable[[Any], bool]) -> Iterator[Any]:
    """The autograd nodes reachable from ``root`` (not itself), not expanding those for
    which ``stop`` holds."""
    stack, seen = [root], {root}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None or nxt in seen:
                continue
            seen.add(nxt)
            yield nxt
            if not stop(nxt):
                stack.append(nxt)


def _graph_mark() -> int:
    """The autograd sequence number of a node made now: nodes made later have larger ones
    (the counter is per thread, and the forward solve runs in one). Made outside
    inference mode, where no node is made (a caller's ``torch.inference_mode()``)."""
    with torch.inference_mode(False), torch.enable_grad():
        node = torch.zeros((), requires_grad=True).expand(1).grad_fn
    assert node is not None
    return node._sequence_nr()


def _reached_since(root: Any, mark: int) -> tuple[list[torch.Tensor], list[Any]]:
    """``(leaves, upstream)``: the leaves requiring grad that the nodes made after
    ``mark`` reach from ``root``, and the first nodes made before (the grad_fn of
    tensors of graphs built outside, which are not known from their nodes)."""
    leaves, upstream = [], []
    for node in _walk(root, stop=lambda n: _leaf_of(n) is not None or n._sequence_nr() <= mark):
        leaf = _leaf_of(node)
        if leaf is not None:
            leaves.append(leaf)
        elif node._sequence_nr() <= mark:
            upstream.append(node)
    return leaves, upstream


def _leaf_of(node: Any) -> torch.Tensor | None:
    return getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf


_ACCUMULATE = type(torch.zeros((), requires_grad=True).expand(1).grad_fn.next_functions[0][0])  # type: ignore[union-attr]


class Inputs:
    """The tensors the backward differentiates besides ``y0`` and ``t``.

    Arguments:
        listed: ``adjoint_params`` (or the module's parameters) that require grad.
        reads: what the first evaluation read (``None``: nothing observed).

    ``tensors`` is the listed tensors followed by the other discovered ones, each object
    once, without listed tensors that ``func`` did not read and that a discovered
    non-leaf tensor is computed from (their gradient arrives through that tensor's own
    graph; differentiating them here as well would count it twice).

    Raises:
        ValueError: ``func`` reads a tensor and also a tensor computed from it outside
            ``func`` (e.g. a parameter and a view of it made beforehand).
    """

    def __init__(self, listed: Sequence[torch.Tensor], reads: Reads | None) -> None:
        order: dict[int, torch.Tensor] = {}
        for x in listed:
            order.setdefault(id(x), x)
        read_ids = set()
        if reads is not None:
            for x in reads.grad:
                order.setdefault(id(x), x)
                read_ids.add(id(x))
            for x in self._hidden_reads(listed, reads.hidden):
                read_ids.add(id(x))
        drop = self._upstream_of_reads(order, read_ids)
        self.tensors: tuple[torch.Tensor, ...] = tuple(x for i, x in order.items() if i not in drop)
        self.dropped = tuple(order[i] for i in drop)
        self._index()
        self.versions: list[int] | None = None

    @staticmethod
    def _hidden_reads(listed: Sequence[torch.Tensor], hidden: Sequence[Any]) -> list:
        """The listed tensors whose nodes are among ``hidden`` (non-leaf tensors read by
        operations the read watcher does not see); any other such node is refused: its
        tensor, unknown, would not be an input, and its gradient would be silently lost
        (``autograd.grad(loss, v)`` without the solve's part)."""
        by_node = {x.grad_fn: x for x in listed if x.grad_fn is not None}
        unknown = [n for n in hidden if n not in by_node]
        if unknown:
            raise ValueError(
                f"func passes a tensor computed outside func (by {type(unknown[0]).__name__}) "
                "to operations the read watcher cannot see (a TorchScript module or "
                "function), so adjoint='symplectic' cannot make it an input and its gradient "
                "would be lost. List it in adjoint_params, compute it inside func, or use "
                "adjoint='backprop'."
            )
        return [by_node[n] for n in hidden]

    @staticmethod
    def _upstream_of_reads(order: dict[int, torch.Tensor], read_ids: set[int]) -> set[int]:
        computed = [x for i, x in order.items() if i in read_ids and x.grad_fn is not None]
        if not computed:
            return set()
        by_node = {x.grad_fn: x for x in order.values() if x.grad_fn is not None}
        drop: set[int] = set()
        for v in computed:
            for node in _walk(v.grad_fn, stop=lambda n: False):
                leaf = _leaf_of(node)
                hit = order.get(id(leaf)) if leaf is not None else by_node.get(node)
                if hit is None or hit is v:
                    continue
                if id(hit) in read_ids:
                    raise ValueError(
                        f"func reads a {describe(hit)} and also a {describe(v)} computed from "
                        "it outside func (e.g. a parameter and a view of it made beforehand): "
                        "the symplectic adjoint would count that gradient twice. Compute the "
                        "derived tensor inside func, or read only one of them."
                    )
                drop.add(id(hit))
        return drop

    def _index(self) -> None:
        self._leaf_ids = {id(x) for x in self.tensors if x.grad_fn is None}
        self._nodes = {x.grad_fn for x in self.tensors if x.grad_fn is not None}

    # -------------------------------------------------------------- versions
    def record_versions(self) -> None:
        """Remember the version counters at the end of the forward pass."""
        self.versions = [_version(x) for x in self.tensors]

    def check_versions(self) -> None:
        """Refuse a tensor changed in place since the forward pass (as autograd does)."""
        if self.versions is None:
            return
        for x, v in zip(self.tensors, self.versions, strict=True):
            now = _version(x)
            if now != v:
                raise RuntimeError(
                    f"one of the variables needed for gradient computation has been modified "
                    f"by an inplace operation: a {describe(x)} that func reads was changed in "
                    f"place after odeint's forward pass (version {v} -> {now}), so its "
                    "gradient would be taken at the new value. Change it only after the "
                    "backward pass (e.g. optimizer.step() after loss.backward()), or let func "
                    "read a copy."
                )

    # ----------------------------------------------------------------- graph
    def check_graph(self, out: torch.Tensor, own: Sequence[torch.Tensor]) -> None:
        """Raise if the graph of ``out`` reaches a tensor requiring grad other than the
        inputs and ``own`` (the evaluation's arguments, at most two leaves; the history
        of a non-leaf one is not followed)."""
        root = out.grad_fn
        if root is None:
            if out.requires_grad and not any(out is x for x in own):
                self._unknown_read(out)  # returned as it is: no graph to walk
            return
        known, nodes = self._leaf_ids, self._nodes
        a = b = None
        for x in own:
            if x.grad_fn is not None:
                nodes = nodes | {x.grad_fn}
            elif a is None:
                a = x
            else:
                b = x
        # Once per VJP, so a plain loop with bound methods: ~3 us on the protocol MLP's
        # fresh graph, whose VJP takes 600-900 us.
        if root in nodes:  # func returned an input computed upstream as it is
            return
        stack, seen = [root], {root}
        pop, push, add = stack.pop, stack.append, seen.add
        while stack:
            for node, _ in pop().next_functions:
                if node is None or node in seen or node in nodes:
                    continue
                add(node)
                if type(node) is not _ACCUMULATE:
                    push(node)
                    continue
                leaf = node.variable  # type: ignore[attr-defined]  # AccumulateGrad's leaf
                if leaf is a or leaf is b or id(leaf) in known:
                    continue
                self._unknown_read(leaf)

    def _unknown_read(self, leaf: torch.Tensor) -> None:
        if id(leaf) in self._leaf_ids:
            return
        raise RuntimeError(
            f"func read a {describe(leaf)} that its first evaluation did not read (a "
            "data-dependent branch?), so the symplectic adjoint would lose its "
            "gradient. Pass it in adjoint_params, or make func read it at every "
            "evaluation. (A tensor created inside func with requires_grad=True also "
            "triggers this: create it without requires_grad.)"
        )


def autocast_state(device: torch.device) -> list[tuple[str, bool, torch.dtype]]:
    """The autocast settings in force now, for the CPU and ``device``'s type."""
    kinds = ["cpu"] if device.type == "cpu" else ["cpu", device.type]
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]


class Replay:
    """The backward pass's view of the forward's surroundings.

    Arguments:
        autocast: :func:`autocast_state` at the forward pass.
        tape: the generators (``None`` when ``func`` is deterministic).
        mutated: module state ``func`` changes in place (restored after the backward).
        cache: autocast's cast cache setting at the forward pass.

    ``with replay.backward():`` wraps the whole backward pass: it snapshots ``mutated``
    and the generator states and restores them on exit. ``with replay.evaluation(state):``
    wraps one evaluation of ``func``: autocast as in the forward, and the generator
    state the forward evaluation started from.
    """

    def __init__(
        self,
        autocast: list[tuple[str, bool, torch.dtype]],
        tape: RngTape | None,
        mutated: Sequence[torch.Tensor],
        cache: bool = True,
    ) -> None:
        self.autocast = autocast
        self.tape = tape
        self.mutated = tuple(mutated)
        self.cache = cache
        self.trivial_autocast = not any(enabled for _, enabled, _ in autocast)
        self.kinds = [kind for kind, _, _ in autocast]
        self.random = tape is not None

    def needed(self) -> bool:
        """Whether evaluations must be wrapped: random func, or autocast on in the forward
        or now (in the backward it must be as in the forward)."""
        if self.random or not self.trivial_autocast:
            return True
        return any(torch.is_autocast_enabled(k) for k in self.kinds)

    @contextlib.contextmanager
    def backward(self) -> Iterator[None]:
        saved = [x.detach().clone() for x in self.mutated]
        rng = self.tape.get() if self.tape is not None else None
        try:
            yield
        finally:
            if rng is not None and self.tape is not None:
                self.tape.set(rng)
            with torch.no_grad():
                for x, v in zip(self.mutated, saved, strict=True):
                    x.copy_(v)

    @contextlib.contextmanager
    def evaluation(self, state: tuple | None = None) -> Iterator[None]:
        if state is not None and self.tape is not None:
            self.tape.set(state)
        if self.trivial_autocast and not any(torch.is_autocast_enabled(k) for k in self.kinds):
            yield  # no autocast then or now: nothing to enter
            return
        with contextlib.ExitStack() as stack:
            for kind, enabled, dtype in self.autocast:
                stack.enter_context(
                    torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.cache)
                )
            yield


class _Gate:
    closed = False


class Cut(torch.autograd.Function):
    """``Cut.apply(x, gate)`` is ``x``; its backward passes nothing while ``gate.closed``.

    In the graph-enabled backward, each VJP evaluates ``f`` at ``Cut(X_i)`` and closes the
    gate for its own ``torch.autograd.grad`` call: the first derivative then holds the
    partial derivatives at ``X_i`` (the symplectic recursion supplies the rest), while
    differentiating that first derivative later goes through the cut into ``X_i``'s
    history (the replayed trajectory), as second derivatives must.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gate: _Gate) -> torch.Tensor:
        ctx.gate = gate
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return (None if ctx.gate.closed else g), None

    Gate = _Gate


def check_time_options(options: dict | None) -> None:
    """``step_t``/``jump_t`` are constants of the solve: refuse them requiring grad."""
    for name in ("step_t", "jump_t"):
        x = (options or {}).get(name)
        if isinstance(x, torch.Tensor) and x.requires_grad:
            raise ValueError(
                f"options[{name!r}] requires grad, but step and jump times are constants of "
                "the discrete solve (README, How it works) and get no gradient: pass "
                f"options[{name!r}].detach()"
            )


def check_no_transform(adjoint_name: str = "symplectic") -> None:
    """Refuse running inside ``torch.func`` transforms (``grad``, ``vjp``, ``vmap``...)."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    if peek is not None and peek() is not None:
        raise ValueError(
            f"adjoint={adjoint_name!r} cannot run inside torch.func transforms (grad, vjp, "
            "vmap, jacrev, ...): its backward pass re-evaluates func outside the transform. "
            "Use torch.autograd.grad, or adjoint='backprop' under torch.func."
        )
