"""Data-parallel training of a tied model in two processes on one host, one CPU device each.

    python two_processes.py 0 2 & python two_processes.py 1 2

Arguments: this process's id, the number of processes, and optionally the coordinator's address
(default 127.0.0.1:12355). Process 0 prints the losses and saves the trained params.
"""

import sys

import jax


process_id, num_processes = int(sys.argv[1]), int(sys.argv[2])
coordinator = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1:12355"
# First, before any other JAX call: joins the processes. jax.devices() then lists every
# process's devices; jax.local_devices() this one's.
jax.distributed.initialize(coordinator, num_processes, process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import tietransform as tt  # noqa: E402


WIDTH, LAYERS, BATCH, STEPS = 8, 4, 16, 3


def loss(params, x, y):
    for layer in params["layers"]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return jnp.mean((x - y) ** 2)


def init_layer(key):
    return {"w": jax.random.normal(key, (WIDTH, WIDTH)) / 3, "b": jnp.zeros(WIDTH)}


# Every process builds the same params from the same seed.
params = {"layers": [init_layer(k) for k in jax.random.split(jax.random.key(0), LAYERS)]}
spec = tt.TieSpec(w="layers[*].w")  # one weight for every layer; each keeps its own bias
packed = tt.pack(params, spec)
optimizer = optax.adam(1e-2)
opt_state = optimizer.init(packed)


@jax.jit
def step(packed, opt_state, x, y):
    value, grads = jax.value_and_grad(tt.tie(loss, spec))(packed, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, packed)
    return optax.apply_updates(packed, updates), opt_state, value


mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
replicated, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

# A stand-in for a data loader: each process reads only its own rows of every global batch.
rows = np.arange(BATCH).reshape(num_processes, -1)[jax.process_index()]
data = np.random.default_rng(1).standard_normal((STEPS, BATCH, WIDTH), np.float32)

if jax.process_index() == 0:
    print(f"{jax.process_count()} processes, {len(jax.devices())} devices")
with jax.set_mesh(mesh):
    # Every process holds the same values: device_put of host (NumPy) arrays makes them one
    # replicated global array. (A jax.Array on a local device would be a cross-host transfer.)
    packed, opt_state = jax.device_put(jax.device_get((packed, opt_state)), replicated)
    for i in range(STEPS):
        x = jax.make_array_from_process_local_data(by_rows, data[i, rows])
        y = jax.make_array_from_process_local_data(by_rows, np.sin(data[i, rows]))
        packed, opt_state, value = step(packed, opt_state, x, y)
        if jax.process_index() == 0:
            print(f"step {i}  loss {float(value):.9f}")  # replicated: each process holds it

# Replicated arrays are whole on every process; fetch them, then save once.
trained = jax.device_get(packed)
if jax.process_index() == 0:
    full = tt.unpack(trained, spec)
    leaves = jax.tree_util.tree_leaves_with_path(full)
    np.savez("trained.npz", **{jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves})
