"""The prefix cache holds exactly the bytes it accounts for, and serves what it holds."""

import gc

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from engine.prefix_cache import PrefixCache


def test_entries_do_not_keep_their_sources_alive():
    # A prompt's KV taken lazily out of a large batch cache: once the batch is gone, only the
    # entry's own bytes may remain (a lazy copy would pin the whole batch buffer).
    gc.collect()
    base = mx.get_active_memory()
    batch = [BatchKVCache([0] * 16) for _ in range(4)]
    for c in batch:
        c.update_and_fetch(mx.random.normal((16, 2, 200, 32)), mx.random.normal((16, 2, 200, 32)))
    mx.eval([c.keys for c in batch] + [c.values for c in batch])
    pc = PrefixCache(10**9, min_tokens=4)
    pc.insert(list(range(50)), [c.extract(3) for c in batch])
    del batch, c
    gc.collect()
    mx.synchronize()
    held = mx.get_active_memory() - base
    assert pc.nbytes == 4 * 2 * (2 * 50 * 32 * 4)
    assert held <= 2 * pc.nbytes  # the 16 x 200-token batch buffers (~13 MB) were freed


def test_lookup_restore_and_lru_budget():
    def caches(n: int, fill: float) -> list[KVCache]:
        out = []
        for _ in range(2):
            c = KVCache()
            c.update_and_fetch(mx.full((1, 1, n, 4), fill), mx.full((1, 1, n, 4), fill))
            out.append(c)
        return out

    one_entry = 2 * 2 * 20 * 4 * 4  # layers x (k, v) x tokens x dims x fp32
    pc = PrefixCache(budget_bytes=one_entry + 10, min_tokens=4)
    pc.insert(list(range(20)), caches(20, 1.0))
    assert pc.lookup(list(range(12)) + [99]) == 12
    restored = pc.restore(list(range(12)) + [99], 12)
    assert restored is not None and restored[0].offset == 12
    assert restored[0].keys.shape[2] == 12 and restored[0].keys[0, 0, 0, 0].item() == 1.0
    pc.insert(list(range(100, 120)), caches(20, 2.0))  # over budget: the older entry goes
    assert pc.lookup(list(range(12))) == 0 and pc.lookup(list(range(100, 110))) == 10
    assert pc.nbytes == one_entry


def test_the_trie_finds_the_longest_shared_prefix_and_forgets_dropped_entries():
    import random

    rng = random.Random(0)

    def caches(n: int) -> list[KVCache]:
        c = KVCache()
        c.update_and_fetch(mx.zeros((1, 1, n, 2)), mx.zeros((1, 1, n, 2)))
        return [c]

    pc = PrefixCache(budget_bytes=30 * 2 * 2 * 40 * 4, min_tokens=2)  # about 30 entries
    for _ in range(200):  # a small alphabet: prefixes are shared often
        tokens = [rng.randrange(3) for _ in range(rng.randrange(2, 40))]
        pc.insert(tokens, caches(len(tokens)))
        query = [rng.randrange(3) for _ in range(rng.randrange(1, 40))]
        best = 0
        for key in pc._entries:
            n = 0
            while n < min(len(key), len(query)) and key[n] == query[n]:
                n += 1
            best = max(best, n)
        assert pc.lookup(query) == (best if best >= 2 else 0)
        if best >= 2:
            restored = pc.restore(query, best)
            assert restored is not None and restored[0].offset == best
    for key in list(pc._entries):
        pc._drop(key)
    assert not pc._root.children and pc.nbytes == 0


def test_counted_in_tokens_ranks_holding_different_layers_keep_the_same_entries():
    # Two pipeline ranks of one group: 3 layers on one, 5 on the other. Counted in bytes their
    # budgets would run out at different entries; counted in tokens they evict alike.
    def caches(layers: int, n: int) -> list[KVCache]:
        out = []
        for _ in range(layers):
            c = KVCache()
            c.update_and_fetch(mx.zeros((1, 1, n, 4)), mx.zeros((1, 1, n, 4)))
            out.append(c)
        return out

    token_bytes = 8 * 2 * 4 * 4  # the whole model's: 8 layers x (k, v) x dims x fp32
    ranks = [PrefixCache(60 * token_bytes, min_tokens=4, token_bytes=token_bytes) for _ in "ab"]
    inserts = [(0, 20), (100, 30), (200, 25), (300, 40)]
    for start, n in inserts:
        for pc, layers in zip(ranks, (3, 5)):
            pc.insert(list(range(start, start + n)), caches(layers, n))
    kept = [[k[0] for k in pc._entries] for pc in ranks]
    assert kept[0] == kept[1] == [300]  # 40 tokens: the older ones went to make room
    assert ranks[0].nbytes == ranks[1].nbytes == 40 * token_bytes
    # In bytes, the same inserts would keep different entries on the two ranks.
    in_bytes = [PrefixCache(60 * token_bytes, min_tokens=4) for _ in "ab"]
    for start, n in inserts:
        for pc, layers in zip(in_bytes, (3, 5)):
            pc.insert(list(range(start, start + n)), caches(layers, n))
    assert [len(pc._entries) for pc in in_bytes] == [4, 3]
