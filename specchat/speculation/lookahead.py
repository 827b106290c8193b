"""Growing the next tree while the target verifies this one (SpecExec only).

A target streamed from disk leaves the CPU mostly idle during its pass (it waits for reads),
while the draft's steps are what a pass spends most of its time on (docs/benchmarks.md,
session 21).  So while the target verifies tree T, a worker thread bets on its outcome and
grows the next tree from there:

    the bet       the target accepts T's favourite chain c_1..c_m (from the root, each node
                  the draft's favourite child of the one before, while that child is in T)
    lookahead     a tree T' rooted at c_m, grown best-first by the draft over its cache
                  pruned to the root and c_1..c_{m-1} (the draft's own, unverified, entries)

When the pass returns: if it accepted exactly c_1..c_m and then drew a token b that T' holds as
an expanded child of its root, the next pass starts from T''s subtree at b, re-rooted
(:meth:`TreeBuilder.rooted_at`); otherwise T' is dropped and the next tree grows from scratch.
Either way the output is the target's own: a tree only says what the target looks at, and the
next tree depends on the outcome only through the committed tokens (as it always does).

The worker runs at a lower scheduling priority (:data:`NICE`), and the OpenMP threads it
starts for its products inherit it, so the target's own compute keeps the cores it needs and
the lookahead takes what the waits for the disk leave idle.
"""

from __future__ import annotations

import copy
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from specchat.model.kvcache import KVCache
from specchat.model.lm import LanguageModel
from specchat.speculation.growth import Growth, GrowthParams, GrowthStopped, choose_width, grow_specexec
from specchat.speculation.sampling import SamplingParams
from specchat.speculation.tree import Tree, TreeBuilder

NICE = 10  # added to the worker thread's niceness (Linux: per thread, inherited by the threads it starts)
GATE_POLL_S = 0.002  # how often a lookahead waiting for the target to be idle checks whether it was stopped


def favourite_chain(tree: Tree) -> list[int]:
    """Node indices c_1..c_m: from the root, the child holding its parent's favourite token, while there is one."""
    children = tree.children()
    tokens, favourites = tree.tokens.tolist(), tree.favourites.tolist()
    chain, node = [], 0
    while True:
        nxt = next((c for c in children[node] if tokens[c] == favourites[node]), None)
        if nxt is None:
            return chain
        chain.append(nxt)
        node = nxt


@dataclass
class Ahead:
    """A tree begun before its pass: valid while the conversation is ``tokens``."""

    tokens: tuple[int, ...]
    builder: TreeBuilder
    spent_s: float = 0.0  # what its expanded nodes would have cost a fresh growth, in width-1 steps


@dataclass
class Bet:
    """A lookahead in flight: what it assumed and the growth it is running."""

    prefix: int  # positions before the root of the tree being verified
    chain: list[int]  # c_1..c_m, node indices of that tree
    chain_tokens: list[int]
    step_s: float  # the calibrated seconds of a width-1 draft step (0 when unknown)
    stop: threading.Event
    future: Future  # -> Growth of T'


class StoppableLayers:
    """A layer source whose iteration raises :class:`GrowthStopped` once ``stop`` is set, so that the
    lookahead's forward in flight when the target finishes ends at its next layer.

    With ``gate`` (the target's :attr:`~specchat.model.lm.LayeredLM.waiting_for_layers`) each
    layer also waits until the target's pass is waiting for the disk: the lookahead computes only
    on CPU time the target leaves idle, and the target's own compute never waits for it (beyond
    the one draft layer in flight when a read lands)."""

    def __init__(self, source, stop: threading.Event, gate: threading.Event | None = None) -> None:
        self.source, self.stop, self.gate = source, stop, gate

    def layers(self):
        for layer in self.source.layers():
            while self.gate is not None and not self.stop.is_set() and not self.gate.wait(GATE_POLL_S):
                pass
            if self.stop.is_set():
                raise GrowthStopped
            yield layer

    def bytes_read(self) -> int:
        return self.source.bytes_read()


