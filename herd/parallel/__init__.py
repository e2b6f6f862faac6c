"""Tensor and expert parallelism over torch.distributed.

One model is split over N ranks (one process and one device each): rank 0 lives in the engine
process and drives the others, which are worker processes running `herd.parallel.worker`.
Every step, rank 0 broadcasts the scheduled batch (one pickled message on a gloo group); each
rank runs the same forward on its shard (all-reduces after attention and feed-forward blocks,
logits all-gathered) and samples; rank 0's tokens are the answer.

- sizes.py    which heads, KV heads, columns, experts and vocabulary rows a rank holds
- comm.py     process groups and the collectives the model needs
- layers.py   the sharded text model (reduce hooks, vocab-parallel embedding/head, EP experts)
- loading.py  which slice of each checkpoint tensor a rank reads
- step.py     the per-step message
- worker.py   a worker rank's main loop
- executor.py rank 0: starts the workers, broadcasts each step, runs its own shard
"""
