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


def test_edges_are_exact_across_batches():
    g = torch.Generator().manual_seed(0)
    g_edges = EdgeBits(d_sae=37, vocab_size=500)
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
    assert g.n_bytes == d_sae // 8 and g.n_edges == 5  # five edges held, no (tokens, d_sae) table
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
    chunks = list(encode_chunks(sae, h, chunk_bytes=40 * 13 * 5))  # 5 rows a chunk: 13 bytes per float32 element
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
    a = EdgeBits(d_sae=21, vocab_size=300)
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
    assert torch.equal(b.token_of, a.token_of)
    new = torch.tensor([299, 0, 299])  # edges keep being added after a reload
    b.add(new, torch.ones(3, 21, dtype=torch.bool))
    assert b.rows(torch.tensor([299, 0])).all()


def test_chunk_size_changes_no_activation_and_no_edge(demo_model, demo_tokenizer, demo_saes, demo_function_tokens):
    """The demo model's residuals encoded by its SAEs (float64: no sum order can flip a threshold) in chunks of 1, 7
    and every row give the same activations and the same edge tables, counts and window sets as a plain dense
    reference built here from one `encode` of all rows."""
    from collections import Counter

    from functok_vllm.core.capture import CoverageCapture, chunk_rows, element_bytes

    text = "The old prince was sitting in his study, and he said to his daughter that the letter had come. " * 8
    ids = torch.tensor(demo_tokenizer(text)["input_ids"][:96])  # (tokens,)
    assert len(ids) == 96
    seq = 32
    with torch.no_grad():
        hs = demo_model(input_ids=ids.view(-1, seq), output_hidden_states=True).hidden_states
    vocab = demo_model.get_output_embeddings().weight.shape[0]
    fn = demo_function_tokens.mask(vocab)
    positions = torch.arange(seq).repeat(len(ids) // seq)  # (tokens,) three windows
    skip = int(ids[5])  # a token whose positions must add nothing
    for layer, sae in demo_saes.items():
        sae = sae.to(dtype=torch.float64)
        h = hs[layer + 1].reshape(-1, sae.d_in).double()  # (tokens, d_in) output of decoder layer `layer`
        act = sae.encode(h)  # (tokens, d_sae) the reference: one encode of every row
        keep = ids != skip
        want = Counter((int(t), int(f)) for t, row in zip(ids[keep], act[keep] > 0, strict=True) for f in row.nonzero())
        win = positions.eq(0).cumsum(0) - 1
        want_all = torch.stack([((act > 0) & keep[:, None])[win == w].any(0) for w in range(3)])
        want_fn = torch.stack([((act > 0) & (keep & fn[ids])[:, None])[win == w].any(0) for w in range(3)])
        per_row = sae.d_sae * element_bytes(sae, active_only=True)
        for rows in (1, 7, len(ids)):
            assert chunk_rows(sae, rows * per_row, active_only=True) == rows
            chunks = list(encode_chunks(sae, h, rows * sae.d_sae * element_bytes(sae, False)))
            assert len(chunks) == -(-len(ids) // rows) and torch.equal(torch.cat([a for _, a in chunks]), act)
            cap = CoverageCapture({layer: sae}, [layer], vocab, skip, fn_mask=fn, exclude_sinks=False)
            cap.chunk_bytes = rows * per_row
            cap.observe(layer, ids, h, positions)
            g = cap.graphs[layer]
            tokens, feats, n = g.pairs()
            got = dict(zip(zip(tokens.tolist(), feats.tolist(), strict=True), n.tolist(), strict=True))
            assert got == want, (layer, rows)
            assert torch.equal(g.token_count, torch.bincount(ids[keep], minlength=vocab))
            assert torch.equal(g.feature_count, (act[keep] > 0).sum(0))
            win_fn, win_all = g.windows()
            assert torch.equal(unpack_bits(win_all, sae.d_sae), want_all)
            assert torch.equal(unpack_bits(win_fn, sae.d_sae), want_fn), (layer, rows)
        assert len(want) > 100 and want_fn.any() and not torch.equal(want_fn, want_all)
