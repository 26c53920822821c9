"""The worker runtime shared by both roles: the step-loop thread (`step_loop`), the process
(`worker`: engine, gRPC server, heartbeat, KV events, metrics, drain), its config, and the
servicer base that answers Health, Abort and Drain. `tandem.prefill` and `tandem.decode` are
the thin role servers on top of it."""
