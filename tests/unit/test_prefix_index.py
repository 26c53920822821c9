"""PrefixIndex: exact leading-block counts under stored/removed/cleared events, epochs, gaps,
speculative claims and forgetting."""

from __future__ import annotations

import logging
import random
import threading

import pytest

from tandem.common.gateway_view import RoutingMode
from tandem.common.workers import KVEventKind, KVEventRecord
from tandem.scheduler import PrefixIndex

STORED, REMOVED, CLEARED = KVEventKind.STORED, KVEventKind.REMOVED, KVEventKind.CLEARED
PROMPT = (101, 102, 103, 104, 105)  # block hashes of a 5-block prompt


class Feed:
    """Applies events with consecutive seqs per (worker, epoch), like one publisher would."""

    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self.seqs: dict[tuple[str, int], int] = {}

    def __call__(self, worker_id: str, kind: KVEventKind, hashes: tuple[int, ...] = (), epoch: int = 1) -> None:
        seq = self.seqs.get((worker_id, epoch), 0) + 1
        self.seqs[(worker_id, epoch)] = seq
        self.index.apply(KVEventRecord(worker_id, epoch, seq, kind, hashes))


@pytest.fixture
def index() -> PrefixIndex:
    return PrefixIndex(speculative_ttl_s=10.0)


@pytest.fixture
def feed(index: PrefixIndex) -> Feed:
    return Feed(index)


def test_match_counts_leading_blocks_per_worker(index, feed):
    feed("w-full", STORED, PROMPT)
    feed("w-two", STORED, PROMPT[:2])
    feed("w-hole-first", STORED, PROMPT[1:])  # holds 2..5 but not block 1: no leading block
    feed("w-hole-mid", STORED, (101, 102, 104, 105))
    feed("w-other", STORED, (999,))
    feed("w-split", STORED, (101,))
    feed("w-split", STORED, (102, 103))  # two events make one run of three
    ids = ["w-full", "w-two", "w-hole-first", "w-hole-mid", "w-other", "w-split", "w-unknown"]
    assert index.match(PROMPT, ids) == {
        "w-full": 5,
        "w-two": 2,
        "w-hole-first": 0,
        "w-hole-mid": 2,
        "w-other": 0,
        "w-split": 3,
        "w-unknown": 0,
    }
    # Only the asked workers, in the asked order; prefixes of the prompt shrink the counts.
    assert index.match(PROMPT[:1], ["w-two", "w-full"]) == {"w-two": 1, "w-full": 1}
    assert index.match((), ["w-full"]) == {"w-full": 0}
    assert index.match(PROMPT, []) == {}
    assert index.num_blocks("w-full") == 5 and index.num_blocks("w-split") == 3


def test_match_is_exact_beyond_64_workers(index, feed):
    hashes = tuple(range(1000, 1256))  # 256 blocks, 4096 tokens
    workers = [f"w-{i:03d}" for i in range(130)]
    for i, worker_id in enumerate(workers):
        if i % 7:
            feed(worker_id, STORED, hashes[: (i * 37) % 257])
    expected = {w: 0 if i % 7 == 0 else (i * 37) % 257 for i, w in enumerate(workers)}
    assert index.match(hashes, workers) == expected


def test_removed_blocks_shorten_the_run(index, feed):
    feed("w", STORED, PROMPT)
    feed("w", REMOVED, (103,))
    assert index.match(PROMPT, ["w"]) == {"w": 2}
    feed("w", REMOVED, (101, 777))  # unknown hashes are ignored
    assert index.match(PROMPT, ["w"]) == {"w": 0}
    assert index.num_blocks("w") == 3  # 102, 104, 105


def test_cleared_drops_only_that_worker(index, feed):
    feed("w-a", STORED, PROMPT)
    feed("w-b", STORED, PROMPT[:3])
    feed("w-a", CLEARED)
    assert index.match(PROMPT, ["w-a", "w-b"]) == {"w-a": 0, "w-b": 3}
    assert index.num_blocks("w-a") == 0
    feed("w-a", STORED, PROMPT[:1])  # the same epoch goes on after a clear
    assert index.match(PROMPT, ["w-a", "w-b"]) == {"w-a": 1, "w-b": 3}
    assert index.num_gaps("w-a") == 0


def test_new_epoch_drops_the_old_entries_and_old_epochs_are_ignored(index, feed):
    feed("w", STORED, PROMPT, epoch=1)
    index.add_speculative("w", (106,), now_s=0.0)
    feed("w", STORED, PROMPT[:1], epoch=2)  # restarted: only block 1 so far
    assert index.match(PROMPT + (106,), ["w"]) == {"w": 1}
    assert (index.num_blocks("w"), index.num_claims("w")) == (1, 0)
    feed("w", STORED, PROMPT, epoch=1)  # a late event of the old process
    assert index.match(PROMPT, ["w"]) == {"w": 1}
    assert index.num_gaps("w") == 0


