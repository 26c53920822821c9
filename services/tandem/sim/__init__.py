"""`tandem simulate` and `tandem plan`: a discrete-event simulation of a Tandem cluster driven by
the project's real routing, batching, disaggregation and scaling decisions, and a search over
prefill/decode pool sizes on top of it."""
