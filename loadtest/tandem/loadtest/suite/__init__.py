"""`make bench`: the project's benchmark set, measured in one run, written to BENCHMARKS.md.

Each section is a module with `run(ctx: BenchContext) -> Section`; `tandem.loadtest.suite.run`
calls them in order, one at a time (they pin processes to cores and must not overlap), and
`tandem.loadtest.suite.markdown` renders the figures next to their goals. A goal that is missed is
written as missed; a section that fails is written as failed, with its error, and makes the
run's exit status 1.

    python -m tandem.loadtest bench --out BENCHMARKS.md [--only engine,kv] [--quick]
"""