def test_seq_gap_is_counted_and_entries_are_kept(index, caplog):
    apply = index.apply
    apply(KVEventRecord("w", 7, 1, STORED, PROMPT[:2]))
    with caplog.at_level(logging.WARNING, logger="tandem.scheduler.index"):
        apply(KVEventRecord("w", 7, 4, STORED, PROMPT[2:4]))  # seqs 2 and 3 were lost
    assert "gap in epoch 7 (seq 4 after 1)" in caplog.text
    assert index.num_gaps("w") == 1
    assert index.match(PROMPT, ["w"]) == {"w": 4}
    apply(KVEventRecord("w", 7, 4, REMOVED, PROMPT[:1]))  # duplicate seq: ignored
    apply(KVEventRecord("w", 7, 2, REMOVED, PROMPT[:1]))  # older seq: ignored
    assert index.match(PROMPT, ["w"]) == {"w": 4}
    apply(KVEventRecord("w", 8, 1, STORED, PROMPT[:1]))  # a new epoch starts a complete view
    assert index.num_gaps("w") == 0
    assert index.match(PROMPT, ["w"]) == {"w": 1}


def test_first_event_in_the_middle_of_an_epoch_counts_as_a_gap(index):
    index.apply(KVEventRecord("w", 3, 42, STORED, PROMPT[:2]))  # stream trimmed before seq 42
    assert index.num_gaps("w") == 1
    assert index.match(PROMPT, ["w"]) == {"w": 2}


def test_cleared_ends_a_gap(index):
    """After CLEARED the worker's view is complete again: nothing before it matters."""
    index.apply(KVEventRecord("w", 3, 1, STORED, PROMPT[:2]))
    index.apply(KVEventRecord("w", 3, 5, STORED, PROMPT[2:3]))  # seqs 2-4 lost
    assert (index.num_gaps("w"), index.gapped_workers()) == (1, ("w",))
    index.apply(KVEventRecord("w", 3, 6, CLEARED, ()))
    index.apply(KVEventRecord("w", 3, 7, STORED, PROMPT[:1]))
    assert (index.num_gaps("w"), index.gapped_workers(), index.blocks("w")) == (0, (), frozenset({101}))


def test_registration_under_a_new_epoch_drops_the_entries_of_the_previous_life(index, feed, caplog):
    """A worker restarted under the same id (its key never expired) registers its new epoch
    before it publishes any event: its old entries go at once, and late events of the old
    process are ignored."""
    feed("w", STORED, PROMPT, epoch=10)
    feed("v", STORED, PROMPT[:2], epoch=10)
    index.add_speculative("w", (101, 102, 106), now_s=0.0)
    assert index.registered("w", 10) is False  # the same life: nothing changes
    assert index.registered("w", 0) is False  # no epoch published (an older worker)
    assert index.blocks("w") == frozenset(PROMPT)
    with caplog.at_level(logging.INFO, logger="tandem.scheduler.index"):
        assert index.registered("w", 20) is True
    assert caplog.messages == [
        "worker w registered again under epoch 20 (index at epoch 10); dropping its index entries"
    ]
    assert (index.blocks("w"), index.num_claims("w")) == (frozenset(), 0)
    assert index.match(PROMPT + (106,), ["w", "v"]) == {"w": 0, "v": 2}
    assert index.registered("w", 20) is False  # every later refresh: nothing to do
    feed("w", STORED, PROMPT, epoch=10)  # a late event of the old process: ignored
    assert index.blocks("w") == frozenset()
    feed("w", STORED, PROMPT[:1], epoch=20)  # seq 1 of the new epoch: no gap, rebuilt
    assert (index.blocks("w"), index.num_gaps("w")) == (frozenset({101}), 0)
    assert index.blocks("v") == frozenset(PROMPT[:2])


def test_registration_seen_before_any_event_skips_older_epochs_in_the_stream(index, feed):
    """A gateway that starts after a worker restarted reads the old life's events from the
    stream: once it saw the registration, they are ignored."""
    assert index.registered("w", 20) is True
    assert index.worker_ids() == frozenset({"w"})
    feed("w", STORED, PROMPT, epoch=10)
    assert index.blocks("w") == frozenset()
    feed("w", STORED, PROMPT[:3], epoch=20)
    assert (index.blocks("w"), index.num_gaps("w")) == (frozenset(PROMPT[:3]), 0)
    # A later resync moved the worker to a larger epoch; its registration still says 20.
    feed("w", CLEARED, epoch=30)
    feed("w", STORED, PROMPT[:1], epoch=30)
    assert index.registered("w", 20) is False
    assert index.blocks("w") == frozenset({101})


