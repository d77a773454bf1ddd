"""The core capture ops on hand-made inputs: edge bitsets, first-reach ranks, re-activation sets, running top-k."""

import torch

from functok_vllm.core import SAE, SAEConfig
from functok_vllm.core.capture import EdgeBits, RunningTopK, encode_chunks, reactivated, unpack_bits

torch.set_num_threads(1)


def edge_set(token_ids, active):
    return {(int(t), int(f)) for t, row in zip(token_ids, active, strict=True) for f in row.nonzero().flatten()}


def stored_edges(g: EdgeBits):
    rows = g.rows(g.token_of)
    return edge_set(g.token_of, rows)


def test_unpack_bits_orders_bits_within_bytes():
    packed = torch.tensor([[0b00000101, 0b10000000]], dtype=torch.uint8)
    got = unpack_bits(packed, 16)[0].nonzero().flatten().tolist()
    assert got == [0, 2, 15]


def test_edges_are_exact_across_batches_and_row_growth():
    g = torch.Generator().manual_seed(0)
    g_edges = EdgeBits(d_sae=37, vocab_size=500, capacity=2)  # capacity 2 forces several regrowths
    want = set()
    for _ in range(5):
        ids = torch.randint(0, 500, (64,), generator=g)
        active = torch.rand(64, 37, generator=g) < 0.1
        g_edges.add(ids, active)
        want |= edge_set(ids, active)
    assert stored_edges(g_edges) == want
    assert g_edges.n_edges == len(want)
    deg = g_edges.degree()
    for t in range(500):
        assert int(deg[t]) == sum(1 for tt, _ in want if tt == t)


def test_counts_of_tokens_and_features():
    g = EdgeBits(d_sae=4, vocab_size=6)
    ids = torch.tensor([5, 5, 1, 0])
    active = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    g.add(ids, active)
    assert g.token_count.tolist() == [1, 1, 0, 0, 0, 2]
    assert g.feature_count.tolist() == [2, 0, 1, 2]
    assert stored_edges(g) == {(5, 0), (5, 3), (1, 2), (1, 3)}
    assert g.rows(torch.tensor([3]))[0].sum() == 0  # never seen


def test_first_rank_and_coverage_curve_by_hand():
    # token 7 reaches {0, 1}, token 3 reaches {1, 2}, token 9 reaches {4}; feature 3 is never reached
    g = EdgeBits(d_sae=5, vocab_size=10)
    active = torch.tensor([[1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    g.add(torch.tensor([7, 3, 9]), active)
    order = torch.tensor([3, 7, 9])
    assert g.first_rank(order).tolist() == [2, 1, 1, 0, 3]
    assert g.coverage_curve(order).tolist() == [2, 3, 4]
    assert g.coverage_curve(torch.tensor([9])).tolist() == [1]


def test_million_feature_dictionary_stays_exact():
    d_sae = 1 << 20
    g = EdgeBits(d_sae=d_sae, vocab_size=50)
    ids = torch.tensor([3, 4, 3, 7])
    feats = [[0, d_sae - 1], [12345], [999_999, 0], [d_sae - 8]]
    active = torch.zeros(4, d_sae, dtype=torch.bool)
    for i, fs in enumerate(feats):
        active[i, fs] = True
    g.add(ids, active)
    assert g.bits.shape[1] == d_sae // 8
    assert stored_edges(g) == {(3, 0), (3, d_sae - 1), (3, 999_999), (4, 12345), (7, d_sae - 8)}
    assert g.coverage_curve(torch.tensor([3, 4, 7])).tolist() == [3, 4, 5]


def test_encode_chunks_equals_one_encode():
    g = torch.Generator().manual_seed(1)
    cfg = SAEConfig(d_in=6, d_sae=40, architecture="jumprelu", hook_name="blocks.0.hook_resid_post")
    sae = SAE(
        cfg,
        {
            "W_enc": torch.randn(6, 40, generator=g),
            "b_enc": torch.zeros(40),
            "W_dec": torch.randn(40, 6),
            "b_dec": torch.zeros(6),
            "threshold": torch.ones(40),
        },
    )
    h = torch.randn(23, 6, generator=g)
    chunks = list(encode_chunks(sae, h, max_elems=40 * 5))  # 5 rows a chunk
    assert [s for s, _ in chunks] == [0, 5, 10, 15, 20]
    whole = sae.encode(h)
    torch.testing.assert_close(torch.cat([a for _, a in chunks]), whole)  # sgemm sums rows in another order
    assert torch.equal(torch.cat([a > 0 for _, a in chunks]), whole > 0)


def test_reactivated_needs_an_earlier_content_position():
    # positions: 0 content, 1 function, 2 content, 3 function
    is_fn = torch.tensor([False, True, False, True])
    active = torch.tensor(
        [
            [1, 0, 1, 0],  # content: features 0, 2
            [1, 1, 0, 0],  # function: 0 was active at content position 0 -> re-activated; 1 is new
            [0, 1, 0, 1],  # content: 1 was active only at a function position -> not re-activated
            [0, 1, 1, 1],  # function: 1 active at content 2, 2 at content 0, 3 at content 2 -> all three
        ],
        dtype=torch.bool,
    )
    got = reactivated(active, is_fn)
    assert [row.nonzero().flatten().tolist() for row in got] == [[], [0], [], [1, 2, 3]]


def test_running_top_k_keeps_the_largest_with_positions():
    top = RunningTopK(n_features=2, k=2)
    top.add(torch.tensor([[1.0, 5.0], [3.0, 0.0]]), offset=0)  # positions 0, 1
    top.add(torch.tensor([[2.0, 4.0], [0.5, 6.0]]), offset=2)  # positions 2, 3
    assert top.values.tolist() == [[3.0, 2.0], [6.0, 5.0]]
    assert top.where.tolist() == [[1, 2], [3, 0]]


def test_edge_state_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(1)
    a = EdgeBits(d_sae=21, vocab_size=300, capacity=3)
    dense = torch.zeros(300, 21, dtype=torch.long)  # firings per (token, feature), counted by hand
    for _ in range(3):
        ids, act = torch.randint(0, 300, (40,), generator=g), torch.rand(40, 21, generator=g) < 0.2
        a.add(ids, act)
        dense.index_add_(0, ids, act.long())
        a.add_window(act[:20].any(0, keepdim=True), act.any(0, keepdim=True))  # one window a batch
    save_file(a.state(), str(tmp_path / "g.safetensors"))
    b = EdgeBits.from_state(load_file(str(tmp_path / "g.safetensors")))
    assert stored_edges(b) == stored_edges(a) and b.n_edges == a.n_edges > 0
    tokens, feats, n = b.pairs()
    assert torch.equal(dense[tokens, feats], n) and int(n.sum()) == int(dense.sum())  # every firing, once
    win_fn, win_all = b.windows()
    assert win_fn.shape == win_all.shape == (3, 3)  # 3 windows, 21 features in 3 bytes
    assert torch.equal(unpack_bits(win_all, 21)[-1], act.any(0)) and torch.equal(
        unpack_bits(win_fn, 21)[-1], act[:20].any(0)
    )
    assert torch.equal(b.token_count, a.token_count) and torch.equal(b.feature_count, a.feature_count)
    assert torch.equal(b.row_of, a.row_of)
    new = torch.tensor([299, 0, 299])  # rows keep growing after a reload
    b.add(new, torch.ones(3, 21, dtype=torch.bool))
    assert b.rows(torch.tensor([299, 0])).all()