class Lookahead:
    """Runs the lookahead growth on one worker thread of lower priority.

    ``patient``: :meth:`finish` lets the growth run to its budget, or ``max_steps`` forwards,
    instead of stopping it when the target is done (what it grows then no longer depends on
    thread timing: for tests)."""

    def __init__(self, nice: int = NICE, patient: bool = False, max_steps: int | None = None) -> None:
        self.nice = nice
        self.patient = patient
        self.max_steps = max_steps
        self._pool: ThreadPoolExecutor | None = None

    def _worker(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specchat-lookahead", initializer=self._lower_priority)
        return self._pool

    def _lower_priority(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + self.nice)
        except (AttributeError, OSError):  # not Linux: the lookahead competes at the same priority
            pass

    def start(
        self, draft: LanguageModel, cache: KVCache, committed: list[int], tree: Tree, growth: GrowthParams, sampling: SamplingParams,
        choose=choose_width, gate: threading.Event | None = None,
    ) -> Bet | None:
        """Prune the draft cache to the bet and start growing T' (None: no chain to bet on); with
        ``gate``, each draft layer waits until the target waits for the disk (:class:`StoppableLayers`)."""
        chain = favourite_chain(tree)
        if not chain:
            return None
        prefix = len(committed) - 1
        cache.keep_draft(prefix + 1, tree.draft_slots[torch.tensor(chain[:-1], dtype=torch.long)])  # root + c_1..c_{m-1}
        chain_tokens = tree.tokens[torch.tensor(chain)].tolist()
        # Its time is hidden (no adaptive stop) but short (a few steps while the target reads):
        # one node per step, the best-scored, so that it deepens the likeliest path rather than
        # widening.  Its root is one level above the next tree's, whose root's children must
        # survive the siblings' competition: room for two trees (the nodes cost no forwards).
        free = replace(growth, budget=2 * growth.budget + 1, batch=1, width_costs=(), draft_step_s=None, target_pass_s=None,
                       max_steps=self.max_steps or growth.max_steps)
        stop = threading.Event()
        stoppable = copy.copy(draft)  # the same model, whose forward ends between two layers once stopped
        stoppable.layer_source = StoppableLayers(draft.layer_source, stop, None if self.patient else gate)
        future = self._worker().submit(grow_specexec, stoppable, cache, committed + chain_tokens, free, sampling, choose, stop=stop.is_set)
        step_s = growth.width_costs[0][1] if growth.width_costs else (growth.draft_step_s or 0.0)
        return Bet(prefix, chain, chain_tokens, step_s, stop, future)

    def finish(self, bet: Bet) -> Growth:
        """Stop the lookahead (its forward in flight ends at its next layer); its growth (re-raises
        what it raised)."""
        if not self.patient:
            bet.stop.set()
        interrupted = False
        while True:  # a Ctrl-C now must not leave the worker writing to the cache the engine rolls back
            try:
                grown = bet.future.result()
                break
            except KeyboardInterrupt:
                interrupted = True
                bet.stop.set()
        if interrupted:
            raise KeyboardInterrupt
        return grown

    @staticmethod
    def settle(bet: Bet, grown: Growth, draft: LanguageModel, cache: KVCache, accepted: list[int], drawn: int, committed: list[int]) -> Ahead | None:
        """After the pass accepted ``accepted`` and drew ``drawn``: the next tree begun, or None.

        Either way the draft cache is left as the next growth needs it: on a hit, the committed
        prefix then the subtree's entries; on a miss, the committed prefix up to where the bet
        and the outcome part (what follows is pending and fed by the next growth).
        ``committed`` is the conversation with this pass's tokens."""
        m = len(bet.chain)
        if accepted == bet.chain:
            ahead = reroot(grown.tree, draft, cache, bet.prefix + m + 1, drawn, committed, bet.step_s)
            if ahead is not None:
                return ahead
        agreed = 0
        while agreed < min(len(accepted), m - 1) and accepted[agreed] == bet.chain[agreed]:
            agreed += 1
        cache.keep(bet.prefix, torch.arange(bet.prefix, bet.prefix + 1 + agreed))  # root + c_1..c_agreed
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def reroot(
    tree: Tree, draft: LanguageModel, cache: KVCache, start: int, drawn: int, committed: list[int], step_s: float = 0.0
) -> Ahead | None:
    """T''s subtree at its root's child ``drawn``, if that child is expanded, as the next tree."""
    slots = tree.draft_slots.tolist()
    child = next((c for c, p in enumerate(tree.parents.tolist()) if p == 0 and int(tree.tokens[c]) == drawn), None)
    if child is None or slots[child] < 0:
        return None
    inside = {child}
    for node in range(child + 1, tree.size):
        if int(tree.parents[node]) in inside:
            inside.add(node)
    kept = sorted(slots[n] for n in inside if slots[n] >= 0)
    cache.keep_draft(start, torch.tensor(kept, dtype=torch.long))
    new_slot = {old: start + i for i, old in enumerate(kept)}
    builder = TreeBuilder.rooted_at(draft, cache, list(committed), tree, child, new_slot)
    return Ahead(tuple(committed), builder, step_s * len(kept))