def test_routing_mode_load_only_then_exact_then_degraded_and_back(index, feed):
    assert index.mode() is RoutingMode.LOAD_ONLY  # empty
    index.add_speculative("w", PROMPT, now_s=0.0)
    assert index.mode() is RoutingMode.LOAD_ONLY  # claims are not entries
    feed("w", STORED, PROMPT[:2], epoch=5)
    assert index.mode() is RoutingMode.EXACT
    index.apply(KVEventRecord("w", 5, 3, STORED, PROMPT[2:3]))  # seq 2 lost
    assert (index.mode(), index.gapped_workers()) == (RoutingMode.DEGRADED, ("w",))
    feed("v", STORED, PROMPT[:1], epoch=5)  # another worker's complete view changes nothing
    assert index.mode() is RoutingMode.DEGRADED
    index.apply(KVEventRecord("w", 6, 1, CLEARED, ()))  # w resynced under a new epoch
    assert (index.mode(), index.gapped_workers()) == (RoutingMode.EXACT, ())
    index.forget("v")
    assert index.mode() is RoutingMode.LOAD_ONLY  # w holds nothing since its resync


def test_speculative_claims_expire_after_the_ttl(index):
    index.add_speculative("w", PROMPT[:3], now_s=100.0)  # the chain and its anchors 1 and 2
    assert index.match(PROMPT, ["w"]) == {"w": 3}
    assert index.match(PROMPT[:2], ["w"]) == {"w": 2}  # the anchor of 2 blocks
    assert index.match((101, 102, 999), ["w"]) == {"w": 2}  # shares 2 blocks with the chain
    assert index.num_claims("w") == 3 and index.num_blocks("w") == 0
    assert index.expire(109.999) == 0
    assert index.match(PROMPT, ["w"]) == {"w": 3}
    assert index.expire(110.0) == 3
    assert index.match(PROMPT, ["w"]) == {"w": 0}
    assert index.num_claims("w") == 0
    assert index.expire(1000.0) == 0
    index.add_speculative("w", (), now_s=1000.0)  # a prompt without a full block: no claim
    assert index.num_claims("w") == 0


def test_stored_events_confirm_what_a_claim_promised(index, feed):
    index.add_speculative("w", PROMPT[:3], now_s=100.0)
    feed("w", STORED, PROMPT[:2])
    assert index.match(PROMPT, ["w"]) == {"w": 3}  # the longer of claim and confirmed run
    assert index.expire(200.0) == 1
    assert index.match(PROMPT, ["w"]) == {"w": 2}  # what the worker really stored
    assert index.num_blocks("w") == 2


def test_claim_and_confirmed_run_take_the_longer(index, feed):
    feed("w-full", STORED, PROMPT)
    index.add_speculative("w-full", PROMPT[:2], now_s=0.0)
    feed("w-hole", STORED, (101, 103, 104, 105))
    index.add_speculative("w-hole", PROMPT[:2], now_s=0.0)  # run 1, claim 2: not joined to 5
    index.add_speculative("w-elsewhere", (999,), now_s=0.0)
    assert index.match(PROMPT, ["w-full", "w-hole", "w-elsewhere"]) == {"w-full": 5, "w-hole": 2, "w-elsewhere": 0}
    assert index.match(PROMPT, ["w-hole"]) == {"w-hole": 2}  # claims of others stay out


def test_claiming_again_pushes_the_expiry(index):
    index.add_speculative("w", PROMPT[:3], now_s=100.0)  # chains of 1, 2 and 3 blocks
    index.add_speculative("w", PROMPT[:3], now_s=105.0)
    index.add_speculative("w", PROMPT[:2], now_s=100.0)  # chains of 1 and 2 blocks
    assert index.num_claims("w") == 3
    assert index.expire(110.0) == 2  # the 1- and 2-block claims; the 3-block one now ends at 115
    assert index.match(PROMPT, ["w"]) == {"w": 3}
    index.add_speculative("w-other", (999,), now_s=115.0)  # adding also expires what is due
    assert index.match(PROMPT, ["w"]) == {"w": 0}


