"""The XLA:CPU worker behind `neuron_executor="xla-cpu"` (src/backend/neuron/xla_cpu.rs starts it as
a script): it runs kvgen's exported `.hlo.pb` graphs on jaxlib's CPU backend, one host device per
tensor-parallel rank, keeping each rank's weights and KV caches as device arrays between steps.

It reads framed requests on stdin and answers on stdout (see xla_cpu.rs). The parent sets
XLA_FLAGS (--xla_force_host_platform_device_count) before this process imports jax.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import traceback


def _read_exact(f, n: int) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise EOFError
    return buf


def _receive(f):
    (hlen,) = struct.unpack("<I", _read_exact(f, 4))
    header = json.loads(_read_exact(f, hlen))
    (count,) = struct.unpack("<I", _read_exact(f, 4))
    blobs = []
    for _ in range(count):
        (n,) = struct.unpack("<Q", _read_exact(f, 8))
        blobs.append(_read_exact(f, n))
    return header, blobs


def _send(f, header: dict, blobs=()):
    h = json.dumps(header).encode()
    f.write(struct.pack("<I", len(h)) + h + struct.pack("<I", len(blobs)))
    for b in blobs:
        f.write(struct.pack("<Q", len(b)))
        f.write(b)
    f.flush()


class Worker:
    def __init__(self, ranks: int):
        import numpy as np
        import jax
        import jax.extend
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.np, self.jax = np, jax
        self.backend = jax.extend.backend.get_backend("cpu")
        devs = self.backend.local_devices()
        if len(devs) < ranks:
            raise RuntimeError(f"XLA:CPU has {len(devs)} devices, {ranks} ranks need {ranks} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
        self.devs = devs[:ranks]
        self.ranks = ranks
        mesh = Mesh(self.devs, ("rank",))
        self.split = NamedSharding(mesh, PartitionSpec("rank"))
        self.same = NamedSharding(mesh, PartitionSpec())
        self.tensors: list[dict[str, object]] = [{} for _ in range(ranks)]
        self.graphs: dict[str, tuple[object, dict]] = {}

    def dtype(self, name: str):
        import ml_dtypes

        return {"float32": self.np.float32, "bfloat16": ml_dtypes.bfloat16, "int32": self.np.int32}[name]

    def put(self, h, blobs):
        shape, dt = tuple(h["shape"]), self.dtype(h["dtype"])
        a = self.np.zeros(shape, dt) if h["zero"] else self.np.frombuffer(blobs[0], dt).reshape(shape)
        self.tensors[h["rank"]][h["name"]] = self.jax.device_put(a, self.devs[h["rank"]])

    def load(self, h, _blobs):
        import jax.extend

        d = h["dir"]
        manifest = json.load(open(os.path.join(d, "manifest.json")))
        opts = jax.extend.backend.get_compile_options(
            num_replicas=self.ranks, num_partitions=1, device_assignment=self.np.array(self.devs).reshape(self.ranks, 1)
        )
        for g in manifest["graphs"]:
            pb = open(os.path.join(d, g["file"]), "rb").read()
            exe = self.backend.compile_and_load(jax.extend.mlir.hlo_to_stablehlo(pb), self.devs, opts)
            self.graphs[g["name"]] = (exe, g)

    def global_array(self, parts):
        # Rank r's array on device r; a scalar is the same on every rank.
        if parts[0].ndim == 0:
            return self.jax.make_array_from_single_device_arrays((), self.same, parts)
        shape = (self.ranks * parts[0].shape[0],) + tuple(parts[0].shape[1:])
        return self.jax.make_array_from_single_device_arrays(shape, self.split, parts)

    def run(self, h, blobs):
        exe, g = self.graphs[h["graph"]]
        per_rank = h["inputs_per_rank"]
        step = [i for i in g["inputs"] if i["role"] == "step"]
        if per_rank != len(step) or len(blobs) != per_rank * self.ranks:
            raise ValueError(f"{g['name']}: {len(blobs)} step inputs for {len(step)} per rank x {self.ranks} ranks")
        args, k = [], 0
        for spec in g["inputs"]:
            if spec["role"] == "step":
                parts = []
                for r in range(self.ranks):
                    a = self.np.frombuffer(blobs[r * per_rank + k], self.dtype(spec["dtype"])).reshape(tuple(spec["shape"]))
                    parts.append(self.jax.device_put(a, self.devs[r]))
                k += 1
            else:
                parts = [self.tensors[r][spec["name"]] for r in range(self.ranks)]
                want = tuple(spec["shape"])
                if tuple(parts[0].shape) != want:
                    raise ValueError(f"{spec['name']}: bound {tuple(parts[0].shape)}, graph wants {want}")
            args.append(self.global_array(parts))
        outs = exe.execute_sharded(args).disassemble_into_single_device_arrays()
        results = [[] for _ in range(self.ranks)]
        for spec, per in zip(g["outputs"], outs):
            for r, a in enumerate(per):
                if spec["aliases"]:
                    self.tensors[r][spec["aliases"]] = a
                else:
                    results[r].append(self.np.asarray(a).tobytes())
        return [b for r in results for b in r]


def main() -> int:
    fin, fout = sys.stdin.buffer, sys.stdout.buffer
    # Anything printed by libraries goes to stderr, never into the protocol stream.
    sys.stdout = sys.stderr
    worker = None
    while True:
        try:
            h, blobs = _receive(fin)
        except EOFError:
            return 0
        op = h.get("op")
        if op == "exit":
            return 0
        try:
            out = []
            if op == "hello":
                worker = Worker(int(h["ranks"]))
            elif worker is None:
                raise RuntimeError("the worker was not started")
            elif op == "put":
                worker.put(h, blobs)
            elif op == "load":
                worker.load(h, blobs)
            elif op == "run":
                out = worker.run(h, blobs)
            elif op == "fetch":
                out = [worker.np.asarray(worker.tensors[h["rank"]][h["name"]]).tobytes()]
            else:
                raise ValueError(f"unknown op {op!r}")
            _send(fout, {"ok": True}, out)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the caller as text
            traceback.print_exc(file=sys.stderr)
            _send(fout, {"ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    sys.exit(main())
