"""The GPU check behind `make gpu-check` (deploy/gpu/check.sh): one command that proves or
disproves the GPU path on a bare CUDA machine with no network.

- `report`: the step results (tables of figures, status, time) and the markdown summary.
- `steps`: the ordered steps, each with its own time limit.
- `check`: runs every step in its own process under its limit and writes the summary.
- `wheelhouse`: what `make gpu-wheels` downloads (the runtime packages the GPU image lacks).
"""
