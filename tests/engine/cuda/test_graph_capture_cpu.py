"""Capture inside full decode graphs, the parts that need no GPU, run for real on CPU tensors with fakes:

- the fused kernel's torch reference (``cuda/decode_reference.py``) against a naive per-element loop;
- the static buffer layout, the request slots and the per-step row table (``graph_buffers``);
- the result ring's bookkeeping with a fake device whose copies complete when the test says
  (``result_ring``): non-blocking drains, waits only when full or for a finishing request, the GPU-side wait;
- a whole decode cycle (``graph_capture``): plan -> row table upload -> kernel (its reference) -> ring ->
  request buffers, over several steps with requests joining and leaving, compared with the eager torch path;
- the per-step graph decision and the dispatch rewrite (``graph_dispatch``), on MRv2- and V1-shaped signatures,
  and through the runner hooks of a stand-in MRv2 runner.

The kernel itself is compared with the reference on a GPU in tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_attncap.engine.cuda.decode_reference import (
    F_FLAGS,
    F_WEIGHT,
    FLAG_ROWS,
    FLAG_STATS,
    ROW_FIELDS,
    decode_capture_reference,
)
from vllm_attncap.engine.cuda.graph_buffers import BufferLayout, DecodeBuffers, GraphRow, SlotTable, fill_row_table, graph_kind
from vllm_attncap.engine.cuda.graph_dispatch import StepGraphPolicy, force_non_uniform, wrap_dispatch
from vllm_attncap.engine.cuda.result_ring import ResultRing
from vllm_attncap.spec import CaptureSpec
from decode_online_state import add_key, combine  # noqa: E402  (beside this file: the kernel's online state)
from store_utils import private_store  # noqa: E402

# --------------------------------------------------------------------------- reference vs a naive loop


def _paged(num_blocks, bs, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, bs, hkv, d), generator=g)


def _naive(q, kc, bt_row, pos, h, scale, softcap, window, alibi, sinks):
    """p[j] for query head h, by the definition (python floats)."""
    bs = kc.shape[1]
    group = q.shape[0] // kc.shape[2]
    logits = []
    for j in range(pos + 1):
        k = kc[int(bt_row[j // bs]), j % bs, h // group]
        x = float((q[h] * k).sum()) * scale
        if softcap:
            x = softcap * math.tanh(x / softcap)
        if alibi is not None:
            x += float(alibi[h]) * (j - pos)
        if window > 0 and j <= pos - window:
            x = -math.inf
        logits.append(x)
    m = max(logits + ([float(sinks[h])] if sinks is not None else []))
    e = [math.exp(x - m) if x > -math.inf else 0.0 for x in logits]
    z = sum(e) + (math.exp(float(sinks[h]) - m) if sinks is not None else 0.0)
    return [x / z for x in e]


@pytest.mark.parametrize("window,softcap,extras", [(-1, 0.0, False), (6, 20.0, True)])
def test_decode_reference_matches_naive_loop(window, softcap, extras):
    g = torch.Generator().manual_seed(3)
    H, Hkv, D, bs, L = 4, 2, 8, 4, 3
    kc = _paged(40, bs, Hkv, D, 1)
    n_rows = 4
    q = torch.randn((n_rows + 2, H, D), generator=g)
    bt = torch.stack([torch.randperm(40, generator=g)[:8] for _ in range(n_rows)]).to(torch.int32)
    seq = torch.tensor([9, 17, 13, 5], dtype=torch.int32)
    alibi = torch.rand(H, generator=g) * 0.3 if extras else None
    sinks = torch.randn(H, generator=g) if extras else None
    table = torch.zeros((n_rows, ROW_FIELDS), dtype=torch.int32)
    layer_mask = torch.zeros((3, L), dtype=torch.uint8)
    head_mask = torch.zeros((3, H), dtype=torch.uint8)
    sal = torch.zeros((3, 32), dtype=torch.uint8)
    # row 0: stats (slot 1, history 7, sink 1, salient {2, 5}); row 1: rows (slot 2, heads {0, 3}, weight 0.5);
    # row 2: stats but not this layer; row 3: off
    table[0, :4] = torch.tensor([FLAG_STATS, 1, 7, 1])
    layer_mask[1, 1] = 1
    sal[1, [2, 5]] = 1
    table[1, :2] = torch.tensor([FLAG_ROWS, 2])
    table[1, 4] = 1  # first layer: assigns
    table[1, F_WEIGHT] = int(np.float32(0.5).view(np.int32))
    table[1, 6] = 2
    layer_mask[2, 1] = 1
    head_mask[2, [0, 3]] = 1
    table[2, :4] = torch.tensor([FLAG_STATS, 0, 5, 0])  # slot 0 captures layer 0 only
    layer_mask[0, 0] = 1
    stats = torch.full((n_rows, L, H, 2), -7.0)
    rows = torch.full((n_rows, 32), -7.0)
    scale = D**-0.5
    decode_capture_reference(q, kc, bt, seq, table, layer_mask, head_mask, sal, layer=1, n_rows=n_rows,
                             scale=scale, softcap=softcap, window=window, alibi_slopes=alibi, sinks=sinks,
                             stats=stats, rows=rows)
    for h in range(H):
        p = _naive(q[0], kc, bt[0], 8, h, scale, softcap, window, alibi, sinks)
        block = p[1:7]
        mass = sum(block)
        pn = [x / mass for x in block]
        ent = -sum(x * math.log(x) for x in pn if x > 0)
        cov = pn[2 - 1] + pn[5 - 1]
        assert stats[0, 1, h, 0].item() == pytest.approx(cov, rel=1e-4, abs=1e-6)
        assert stats[0, 1, h, 1].item() == pytest.approx(ent, rel=1e-4, abs=1e-6)
    mean = [0.5 * (a + b) / 2 for a, b in zip(_naive(q[1], kc, bt[1], 16, 0, scale, softcap, window, alibi, sinks),
                                           _naive(q[1], kc, bt[1], 16, 3, scale, softcap, window, alibi, sinks))]
    np.testing.assert_allclose(rows[1, :17].numpy(), mean, rtol=1e-4, atol=1e-7)
    assert (rows[1, 17:] == -7).all()  # right of the query: untouched
    assert (stats[2] == -7).all() and (stats[3] == -7).all() and (rows[0] == -7).all()  # other layer / off
    assert (stats[0, [0, 2]] == -7).all()  # only this layer's slice


# --------------------------------------------------------------------------- layout, slots, row table


def test_graph_kind_decides_what_runs_in_the_graph():
    assert graph_kind(CaptureSpec(mode="stats"), 30) == "stats"
    assert graph_kind(CaptureSpec(mode="stats", layers=[3], heads=[1]), 30) == "stats"
    assert graph_kind(CaptureSpec(mode="stats", n_max=10), 30) is None  # elision: eager
    assert graph_kind(CaptureSpec(mode="stats", reduce="head_mean"), 30) is None
    assert graph_kind(CaptureSpec(layers=[-1], reduce="head_mean"), 30) == "rows"
    assert graph_kind(CaptureSpec(layers=[0, 1], reduce="head_mean"), 30) is None
    assert graph_kind(CaptureSpec(reduce="head_mean"), 1) == "rows"
    assert graph_kind(CaptureSpec(reduce="layer_head_mean"), 30) == "rows"
    assert graph_kind(CaptureSpec(), 30) is None  # full rows: PIECEWISE


def test_layout_shapes_and_bytes():
    lay = BufferLayout(max_rows=16, num_layers=30, num_heads=9, num_kv_heads=3, width=2048, n_splits=4)
    sh = lay.shapes()
    assert sh["stats"] == ((16, 30, 9, 2), torch.float32)
    assert sh["rows"] == ((16, 2048), torch.float32)
    assert sh["row_table"] == ((16, ROW_FIELDS), torch.int32)
    assert sh["counters"] == ((16, 3), torch.int32)
    expected = 16 * 8 * 4 + 32 * 30 + 32 * 9 + 32 * 2048 + 16 * 30 * 9 * 2 * 4 + 16 * 2048 * 4 + 16 * 9 * 4 * 4 * 4 + 16 * 3 * 4
    assert lay.nbytes() == expected
    bufs = DecodeBuffers(lay, lambda s, d: torch.zeros(s, dtype=d))
    assert bufs.stats.shape == (16, 30, 9, 2) and bufs.stats[:3].is_contiguous()
    with pytest.raises(ValueError, match="not a multiple of 2 KV heads"):
        BufferLayout(max_rows=1, num_layers=1, num_heads=9, num_kv_heads=2, width=8)
    with pytest.raises(ValueError, match="max_rows"):
        BufferLayout(max_rows=0, num_layers=1, num_heads=2, num_kv_heads=1, width=8)


def _rc(req_id, spec, prompt=10, num_layers=4, num_heads=4):
    from vllm_attncap.spec import resolve_spec

    r = resolve_spec(spec, num_layers=num_layers, num_heads=num_heads, prompt_len=prompt, max_tokens=8)
    layers = r.layers
    slot = {l: (0 if r.spec.reduce == "layer_head_mean" else i) for i, l in enumerate(layers)}
    return SimpleNamespace(req_id=req_id, resolved=r, spec=r.spec, first_layer=min(layers), last_layer=max(layers),
                           layer_slot=slot)


def test_slot_table_assigns_once_and_recycles():
    lay = BufferLayout(max_rows=2, num_layers=4, num_heads=4, num_kv_heads=2, width=16, slots=2)
    assert BufferLayout(max_rows=2, num_layers=4, num_heads=4, num_kv_heads=2, width=16).n_slots == 4
    st = SlotTable(lay)
    a = _rc("a", {"mode": "stats", "layers": [1, 3], "salient": [2, 9]})
    b = _rc("b", {"layers": [-1], "heads": [0, 2], "reduce": "head_mean"})
    sa, masks = st.assign(a)
    lm, hm, sm = masks
    assert lm.tolist() == [0, 1, 0, 1] and hm.tolist() == [1, 1, 1, 1] and np.nonzero(sm)[0].tolist() == [2, 9]
    assert st.assign(a) == (sa, None)  # known: no upload
    sb, (lm, hm, sm) = st.assign(b)
    assert sb != sa and lm.tolist() == [0, 0, 0, 1] and hm.tolist() == [1, 0, 1, 0] and sm is None
    assert st.assign(_rc("c", {"mode": "stats"})) == (None, None)  # full: the caller captures eagerly
    st.release("a")
    sc, masks = st.assign(_rc("c", {"mode": "stats"}))
    assert sc == sa and masks is not None and len(st) == 2


def test_fill_row_table_turns_every_other_row_off():
    table = np.full((5, ROW_FIELDS), 99, dtype=np.int32)
    a = _rc("a", {"mode": "stats", "history_len": 6, "sink": 2})
    b = _rc("b", {"layers": [1, 2], "heads": [0, 1, 3], "reduce": "layer_head_mean"})
    fill_row_table(table, [GraphRow(3, a, "stats", 0, 11, 1), GraphRow(0, b, "rows", 4, 15, 0)])
    assert table[3].tolist()[:4] == [FLAG_STATS, 1, 6, 2]
    assert table[0, F_FLAGS] == FLAG_ROWS and table[0, 4] == 1 and table[0, 6] == 3
    assert table[0:1, F_WEIGHT].view(np.float32)[0] == np.float32(0.5)
    assert (table[[1, 2, 4]] == 0).all()


# --------------------------------------------------------------------------- the result ring


class _FakeOps:
    """A device whose copies complete only when ``complete()`` is called (or the host waits).

    A copy reads its source in device order: when the compute stream is made to wait for it (``gpu_wait``, which
    must happen before the next step's kernels overwrite the static buffers) or when it completes, whichever
    comes first; :meth:`unread` counts copies that have not read their source yet.
    """

    def __init__(self):
        self.events = []
        self.gpu_waits = []
        self.host_waits = 0

    def host_buffer(self, nbytes):
        return torch.zeros(nbytes, dtype=torch.uint8)

    def copy(self, pairs):
        ev = {"done": False, "pairs": pairs, "data": None}
        self.events.append(ev)
        return ev

    def _read(self, ev):
        if ev["data"] is None:
            ev["data"] = [src.clone() for src, _ in ev["pairs"]]

    def _run(self, ev):
        if not ev["done"]:
            self._read(ev)
            for data, (_, dst) in zip(ev["data"], ev["pairs"]):
                dst.copy_(data)
            ev["done"] = True

    def _pos(self, ev):
        return next(i for i, e in enumerate(self.events) if e is ev)

    def unread(self):
        return sum(ev["data"] is None for ev in self.events)

    def complete(self, n=None):
        for ev in self.events[:n]:
            self._run(ev)

    def done(self, ev):
        return ev["done"]

    def wait(self, ev):
        self.host_waits += 1
        for e in self.events[: self._pos(ev) + 1]:  # one copy stream: in order
            self._run(e)

    def gpu_wait(self, ev):
        self.gpu_waits.append(ev)
        for e in self.events[: self._pos(ev) + 1]:
            self._read(e)


def _row(req, b=0):
    return GraphRow(b, SimpleNamespace(req_id=req), "stats", 0, 1, 0)


def test_ring_drains_without_waiting_and_waits_only_when_it_must():
    ops = _FakeOps()
    written = []
    ring = ResultRing(ops, 3, 64, write=lambda rows, views: written.append((rows[0].rc.req_id, views["x"].clone())))
    src = torch.arange(4, dtype=torch.float32)
    ring.submit([_row("a")], {"x": src * 1})
    ring.submit([_row("b")], {"x": src * 2})
    assert ring.in_flight == 2 and ring.drain() == 0 and not written  # nothing finished: nothing written, no wait
    ring.before_next_step()
    assert ops.gpu_waits == [ops.events[1]]  # the next step waits for the last copy on the GPU, not the host
    ops.complete(1)
    assert ring.drain() == 1 and [w[0] for w in written] == ["a"]
    assert written[0][1].tolist() == [0, 1, 2, 3]
    ring.submit([_row("c")], {"x": src * 3})
    ring.submit([_row("d")], {"x": src * 4})  # 3 slots: b, c, d in flight
    assert ops.host_waits == 0 and ring.blocking_waits == 0
    ring.submit([_row("e")], {"x": src * 5})  # full: waits for the oldest (b)
    assert ring.blocking_waits == 1 and [w[0] for w in written] == ["a", "b"]
    # a finishing request waits for its own slot (and the ones before it), not for later ones
    ring.drain(block_for={"c"})
    assert [w[0] for w in written] == ["a", "b", "c"] and ring.in_flight == 2
    assert ring.pending_requests() == {"d", "e"}
    ring.drain(block_for={"zzz"})  # nothing of it in flight: no wait
    assert ring.blocking_waits == 2
    with pytest.raises(ValueError, match="slot size"):
        ring.submit([_row("f")], {"x": torch.zeros(100)})
    with pytest.raises(ValueError, match="n_slots"):
        ResultRing(ops, 1, 8)


# --------------------------------------------------------------------------- a whole decode cycle on CPU


class _CpuUploader:
    def __init__(self):
        self.calls = 0

    def upload(self, pairs):
        from vllm_attncap.engine.cuda.pinned import Uploader

        self.calls += 1
        self.inner = getattr(self, "inner", None) or Uploader(torch.device("cpu"), 1 << 16)
        self.inner.upload(pairs)


def test_decode_cycle_matches_the_eager_torch_path(monkeypatch, tmp_path):
    """Steps of a fake MRv2 batch through GraphCapture (kernel = its reference, ring = fake device) give the same
    request buffers as the eager torch path, with requests joining, leaving and reordering between steps."""
    from vllm_attncap.engine import runner_hooks
    from vllm_attncap.engine.capture import capture_layer
    from vllm_attncap.engine.reference import gather_paged_keys
    from vllm_attncap.engine.cuda.graph_step import GraphCapture
    from vllm_attncap.engine.plan import build_step_plan
    from vllm_attncap.engine.tracker import CaptureTracker, ModelShape

    L, H, Hkv, D, bs, W = 3, 4, 2, 16, 4, 64
    specs = {"s": {"mode": "stats", "sink": 1, "salient": [0, 2, 3], "layers": [0, 2], "heads": [3, 1]},
             "r": {"layers": [-1], "reduce": "head_mean", "heads": [0, 2]},
             "m": {"reduce": "layer_head_mean"},
             "f": {"layers": [1]}}  # full rows: not in the graph (eager path)
    prompts = {"s": 6, "r": 9, "m": 5, "f": 7}
    g = torch.Generator().manual_seed(0)
    kv0 = [torch.randn((48, bs, Hkv, D), generator=g) for _ in range(L)]
    perm = torch.randperm(48, generator=g).to(torch.int32)
    reqs = list(prompts)
    table = torch.stack([perm[i * 8:(i + 1) * 8] for i in range(len(reqs))])
    steps = [["s", "r", "m", "f"], ["r", "s", "f", "m"], ["m", "s"], ["s", "m", "r"], ["r"]]  # decode steps
    computed = dict(prompts)
    impl = SimpleNamespace(scale=D**-0.5, logits_soft_cap=0.0, alibi_slopes=None, sinks=None)

    def run(graph_path: bool):
        private_store(monkeypatch, tmp_path / ("graph" if graph_path else "eager"))  # same request ids, own store
        tracker = CaptureTracker()
        tracker.set_model_shape(ModelShape(L, H, Hkv, D, W))
        params = {rid: SimpleNamespace(extra_args={"attncap": specs[rid]}, max_tokens=8) for rid in reqs}
        rs = SimpleNamespace(prompt_len=SimpleNamespace(np=np.array([prompts[r] for r in reqs], dtype=np.int32)))
        lay = BufferLayout(max_rows=6, num_layers=L, num_heads=H, num_kv_heads=Hkv, width=W, n_splits=2)
        ops = _FakeOps()
        gc = GraphCapture(lay, lambda s, d: torch.zeros(s, dtype=d), _CpuUploader(),
                          lambda nbytes: ResultRing(ops, 2, nbytes))
        done = dict(computed)
        gq = torch.Generator().manual_seed(1)
        gk = torch.Generator().manual_seed(2)
        kv = [k.clone() for k in kv0]
        for i, rids in enumerate(steps):
            batch = SimpleNamespace(req_ids=list(rids), idx_mapping_np=np.array([reqs.index(r) for r in rids]),
                                    num_reqs=len(rids))
            view = runner_hooks.MRv2StepView.__new__(runner_hooks.MRv2StepView)
            view.runner, view.input_batch, view.req_states, view.params = None, batch, rs, params
            seq = [done[r] + 1 for r in rids]
            npad = len(rids) + 1  # a padded batch, as FULL graphs run it
            cm = SimpleNamespace(num_reqs=npad, query_start_loc_cpu=torch.arange(npad + 1, dtype=torch.int32),
                                 seq_lens=torch.tensor(seq + [0], dtype=torch.int32),
                                 seq_lens_cpu_upper_bound=torch.tensor(seq + [0], dtype=torch.int32),
                                 block_table_tensor=torch.cat([table[[reqs.index(r) for r in rids]],
                                                               torch.zeros((1, 8), dtype=torch.int32)]))
            for rid, s in zip(rids, seq):  # this step's key
                for k in kv:
                    k[int(table[reqs.index(rid), (s - 1) // bs]), (s - 1) % bs] = torch.randn((Hkv, D), generator=gk)
            queries = [torch.randn((npad, H, D), generator=gq) for _ in range(L)]
            plan = build_step_plan(view, cm, tracker)
            if graph_path:
                plan = gc.begin_step(plan, uniform_decode=True)
                assert ops.unread() == 0  # the previous step's copy is ordered before this step's kernels
                b = gc.buffers
                for layer in range(L):  # what every layer's kernel does
                    decode_capture_reference(queries[layer], kv[layer], cm.block_table_tensor, cm.seq_lens,
                                             b.row_table, b.layer_mask, b.head_mask, b.salient_mask, layer=layer,
                                             n_rows=npad, scale=impl.scale, stats=b.stats, rows=b.rows)
            if plan is not None:
                for layer in range(L):
                    if plan.wants(layer):
                        capture_layer(impl, layer, queries[layer],
                                      lambda bb: gather_paged_keys(kv[layer], bb.block_table_row, bb.ctx_len), plan)
            if graph_path:
                gc.end_step()
                if i == 1:
                    ops.complete()  # copies of steps 0-1 land; later ones stay in flight until the end
            for r in rids:
                done[r] += 1
        if graph_path:
            assert gc.graph_steps == len(steps) and gc.uploader.calls >= len(steps)
            gc.finish(["s"])  # a finishing request: its slots are written first
            gc.flush()
        out = {rid: np.array(rc.writer.array) for rid, rc in tracker.active.items()}
        tracker.close_all()
        return out

    eager = run(False)
    graph = run(True)
    assert set(eager) == set(graph) == set(reqs)
    for rid in reqs:
        np.testing.assert_allclose(graph[rid], eager[rid], rtol=1e-4, atol=1e-6, err_msg=rid, equal_nan=True)
        assert np.isfinite(eager[rid]).any()


# --------------------------------------------------------------------------- the per-step graph decision


def test_policy_forces_piecewise_only_for_what_the_graph_cannot_hold():
    pol = StepGraphPolicy()
    pol.num_layers, pol.in_graph = 30, True
    specs = {"a": {"mode": "stats"}, "b": {"layers": [-1], "reduce": "head_mean"}, "c": {}, "d": None,
             "bad": {"reduce": "max"}}
    of = specs.get
    assert not pol.decide(["a", "b", "d"], of)  # all in the graph
    assert pol.decide(["a", "c"], of) and pol.force  # full rows: PIECEWISE
    assert not pol.decide(["bad", "d"], of) and not pol.force  # refused spec: runs without capture, in the graph
    assert not pol.decide([], of)
    pol.in_graph = False
    assert pol.decide(["a"], of) and not pol.decide(["d"], of)
    pol.graphs = False  # CPU: no graphs to leave
    assert not pol.decide(["a", "c"], of) and not pol.force
    pol.forget(["a"])
    assert "a" not in pol._kinds


def test_dispatch_rewrite_for_mrv2_and_v1_signatures():
    class MRv2Manager:  # vLLM MRv2 CudaGraphManager.dispatch shape
        def dispatch(self, num_reqs, num_tokens, uniform_token_count, num_active_loras, max_query_len=None):
            return ("FULL" if uniform_token_count == 1 else "PIECEWISE", num_reqs, num_tokens)

    class V1Dispatcher:  # vLLM V1 CudagraphDispatcher.dispatch shape
        def dispatch(self, num_tokens, uniform_decode=False, has_lora=False):
            return "FULL" if uniform_decode else "PIECEWISE"

    class Other:
        def dispatch(self, n):
            return "FULL"

    pol = StepGraphPolicy()
    MRv2Manager.dispatch = wrap_dispatch(MRv2Manager.dispatch, pol)
    V1Dispatcher.dispatch = wrap_dispatch(V1Dispatcher.dispatch, pol)
    Other.dispatch = wrap_dispatch(Other.dispatch, pol)
    m, v, o = MRv2Manager(), V1Dispatcher(), Other()
    assert m.dispatch(4, 4, 1, 0) == ("FULL", 4, 4) and v.dispatch(8, uniform_decode=True) == "FULL"
    pol.force = True
    assert m.dispatch(4, 4, 1, 0, max_query_len=1) == ("PIECEWISE", 4, 4)
    assert m.dispatch(4, num_tokens=4, uniform_token_count=1, num_active_loras=0) == ("PIECEWISE", 4, 4)
    assert v.dispatch(8, True) == "PIECEWISE" and v.dispatch(8, uniform_decode=True, has_lora=True) == "PIECEWISE"
    assert o.dispatch(3) == "FULL"  # nothing to rewrite: unchanged (and a warning)
    assert pol.forced_steps == 4
    import inspect

    assert force_non_uniform(inspect.signature(V1Dispatcher.dispatch.__wrapped__), (v,), {"bogus": 1}) is None


def test_mrv2_hooks_decide_the_step_before_dispatch(monkeypatch, tmp_path):
    """execute_model of a stand-in MRv2 runner sets the decision from the scheduled requests (new ones included)
    before its dispatch runs, and forgets finished requests."""
    private_store(monkeypatch, tmp_path)
    from vllm_attncap.engine import runner_hooks
    from vllm_attncap.engine.cuda import graph_dispatch
    from vllm_attncap.engine.tracker import CaptureTracker

    monkeypatch.setattr(runner_hooks, "get_tracker", lambda t=CaptureTracker(): t)
    pol = StepGraphPolicy()
    pol.num_layers, pol.in_graph = 4, True
    runner_hooks.on_schedule(pol.decide)  # what graph_dispatch.install does for the process policy
    runner_hooks.on_finish(pol.forget)
    seen = []

    class Manager:
        def dispatch(self, num_reqs, num_tokens, uniform_token_count, num_active_loras):
            return "FULL" if uniform_token_count == 1 else "PIECEWISE"

    Manager.dispatch = wrap_dispatch(Manager.dispatch, pol)
    finished_seen = []
    runner_hooks.on_finish(finished_seen.append)

    class Runner:
        def __init__(self):
            self.req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.zeros(4, dtype=np.int32)))
            self.mgr = Manager()

        def add_requests(self, so):
            pass

        def finish_requests(self, so):
            pass

        def prepare_inputs(self, so):
            return SimpleNamespace(req_ids=list(so.num_scheduled_tokens), idx_mapping_np=np.zeros(4, dtype=np.int32))

        def execute_model(self, so):
            self.finish_requests(so)
            self.add_requests(so)
            seen.append(self.mgr.dispatch(len(so.num_scheduled_tokens), len(so.num_scheduled_tokens), 1, 0))
            self.prepare_inputs(so)

    runner_hooks.install_mrv2(Runner)
    try:
        r = Runner()

        def so(new=(), sched=(), finished=()):
            return SimpleNamespace(
                scheduled_new_reqs=[SimpleNamespace(req_id=rid, prompt_token_ids=[1, 2],
                                                    sampling_params=SimpleNamespace(extra_args={"attncap": sp}))
                                    for rid, sp in new],
                num_scheduled_tokens={rid: 1 for rid in sched}, finished_req_ids=set(finished),
                preempted_req_ids=set())

        r.execute_model(so(new=[("a", {"mode": "stats"})], sched=["a"]))
        r.execute_model(so(new=[("b", {})], sched=["a", "b"]))  # b asks for full rows: PIECEWISE
        r.execute_model(so(sched=["a", "b"]))
        r.execute_model(so(sched=["a"], finished=["b"]))
        assert seen == ["FULL", "PIECEWISE", "PIECEWISE", "FULL"]
        assert finished_seen == [{"b"}] and "b" not in pol._kinds
        assert graph_dispatch.policy is not pol  # the process policy was not touched
    finally:
        runner_hooks._ON_FINISH.remove(finished_seen.append)
        runner_hooks._ON_FINISH.remove(pol.forget)
        runner_hooks._ON_SCHEDULE.remove(pol.decide)


# --------------------------------------------------------------------------- the kernel's online-state algebra


@pytest.mark.parametrize("seed", range(5))
def test_online_statistics_algebra_equals_the_direct_formula(seed):
    """The fused kernel's statistics algorithm (online (max, S, V, C) per warp, combined across warps and splits in
    any order; entropy = ln S - V/S, coverage = C/S), ported line by line, equals history_stats on the same logits.
    The kernel itself is compared with the reference on a GPU (tests/gpu/test_decode_kernel.py)."""
    from vllm_attncap.engine.reference import history_stats

    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    x = rng.normal(scale=rng.uniform(0.5, 8), size=n)
    sal = rng.random(n) < 0.2
    empty = (-math.inf, 0.0, 0.0, 0.0)
    splits = int(rng.integers(1, 6))
    per = -(-n // splits)
    parts = []
    for s0 in range(0, splits * per, per):
        warps = [empty] * 4
        for j in range(s0, min(n, s0 + per)):
            w = (j - s0) % 4
            warps[w] = add_key(warps[w], x[j], sal[j])
        tot = empty
        for w in warps:
            tot = combine(tot, w)
        parts.append(tot)
    rng.shuffle(parts)
    tot = empty
    for p in parts:
        tot = combine(tot, p)
    ent = math.log(tot[1]) - tot[2] / tot[1]
    cov = tot[3] / tot[1]
    probs = torch.softmax(torch.tensor(x), dim=0)[None]
    ref_cov, ref_ent = history_stats(probs, n, 0, torch.tensor(np.nonzero(sal)[0]))
    assert ent == pytest.approx(float(ref_ent[0]), rel=1e-5, abs=1e-6)  # the reference works in float32
    assert cov == pytest.approx(float(ref_cov[0]), rel=1e-5, abs=1e-7)


def test_results_reach_the_buffers_before_the_step_output_leaves(monkeypatch):
    """sample_tokens' output: a plain one flushes at once; an asynchronous one when vLLM fetches it, and only the
    results submitted before it (a later step's copy is not waited for)."""
    from vllm_attncap.engine import runner_hooks

    ops = _FakeOps()
    written = []
    ring = ResultRing(ops, 4, 64, write=lambda rows, views: written.append(rows[0].rc.req_id))
    calls = []

    def mark():
        m = ring.submitted
        return lambda: (calls.append(m), ring.drain_through(m))

    class Out:
        def __init__(self):
            self.fetched = False

        def get_output(self):
            self.fetched = True
            return "output"

    class Runner:
        def sample_tokens(self, grammar_output, async_out=True):
            return Out() if async_out else "plain"

    runner_hooks._install_sample_tokens(Runner)
    runner_hooks._install_sample_tokens(Runner)  # idempotent
    monkeypatch.setattr(runner_hooks, "_ON_OUTPUT", [])
    runner_hooks.on_output(mark)
    r = Runner()
    src = torch.zeros(2)
    ring.submit([_row("a")], {"x": src})
    out = r.sample_tokens(None)  # step 1's output: asynchronous
    assert not written and not calls  # nothing waited for yet
    ring.submit([_row("b")], {"x": src})  # step 2 runs ahead (async scheduling)
    assert out.get_output() == "output" and out.fetched
    assert written == ["a"] and calls == [1] and ring.in_flight == 1  # b's copy not waited for
    assert ring.blocking_waits == 1
    assert r.sample_tokens(None, async_out=False) == "plain"
    assert written == ["a", "b"]


def test_stats_only_graph_sends_rows_requests_eager():
    """With the rows pass off (VLLM_ATTNCAP_GRAPH_ROWS=0) head-mean rows requests leave the graph: the policy
    forces their steps to PIECEWISE and begin_step keeps them in the eager plan."""
    from vllm_attncap.engine.cuda.graph_step import GraphCapture
    from vllm_attncap.engine.plan import RowBatch, StepPlan

    pol = StepGraphPolicy()
    pol.num_layers, pol.in_graph, pol.kinds = 4, True, ("stats",)
    specs = {"a": {"mode": "stats"}, "b": {"layers": [-1], "reduce": "head_mean"}}
    assert not pol.decide(["a"], specs.get) and pol.decide(["a", "b"], specs.get)
    lay = BufferLayout(max_rows=4, num_layers=4, num_heads=4, num_kv_heads=2, width=32)
    gc = GraphCapture(lay, lambda s, d: torch.zeros(s, dtype=d), _CpuUploader(), lambda n: None, kinds=("stats",))
    a, b = _rc("a", specs["a"]), _rc("b", specs["b"])
    rb = [RowBatch(rc=a, token_index=None, q_pos=None, rows=[2], ctx_len=12, block_table_row=None, batch_row=0),
          RowBatch(rc=b, token_index=None, q_pos=None, rows=[2], ctx_len=12, block_table_row=None, batch_row=1)]
    rest = gc.begin_step(StepPlan(rb, frozenset(range(4))), uniform_decode=True)
    assert [x.rc.req_id for x in rest.batches] == ["b"] and gc.active
    assert gc.buffers.row_table[0, 0] == FLAG_STATS and gc.buffers.row_table[1, 0] == 0