def test_stored_replaces_claims_removed_keeps_the_rest_and_cleared_drops_them(index, feed):
    index.add_speculative("w", PROMPT, now_s=0.0)  # chains of 1, 2, 4 and 5 blocks
    feed("w", STORED, PROMPT[:2])  # fulfils the claims of 1 and 2 blocks
    assert index.num_claims("w") == 2
    feed("w", REMOVED, (101, 102))
    assert index.match(PROMPT, ["w"]) == {"w": 5}  # the unfulfilled claims live out their TTL
    feed("w", STORED, PROMPT)
    assert index.num_claims("w") == 0
    feed("w", REMOVED, (102,))
    assert index.match(PROMPT, ["w"]) == {"w": 1}  # the confirmed entries say what is left
    assert index.expire(10.0) == 0
    # 101, 104 and 105 are held (a hole at 102): of the chains of 1, 2, 4 and 5 blocks, only
    # the one ending at 102 is claimed (recomputing the prompt stores 102, nothing else)
    index.add_speculative("w", PROMPT, now_s=20.0)
    assert index.num_claims("w") == 1
    assert index.match(PROMPT, ["w"]) == {"w": 2}
    feed("w", CLEARED)
    assert index.match(PROMPT, ["w"]) == {"w": 0}
    assert index.num_claims("w") == 0 and index.num_blocks("w") == 0
    assert index.expire(100.0) == 0


def test_zero_ttl_disables_speculative_entries():
    index = PrefixIndex(speculative_ttl_s=0.0)
    index.add_speculative("w", PROMPT, now_s=0.0)
    assert index.match(PROMPT, ["w"]) == {"w": 0}
    assert index.worker_ids() == frozenset()


def test_forget_drops_everything_and_the_slot_is_reused_cleanly(index, feed):
    feed("w-a", STORED, PROMPT)
    index.add_speculative("w-a", (106,), now_s=0.0)
    feed("w-b", STORED, PROMPT[:2])
    assert index.worker_ids() == frozenset({"w-a", "w-b"})
    index.forget("w-a")
    assert index.worker_ids() == frozenset({"w-b"})
    assert index.match(PROMPT + (106,), ["w-a", "w-b"]) == {"w-a": 0, "w-b": 2}
    assert index.num_blocks("w-a") == 0
    feed("w-c", STORED, PROMPT[:1])  # takes w-a's freed slot
    assert index.match(PROMPT + (106,), ["w-a", "w-b", "w-c"]) == {"w-a": 0, "w-b": 2, "w-c": 1}
    assert index.expire(100.0) == 0  # w-a's claim went with it
    index.forget("w-never-seen")  # no-op


def test_concurrent_apply_and_match_stay_consistent(index):
    hashes = tuple(range(1, 257))
    index.apply(KVEventRecord("w-stable", 1, 1, STORED, hashes))
    errors: list[str] = []

    def churn() -> None:
        for seq in range(1, 401):
            kind = STORED if seq % 2 else REMOVED
            index.apply(KVEventRecord("w-churn", 1, seq, kind, hashes[:128]))

    thread = threading.Thread(target=churn)
    thread.start()
    while thread.is_alive():
        result = index.match(hashes, ["w-stable", "w-churn"])
        if result["w-stable"] != 256 or result["w-churn"] not in (0, 128):
            errors.append(repr(result))
    thread.join()
    assert errors == []
    assert index.match(hashes, ["w-churn"]) == {"w-churn": 0}  # the last event (seq 400) removed


def test_match_equals_a_brute_force_oracle_on_random_histories(index, feed):
    rng = random.Random(1234)
    prompts = [tuple(rng.getrandbits(64) for _ in range(rng.randint(0, 40))) for _ in range(6)]
    workers = [f"w-{i}" for i in range(70)]
    held: dict[str, set[int]] = {w: set() for w in workers}
    claimed: dict[str, dict[int, float]] = {w: {} for w in workers}
    for step in range(600):
        worker_id, prompt = rng.choice(workers), rng.choice(prompts)
        cut = rng.randint(0, len(prompt))
        action = rng.random()
        if action < 0.5 and cut:
            feed(worker_id, STORED, prompt[:cut])
            held[worker_id].update(prompt[:cut])
        elif action < 0.7 and cut:
            removed = tuple(rng.sample(prompt[:cut], rng.randint(1, cut)))
            feed(worker_id, REMOVED, removed)
            held[worker_id].difference_update(removed)
        elif action < 0.75:
            feed(worker_id, CLEARED)
            held[worker_id].clear()
            claimed[worker_id].clear()
        elif cut:
            index.add_speculative(worker_id, prompt[:cut], now_s=float(step))
            claimed[worker_id][prompt[cut - 1]] = step + 10.0
        now_s = float(step)
        index.expire(now_s)
        for claims in claimed.values():
            for h in [h for h, expiry_s in claims.items() if expiry_s <= now_s]:
                del claims[h]
        if step % 20 == 0:
            for prompt in prompts:
                expected = {}
                for w in workers:
                    run = next((i for i, h in enumerate(prompt) if h not in held[w]), len(prompt))
                    claim = max((i + 1 for i, h in enumerate(prompt) if h in claimed[w]), default=0)
                    expected[w] = max(run, claim)
                assert index.match(prompt, workers) == expected, step
