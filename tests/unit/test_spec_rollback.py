"""Rollback after rejected drafts: block tables, free blocks and prefix-cache registrations
are exact, and the proposer is told what is valid. A scripted proposer drafts the true greedy
continuation for a set number of positions, then wrong tokens, so each rejection is placed."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

from tandem.engine import Engine, SamplingParams
from tandem.engine.sequence import Sequence
from tandem.engine.spec.proposer import Draft

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


class ScriptedProposer:
    """Drafts `truth` for the next `num_right[step]` positions, then wrong tokens."""

    name = "scripted"

    def __init__(self, prompt_len: int, truth: list[int], num_right: list[int], vocab: int) -> None:
        self.prompt_len, self.truth, self.num_right, self.vocab = prompt_len, truth, num_right, vocab
        self.calls: list[tuple[str, str, int]] = []

    def propose(self, seqs: Seq[Sequence], num_tokens: Seq[int]) -> list[Draft]:
        drafts = []
        for seq, k in zip(seqs, num_tokens):
            done = seq.num_output_tokens
            step = sum(1 for call in self.calls if call[0] == "propose")
            right = self.num_right[step] if step < len(self.num_right) else 0
            tokens = [self.truth[done + i] if i < right else (self.truth[done + i] + 1) % self.vocab for i in range(k)]
            self.calls.append(("propose", seq.request_id, k))
            drafts.append(Draft(tuple(tokens)))
        return drafts

    def rollback(self, request_id: str, num_valid_tokens: int) -> None:
        self.calls.append(("rollback", request_id, num_valid_tokens))

    def finish(self, request_id: str) -> None:
        self.calls.append(("finish", request_id, 0))


def test_rejected_runs_roll_back_exactly_across_block_boundaries(tiny_model_dir: Path) -> None:
    prompt = [11, 12, 13, 14, 15, 16]
    truth = list(
        Engine.from_pretrained(tiny_model_dir, num_blocks=16, block_size=4).generate([prompt], GREEDY)[0].token_ids
    )
    engine = Engine.from_pretrained(tiny_model_dir, num_blocks=16, block_size=4, speculative_config=NGRAM)
    assert engine.speculator is not None
    proposer = ScriptedProposer(len(prompt), truth, [3, 0, 4], engine.model_config.vocab_size)
    engine.speculator.proposer = proposer
    engine.add_request("r", prompt, GREEDY)
    seq = engine._seqs["r"]
    pool = engine.pool

    assert [o.new_token_ids for o in engine.step()] == [(truth[0],)]  # prefill: no drafts for the first token
    assert (seq.block_table, seq.num_computed_tokens, pool.num_free_blocks) == ([0, 1], 6, 14)

    # step 2: 7 tokens, k=4 -> blocks for positions < 11 (block 2 added); 3 accepted + the
    # correction: the accepted run crosses into block 2, which is kept but not registered
    assert [o.new_token_ids for o in engine.step()] == [tuple(truth[1:5])]
    assert (seq.num_tokens, seq.num_computed_tokens) == (11, 10)
    assert (seq.block_table, pool.num_free_blocks, seq.num_cached_blocks) == ([0, 1, 2], 13, 2)
    assert pool.block_hash(1) == seq.block_hashes(4)[1] and pool.block_hash(2) is None
    assert proposer.calls == [("propose", "r", 4), ("rollback", "r", 10)]

    # step 3: nothing accepted; positions < 15 needed block 3, which only rejected positions
    # used: it is freed (to the free queue's tail)
    assert [o.new_token_ids for o in engine.step()] == [(truth[5],)]
    assert (seq.num_tokens, seq.num_computed_tokens, seq.block_table) == (12, 11, [0, 1, 2])
    assert (pool.num_free_blocks, seq.num_cached_blocks, pool.free_block_ids()[-1]) == (13, 2, 3)
    assert proposer.calls[-1] == ("rollback", "r", 11)

    # step 4: all 4 accepted + the bonus: computed 16, so blocks 2 and 4 are full and registered
    assert [o.new_token_ids for o in engine.step()] == [tuple(truth[6:11])]
    assert (seq.num_tokens, seq.num_computed_tokens, seq.block_table) == (17, 16, [0, 1, 2, 4])
    assert (pool.num_free_blocks, seq.num_cached_blocks) == (12, 4)
    assert [pool.block_hash(b) for b in (2, 4)] == seq.block_hashes(4)[2:4]
    assert proposer.calls[-1] == ("rollback", "r", 16)
    stats = engine.stats
    assert (stats.spec_num_drafts, stats.spec_num_draft_tokens, stats.spec_num_accepted_tokens) == (3, 12, 7)
    assert stats.spec_accepted_per_position == [2, 2, 2, 1]
    engine.check_integrity()

    while engine.has_unfinished():
        engine.step()
    assert proposer.calls[-1] == ("finish", "r", 0)
    assert seq.output_token_ids == truth
    engine.check_integrity()
    assert engine.is_drained()
