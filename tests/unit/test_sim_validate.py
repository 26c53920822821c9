"""sim_validate's serving correction: the served worker's probe gaps set the step's fixed and
per-sequence terms exactly, and the rest of the TTFT is the gateway's latency."""

from __future__ import annotations

import pytest

from tandem.loadtest.suite.sim_validate import PROBE_BATCH, Serving
from tandem.sim.calibrate import CalibratedCostModel, Coefficients
from tandem.sim.types import StepShape


def test_probes_set_the_fixed_and_per_sequence_terms() -> None:
    engine = CalibratedCostModel("m", Coefficients(0.007, 1e-4, 0.0005, 0.0, 0.0), kv_bytes=4096)
    served, gateway_s = Serving(gap_alone_s=0.004, gap_batch_s=0.011, ttft_alone_s=0.02).apply(engine)
    c = served.coefficients
    # decode(b) = fixed + (1e-4 + per_seq) b: 0.004 at b = 1 and 0.011 at b = 8 give
    # per_seq = (0.011 - 0.0008 - 0.0039) / 7 = 0.0009 and fixed = 0.0039 - 0.0009 = 0.003
    assert (c.step_s, c.decode_seq_s, c.token_s) == pytest.approx((0.003, 0.0009, 1e-4), abs=1e-12)
    assert served.step_seconds(StepShape(decode_seqs=1, decode_context_tokens=88)) == pytest.approx(0.004)
    assert served.step_seconds(StepShape(decode_seqs=PROBE_BATCH, decode_context_tokens=88 * 8)) == pytest.approx(0.011)
    # the 64-token probe prefill takes 0.003 + 64e-4 = 0.0094 s; the rest of its 0.02 s TTFT
    assert gateway_s == pytest.approx(0.0106)
