"""The KV hand-off from prefill to decode workers (DESIGN.md sections 2 and 4).

- `base`: the `KVTransport` interface and `create_transport(name, config)` ("grpc", "torch", "tcp");
  the transport modules are imported on demand.
- `config`: `KVTransferConfig` and the transport registry (no torch: the CLI and `tandem up`
  read it to build configs).
- `block_store`: `KVBlockStore`, a worker's KV cache as blocks to pack and unpack.
- `leases`: `LeaseTable`, a prefill worker's held blocks.

The KV handle itself is a shared noun: `tandem.common.kv_handle.KVHandle`. Nothing is imported
here, so `import tandem.kvtransfer.config` stays free of torch.
"""
