"""The autoscaler: scales the prefill and decode pools separately, driven by their queues.

`signals` reads each pool's load from Redis, `policy.decide` (pure) turns signals and current
replicas into a `ScaleDecision` per pool, `Autoscaler` runs that loop and applies the decisions
through an `Actuator` (Kubernetes here in `kubernetes.py`; local processes and Ray elsewhere).
`tandem autoscaler` (services/tandem/cli/) runs it as a service.

Nothing is imported here: `tandem.autoscaler.config` stays cheap for the CLI's parser, and the
`kubernetes` client is only loaded by the actuator that needs it.
"""
