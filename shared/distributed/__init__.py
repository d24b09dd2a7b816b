"""Training on several processes (chapter 06): set-up and launching, the communication
each strategy needs, and the pieces that split a ``GPT`` across processes.

Everything works on CPU processes over gloo (a laptop) and on GPUs over NCCL: the
backend follows the device. Strategies themselves (DDP, FSDP2, tensor and pipeline
parallelism, DeepSpeed ZeRO) are driven by
``chapters/06_distributed_training/train_distributed.py``; this package holds what
that script, the notebook and the tests share, one concern per module:

- ``process_group``: who this process is (``DistEnv``), joining and leaving the group;
- ``launcher``: ``torchrun`` started from Python, its log streamed, a hung job stopped;
- ``data_parallel``: each rank's batches, the gradient all-reduce by hand, clipping;
- ``tensor_parallel``: Megatron's split of the GPT with DTensor, whole weights back;
- ``pipeline``: the GPT cut into stages of blocks;
- ``accounting``: collectives counted, bytes per step and model-state memory formulas;
- ``bucketed``: DDP by hand, gradient buckets all-reduced while backward runs;
- ``zero``: ZeRO-1 and -2 by hand, optimizer state (and gradients) split over ranks;
- ``fsdp``: FSDP (ZeRO-3) by hand, each block's weights gathered only while needed;
- ``sequence_parallel``: the sequence split over ranks, ring (and Ulysses) attention.

``from shared import distributed as D`` gives all of them: ``D.launch``,
``D.clip_gradients``, ``D.GPTStage``, ...
"""

from shared.distributed.accounting import (
    RING_FACTOR,
    SHARDED,
    CollectiveLog,
    bytes_per_step,
    count_collectives,
    model_state_bytes,
)
from shared.distributed.bucketed import BucketedDDP
from shared.distributed.data_parallel import (
    allreduce_gradients,
    broadcast_parameters,
    clip_gradients,
    grad_norm,
    rank_batches,
)
from shared.distributed.fsdp import FSDPByHand
from shared.distributed.launcher import free_port, launch, torchrun_command
from shared.distributed.pipeline import GPTStage, split_layers
from shared.distributed.process_group import DistEnv, init_distributed, shutdown
from shared.distributed.sequence_parallel import (
    allreduce_sequence_gradients,
    ring_attention,
    sequence_parallel_loss,
    ulysses_attention,
)
from shared.distributed.tensor_parallel import (
    full_state_dict,
    local_numel,
    permute_qkv,
    qkv_rows_by_rank,
    tensor_parallelize,
)
from shared.distributed.zero import ShardedOptimizer

__all__ = [
    "RING_FACTOR", "SHARDED", "BucketedDDP", "CollectiveLog", "DistEnv", "FSDPByHand",
    "GPTStage", "ShardedOptimizer",
    "allreduce_sequence_gradients", "ring_attention", "sequence_parallel_loss",
    "ulysses_attention",
    "allreduce_gradients", "broadcast_parameters", "bytes_per_step", "clip_gradients",
    "count_collectives", "free_port", "full_state_dict", "grad_norm",
    "init_distributed", "launch", "local_numel", "model_state_bytes", "permute_qkv",
    "qkv_rows_by_rank", "rank_batches", "shutdown", "split_layers",
    "tensor_parallelize", "torchrun_command",
]  # fmt: skip
