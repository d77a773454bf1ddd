"""The transformers engine's dynamic batching loop: one worker thread; requests join and leave the running batch.

Each loop iteration takes new requests and aborts from a thread-safe inbox, admits waiting requests while the batch
has room (each is prefilled alone, into its own key/value buffer, see `ragged.py`), then runs one decode step for
the whole batch: one forward of one token per request. A request leaves the batch the moment it finishes.

Isolation (a request decoded next to others returns exactly the tokens it returns alone): attention reads only the
request's own buffer, positions are the request's own, the steering slot of every token comes from the core's
`build_slot_index` (filler rows get slot 0), sampling uses the request's own generator, and the decode batch is
padded with filler rows to a multiple of `row_multiple` so the matmul kernels see the same row-count class whether a
request runs alone or not (see `HFEngineConfig.decode_row_multiple`).

What a request asks for beyond tokens costs only that request's rows: log-probabilities are one log-softmax of its
logits row (of every prompt position only when it asks for prompt scoring: the prefill keeps the last position
otherwise), and features are read in the same hooks that steer (`feature_plan.py`), on its rows only; so is a capture
(`functok_vllm.activation_capture`): its rows of the tensor at the hook point after the steering there are copied out.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from functok_vllm.activation_capture import encode_capture, select_rows
from functok_vllm.core import SlotsFull, SteeringTable, StepIndex, build_slot_index
from functok_vllm.core.batch import Narrowing, last_function_position, narrowing, policy_code, stack_narrowings
from functok_vllm.core.readout import ProbeSets
from functok_vllm.engines.base import Delta, GenerateRequest, TokenLogprob
from functok_vllm.engines.hf import sampling
from functok_vllm.engines.hf.feature_plan import (
    Readout,
    entry,
    latest_value,
    layer_fn,
    plan_series,
    series_values,
)
from functok_vllm.engines.hf.ragged import KVBuffer, RaggedAttention
from functok_vllm.engines.hf.scoring import HiddenTap, prompt_logprobs
from functok_vllm.engines.hf.textout import TextStream
from functok_vllm.engines.placement import decoder_layers, hooked

log = logging.getLogger("functok.engine")


@dataclass(eq=False)  # compared by identity
class Seq:
    """A request inside the worker."""

    req: GenerateRequest
    emit: Callable[[Delta], None]  # thread-safe hand-off to the request's consumer
    max_new: int
    text: TextStream
    generator: torch.Generator | None = None
    stops: frozenset = frozenset()  # token ids that end it: end-of-sequence (unless ignore_eos), stop_token_ids
    slot: int = 0
    policy: int = 0
    last_fn: int = -1
    narrow: Narrowing | None = None  # its position object's narrowing (None: a position name)
    kv: KVBuffer | None = None
    out_ids: list[int] = field(default_factory=list)
    steered: int = 0
    pen_row: int = -1  # its row of the sampler's PenaltyCounts (-1: no penalties)
    pending: dict = field(default_factory=dict)  # prompt extras for the next delta (prompt_logprobs, prompt_features)
    captured: dict = field(default_factory=dict)  # layer -> [(rows, d_model) tensors], one per forward, when it asked
    groups: dict = field(default_factory=dict)  # its readout's ProbeGroups by (layer, before), when it asked
    read_out: list = field(default_factory=list)  # [(positions, (rows, series) buffer)], one per forward
    monitor_run: int = 0  # positions in a row where its stop_when held, up to the latest

    def delta(self, text: str, ids: list[int], finish: str | None = None, error: str | None = None, extra=None):
        """`extra`: (TokenLogprob or None, feature entry or None) of the one token in `ids`, when it asked."""
        d = Delta(text, ids, finish, len(self.req.prompt_ids), len(self.out_ids), self.steered, error)
        if extra is not None:
            lp, feat = extra
            d.logprobs = None if lp is None else [lp]
            d.features = None if feat is None else [feat]
        if self.pending:
            d.prompt_logprobs = self.pending.pop("prompt_logprobs", None)
            d.prompt_features = self.pending.pop("prompt_features", None)
        return d


class Batcher:
    """The worker thread: owns the model's forwards, the steering table and every request's state."""

    def __init__(
        self,
        model,
        ragged: RaggedAttention,
        tokenizer,
        table: SteeringTable | None,
        fn_mask: torch.Tensor | None,
        max_running: int,
        row_multiple: int,
        eos_ids: set[int],
    ):
        self.model, self.ragged, self.tokenizer, self.table, self.fn_mask = model, ragged, tokenizer, table, fn_mask
        self.max_running, self.row_multiple, self.eos_ids = max_running, row_multiple, eos_ids
        self.device = model.device
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self.stats = {"prefills": 0, "decode_steps": 0, "decode_rows": 0}
        self._live = dict.fromkeys(table.layers if table else (), 0)  # layer -> running requests steering there
        self.layers = decoder_layers(model)
        self.readout = Readout(self.device)  # this forward's feature readout plan (empty: nothing to read)
        self.capture: dict[int, list] = {}  # this forward's capture plan: layer -> [(Seq, its flattened rows)]
        self.reads: dict[int, list] = {}  # this forward's readout plan: layer -> [SeriesRead]
        saes = {layer: op.sae for layer, op in table.layers.items()} if table else {}
        self.probe_sets = ProbeSets(saes, self.device)  # requests reading the same series share their tensors
        self.pens = sampling.PenaltyCounts(max_running, model.get_output_embeddings().weight.shape[0], self.device)
        self._stop = False
        self._narrowed: tuple = ((), None)  # (the rows, their stacked narrowings): rebuilt when the rows change
        self.thread = threading.Thread(target=self._main, name="functok-hf-worker", daemon=True)

    # ---- called from the event loop thread ------------------------------------------------------------------------

    def submit(self, seq: Seq) -> None:
        self.inbox.put(("submit", seq))

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id))

    def stop(self) -> None:
        self._stop = True
        self.inbox.put(("wake", None))
        self.thread.join()
        self._abort_all()  # requests submitted while the worker was stopping

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self._stop

    # ---- the worker thread ----------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stop:
                    self._drain(block=not (self.running or self.waiting))
                    self._admit()
                    if self.running:
                        try:
                            self._decode()
                        except Exception as e:  # a bug or out of memory: fail this batch, keep serving
                            log.exception("decode step failed; failing %d running requests", len(self.running))
                            for seq in list(self.running):
                                self._finish(seq, "error", error=f"decode step failed: {type(e).__name__}")
        except Exception:  # outside a step (admission, a queue message): no request may be left without an ending
            log.exception("the engine's worker thread failed; aborting every request")
            self._stop = True
            raise
        finally:
            self._abort_all()

    def _abort_all(self) -> None:
        self._drain(block=False)
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq, "abort")

    def _hooks(self, steer: bool):
        """This forward's temporary hooks (`engines.placement`): the steering op at each layer a running request
        steers when any token of the forward is steered, then the feature readout where a request reads features."""
        fns = []
        for layer, op in self.table.layers.items() if self.table else ():
            add = steer and self._live[layer] > 0
            read = bool(self.readout.plans) and op.sae is not None
            keep, reads = self.capture.get(layer), self.reads.get(layer)
            if add or read or keep or reads:
                fns.append((op.hook, layer_fn(layer, op, add, self.readout if read else None, keep, reads)))
        return hooked(self.layers, fns)

    def _plan_capture(self, wants: list[tuple[Seq, slice]]) -> None:
        """This forward's capture plan from (request, its flattened rows) of the requests that capture."""
        self.capture = {}
        for seq, rows in wants:
            for layer in seq.req.capture.layers:
                self.capture.setdefault(layer, []).append((seq, rows))

    def _drain(self, block: bool) -> None:
        try:
            msg = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, arg = msg
            if kind == "submit":
                self.waiting.append(arg)
            elif kind == "abort":
                for seq in [s for s in (*self.waiting, *self.running) if s.req.request_id == arg]:
                    self._finish(seq, "abort")
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            try:
                seq.slot = self.table.acquire(seq.req.steering) if self.table else 0
            except SlotsFull:
                return  # stays first in line until a running request releases its slot
            self.waiting.popleft()
            self.running.append(seq)
            for layer in seq.req.steering.layers if seq.slot else ():
                self._live[layer] += 1
            try:
                self._prefill(seq)
            except Exception as e:
                log.exception("prefill failed for request %s", seq.req.request_id)
                self._finish(seq, "error", error=f"prefill failed: {type(e).__name__}")

    def _prefill(self, seq: Seq) -> None:
        r = seq.req
        spec, fr, prompt = r.steering, r.features, r.prompt_ids
        ids = torch.tensor(prompt, dtype=torch.long, device=self.device)  # (n,)
        n = ids.shape[0]
        if spec is not None and self.fn_mask is not None:
            seq.policy = policy_code(spec.positions)
            seq.last_fn = last_function_position(ids, self.fn_mask)
            roles = torch.tensor(r.prompt_roles) if r.prompt_roles is not None else None
            seq.narrow = narrowing(spec.positions, prompt, self.fn_mask, roles)
        if r.sampling.penalized:
            seq.pen_row = self.pens.join(prompt)
        seq.kv = KVBuffer(n + seq.max_new)  # each layer's part shaped like the keys and values it produces
        positions = torch.arange(n, device=self.device)
        req = torch.zeros(n, dtype=torch.long, device=self.device)  # (n,) every token is this request's
        steer = self._set_steering(ids, positions, [seq], req)
        if fr is not None:  # every prompt position, or only the one that predicts the first token
            self.readout.plan([(0, fr, list(range(n)) if fr.prompt else [n - 1])])
        self._plan_capture([(seq, slice(0, n))] if r.capture is not None else [])
        if r.readout is not None:  # every prompt position, or only the one that predicts the first token
            seq.groups = self.probe_sets.groups(r.readout.probes)
            first = 0 if r.readout.prompt else n - 1
            self.reads = plan_series([(seq, first, list(range(first, n)))], self.device)
        else:
            self.reads = {}
        scoring = r.prompt_logprobs is not None
        tap = HiddenTap(self.model) if scoring else contextlib.nullcontext()  # the head then computes 1 row
        with self._hooks(steer), tap:
            out = self.model(
                input_ids=ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=0 if scoring else 1,  # every position's hidden state only for prompt scoring
                **self.ragged.forward_kwargs([seq.kv]),
            )
        seq.kv.length = n
        if steer:
            self._count_applied([seq], req)
        self.stats["prefills"] += 1
        logits = out.logits[0]  # (1, vocab)
        if scoring:
            seq.pending["prompt_logprobs"] = [None, *prompt_logprobs(self.model, tap.hidden, ids, r.prompt_logprobs)]
        feats = self.readout.take().get(0, []) if fr is not None else []
        if fr is not None and fr.prompt:
            seq.pending["prompt_features"] = [entry(prompt[p], p, feats[p], fr) for p in range(n)]
        if seq.max_new == 0:  # prompt scoring only
            self._finish(seq, "length")
            return
        self._next_tokens([seq], logits[-1:], [n - 1], {0: feats[-1:]})

    def _decode(self) -> None:
        rows = list(self.running)
        b = len(rows)
        r = -(-b // self.row_multiple) * self.row_multiple  # filler rows: token 0 at position 0, slot 0, no buffer
        fill = [0] * (r - b)
        ids = torch.tensor([s.out_ids[-1] for s in rows] + fill, dtype=torch.long, device=self.device)  # (r,)
        at = [s.kv.length for s in rows]
        positions = torch.tensor(at + fill, dtype=torch.long, device=self.device)  # (r,)
        req = torch.arange(r, device=self.device).clamp_(max=b)  # filler rows point at the slot-0 entry b
        steer = self._set_steering(ids, positions, rows, req)
        wants = [(i, s.req.features, [i]) for i, s in enumerate(rows) if s.req.features is not None]
        if wants:
            self.readout.plan(wants)
        self._plan_capture([(s, slice(i, i + 1)) for i, s in enumerate(rows) if s.req.capture is not None])
        reading = [(s, i, [at[i]]) for i, s in enumerate(rows) if s.req.readout is not None]
        self.reads = plan_series(reading, self.device) if reading else {}
        with self._hooks(steer):
            out = self.model(
                input_ids=ids[:, None],
                position_ids=positions[:, None],
                use_cache=False,
                **self.ragged.forward_kwargs([s.kv for s in rows] + [None] * (r - b)),
            )
        for s in rows:
            s.kv.length += 1
        if steer:
            self._count_applied(rows, req)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += b
        self._next_tokens(rows, out.logits[:b, -1], at, self.readout.take() if wants else {})  # logits (b, vocab)

    def _next_tokens(self, seqs: list[Seq], logits: torch.Tensor, at: list[int], feats: dict) -> None:
        """Sample each request's next token from its row of `logits` (b, vocab); with the log-probabilities and the
        features it asked for (`feats`: request index -> [per-layer lists read at position `at[i]`]), hand it on."""
        tokens = self._sample(logits, seqs)  # (b,)
        lps: dict[int, TokenLogprob] = {}
        want = [i for i, s in enumerate(seqs) if s.req.logprobs is not None]
        if want:
            idx = torch.tensor(want, device=logits.device)
            got = sampling.token_logprobs(logits[idx], tokens[idx], [seqs[i].req.logprobs for i in want])
            lps = dict(zip(want, got, strict=True))
        for i, (s, token) in enumerate(zip(seqs, tokens.tolist(), strict=True)):
            fr = s.req.features
            feat = entry(token, at[i], feats[i][0], fr) if fr is not None else None
            hit = self._monitor_hit(s) if s.req.stop_when is not None else False
            self._advance(s, token, (lps.get(i), feat) if (i in lps or fr is not None) else None, hit)

    def _monitor_hit(self, seq: Seq) -> bool:
        """Whether the request's `stop_when` (action "stop") triggers at the token just sampled: its series, read at
        the position that predicted it, held for `tokens` positions in a row (one host read per such request)."""
        stop = seq.req.stop_when
        if stop.action != "stop":
            return False
        seq.monitor_run = seq.monitor_run + 1 if stop.holds(latest_value(seq.read_out, stop.series)) else 0
        return seq.monitor_run >= stop.tokens

    def _set_steering(self, ids, positions, seqs: list[Seq], req: torch.Tensor) -> bool:
        """Write this forward's per-token slots into the steering table. Whether any token of the forward is
        steered (then `_count_applied` counts, after the forward, where the edits acted)."""
        if self.table is None or not any(s.slot for s in seqs):
            return False
        per_req = lambda attr: torch.tensor([getattr(s, attr) for s in seqs] + [0], device=self.device)  # noqa: E731
        step = StepIndex(
            input_ids=ids,
            positions=positions,
            req=req,
            slot=per_req("slot"),
            policy=per_req("policy"),
            prompt_len=torch.tensor([len(s.req.prompt_ids) for s in seqs] + [0], device=self.device),
            last_fn=per_req("last_fn"),
            narrow=self._narrowings(seqs),
        )
        slots = build_slot_index(step, self.fn_mask)  # (tokens,)
        self.table.set_slot_index(slots)
        return bool(slots.any())  # one device sync a step

    def _count_applied(self, seqs: list[Seq], req: torch.Tensor) -> None:
        """After a steered forward: add to each request the positions where some edit acted (the table's `applied`:
        selected with an unconditional edit, or where a conditional edit's condition held at some layer)."""
        counts = torch.zeros(len(seqs) + 1, dtype=torch.long, device=self.device)  # (requests + 1,)
        counts.index_add_(0, req, self.table.applied[: req.shape[0]].long())
        for s, c in zip(seqs, counts.tolist(), strict=False):  # the last entry counts filler rows (always 0)
            s.steered += c

    def _narrowings(self, seqs: list[Seq]):
        """The stacked narrowings of these rows (and the filler entry), kept while the rows stay the same."""
        rows, stacked = self._narrowed
        if len(rows) != len(seqs) or any(a is not b for a, b in zip(rows, seqs, strict=False)):
            stacked = stack_narrowings([s.narrow for s in seqs] + [None], self.device)
            self._narrowed = (tuple(seqs), stacked)
        return stacked

    def _sample(self, logits: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
        """(b, vocab) logits -> (b,) tokens, on the device (no host copy here)."""
        params = [s.req.sampling for s in seqs]
        if all(p.greedy and not p.penalized and not p.min_tokens for p in params):
            return logits.argmax(-1)
        return sampling.sample(
            logits,
            params,
            [s.generator for s in seqs],
            [len(s.out_ids) for s in seqs],
            [s.pen_row for s in seqs],
            [s.stops for s in seqs],
            self.pens,
        )

    def _advance(self, seq: Seq, token: int, extra=None, monitor_hit: bool = False) -> None:
        seq.out_ids.append(token)
        p = seq.req.sampling
        if token in seq.stops:  # its text only with include_stop_str_in_output (vLLM's rule)
            text = seq.text.push(token, check_stop=False) if p.include_stop_str_in_output else ""
            self._finish(seq, "stop", [token], text, extra=extra)
            return
        text = seq.text.push(token, check_stop=len(seq.out_ids) > p.min_tokens)
        if seq.text.stopped or monitor_hit:
            self._finish(seq, "stop", [token], text, extra=extra)
        elif len(seq.out_ids) >= seq.max_new:
            self._finish(seq, "length", [token], text, extra=extra)
        else:
            seq.emit(seq.delta(text, [token], extra=extra))

    def _finish(self, seq: Seq, reason: str, ids=(), text: str = "", error: str | None = None, extra=None) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        else:
            return  # already finished
        if self.table is not None and seq.slot:
            self.table.release(seq.req.steering)
            for layer in seq.req.steering.layers:
                self._live[layer] -= 1
        self.pens.leave(seq.pen_row)
        seq.pen_row = -1
        seq.kv = None
        d = seq.delta(text + seq.text.flush(), list(ids), reason, error, extra)
        if seq.req.capture is not None and reason in ("stop", "length"):
            d.capture = self._capture_blob(seq)
        seq.captured = {}
        if seq.req.readout is not None and reason in ("stop", "length"):
            d.readout = self._readout(seq)
        seq.read_out = []
        seq.emit(d)

    def _readout(self, seq: Seq) -> dict:
        """The request's series: {"positions", "token_ids", "values": [[a float per series] per position]}."""
        positions, values = series_values(seq.read_out, len(seq.req.readout.probes))
        ids = seq.req.prompt_ids + seq.out_ids
        return {"positions": positions, "token_ids": [ids[p] for p in positions], "values": values.tolist()}

    def _capture_blob(self, seq: Seq) -> bytes:
        """The request's capture: the rows its forwards copied out, at the positions it asked for."""
        c = seq.req.capture
        hooks = {layer: op.hook.canonical().name for layer, op in self.table.layers.items()}  # as hook_layers
        forwarded = len(seq.req.prompt_ids) + max(len(seq.out_ids) - 1, 0)  # the last token is never fed back
        token_ids = torch.tensor((seq.req.prompt_ids + seq.out_ids)[:forwarded], dtype=torch.long)  # (forwarded,)
        if c.positions == "last":  # the hooks kept only the latest row
            rows, pick = torch.tensor([forwarded - 1]), slice(None)
        else:
            rows = select_rows(c, token_ids, self.fn_mask)
            pick = rows
        tensors = {hooks[layer]: torch.cat(seq.captured[layer])[pick] for layer in c.layers}  # (rows, d_model)
        return encode_capture(tensors, rows, token_ids[rows], c.dtype)
