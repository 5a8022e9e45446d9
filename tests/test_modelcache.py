"""The dashboard's model cache: sized by bytes, LRU among unheld entries, never releasing a held model
(real tiny transformers models; several threads and several AppTest sessions on different models at once)."""
import random
import threading
import time

import pytest

from hetmoe_core.modelcache import ModelCache, cache_share, model_bytes

FAMILIES = ("olmoe", "mixtral", "qwen2_moe")


def _loader(key):
    from hetmoe_core.models import load_model
    lm = load_model(f"tiny:{key}")
    return lm, model_bytes(lm.model)


def test_model_bytes_counts_unique_tensors_once():
    from hetmoe_core.models import load_model
    lm = load_model("tiny:olmoe")
    n = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in lm.model.parameters()}.values())
    assert model_bytes(lm.model) >= n > 0
    assert model_bytes(lm.model) == model_bytes(lm.model)


def test_lru_among_unheld_and_sized_by_bytes():
    released = []
    one = _loader("olmoe")[1]
    cache = ModelCache(_loader, max_bytes=int(2.5 * one), on_release=lambda h: released.append(h.key))
    a = cache.hold("olmoe", "run-a")
    cache.release("run-a")
    b = cache.hold("mixtral", "run-b")
    cache.release("run-b")
    assert [e["key"] for e in cache.entries()] == ["mixtral", "olmoe"]       # most recent first
    cache.hold("olmoe", "run-c")                      # touch: olmoe becomes the most recent, still loaded
    assert cache.hold("olmoe", "run-c") is a and not released
    cache.release("run-c")
    total = sum(e["bytes"] for e in cache.entries())
    cache.hold("qwen2_moe", "run-d")                  # over the size: the least recently used unheld one goes
    assert released == ["mixtral"] and b.lm is None and a.lm is not None
    assert cache.total_bytes() <= int(2.5 * one) or total > 0
    assert {e["key"]: e["holds"] for e in cache.entries()} == {"qwen2_moe": 1, "olmoe": 0}


def test_a_held_model_is_never_released_even_over_size():
    cache = ModelCache(_loader, max_bytes=1)          # room for nothing: only holds keep entries
    a = cache.hold("olmoe", "session-1")
    cache.hold("mixtral", "session-2")
    assert a.lm is not None and len(cache.entries()) == 2
    cache.release("session-2")                        # unheld and over size: released at once
    assert [e["key"] for e in cache.entries()] == ["olmoe"] and a.lm is not None
    cache.release("session-1")
    assert cache.entries() == [] and a.lm is None


def test_holds_of_an_ended_thread_count_as_released():
    cache = ModelCache(_loader, max_bytes=1)
    t = threading.Thread(target=lambda: cache.hold("olmoe", (threading.current_thread(), 1)))
    t.start()
    t.join()
    cache.hold("mixtral", "other")                    # eviction prunes the dead thread's hold
    assert [e["key"] for e in cache.entries()] == ["mixtral"]


def test_threads_on_different_models_never_see_a_released_model():
    """The classroom race: three sessions on three models, a cache with room for fewer, each run using its
    model's weights while the others load theirs. Repeated; a released model would show as lm None."""
    cache = ModelCache(_loader, max_bytes=1)
    errors, uses = [], [0]

    def session(family, seed):
        rng = random.Random(seed)
        for i in range(25):
            owner = (threading.current_thread(), i)
            try:
                h = cache.hold(family, owner)
                for _ in range(3):
                    assert h.lm is not None, f"{family}: released while held"
                    assert h.lm.fingerprint and h.lm.anatomy.moe_layers
                    time.sleep(rng.uniform(0, 0.004))
                uses[0] += 1
            except Exception as e:            # collected and asserted below: a thread cannot fail the test itself
                errors.append(f"{family} round {i}: {type(e).__name__}: {e}")
            finally:
                cache.release(owner)

    threads = [threading.Thread(target=session, args=(f, n)) for n, f in enumerate(FAMILIES * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert uses[0] == 25 * len(threads)


def test_cache_share_is_validated(monkeypatch):
    monkeypatch.setenv("HETMOE_MODEL_CACHE_SHARE", "0.25")
    assert cache_share() == 0.25
    for bad in ("0", "2", "half"):
        monkeypatch.setenv("HETMOE_MODEL_CACHE_SHARE", bad)
        with pytest.raises(ValueError, match="HETMOE_MODEL_CACHE_SHARE"):
            cache_share()
