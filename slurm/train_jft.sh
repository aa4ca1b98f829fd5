#!/bin/bash
# Xception on JFT-style multi-label data (configs/jft.yaml) with DDP: one task per GPU.
#
#   sbatch slurm/train_jft.sh                          # from the repository root
#   sbatch --nodes=8 slurm/train_jft.sh --trainer.max_epochs 5
#
# sbatch's own options (--nodes, --ntasks-per-node, --gres, --time ...) override this header;
# arguments after the script name go to the CLI. Node and device counts reach the trainer from
# SLURM's variables, never typed twice. The run lives in runs/<job name>: a requeued job -- and a
# new submission under the same --job-name -- resumes from its newest checkpoint (--ckpt_path last).
#
#SBATCH --job-name=jft
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8          # one task per GPU: equal to the count in --gres
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=14           # per GPU: 12 DataLoader workers + the training process + its pin-memory thread
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90          # 90 s before the limit, to the tasks: save hpc_ckpt_N.ckpt, requeue (RequeueOnSignal)
#SBATCH --requeue
#SBATCH --open-mode=append           # a requeued job appends to its output instead of truncating it
#SBATCH --output=slurm-%x-%j.out
#
# Cluster-specific settings, none forced here (export them before sbatch, or add them below):
#   NCCL_SOCKET_IFNAME=ib0  GLOO_SOCKET_IFNAME=ib0   interface for bootstrap / TCP traffic
#   NCCL_IB_HCA=mlx5        InfiniBand adapters for NCCL;  NCCL_DEBUG=INFO  to see what NCCL picked
#   MASTER_ADDR / MASTER_PORT  rendezvous; default: first node of the job, port 15000 + last 4 digits of the job id
#   PYTHON                  interpreter (default: python on PATH, e.g. an activated venv)
#
# Cores: --cpus-per-task covers one task's DataLoader workers, the training process and its pin-memory
# thread, so the srun line passes num_workers = SLURM_CPUS_PER_TASK - 2 (14 -> 12; a num_workers after
# the script name wins). With --model.compile true, inductor's compile workers (one per core of the
# task, TORCHINDUCTOR_COMPILE_THREADS) share these cores while the network compiles, at the first steps.

srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ${PYTHON:-python} -m xception_pl fit --config configs/jft.yaml --trainer.num_nodes "$SLURM_JOB_NUM_NODES" --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.default_root_dir "runs/$SLURM_JOB_NAME" --data.init_args.num_workers "$(( SLURM_CPUS_PER_TASK > 2 ? SLURM_CPUS_PER_TASK - 2 : 0 ))" --ckpt_path last "$@"
